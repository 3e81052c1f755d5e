"""Sampling, scoring, the demo reward and the dataset-shape converters (tiny offline models; one slow SmolLM2 test)."""

import json
import math
import re
import sys
import time

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_rewardweighted.data.convert import (
    detect_shape,
    groups_to_pairs,
    groups_to_rows,
    load_dataset_any,
    rows_to_groups,
    save_dataset,
    save_datasets,
)
from trl_rewardweighted.rewards import vader_positivity
from trl_rewardweighted.sampling import (
    RewardModelScorer,
    generate_completions,
    load_scorer,
    score_completions,
)

STRING_PROMPTS = ["Hello there", "Tell me a short story about a cat.", "Why?"]
CHAT_PROMPTS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "Tell me a short story about a cat."}],
]


def length_reward(prompts, completions):
    """A `module:function` scorer for the tests: the completion's length."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def tiny_rm(tiny_reward_model_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_path).eval()
    return model, AutoTokenizer.from_pretrained(tiny_reward_model_path)


def _generate(tiny_lm, prompts, **kwargs):
    model, tokenizer = tiny_lm
    kwargs = {"n": 3, "max_new_tokens": 6, "progress": False, **kwargs}
    return generate_completions(model, prompts, tokenizer=tokenizer, **kwargs)


def _nan_equal(a, b):
    """Deep equality where NaN == NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    return a == b


# ----------------------------------------------------------------------------------------------------------------------
# generate_completions
# ----------------------------------------------------------------------------------------------------------------------


def test_n_completions_per_prompt_string_prompts(tiny_lm):
    ds = _generate(tiny_lm, STRING_PROMPTS, n=3, batch_size=2)  # 2 batches, the last one partial
    assert ds.column_names == ["prompt", "completions"]
    assert ds["prompt"] == STRING_PROMPTS
    assert all(len(group) == 3 and all(isinstance(c, str) for c in group) for group in ds["completions"])
    # a random tiny model samples different texts for the same prompt
    assert len(set(ds["completions"][0])) > 1


def test_same_seed_same_output_different_seed_differs(tiny_lm):
    a = _generate(tiny_lm, STRING_PROMPTS, seed=3)["completions"]
    b = _generate(tiny_lm, STRING_PROMPTS, seed=3)["completions"]
    c = _generate(tiny_lm, STRING_PROMPTS, seed=4)["completions"]
    assert a == b
    assert a != c


def test_generation_leaves_global_rng_untouched(tiny_lm):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _generate(tiny_lm, STRING_PROMPTS[:1])
    assert torch.equal(torch.rand(3), expected)


def test_conversational_prompts_keep_their_shape(tiny_lm):
    ds = _generate(tiny_lm, CHAT_PROMPTS, n=2)
    assert list(ds["prompt"]) == CHAT_PROMPTS
    assert all(len(g) == 2 and all(isinstance(c, str) for c in g) for g in ds["completions"])


def _manual_greedy(model, tokenizer, messages, max_new_tokens):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_temperature_zero_is_greedy_and_matches_manual_generate(tiny_lm):
    model, tokenizer = tiny_lm
    # two prompts of different lengths in one batch: left padding must not change the greedy continuation
    ds = _generate(tiny_lm, STRING_PROMPTS[:2], n=2, temperature=0, max_new_tokens=8)
    for prompt, group in zip(STRING_PROMPTS[:2], ds["completions"]):
        expected = _manual_greedy(model, tokenizer, [{"role": "user", "content": prompt}], 8)
        assert group == [expected, expected]


def test_system_prompt_is_used_for_generation_only(tiny_lm):
    model, tokenizer = tiny_lm
    ds = _generate(tiny_lm, STRING_PROMPTS[:1], n=1, temperature=0, max_new_tokens=8, system_prompt="Be kind.")
    assert ds["prompt"] == STRING_PROMPTS[:1]
    assert ds["system_prompt"] == ["Be kind."]
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": STRING_PROMPTS[0]}]
    assert ds["completions"][0] == [_manual_greedy(model, tokenizer, messages, 8)]


def test_model_path_gives_same_output_as_loaded_model(tiny_lm, tiny_model_path):
    from_path = generate_completions(tiny_model_path, STRING_PROMPTS, n=2, max_new_tokens=6, progress=False)
    loaded = _generate(tiny_lm, STRING_PROMPTS, n=2)
    assert from_path["completions"] == loaded["completions"]


def test_no_chat_template_uses_raw_string(tiny_lm, tiny_model_path):
    from transformers import AutoTokenizer

    model, _ = tiny_lm
    plain = AutoTokenizer.from_pretrained(tiny_model_path)
    plain.chat_template = None
    ds = generate_completions(model, ["Hello"], n=1, tokenizer=plain, temperature=0, max_new_tokens=5, progress=False)
    enc = plain("Hello", return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=plain.pad_token_id)
    assert ds["completions"][0] == [plain.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    with pytest.raises(ValueError, match="no chat_template"):
        generate_completions(model, CHAT_PROMPTS, tokenizer=plain, progress=False)


def test_prompts_dataset_keeps_extra_columns(tiny_lm):
    prompts = Dataset.from_dict({"prompt": STRING_PROMPTS[:2], "id": [7, 8]})
    ds = _generate(tiny_lm, prompts, n=2)
    assert ds.column_names == ["prompt", "id", "completions"]
    assert ds["id"] == [7, 8]


def test_generation_argument_errors(tiny_lm, tiny_model_path):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="n must be"):
        _generate(tiny_lm, STRING_PROMPTS, n=0)
    with pytest.raises(ValueError, match="Prompt 1"):
        _generate(tiny_lm, [CHAT_PROMPTS[0], "plain"])
    with pytest.raises(ValueError, match="pass its `tokenizer`"):
        generate_completions(model, STRING_PROMPTS, progress=False)
    with pytest.raises(ValueError, match="Unknown backend"):
        _generate(tiny_lm, STRING_PROMPTS, backend="tgi")
    with pytest.raises(ValueError, match="list of prompts"):
        _generate(tiny_lm, "a single string")


def test_forced_vllm_backend_without_vllm_is_a_clear_import_error(tiny_model_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match="pip install vllm"):
        generate_completions(tiny_model_path, STRING_PROMPTS, backend="vllm", progress=False)


@pytest.fixture
def fake_vllm(monkeypatch, tiny_tokenizer):
    """A stand-in `vllm` module that records the calls (the real vLLM needs a CUDA GPU and is not installed here).
    Its replies are the sampled ids of the text `p<prompt>-s<sample>` followed by EOS, as vLLM returns them."""
    import importlib.machinery
    import types

    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            calls["prompts"], calls["params"] = prompts, [p.kwargs for p in params]

            def completion(text):
                ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
                return types.SimpleNamespace(text=text, token_ids=ids)

            return [
                types.SimpleNamespace(outputs=[completion(f"p{i}-s{j}") for j in range(p.kwargs["n"])])
                for i, p in enumerate(params)
            ]

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


def test_vllm_backend_call_shape(fake_vllm, tiny_model_path, tiny_tokenizer):
    ds = generate_completions(
        tiny_model_path,
        CHAT_PROMPTS,
        n=3,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=5,
        seed=4,
        backend="vllm",
        vllm_kwargs={"gpu_memory_utilization": 0.5},
        progress=False,
    )
    assert ds["completions"] == [["p0-s0", "p0-s1", "p0-s2"], ["p1-s0", "p1-s1", "p1-s2"]]
    assert fake_vllm["init"] == {"model": tiny_model_path, "seed": 4, "gpu_memory_utilization": 0.5}
    expected_ids = [
        tiny_tokenizer(
            tiny_tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        for p in CHAT_PROMPTS
    ]
    assert fake_vllm["prompts"] == [{"prompt_token_ids": ids} for ids in expected_ids]
    assert fake_vllm["params"] == [
        {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "seed": 4 + i} for i in range(2)
    ]
    greedy = generate_completions(
        tiny_model_path, CHAT_PROMPTS[:1], n=2, temperature=0, backend="vllm", progress=False
    )
    assert fake_vllm["params"][0]["n"] == 1 and greedy["completions"] == [["p0-s0", "p0-s0"]]


def test_auto_backend_picks_vllm_only_with_a_gpu_and_a_path(fake_vllm, monkeypatch, tiny_lm):
    from trl_rewardweighted.sampling import resolve_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "some/model") == "transformers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "some/model") == "vllm"
    assert resolve_backend("auto", tiny_lm[0]) == "transformers"
    assert resolve_backend("transformers", "some/model") == "transformers"


# ----------------------------------------------------------------------------------------------------------------------
# score_completions
# ----------------------------------------------------------------------------------------------------------------------


def _manual_rm_score(model, tokenizer, text, add_special_tokens):
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0, 0].item()


@pytest.mark.parametrize("prompts", [STRING_PROMPTS[:2], CHAT_PROMPTS], ids=["string", "conversational"])
def test_reward_model_scores_match_manual_forward(tiny_rm, tiny_reward_model_path, prompts):
    model, tokenizer = tiny_rm
    groups = [
        ["Sure, here you go.", "no", "A much longer completion about cats and dogs."],
        ["ok", "Once upon a time"],
    ]
    ds = Dataset.from_dict({"prompt": prompts, "completions": groups})
    scored = score_completions(ds, tiny_reward_model_path, batch_size=2, progress=False)  # batches cross groups
    for prompt, group, rewards in zip(prompts, groups, scored["rewards"]):
        assert len(rewards) == len(group)
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        for completion, reward in zip(group, rewards):
            text = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": completion}], tokenize=False
            )
            assert reward == pytest.approx(_manual_rm_score(model, tokenizer, text, False), abs=1e-5)


def test_loaded_reward_model_without_chat_template_scores_plain_concatenation(tiny_rm, tiny_reward_model_path):
    from transformers import AutoTokenizer

    model, _ = tiny_rm
    plain = AutoTokenizer.from_pretrained(tiny_reward_model_path)
    plain.chat_template = None
    scorer = load_scorer(model, tokenizer=plain)
    assert isinstance(scorer, RewardModelScorer)
    assert scorer.render("Q: hi. A:", " hello") == "Q: hi. A: hello"
    scores = scorer(["Q: hi. A:", "Q: why? A:"], [" hello", " because it is so"])
    for text, score in zip(["Q: hi. A: hello", "Q: why? A: because it is so"], scores):
        assert score == pytest.approx(_manual_rm_score(model, plain, text, True), abs=1e-5)
    with pytest.raises(ValueError, match="no chat_template"):
        scorer(CHAT_PROMPTS[:1], ["x"])


def test_reward_model_with_several_labels_is_rejected(tiny_model_path):
    with pytest.raises(ValueError, match="num_labels=1"):
        load_scorer(tiny_model_path)  # a causal LM loads as a 2-label classifier


def test_callable_and_module_function_scorers():
    ds = Dataset.from_dict({"prompt": ["a", "b"], "completions": [["x", "yyy"], ["zz"]]})
    by_callable = score_completions(ds, length_reward, progress=False)
    by_name = score_completions(ds, "tests.test_sampling:length_reward", batch_size=1, progress=False)
    assert by_callable["rewards"] == by_name["rewards"] == [[1.0, 3.0], [2.0]]
    assert by_callable.column_names == ["prompt", "completions", "rewards"]
    custom = score_completions(ds, length_reward, progress=False, reward_column="len")
    assert custom["len"] == [[1.0, 3.0], [2.0]]


def test_callable_receives_prompts_as_stored():
    seen = []

    def spy(prompts, completions):
        seen.extend(prompts)
        return [0.0] * len(completions)

    score_completions(Dataset.from_dict({"prompt": CHAT_PROMPTS, "completions": [["a"], ["b"]]}), spy, progress=False)
    assert seen == CHAT_PROMPTS


def test_scorer_spec_errors():
    ds = Dataset.from_dict({"prompt": ["a"], "completions": [["x", "y"]]})
    with pytest.raises(ValueError, match="cannot be imported"):
        load_scorer("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        load_scorer("trl_rewardweighted.rewards:nope")
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        score_completions(ds, lambda p, c: [1.0], progress=False)
    with pytest.raises(ValueError, match=r"completion 0: score 'high' \(str\) is not a number"):
        score_completions(ds, lambda p, c: ["high", 1.0], progress=False)
    with pytest.raises(ValueError, match=r"The scorer returned float \(0.5\); it must return a list of floats"):
        score_completions(ds, lambda p, c: 0.5, progress=False)
    with pytest.raises(ValueError, match="columns found"):
        score_completions(Dataset.from_dict({"text": ["a"]}), length_reward, progress=False)


@pytest.mark.parametrize(
    "bad, shown",
    [
        ("0.5", "'0.5' (str)"),
        (True, "True (bool)"),
        (np.bool_(False), "False (bool)"),
        (torch.tensor(True), "True (bool)"),
        ([1.0], "[1.0] (list)"),
        (1j, "1j (complex)"),
    ],
)
def test_scores_must_be_real_numbers(bad, shown):
    ds = Dataset.from_dict({"prompt": ["a", "b"], "completions": [["w", "x"], ["y", "z"]]})
    message = f"Scorer output for completion 2: score {shown} is not a number; give a float."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        # the first chunk (completions 0, 1) is fine; the bad score is completion 2, the first of the second chunk
        score_completions(ds, lambda p, c: [0.0, 0.0] if p == ["a", "a"] else [bad, 1.0], batch_size=2, progress=False)
    with pytest.raises(ValueError, match="completion 0: score"):  # a whole bool tensor / array, too
        score_completions(ds, lambda p, c: torch.ones(len(c), dtype=torch.bool), progress=False)


def test_numpy_and_torch_numbers_are_scores():
    ds = Dataset.from_dict({"prompt": ["a"], "completions": [["w", "x", "y", "z", "v"]]})
    values = [np.float32(0.5), np.int64(2), torch.tensor(0.25), np.array(1.5), 3]
    assert score_completions(ds, lambda p, c: values, progress=False)["rewards"] == [[0.5, 2.0, 0.25, 1.5, 3.0]]
    scored = score_completions(ds, lambda p, c: torch.arange(len(c)) * 0.5, progress=False)
    assert scored["rewards"] == [[0.0, 0.5, 1.0, 1.5, 2.0]]


def test_non_finite_scores_are_kept_as_nan_with_a_warning():
    ds = Dataset.from_dict({"prompt": ["a", "b"], "completions": [["w", "x"], ["y", "z"]]})
    values = [float("nan"), 1.5, float("inf"), None]
    with pytest.warns(UserWarning, match="3 of 4 rewards are not finite"):
        scored = score_completions(ds, lambda p, c: values, progress=False)
    (r0, r1), (r2, r3) = scored["rewards"]
    assert math.isnan(r0) and r1 == 1.5 and math.isnan(r2) and math.isnan(r3)


# ----------------------------------------------------------------------------------------------------------------------
# vader_positivity
# ----------------------------------------------------------------------------------------------------------------------


def test_vader_positivity_known_sentences():
    vader = pytest.importorskip("vaderSentiment.vaderSentiment", reason="pip install vaderSentiment==3.3.2")
    SentimentIntensityAnalyzer = vader.SentimentIntensityAnalyzer

    texts = ["I love this, it is wonderful!", "This is terrible and I hate it.", "The box is on the table."]
    pos, neg, neutral = vader_positivity([""] * 3, texts)
    assert pos > 0.5 and neg < -0.5 and abs(neutral) < 0.05
    direct = SentimentIntensityAnalyzer()
    assert [pos, neg, neutral] == [direct.polarity_scores(t)["compound"] for t in texts]
    assert vader_positivity([], []) == []


# ----------------------------------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def groups():
    """Group 0 has distinct rewards, group 1 a tie in the middle, group 2 only ties."""
    return Dataset.from_dict(
        {
            "prompt": ["p0", "p1", "p2"],
            "completions": [["a", "b", "c"], ["d", "e", "f", "k"], ["g", "h"]],
            "rewards": [[1.0, 3.0, 2.0], [0.9, 0.5, 0.5, 0.1], [2.0, 2.0]],
            "id": [0, 1, 2],
        }
    )


def _pairs(ds):
    return [(r["prompt"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"], r["id"]) for r in ds]


def test_groups_to_rows(groups):
    rows = groups_to_rows(groups)
    assert rows.column_names == ["prompt", "completion", "reward", "id"]
    assert [(r["prompt"], r["completion"], r["reward"], r["id"]) for r in rows] == [
        ("p0", "a", 1.0, 0),
        ("p0", "b", 3.0, 0),
        ("p0", "c", 2.0, 0),
        ("p1", "d", 0.9, 1),
        ("p1", "e", 0.5, 1),
        ("p1", "f", 0.5, 1),
        ("p1", "k", 0.1, 1),
        ("p2", "g", 2.0, 2),
        ("p2", "h", 2.0, 2),
    ]
    assert rows_to_groups(rows).to_list() == groups.to_list()


def test_best_worst_pairs(groups):
    assert _pairs(groups_to_pairs(groups)) == [("p0", "b", "a", 3.0, 1.0, 0), ("p1", "d", "k", 0.9, 0.1, 1)]
    kept = _pairs(groups_to_pairs(groups, ties="keep"))
    assert kept[:2] == [("p0", "b", "a", 3.0, 1.0, 0), ("p1", "d", "k", 0.9, 0.1, 1)]
    assert len(kept) == 3 and {kept[2][1], kept[2][2]} == {"g", "h"} and kept[2][3:] == (2.0, 2.0, 2)


def test_best_vs_rest_pairs(groups):
    expected = [
        ("p0", "b", "a", 3.0, 1.0, 0),
        ("p0", "b", "c", 3.0, 2.0, 0),
        ("p1", "d", "e", 0.9, 0.5, 1),
        ("p1", "d", "f", 0.9, 0.5, 1),
        ("p1", "d", "k", 0.9, 0.1, 1),
    ]
    assert _pairs(groups_to_pairs(groups, strategy="best_vs_rest")) == expected
    kept = _pairs(groups_to_pairs(groups, strategy="best_vs_rest", ties="keep"))
    assert kept[:5] == expected
    assert len(kept) == 6 and {kept[5][1], kept[5][2]} == {"g", "h"}


def test_all_pairs(groups):
    expected = [
        ("p0", "b", "a", 3.0, 1.0, 0),
        ("p0", "c", "a", 2.0, 1.0, 0),
        ("p0", "b", "c", 3.0, 2.0, 0),
        ("p1", "d", "e", 0.9, 0.5, 1),
        ("p1", "d", "f", 0.9, 0.5, 1),
        ("p1", "d", "k", 0.9, 0.1, 1),
        ("p1", "e", "k", 0.5, 0.1, 1),
        ("p1", "f", "k", 0.5, 0.1, 1),
    ]
    assert _pairs(groups_to_pairs(groups, strategy="all_pairs")) == expected
    kept = _pairs(groups_to_pairs(groups, strategy="all_pairs", ties="keep"))
    assert kept == expected[:6] + [("p1", "e", "f", 0.5, 0.5, 1)] + expected[6:] + [("p2", "g", "h", 2.0, 2.0, 2)]


def test_tie_breaking_for_the_best_is_seeded():
    ds = Dataset.from_dict({"prompt": ["p"], "completions": [["x", "y", "z"]], "rewards": [[1.0, 1.0, 0.0]]})
    chosen = [groups_to_pairs(ds, seed=s)["chosen"][0] for s in range(20)]
    assert set(chosen) == {"x", "y"}
    assert chosen == [groups_to_pairs(ds, seed=s)["chosen"][0] for s in range(20)]


def test_nan_rewards_are_excluded_with_a_count():
    ds = Dataset.from_dict(
        {
            "prompt": ["p0", "p1"],
            "completions": [["a", "b", "c"], ["d", "e"]],
            "rewards": [[float("nan"), 1.0, 0.0], [float("nan"), 1.0]],
        }
    )
    with pytest.warns(UserWarning, match="2 NaN reward.*1 group"):
        pairs = groups_to_pairs(ds, strategy="all_pairs")
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("b", "c")]


def test_conversational_prompts_give_assistant_message_completions():
    prompt = [{"role": "user", "content": "hi"}]
    ds = Dataset.from_dict({"prompt": [prompt], "completions": [["good", "bad"]], "rewards": [[1.0, 0.0]]})
    pair = groups_to_pairs(ds)[0]
    assert pair["prompt"] == prompt
    assert pair["chosen"] == [{"role": "assistant", "content": "good"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "bad"}]
    row = groups_to_rows(ds)[0]
    assert row["completion"] == [{"role": "assistant", "content": "good"}]
    assert rows_to_groups(groups_to_rows(ds))["completions"] == [["good", "bad"]]


def test_converted_data_is_accepted_by_trl_chat_templating(tiny_tokenizer):
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    prompt = [{"role": "user", "content": "hi"}]
    ds = Dataset.from_dict({"prompt": [prompt], "completions": [["good", "bad"]], "rewards": [[1.0, 0.0]]})
    for example in (groups_to_pairs(ds)[0], groups_to_rows(ds)[0]):
        assert is_conversational(example)
        rendered = maybe_apply_chat_template(example, tiny_tokenizer)
        assert rendered["prompt"].endswith("<|im_start|>assistant\n")
    assert maybe_apply_chat_template(groups_to_pairs(ds)[0], tiny_tokenizer)["chosen"].startswith("good")


def test_converter_errors(groups):
    with pytest.raises(ValueError, match="Unknown pair strategy"):
        groups_to_pairs(groups, strategy="best")
    with pytest.raises(ValueError, match="Unknown ties"):
        groups_to_pairs(groups, ties="random")
    bad = Dataset.from_dict({"prompt": ["p"], "completions": [["a", "b"]], "rewards": [[1.0]]})
    with pytest.raises(ValueError, match="Row 0: 2 completions but 1 rewards"):
        groups_to_rows(bad)
    with pytest.raises(ValueError, match="columns found"):
        groups_to_pairs(Dataset.from_dict({"prompt": ["p"], "completions": [["a"]]}))
    with pytest.raises(ValueError, match="columns found"):
        detect_shape(Dataset.from_dict({"text": ["p"]}))


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "data_dir"])
def test_save_load_round_trip_with_conversational_columns_and_nan(tmp_path, name):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    groups = Dataset.from_dict(
        {
            "prompt": [prompt, prompt],
            "completions": [["a", "b"], ["c", "d"]],
            "rewards": [[1.0, float("nan")], [0.5, 0.25]],
        }
    )
    with pytest.warns(UserWarning):
        pairs = groups_to_pairs(groups)
    for ds in (groups, groups_to_rows(groups), pairs):
        back = load_dataset_any(save_dataset(ds, tmp_path / ds.column_names[1] / name))
        assert back.column_names == ds.column_names
        assert _nan_equal(back.to_list(), ds.to_list())
        assert detect_shape(back) == detect_shape(ds)


def test_load_dataset_dict_folder(tmp_path):
    from datasets import DatasetDict

    rows = Dataset.from_dict({"prompt": ["p", "q"], "completion": ["a", "b"], "reward": [1.0, None]})
    DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "dd"))
    train = load_dataset_any(tmp_path / "dd")
    assert isinstance(train, Dataset) and len(train) == 2 and math.isnan(train["reward"][1])
    both = load_dataset_any(tmp_path / "dd", keep_splits=True)
    assert (
        isinstance(both, DatasetDict) and sorted(both) == ["test", "train"] and math.isnan(both["train"]["reward"][1])
    )


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        load_dataset_any(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match="Unknown dataset format"):
        load_dataset_any(tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one written by save_to_disk"):
        load_dataset_any(tmp_path / "folder")


def test_json_array_and_column_documents_load(tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(
        '[\n  {"prompt": "p", "completion": "a", "reward": 1},\n  {"prompt": "p", "completion": "b", "reward": null}\n]\n'
    )
    back = load_dataset_any(array)
    assert back["completion"] == ["a", "b"] and back["reward"][0] == 1.0 and math.isnan(back["reward"][1])
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"prompt": ["p", "q"], "completions": [["a"], ["b", "c"]]}, indent=2))
    assert load_dataset_any(columns).to_list() == [
        {"prompt": "p", "completions": ["a"]},
        {"prompt": "q", "completions": ["b", "c"]},
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"prompt": "p", "id": 1}\n\n{"prompt": "q", "id": "two"}\n',
            "{path}:3: `id` is a string, but at {path}:1 it is a number; a column must hold one type in every row.",
        ),
        (
            '{"prompt": "p", "meta": {"x": 1}}\n{"prompt": "q", "meta": {"x": "one"}}\n',
            "{path}:2: `meta` has another structure than at {path}:1 (a field or item of another type); a column must "
            "hold one type in every row.",
        ),
        (
            '{"prompt": [{"role": "user", "content": "hi"}]}\n{"prompt": [{"content": "no role"}]}\n',
            "{path}:2: `prompt` has a message without 'role' / 'content': {{'content': 'no role'}}.",
        ),
        (
            '{"prompt": "p"}\n{"prompt": 3}\n',
            "{path}:2: `prompt` is a number; expected a string or a list of {{'role': ..., 'content': ...}} messages.",
        ),
        (
            '{"prompt": "p", "completions": ["a"], "rewards": [1, "high"]}\n',
            "{path}:1: `rewards`[1] 'high' (str) is not a number; give a float.",
        ),
        (
            '{"prompt": "p", "completions": ["a"], "rewards": 1}\n',
            "{path}:1: `rewards` is a number; it must be a "
            "list of numbers, one per completion (null for a missing one).",
        ),
        (
            '[\n  {"prompt": "p"},\n  {"prompt": "q"}\n  {"prompt": "r"}\n]',
            "{path}:4: invalid JSON: Expecting ',' delimiter (column 3).",
        ),
        ('[{"prompt": "p"}]\n\n]', "{path}:3: invalid JSON: Extra data after the closing ']' (column 1)."),
        (
            '[\n  {"prompt": "p"},\n  {"prompt": "q",}\n]',
            "{path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 18).",
        ),
        ("[]", "{path}: no rows"),
    ],
)
def test_json_load_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(message.format(path=path))}$"):
        load_dataset_any(path)


def _failing_parquet_writer(self, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"PAR1")
    raise OSError("disk full")


def test_save_datasets_is_all_or_nothing(tmp_path, monkeypatch):
    rows = Dataset.from_dict({"prompt": ["p"], "completion": ["a"], "reward": [1.0]})
    first, second = tmp_path / "rows.jsonl", tmp_path / "rows.parquet"
    save_datasets([(rows, first), (rows, second)])
    before = first.read_bytes(), second.read_bytes()
    with pytest.raises(FileExistsError, match=f"^{re.escape(str(first))} already exists; pass overwrite=True"):
        save_dataset(rows, first, overwrite=False)
    monkeypatch.setattr(Dataset, "to_parquet", _failing_parquet_writer)
    more = Dataset.from_dict({"prompt": ["q", "r"], "completion": ["b", "c"], "reward": [0.0, 2.0]})
    with pytest.raises(OSError, match="disk full"):  # the second write fails: the first output is not replaced either
        save_datasets([(more, first), (more, second)])
    assert (first.read_bytes(), second.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "rows.parquet"]
    with pytest.raises(ValueError, match="is given twice"):
        save_datasets([(rows, first), (rows, tmp_path / "." / "rows.jsonl")])


# ----------------------------------------------------------------------------------------------------------------------
# Real model (slow)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_generate_and_score_with_vader():
    from trl_rewardweighted.offline import smollm2_path

    start = time.perf_counter()
    prompts = [
        [{"role": "user", "content": "Describe a sunny day."}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    ds = generate_completions(smollm2_path(), prompts, n=2, max_new_tokens=16, seed=0, progress=False)
    ds = score_completions(ds, "trl_rewardweighted.rewards:vader_positivity", progress=False)
    elapsed = time.perf_counter() - start
    assert len(ds) == 2
    for group, rewards in zip(ds["completions"], ds["rewards"]):
        assert len(group) == 2 and all(isinstance(c, str) and c.strip() for c in group)
        assert rewards == vader_positivity([None] * 2, group)
        assert all(-1.0 <= r <= 1.0 for r in rewards)
    print(f"SmolLM2 generate+score (2 prompts x 2 completions x 16 tokens): {elapsed:.1f} s; {ds.to_list()}")
