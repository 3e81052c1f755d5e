"""Public-dataset adapters (trl_rewardweighted.data.adapters), mixtures, the recipe hook and `trl-rw convert --adapter`.

The fixtures are built here with the public schemas (column names, nesting, types, split names) of
`openbmb/UltraFeedback`, `HuggingFaceH4/ultrafeedback_binarized` and `Anthropic/hh-rlhf` (see docs/datasets.md) and
synthetic content. Model-free and offline.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
from datasets import Dataset, DatasetDict

from trl_rewardweighted.data.adapters import (
    ADAPTERS,
    apply_adapter,
    hh_rlhf_prompts,
    hh_rlhf_sft,
    load_mixture,
    parse_hh_transcript,
    ultrafeedback_binarized_pairs,
    ultrafeedback_binarized_rows,
    ultrafeedback_groups,
    ultrafeedback_pairs,
    ultrafeedback_rows,
)

# The fixtures hold bad rows on purpose: their counted-skip warnings are asserted where they matter (pytest.warns
# records them whatever the filter) and silenced elsewhere.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*(row|completion)\(s\) (skipped|dropped):UserWarning")

# ----------------------------------------------------------------------------------------------------------------------
# Fixtures with the public schemas
# ----------------------------------------------------------------------------------------------------------------------


def _uf_completion(model, response, ratings, overall, fine):
    """One `completions` item of openbmb/UltraFeedback; `ratings` = (helpfulness, honesty, instruction_following,
    truthfulness) as the strings the dataset stores ("N/A" allowed)."""
    h, o, i, t = ratings
    return {
        "annotations": {
            "helpfulness": {"Rating": h, "Rationale": "r", "Rationale For Rating": "rr", "Type": ["1", "2"]},
            "honesty": {"Rating": o, "Rationale": "r"},
            "instruction_following": {"Rating": i, "Rationale": "r"},
            "truthfulness": {"Rating": t, "Rationale": "r", "Rationale For Rating": "rr", "Type": ["0"]},
        },
        "critique": "c",
        "custom_system_prompt": "Be helpful.",
        "fine-grained_score": fine,
        "model": model,
        "overall_score": overall,
        "principle": "helpfulness",
        "response": response,
    }


def _uf_row(source, instruction, completions):
    return {
        "source": source,
        "instruction": instruction,
        "models": [c["model"] for c in completions],
        "completions": completions,
        "correct_answers": ["yes"],
        "incorrect_answers": ["no"],
    }


def ultrafeedback():
    """Three instructions: a clean one, one with an "N/A" rating and a tie, one with a null score."""
    rows = [
        _uf_row("evol_instruct", "Q0", [
            _uf_completion("m-a", "A0", ("5", "4", "5", "4"), 8.0, 4.5),
            _uf_completion("m-b", "B0", ("2", "2", "3", "1"), 3.0, 2.0),
            _uf_completion("m-c", "C0", ("4", "4", "4", "4"), 6.5, 4.0),
            _uf_completion("m-d", "D0", ("1", "1", "1", "1"), 1.0, 1.0),
        ]),
        _uf_row("sharegpt", "Q1", [
            _uf_completion("m-a", "A1", ("3", "N/A", "3", "3"), 7.0, 3.0),
            _uf_completion("m-b", "B1", ("3", "3", "3", "3"), 7.0, 3.0),
            _uf_completion("m-c", "C1", ("2", "2", "2", "2"), 5.0, 2.0),
            _uf_completion("m-d", "D1", ("5", "5", "5", "5"), 5.0, 5.0),
        ]),
        _uf_row("flan_v2_niv2", "Q2", [
            _uf_completion("m-a", "A2", ("3", "3", "3", "3"), None, 3.0),
            _uf_completion("m-b", "B2", ("4", "4", "4", "4"), 9.0, 4.0),
            _uf_completion("m-c", "", ("4", "4", "4", "4"), 9.5, 4.0),
            _uf_completion("m-d", "D2", ("2", "2", "2", "2"), 2.0, 2.0),
        ]),
    ]  # fmt: skip
    return Dataset.from_list(rows)


def _ufb_row(i, prompt, chosen, rejected, sc, sr):
    user = {"content": prompt, "role": "user"}
    return {
        "prompt": prompt,
        "prompt_id": f"id{i}",
        "chosen": [user, {"content": chosen, "role": "assistant"}],
        "rejected": [user, {"content": rejected, "role": "assistant"}],
        "messages": [user, {"content": chosen, "role": "assistant"}],
        "score_chosen": sc,
        "score_rejected": sr,
    }


def ultrafeedback_binarized():
    """A DatasetDict with the public split names; train_prefs holds a tie and a row with an empty response."""
    train = [
        _ufb_row(0, "P0", "good", "bad", 9.0, 4.0),
        _ufb_row(1, "P1", "fine", "also fine", 7.0, 7.0),
        _ufb_row(2, "P2", "ok", "", 8.0, 2.0),
    ]
    test = [_ufb_row(3, "P3", "yes", "no", 6.0, 1.5)]
    return DatasetDict(
        {name: Dataset.from_list(rows) for name, rows in
         [("train_prefs", train), ("test_prefs", test), ("train_sft", train), ("test_sft", test)]}
    )  # fmt: skip


HH = [
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
    "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another one?\n\nAssistant: Pear.",
    "\n\nHuman: Hi there\n\nAssistant: Hey.",  # same prompt as row 0
    "no markers at all",
    "\n\nHuman: \n\nAssistant: empty human turn",
    "\n\nHuman: Say nothing\n\nAssistant:",  # empty last assistant turn: a prompt, but no SFT row
]


def hh_rlhf():
    return Dataset.from_dict({"chosen": HH, "rejected": [t + " (worse)" for t in HH]})


def _msgs(*turns):
    roles = ["user", "assistant"]
    return [{"role": roles[k % 2], "content": text} for k, text in enumerate(turns)]


# ----------------------------------------------------------------------------------------------------------------------
# openbmb/UltraFeedback
# ----------------------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert sorted(ADAPTERS) == [
        "hh_rlhf_prompts", "hh_rlhf_sft", "ultrafeedback_binarized_pairs", "ultrafeedback_binarized_rows",
        "ultrafeedback_groups", "ultrafeedback_pairs", "ultrafeedback_rows",
    ]  # fmt: skip


def test_ultrafeedback_groups_overall():
    stats = {}
    with pytest.warns(UserWarning) as record:
        out = ultrafeedback_groups(ultrafeedback(), stats=stats)
    assert out.column_names == ["prompt", "completions", "rewards", "models", "source"]
    assert out["prompt"] == [_msgs("Q0"), _msgs("Q1"), _msgs("Q2")]
    assert out["completions"] == [["A0", "B0", "C0", "D0"], ["A1", "B1", "C1", "D1"], ["B2", "D2"]]
    assert out["rewards"] == [[8.0, 3.0, 6.5, 1.0], [7.0, 7.0, 5.0, 5.0], [9.0, 2.0]]
    assert out["models"][2] == ["m-b", "m-d"]
    assert out["source"] == ["evol_instruct", "sharegpt", "flan_v2_niv2"]
    assert stats == {
        "rows_in": 3,
        "rows_out": 3,
        "skipped": {},
        "dropped_completions": {"`overall_score` is missing (null / NaN)": 1, "the response is empty": 1},
    }
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "ultrafeedback_groups: 1 completion(s) dropped: `overall_score` is missing (null / NaN) (row 2 completion 0).",
        "ultrafeedback_groups: 1 completion(s) dropped: the response is empty (row 2 completion 2).",
    ]


def test_ultrafeedback_groups_mean_aspects_drops_na_and_messages():
    stats = {}
    with pytest.warns(UserWarning, match=r"1 completion\(s\) dropped: a rating is 'N/A' \(row 1 completion 0\)"):
        out = ultrafeedback_groups(ultrafeedback(), score="mean_aspects", completions_as="messages", stats=stats)
    assert out["rewards"] == [[4.5, 2.0, 4.0, 1.0], [3.0, 2.0, 5.0], [3.0, 4.0, 2.0]]
    assert out["completions"][1] == [_msgs("", "B1")[1:], _msgs("", "C1")[1:], _msgs("", "D1")[1:]]
    assert stats["dropped_completions"] == {"a rating is 'N/A'": 1, "the response is empty": 1}


def test_ultrafeedback_groups_fine_grained_string_prompt_and_min_completions():
    stats = {}
    with pytest.warns(UserWarning, match=r"1 row\(s\) skipped: fewer than 4 scored completion\(s\) left \(row 2\)"):
        out = ultrafeedback_groups(
            ultrafeedback(), score="fine_grained", conversational=False, min_completions=4, stats=stats
        )
    assert out["prompt"] == ["Q0", "Q1"]
    assert out["rewards"] == [[4.5, 2.0, 4.0, 1.0], [3.0, 3.0, 2.0, 5.0]]
    assert stats["skipped"] == {"fewer than 4 scored completion(s) left": 1}


def test_ultrafeedback_rows_all_and_best_only():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = ultrafeedback_rows(ultrafeedback())
        best = ultrafeedback_rows(ultrafeedback(), best_only=True, conversational=False, seed=0)
    assert rows.column_names == ["prompt", "completion", "reward", "model", "source"]
    assert len(rows) == 10
    assert rows[0] == {
        "prompt": _msgs("Q0"), "completion": [{"role": "assistant", "content": "A0"}], "reward": 8.0,
        "model": "m-a", "source": "evol_instruct",
    }  # fmt: skip
    assert rows["reward"] == [8.0, 3.0, 6.5, 1.0, 7.0, 7.0, 5.0, 5.0, 9.0, 2.0]
    assert best["prompt"] == ["Q0", "Q1", "Q2"]
    assert best["completion"][0] == "A0" and best["completion"][2] == "B2"
    assert best["completion"][1] in ("A1", "B1")  # the tie at 7.0, broken by the seed
    assert best["reward"] == [8.0, 7.0, 9.0]


def test_ultrafeedback_pairs_strategies_and_ties():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bw = ultrafeedback_pairs(ultrafeedback(), strategy="best_worst")
        rnd = ultrafeedback_pairs(ultrafeedback(), strategy="best_random", seed=3)
        allp = ultrafeedback_pairs(ultrafeedback(), strategy="all_pairs", conversational=False)
    assert bw.column_names == [
        "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "chosen_model", "rejected_model", "source",
    ]  # fmt: skip
    assert list(zip(bw["score_chosen"], bw["score_rejected"])) == [(8.0, 1.0), (7.0, 5.0), (9.0, 2.0)]
    assert bw["chosen"][0] == [{"role": "assistant", "content": "A0"}]
    assert bw["rejected_model"][0] == "m-d"
    for sc, sr in zip(rnd["score_chosen"], rnd["score_rejected"]):
        assert sc > sr  # ties='drop': never a tied pair
    assert rnd["score_chosen"] == [8.0, 7.0, 9.0]
    # all_pairs on Q1 (7, 7, 5, 5): the 4 pairs across the two levels; ties dropped.
    q1 = [(c, r) for p, c, r in zip(allp["prompt"], allp["chosen"], allp["rejected"]) if p == "Q1"]
    assert sorted(q1) == [("A1", "C1"), ("A1", "D1"), ("B1", "C1"), ("B1", "D1")]
    assert len(allp) == 6 + 4 + 1


def test_ultrafeedback_pairs_all_tied_group_is_a_counted_skip():
    ds = Dataset.from_list([
        _uf_row("s", "T", [_uf_completion("a", "x", ("3",) * 4, 5.0, 3.0),
                           _uf_completion("b", "y", ("3",) * 4, 5.0, 3.0)]),
        _uf_row("s", "U", [_uf_completion("a", "x", ("3",) * 4, 6.0, 3.0),
                           _uf_completion("b", "y", ("3",) * 4, 5.0, 3.0)]),
    ])  # fmt: skip
    stats = {}
    with pytest.warns(UserWarning, match=r"1 row\(s\) skipped: all scores tie \(ties='drop'\) \(row 0\)"):
        out = ultrafeedback_pairs(ds, stats=stats)
    assert out["score_chosen"] == [6.0] and stats["rows_out"] == 1
    kept = ultrafeedback_pairs(ds, ties="keep")
    assert kept["score_chosen"] == [5.0, 6.0] and kept["score_rejected"] == [5.0, 5.0]


def test_ultrafeedback_missing_column_lists_the_schema():
    with pytest.raises(ValueError, match=r"ultrafeedback_groups: the dataset has no column\(s\) \['completions'\].*"
                                         r"openbmb/UltraFeedback: `instruction` \(str\)"):  # fmt: skip
        ultrafeedback_groups(Dataset.from_dict({"instruction": ["q"]}))


def test_ultrafeedback_structural_errors_name_row_and_column():
    bad_rating = Dataset.from_list([_uf_row("s", "Q", [_uf_completion("a", "x", ("3", "three", "3", "3"), 5.0, 3.0)])])
    with pytest.raises(ValueError, match=r"Row 0, `completions`\[0\]: `annotations.honesty.Rating` is 'three'"):
        ultrafeedback_groups(bad_rating, score="mean_aspects")
    bool_score = [_uf_row("s", "Q", [_uf_completion("a", "x", ("3",) * 4, 5.0, 3.0)])]
    bool_score[0]["completions"][0]["overall_score"] = True
    with pytest.raises(ValueError, match=r"Row 0, `completions`\[0\]: `overall_score` True \(bool\) is not a number"):
        ultrafeedback_groups(Dataset.from_list(bool_score))
    no_response = Dataset.from_dict({"instruction": ["Q"], "completions": [[{"model": "a", "overall_score": 1.0}]]})
    with pytest.raises(ValueError, match=r"Row 0, `completions`\[0\]: the completion has no `response` key"):
        ultrafeedback_rows(no_response)
    with pytest.raises(ValueError, match=r"ultrafeedback_groups: unknown score 'mean'; choose one of"):
        ultrafeedback_groups(ultrafeedback(), score="mean")


def test_all_rows_unusable_is_an_error_naming_the_reasons():
    ds = Dataset.from_list([_uf_row("s", "Q", [_uf_completion("a", "x", ("N/A",) * 4, 5.0, 3.0)])])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"ultrafeedback_groups: no row left out of 1 "
                                                                    r"\(skipped: \{'fewer than 2 scored"):  # fmt: skip
        ultrafeedback_groups(ds, score="mean_aspects")


# ----------------------------------------------------------------------------------------------------------------------
# HuggingFaceH4/ultrafeedback_binarized
# ----------------------------------------------------------------------------------------------------------------------


def test_ultrafeedback_binarized_pairs():
    stats = {}
    with pytest.warns(UserWarning, match=r"1 row\(s\) skipped: an empty chosen / rejected response \(row 2\)"):
        out = ultrafeedback_binarized_pairs(ultrafeedback_binarized()["train_prefs"], stats=stats)
    assert out.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "prompt_id"]
    assert out[0] == {
        "prompt": _msgs("P0"), "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}], "score_chosen": 9.0, "score_rejected": 4.0,
        "prompt_id": "id0",
    }  # fmt: skip
    assert out["prompt_id"] == ["id0", "id1"]  # the tie is kept by default
    assert stats == {"rows_in": 3, "rows_out": 2, "skipped": {"an empty chosen / rejected response": 1},
                     "dropped_completions": {}}  # fmt: skip
    with pytest.warns(UserWarning, match=r"score_chosen equals score_rejected \(ties='drop'\) \(row 1\)"):
        dropped = ultrafeedback_binarized_pairs(ultrafeedback_binarized()["train_prefs"], ties="drop")
    assert dropped["prompt_id"] == ["id0"]
    strings = ultrafeedback_binarized_pairs(ultrafeedback_binarized()["test_prefs"], conversational=False)
    assert strings[0]["prompt"] == "P3" and strings[0]["chosen"] == "yes" and strings[0]["rejected"] == "no"


def test_ultrafeedback_binarized_rows():
    with pytest.warns(UserWarning):
        out = ultrafeedback_binarized_rows(ultrafeedback_binarized()["train_prefs"], conversational=False)
    assert out.to_dict() == {
        "prompt": ["P0", "P0", "P1", "P1"],
        "completion": ["good", "bad", "fine", "also fine"],
        "reward": [9.0, 4.0, 7.0, 7.0],
        "prompt_id": ["id0", "id0", "id1", "id1"],
    }


def test_ultrafeedback_binarized_errors():
    ds = ultrafeedback_binarized()["test_prefs"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['score_chosen', 'score_rejected'\].*train_prefs"):
        ultrafeedback_binarized_pairs(ds.remove_columns(["score_chosen", "score_rejected"]))
    swapped = ds.map(lambda r: {"chosen": list(reversed(r["chosen"]))})
    with pytest.raises(ValueError, match=r"Row 0: the last message of `chosen` must be an assistant message"):
        ultrafeedback_binarized_pairs(swapped)
    as_text = ds.remove_columns("rejected").add_column("rejected", ["plain"])
    with pytest.raises(ValueError, match=r"Row 0: `rejected` must be a list of messages"):
        ultrafeedback_binarized_rows(as_text)


# ----------------------------------------------------------------------------------------------------------------------
# Anthropic/hh-rlhf
# ----------------------------------------------------------------------------------------------------------------------


def test_parse_hh_transcript():
    assert parse_hh_transcript(HH[1]) == (_msgs("Name a fruit.", "Apple.", "Another one?", "Pear."), "")
    assert parse_hh_transcript(HH[3]) == (None, "no 'Human:' / 'Assistant:' markers")
    assert parse_hh_transcript(HH[4]) == (None, "an empty turn")
    assert parse_hh_transcript(HH[5]) == (None, "an empty turn")
    assert parse_hh_transcript(HH[5], allow_empty_last=True)[0] == _msgs("Say nothing", "")
    assert parse_hh_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")[1] == "the turns do not alternate " \
                                                                                 "Human / Assistant"  # fmt: skip
    assert parse_hh_transcript("\n\nAssistant: a")[1] == "the first turn is not 'Human:'"
    assert parse_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nHuman: c")[1] == "the last turn is not 'Assistant:'"


def test_hh_rlhf_prompts_dedupes_and_counts():
    stats = {}
    with pytest.warns(UserWarning) as record:
        out = hh_rlhf_prompts(hh_rlhf(), stats=stats)
    assert out["prompt"] == [_msgs("Hi there"), _msgs("Name a fruit.", "Apple.", "Another one?"), _msgs("Say nothing")]
    assert stats["skipped"] == {
        "duplicate prompt (dedupe=True)": 1,
        "malformed `chosen` transcript: no 'Human:' / 'Assistant:' markers": 1,
        "malformed `chosen` transcript: an empty turn": 1,
    }
    assert "hh_rlhf_prompts: 1 row(s) skipped: malformed `chosen` transcript: an empty turn (row 4)." in [
        str(w.message) for w in record
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = hh_rlhf_prompts(hh_rlhf(), conversational=False, dedupe=False)
    assert text["prompt"][:3] == [
        "\n\nHuman: Hi there\n\nAssistant:",
        "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another one?\n\nAssistant:",
        "\n\nHuman: Hi there\n\nAssistant:",
    ]


def test_hh_rlhf_sft():
    stats = {}
    with pytest.warns(UserWarning, match=r"2 row\(s\) skipped: malformed `chosen` transcript: an empty turn "
                                         r"\(row 4, row 5\)"):  # fmt: skip
        out = hh_rlhf_sft(hh_rlhf(), stats=stats)
    assert out["prompt"] == [_msgs("Hi there"), _msgs("Name a fruit.", "Apple.", "Another one?"), _msgs("Hi there")]
    assert out["completion"] == [
        [{"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "assistant", "content": "Pear."}],
        [{"role": "assistant", "content": "Hey."}],
    ]
    assert stats["rows_out"] == 3 and stats["rows_in"] == 6
    with pytest.raises(
        ValueError, match=r"hh_rlhf_sft: the dataset has no column\(s\) \['chosen'\].*Anthropic/hh-rlhf"
    ):
        hh_rlhf_sft(Dataset.from_dict({"text": ["x"]}))


# ----------------------------------------------------------------------------------------------------------------------
# apply_adapter, mixtures
# ----------------------------------------------------------------------------------------------------------------------


def test_apply_adapter_validates_name_and_options():
    with pytest.raises(
        ValueError, match=r"Unknown dataset adapter 'ultrafeedback'; choose one of \['hh_rlhf_prompts'"
    ):
        apply_adapter(hh_rlhf(), "ultrafeedback")
    with pytest.raises(ValueError, match=r"'hh_rlhf_sft' has no option\(s\) \['score'\]; its options are "
                                         r"\['conversational', 'stats'\]"):  # fmt: skip
        apply_adapter(hh_rlhf(), "hh_rlhf_sft", {"score": "overall"})
    with pytest.raises(ValueError, match=r"dataset_adapter_kwargs: not valid JSON"):
        apply_adapter(hh_rlhf(), "hh_rlhf_sft", "{score")
    with pytest.raises(ValueError, match=r"`conversational` must be true or false, got 'no'"):
        apply_adapter(hh_rlhf(), "hh_rlhf_sft", '{"conversational": "no"}')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = apply_adapter(ultrafeedback_binarized(), "ultrafeedback_binarized_rows", '{"conversational": false}')
    assert isinstance(out, DatasetDict) and out["test_prefs"]["completion"] == ["yes", "no"]


def _write(ds, path):
    ds.to_json(path)
    return str(path)


def test_load_mixture_handbook_form_with_adapters(tmp_path):
    ufb = tmp_path / "ufb"
    ultrafeedback_binarized().save_to_disk(str(ufb))
    local_pairs = Dataset.from_dict({
        "prompt": [_msgs(f"L{k}") for k in range(4)],
        "chosen": [[{"role": "assistant", "content": f"c{k}"}] for k in range(4)],
        "rejected": [[{"role": "assistant", "content": f"r{k}"}] for k in range(4)],
        "score_chosen": [1.0, 2.0, 3.0, 4.0], "score_rejected": [0.0, 0.0, 0.0, 0.0],
    })  # fmt: skip
    config = {
        "datasets": [
            {"id": str(ufb), "split": "train_prefs", "adapter": "ultrafeedback_binarized_pairs",
             "columns": ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]},
            {"id": _write(local_pairs, tmp_path / "pairs.jsonl"), "weight": 0.5},
        ],
        "seed": 7,
    }  # fmt: skip
    with pytest.warns(UserWarning):
        train, test = load_mixture(config)
    assert test is None
    assert len(train) == 2 + 2
    assert train["prompt"][:2] == [_msgs("P0"), _msgs("P1")]
    expected = local_pairs.shuffle(seed=7).select(range(2))["prompt"]
    assert train["prompt"][2:] == expected
    config["test_split_size"] = 0.25
    with pytest.warns(UserWarning):
        train, test = load_mixture(config)
    assert (len(train), len(test)) == (3, 1)


def test_load_mixture_trl_form_fractions(tmp_path):
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig

    a = _write(Dataset.from_dict({"prompt": [f"a{k}" for k in range(10)]}), tmp_path / "a.jsonl")
    b = _write(Dataset.from_dict({"prompt": [f"b{k}" for k in range(4)]}), tmp_path / "b.jsonl")
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path=a, fraction=0.5), DatasetConfig(path=b, fraction=0.5)])
    train, test = load_mixture(mixture)
    # TRL's rule: shares 1/2 each, the largest mixture that oversamples nothing has 8 rows (4 of b), first rows kept.
    assert train["prompt"] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"] and test is None


def test_load_mixture_errors(tmp_path):
    a = _write(Dataset.from_dict({"prompt": ["x", "y"]}), tmp_path / "a.jsonl")
    b = _write(Dataset.from_dict({"text": ["z"]}), tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match=r"entry 0: unknown key\(s\) \['wieght'\]; allowed: \['id', 'config'"):
        load_mixture({"datasets": [{"id": a, "wieght": 0.5}]})
    with pytest.raises(ValueError, match=r"entry 0 \(.*a.jsonl\): `weight` is the share of its rows kept and must be "
                                         r"in \(0, 1\], got 2.0"):  # fmt: skip
        load_mixture({"datasets": [{"id": a, "weight": 2}]})
    with pytest.raises(ValueError, match=r"`fraction` must be set for every entry or for none"):
        load_mixture({"datasets": [{"path": a, "fraction": 0.5}, {"path": b}]})
    with pytest.raises(ValueError, match=r"use one form for every entry"):
        load_mixture({"datasets": [{"path": a}, {"id": b}]})
    with pytest.raises(ValueError, match=r"do not share one schema.*a.jsonl: \['prompt'\]; .*b.jsonl: \['text'\]"):
        load_mixture({"datasets": [{"id": a}, {"id": b}]})
    with pytest.raises(ValueError, match=r"has no split 'test_prefs' \(splits: \['train'\]\)"):
        ds_dir = tmp_path / "dd"
        DatasetDict({"train": Dataset.from_dict({"prompt": ["x"]})}).save_to_disk(str(ds_dir))
        load_mixture({"datasets": [{"id": str(ds_dir), "split": "test_prefs"}]})


# ----------------------------------------------------------------------------------------------------------------------
# Recipe hook and CLI
# ----------------------------------------------------------------------------------------------------------------------


def _recipe(tmp_path, body: str):
    path = tmp_path / "recipe.yaml"
    path.write_text("model_name_or_path: some/model\noutput_dir: " + str(tmp_path / "out") + "\n" + body)
    return ["--config", str(path), "--use_cpu", "true", "--report_to", "none", "--bf16", "false"]


def test_recipe_dataset_adapter_parses_and_loads(tmp_path):
    from trl_rewardweighted.scripts.train import load_splits, make_parser

    data = _write(hh_rlhf(), tmp_path / "hh.jsonl")
    args = _recipe(tmp_path, f"dataset_name: {data}\ndataset_adapter: hh_rlhf_sft\n"
                             "dataset_adapter_kwargs:\n  conversational: false\n")  # fmt: skip
    script_args, _, _, mixture_args = make_parser("var").parse_args_and_config(args=args, fail_with_unknown_args=True)
    assert script_args.dataset_adapter == "hh_rlhf_sft"
    assert script_args.dataset_adapter_kwargs == {"conversational": False}
    with pytest.warns(UserWarning, match="hh_rlhf_sft: 2 row"):
        train, test = load_splits(script_args, mixture_args)
    assert test is None and train.column_names == ["prompt", "completion"]
    assert train["completion"] == [" Hello! How can I help?", " Pear.", " Hey."]
    # The same option from the command line, as JSON.
    script_args = make_parser("var").parse_args_and_config(
        args=[*args, "--dataset_adapter_kwargs", '{"conversational": true}'], fail_with_unknown_args=True
    )[0]
    assert script_args.dataset_adapter_kwargs == {"conversational": True}


def test_recipe_rejects_unknown_adapter_and_both_sources(tmp_path):
    from trl_rewardweighted.scripts.train import load_splits, make_parser

    args = _recipe(tmp_path, "dataset_name: x.jsonl\ndataset_adapter: ultrafeedback\n")
    with pytest.raises(ValueError, match=r"dataset_adapter: unknown adapter 'ultrafeedback'; choose one of"):
        make_parser("vcb").parse_args_and_config(args=args, fail_with_unknown_args=True)
    data = _write(Dataset.from_dict({"prompt": ["x"]}), tmp_path / "p.jsonl")
    args = _recipe(tmp_path, f"dataset_name: {data}\ndataset_mixture:\n  datasets:\n    - id: {data}\n")
    parsed = make_parser("vcb").parse_args_and_config(args=args, fail_with_unknown_args=True)
    with pytest.raises(ValueError, match=r"Set either `dataset_name` or a mixture"):
        load_splits(parsed[0], parsed[3])


def test_recipe_mixtures_both_forms(tmp_path):
    from trl_rewardweighted.scripts.train import load_splits, make_parser

    a = _write(Dataset.from_dict({"prompt": [f"a{k}" for k in range(4)]}), tmp_path / "a.jsonl")
    b = _write(hh_rlhf(), tmp_path / "hh.jsonl")
    handbook = _recipe(tmp_path, f"dataset_mixture:\n  datasets:\n    - id: {a}\n    - id: {b}\n"
                                 "      adapter: hh_rlhf_prompts\n      adapter_kwargs: {{conversational: false}}\n"
                                 "  seed: 1\n".replace("{{", "{").replace("}}", "}"))  # fmt: skip
    parsed = make_parser("reward_augmented_dpo").parse_args_and_config(args=handbook, fail_with_unknown_args=True)
    with pytest.warns(UserWarning):
        train, test = load_splits(parsed[0], parsed[3])
    assert train["prompt"][:5] == ["a0", "a1", "a2", "a3", "\n\nHuman: Hi there\n\nAssistant:"] and len(train) == 7
    trl_form = _recipe(tmp_path, f"datasets:\n  - path: {a}\n    fraction: 1.0\ntest_split_size: 0.5\n")
    parsed = make_parser("reward_augmented_dpo").parse_args_and_config(args=trl_form, fail_with_unknown_args=True)
    train, test = load_splits(parsed[0], parsed[3])
    assert sorted(list(train["prompt"]) + list(test["prompt"])) == ["a0", "a1", "a2", "a3"] and len(test) == 2


def test_cli_convert_adapter(tmp_path, capsys):
    from trl_rewardweighted.cli import main

    src = tmp_path / "uf"
    DatasetDict({"train": ultrafeedback()}).save_to_disk(str(src))
    out = tmp_path / "groups.jsonl"
    argv = ["convert", "--adapter", "ultrafeedback_groups", "--adapter-kwargs", '{"score": "fine_grained"}',
            "--input", str(src), "--output", str(out)]  # fmt: skip
    with pytest.warns(UserWarning):
        assert main(argv) == 0
    assert "convert: wrote 3 groups (ultrafeedback_groups) to" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[2]["rewards"] == [3.0, 4.0, 2.0] and rows[0]["prompt"] == _msgs("Q0")
    # Adapter then a shape conversion: groups -> pairs.
    pairs = tmp_path / "pairs.jsonl"
    with pytest.warns(UserWarning):
        assert main(["convert", "--adapter", "ultrafeedback_groups", "--to", "pairs", "--input", str(src),
                     "--output", str(pairs)]) == 0  # fmt: skip
    assert [json.loads(line)["score_chosen"] for line in pairs.read_text().splitlines()] == [8.0, 7.0, 9.0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter", "nope"], "Unknown dataset adapter 'nope'"),
        (["--adapter", "ultrafeedback_groups", "--adapter-kwargs", "[1]"], "must be a mapping"),
        (["--adapter", "hh_rlhf_sft"], r"hh_rlhf_sft: the dataset has no column\(s\) \['chosen'\]"),
        ([], "Give --to"),
    ],
)
def test_cli_convert_adapter_errors(tmp_path, capsys, argv, message):
    from trl_rewardweighted.cli import main

    src = _write(Dataset.from_dict({"prompt": ["x"]}), tmp_path / "p.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *argv, "--input", src, "--output", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of the fixture
    assert err.startswith("trl-rw convert: error:") and __import__("re").search(message, err)
    assert not (tmp_path / "o.jsonl").exists()


def test_nan_is_not_silently_a_reward():
    """A NaN fine-grained score is a counted drop, never a NaN in `rewards`."""
    ds = Dataset.from_list([_uf_row("s", "Q", [_uf_completion("a", "x", ("3",) * 4, 5.0, math.nan),
                                               _uf_completion("b", "y", ("3",) * 4, 5.0, 2.0),
                                               _uf_completion("c", "z", ("3",) * 4, 5.0, 1.0)])])  # fmt: skip
    with pytest.warns(UserWarning, match="`fine-grained_score` is missing"):
        out = ultrafeedback_groups(ds, score="fine_grained")
    assert out["rewards"] == [[2.0, 1.0]]
