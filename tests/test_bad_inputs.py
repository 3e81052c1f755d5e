"""Adversarial bad input against the three trainers, `reward_augment_dataset` and `trl-rw`.

Each case asserts the final behaviour: a clear error naming the column, the row and the fix; or a counted, warned skip;
or finite training. Trainers are only constructed unless the failure shows up in training (then 1 step).
"""

import math
import re

import pytest
import torch
from datasets import Dataset, Sequence, Value
from transformers import AutoModelForCausalLM

from tests._helpers import cpu_args
from trl_rewardweighted import (
    RewardAugmentedDPOConfig,
    RewardAugmentedDPOTrainer,
    VARConfig,
    VARTrainer,
    VCBConfig,
    VCBTrainer,
)
from trl_rewardweighted.cli import main
from trl_rewardweighted.data.relabel import reward_augment_dataset
from trl_rewardweighted.data.utils import check_prompt_and_completion


def U(text):
    return [{"role": "user", "content": text}]


def A(text):
    return [{"role": "assistant", "content": text}]


def losses(trainer):
    trainer.train()
    values = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert values and all(math.isfinite(v) for v in values), values
    return values


# Messages every malformed prompt/completion gets (the shared check in data/utils.py).
NOT_TEXT = r"it must be a string or a list of \{'role': \.\.\., 'content': <string>\} messages\. Fix or drop the row\."
FIX_MESSAGES = r"Give a string, or a non-empty list of \{'role': \.\.\., 'content': <string>\} messages\."


# ----------------------------------------------------------------------------------------------------------------------
# The shared row check (model-free)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, completion, match",
    [
        (None, "x", rf"^Row 7: `prompt` is None \(NoneType\): {NOT_TEXT}"),
        ("x", 3, rf"^Row 7: `completion` is 3 \(int\): {NOT_TEXT}"),
        ([], A("x"), rf"^Row 7: `prompt`: it is an empty message list\. {FIX_MESSAGES}"),
        (["hi"], A("x"), r"^Row 7: `prompt`: message 0 is str \('hi'\), not a dict with `role` and `content`"),
        ([{"content": "hi"}], A("x"), r"^Row 7: `prompt`: message 0 has no `role` \(got None\)"),
        ([{"role": "user", "content": None}], A("x"), r"^Row 7: `prompt`: message 0 \('user'\) has no `content`\."),
        (U("x"), [{"role": "assistant", "content": 1.5}], r"`completion`: message 0 \('assistant'\) has content 1\.5"),
        (U("x"), "y", r"^Row 7: `prompt` is a message list but `completion` is a string; both must be strings"),
    ],
)
def test_row_check(prompt, completion, match):
    with pytest.raises(ValueError, match=match):
        check_prompt_and_completion(prompt, completion, 7)


def test_row_check_accepts_tool_calls_without_content_and_list_content():
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}
    check_prompt_and_completion(U("x") + [tool_call], A("done"), 0)
    check_prompt_and_completion([{"role": "user", "content": [{"type": "text", "text": "x"}]}], A("y"), 0)
    check_prompt_and_completion("", "", 0)  # empty strings: an empty completion is trained as EOS only


# ----------------------------------------------------------------------------------------------------------------------
# VAR
# ----------------------------------------------------------------------------------------------------------------------

VAR_ROWS = {
    "prompt": ["The cat", "A dog", "Hello", "The sun"],
    "completion": [" sat.", " ran.", " world", " rises."],
    "reward": [1.0, 0.5, -1.0, 2.0],
}


def var_data(**changes):
    rows = {k: list(v) for k, v in VAR_ROWS.items()}
    rows.update(changes)
    return Dataset.from_dict({k: v for k, v in rows.items() if v is not None})


def var_chat(prompt=None, completion=None):
    return Dataset.from_dict(
        {
            "prompt": prompt or [U("a"), U("b"), U("c"), U("d")],
            "completion": completion or [A("w"), A("x"), A("y"), A("z")],
            "reward": VAR_ROWS["reward"],
        }
    )


def var_args(tmp_path, **kw):
    base = dict(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, ref_weighting=False)
    base.update(kw)
    return VARConfig(output_dir=str(tmp_path / "out"), **cpu_args(**base))


@pytest.mark.parametrize(
    "dataset, match",
    [
        (
            lambda: var_data(prompt=None),
            r"^The train dataset has no `prompt` column \(columns: \['completion', 'reward'\]\)\. VAR trains on "
            r"prompt/completion rows .* rename your columns to `prompt` and `completion`\.",
        ),
        (lambda: var_data(completion=None), r"^The train dataset has no `completion` column"),
        (lambda: var_data(prompt=[1, 2, 3, 4]), rf"^Row 0: `prompt` is 1 \(int\): {NOT_TEXT}"),
        (lambda: var_data(completion=[{"a": "x"}] * 4), r"^Row 0: `completion` is \{'a': 'x'\} \(dict\)"),
        (lambda: var_data(prompt=["a", None, "b", "c"]), r"^Row 1: `prompt` is None \(NoneType\)"),
        (lambda: var_data(completion=[" a", " b", " c", None]), r"^Row 3: `completion` is None \(NoneType\)"),
        (lambda: var_chat(prompt=[U("a"), [], U("c"), U("d")]), r"^Row 1: `prompt`: it is an empty message list"),
        (lambda: var_chat(completion=[A("w"), [], A("y"), A("z")]), r"^Row 1: `completion`: it is an empty message"),
        (
            lambda: var_chat(prompt=[[{"role": "user"}], U("b"), U("c"), U("d")]),
            r"^Row 0: `prompt`: message 0 \('user'\) has no `content`\.",
        ),
        (
            lambda: var_chat(prompt=[[{"role": "user", "content": 5}]] * 4),
            r"^Row 0: `prompt`: message 0 \('user'\) has content 5 of type int; content must be a string\.",
        ),
        (
            lambda: Dataset.from_dict({"prompt": [U("a")] * 2, "completion": ["x", "y"], "reward": [1.0, 2.0]}),
            r"^Row 0: `prompt` is a message list but `completion` is a string",
        ),
        (
            lambda: var_data(reward=[[1.0], [2.0], [3.0], [4.0]]),
            r"^Column `reward` must hold numbers, but row 0 has \[1\.0\] \(list\)\. VAR needs a float reward per row",
        ),
        (
            lambda: var_data(reward=[{"a": 1.0}] * 4),
            r"^Column `reward` must hold numbers, but row 0 has \{'a': 1\.0\}",
        ),
        (lambda: var_data(reward=["nan"] * 4), r"^Column `reward` must hold numbers, but row 0 has 'nan' \(str\)"),
    ],
    ids=[
        "no-prompt",
        "no-completion",
        "int-prompt",
        "dict-completion",
        "none-prompt",
        "none-completion",
        "empty-prompt-messages",
        "empty-completion-messages",
        "message-without-content",
        "int-content",
        "chat-prompt-string-completion",
        "nested-reward",
        "dict-reward",
        "string-nan-reward",
    ],
)
def test_var_refuses_malformed_data(tiny_model_path, tmp_path, dataset, match):
    with pytest.raises(ValueError, match=match):
        VARTrainer(model=tiny_model_path, args=var_args(tmp_path), train_dataset=dataset())


def test_var_refuses_malformed_eval_rows_and_stream_first_row(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match=r"^The eval dataset has no `completion` column"):
        VARTrainer(
            model=tiny_model_path,
            args=var_args(tmp_path),
            train_dataset=var_data(),
            eval_dataset=var_data(completion=None),
        )
    stream = var_data(prompt=[None, "b", "c", "d"]).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"^Row 0: `prompt` is None \(NoneType\)"):
        VARTrainer(model=tiny_model_path, args=var_args(tmp_path), train_dataset=stream)


@pytest.mark.parametrize(
    "rewards",
    [[float("inf")] * 4, [float("-inf")] * 4, [float("nan")] * 4],
    ids=["+inf", "-inf", "all-nan"],
)
def test_var_no_finite_reward_is_refused_at_init(tiny_model_path, tmp_path, rewards):
    with pytest.raises(ValueError, match=r"Every `reward` of the train dataset is NaN/inf/None \(4 rows\)"):
        VARTrainer(model=tiny_model_path, args=var_args(tmp_path), train_dataset=var_data(reward=rewards))


@pytest.mark.parametrize(
    "dataset, kw",
    [
        (lambda: var_data(reward=[1e300, -1e300, 1e300, 0.0]), {}),  # weights computed in float64, no overflow
        (lambda: var_data().cast_column("reward", Value("float16")), {}),
        (lambda: var_data(reward=[1, 2, 3, 4]), {}),
        (lambda: var_data(completion=["", " ran.", "", " rises."]), {}),  # empty completion: EOS only
        (lambda: var_chat(prompt=[A("Hi, how can I help?")] * 4), {}),  # an assistant-only prompt (prefill)
        (lambda: var_data(), dict(per_device_train_batch_size=1)),  # warned: plain SFT
        (lambda: var_data(), dict(gradient_accumulation_steps=8, max_steps=-1, num_train_epochs=1)),
    ],
    ids=["huge", "float16", "int", "empty-completion", "assistant-prompt", "batch-1", "ga-beyond-batches"],
)
def test_var_accepted_inputs_train_finitely(tiny_model_path, tmp_path, dataset, kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = VARTrainer(model=tiny_model_path, args=var_args(tmp_path, **kw), train_dataset=dataset())
    losses(trainer)
    assert trainer.state.global_step == 1


def test_var_single_nan_row_is_skipped_and_counted(tiny_model_path, tmp_path):
    dataset = var_data(reward=[float("nan"), 1.0, 2.0, 3.0])
    trainer = VARTrainer(
        model=tiny_model_path, args=var_args(tmp_path, per_device_train_batch_size=4), train_dataset=dataset
    )
    losses(trainer)
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    assert entry["var/rows_skipped"] == 1.0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta=float("nan")), r"VARConfig\.beta must be a finite number > 0, got nan\."),
        (dict(beta=float("inf")), r"VARConfig\.beta must be a finite number > 0, got inf\."),
        (dict(beta="1"), r"VARConfig\.beta must be a finite number > 0, got '1'\."),
        (dict(beta=True), r"VARConfig\.beta must be a finite number > 0, got True\."),
        (dict(beta=-0.5), r"VARConfig\.beta must be a finite number > 0, got -0\.5\."),
        (dict(z_scope="Step"), r"VARConfig\.z_scope must be one of \('step', 'micro_batch', 'prompt'\), got 'Step'\."),
    ],
)
def test_var_config_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        var_args(tmp_path, **kw)


def test_var_max_length_below_every_prompt(tiny_model_path, tmp_path):
    with pytest.warns(UserWarning, match=r"4 of 4 rows of the train dataset have no completion token left"):
        with pytest.raises(
            ValueError, match=r"No row of the train dataset keeps a completion token: .*`max_length=1`"
        ):
            VARTrainer(model=tiny_model_path, args=var_args(tmp_path, max_length=1), train_dataset=var_data())


def test_var_zero_epochs_trains_nothing(tiny_model_path, tmp_path):
    args = var_args(tmp_path, max_steps=-1, num_train_epochs=0)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=var_data())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_var_ref_model_is_the_policy_object(tiny_model_path, tmp_path):
    """The same object as policy and reference: the reference log-probs are those of the starting policy."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = VARTrainer(
        model=model, ref_model=model, args=var_args(tmp_path, ref_weighting=True), train_dataset=var_data()
    )
    auto = VARTrainer(model=tiny_model_path, args=var_args(tmp_path, ref_weighting=True), train_dataset=var_data())
    assert trainer.train_dataset["ref_logps"] == pytest.approx(auto.train_dataset["ref_logps"], abs=1e-5)
    losses(trainer)


@pytest.mark.parametrize("trainer_name", ["var", "vcb", "ra"])
def test_ref_model_path_that_does_not_exist(tiny_model_path, tmp_path, trainer_name):
    missing = str(tmp_path / "no-such-model")
    match = rf"`ref_model='{re.escape(missing)}'` could not be loaded as a model: .*Give a folder with a saved model"
    with pytest.raises(ValueError, match=match):
        if trainer_name == "var":
            VARTrainer(
                model=tiny_model_path, ref_model=missing, args=var_args(tmp_path, ref_weighting=True),
                train_dataset=var_data(),
            )  # fmt: skip
        elif trainer_name == "vcb":
            VCBTrainer(model=tiny_model_path, ref_model=missing, args=vcb_args(tmp_path), train_dataset=vcb_data())
        else:
            RewardAugmentedDPOTrainer(
                model=tiny_model_path, ref_model=missing, args=ra_args(tmp_path), train_dataset=ra_data()
            )


@pytest.mark.parametrize("trainer_name", ["var", "vcb"])
def test_peft_config_with_a_peft_model(tiny_model_path, tmp_path, trainer_name):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    config = peft.LoraConfig(r=2, target_modules=["v_proj"])
    with pytest.raises(ValueError, match=r"You passed a `PeftModel` instance together with a `peft_config`"):
        if trainer_name == "var":
            VARTrainer(model=model, peft_config=config, args=var_args(tmp_path), train_dataset=var_data())
        else:
            VCBTrainer(model=model, peft_config=config, args=vcb_args(tmp_path), train_dataset=vcb_data())


# ----------------------------------------------------------------------------------------------------------------------
# VCB
# ----------------------------------------------------------------------------------------------------------------------

VCB_ROWS = {
    "prompt": ["The cat", "A dog", "Hello", "The sun"],
    "completions": [[" sat.", " ran.", " is"], [" barks.", " sleeps."], [" world", " there", " my"], [" up", " hot"]],
    "rewards": [[1.0, 0.5, -1.0], [0.2, 0.4], [1.0, 2.0, 3.0], [0.1, 0.3]],
}


def vcb_data(**changes):
    rows = {k: list(v) for k, v in VCB_ROWS.items()}
    rows.update(changes)
    return Dataset.from_dict(rows)


def vcb_chat(prompts, completions):
    return Dataset.from_dict({"prompt": prompts, "completions": completions, "rewards": [[1.0, 2.0]] * len(prompts)})


def vcb_args(tmp_path, **kw):
    base = dict(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3)
    base.update(kw)
    return VCBConfig(output_dir=str(tmp_path / "out"), **cpu_args(**base))


@pytest.mark.parametrize(
    "dataset, match",
    [
        (lambda: vcb_data(prompt=[1, 2, 3, 4]), rf"^Row 0: `prompt` is 1 \(int\): {NOT_TEXT}"),
        (lambda: vcb_data(prompt=["a", None, "b", "c"]), r"^Row 1: `prompt` is None \(NoneType\)"),
        (
            lambda: vcb_data(completions=[[" a", None, " c"]] + VCB_ROWS["completions"][1:]),
            r"^Row 0: the prompt is a string, so each completion must be a string too, got NoneType\.",
        ),
        (lambda: vcb_chat([[]] + [U("a")] * 3, [["x", "y"]] * 4), r"^Row 0: `prompt`: it is an empty message list"),
        (
            lambda: vcb_chat([[{"role": "user"}]] + [U("a")] * 3, [["x", "y"]] * 4),
            r"^Row 0: `prompt`: message 0 \('user'\) has no `content`\.",
        ),
        (
            lambda: vcb_chat([[{"role": "user", "content": 5}]] * 2, [["x", "y"]] * 2),
            r"^Row 0: `prompt`: message 0 \('user'\) has content 5 of type int",
        ),
        (
            lambda: vcb_chat([U("a")] * 2, [[[], A("y")], [A("x"), A("y")]]),
            r"^Row 0: completion 0: it is an empty message list",
        ),
        (
            lambda: vcb_data(rewards=[[1.0, 2.0]] + VCB_ROWS["rewards"][1:]),
            r"^Row 0: `completions` has 3 entries but `rewards` has 2\. Give exactly one reward per completion",
        ),
        (
            lambda: vcb_data(rewards=[[str(x) for x in r] for r in VCB_ROWS["rewards"]]),
            r"^Column `rewards` must hold lists of numbers, but row 0 has \['1\.0', '0\.5', '-1\.0'\] \(str\)",
        ),
        (
            lambda: vcb_data(rewards=[[[1.0]] * len(r) for r in VCB_ROWS["rewards"]]),
            r"^Column `rewards` must hold lists of numbers, but row 0 has \[\[1\.0\], \[1\.0\], \[1\.0\]\] \(list\)",
        ),
        (
            lambda: vcb_data(rewards=[{"a": 1.0}] * 4),
            r"^Column `rewards` must hold a list of numbers per row \(one per completion\), but row 0 has \{'a'",
        ),
        (
            lambda: vcb_data(rewards=[[None] * len(r) for r in VCB_ROWS["rewards"]]),
            r"^Column `rewards` must hold lists of numbers, but row 0 has \[None, None, None\]",
        ),
        (
            lambda: vcb_data(rewards=[[float("inf")] * len(r) for r in VCB_ROWS["rewards"]]),
            r"^No prompt group of the train dataset has 2 finite rewards",
        ),
        (
            lambda: vcb_data(completions=[[" a"]] * 4, rewards=[[1.0]] * 4),
            r"^No usable row in the train dataset: all 4 rows have fewer than 2 completions",
        ),
    ],
    ids=[
        "int-prompt",
        "none-prompt",
        "none-completion",
        "empty-prompt-messages",
        "message-without-content",
        "int-content",
        "empty-completion-messages",
        "length-mismatch",
        "string-rewards",
        "nested-rewards",
        "dict-rewards",
        "all-none-rewards",
        "inf-everywhere",
        "all-groups-of-one",
    ],
)
def test_vcb_refuses_malformed_data(tiny_model_path, tmp_path, dataset, match):
    with pytest.raises(ValueError, match=match):
        VCBTrainer(model=tiny_model_path, args=vcb_args(tmp_path), train_dataset=dataset())


def test_vcb_short_groups_and_none_rewards_are_skipped_counted_and_warned(tiny_model_path, tmp_path):
    completions = [[], [" a"], *VCB_ROWS["completions"][2:]]
    rewards = [[], [1.0], [None, None, None], [0.1, 0.3]]
    with pytest.warns(UserWarning) as record:
        trainer = VCBTrainer(
            model=tiny_model_path,
            args=vcb_args(tmp_path, per_device_train_batch_size=2),
            train_dataset=vcb_data(completions=completions, rewards=rewards),
        )
    messages = " | ".join(str(w.message) for w in record)
    assert "2 of 4 rows of the train dataset have fewer than 2 completions and are skipped" in messages
    assert "3 rewards in 1 rows of the train dataset are NaN/inf" in messages
    assert trainer.dropped_rows["train"] == 2 and trainer.nonfinite_rewards["train"] == 3
    losses(trainer)
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    assert entry["groups_skipped"] == 1.0  # the all-None group


@pytest.mark.parametrize(
    "changes, kw",
    [
        (dict(completions=[[" a", " a", " a"]] * 4, rewards=[[1.0, 2.0, 3.0]] * 4), {}),  # duplicates
        (dict(rewards=[[1.0, 1.0, 1.0], [2.0, 2.0], [0.0, 0.0, 0.0], [5.0, 5.0]]), {}),  # every reward tied
        (dict(rewards=[[1e300, -1e300, 0.0], [0.2, 0.4], [1.0, 2.0, 3.0], [0.1, 0.3]]), {}),
        (dict(rewards=[[float("inf"), float("-inf"), 1.0], [0.2, 0.4], [1.0, 2.0, 3.0], [0.1, 0.3]]), {}),
        (dict(rewards=[[1, 2, 3], [1, 2], [1, 2, 3], [1, 2]]), {}),
        (dict(), dict(per_device_train_batch_size=1)),
        (dict(), dict(gradient_accumulation_steps=8, max_steps=-1, num_train_epochs=1)),
        (dict(), dict(max_length=3)),
    ],
    ids=["duplicates", "ties", "huge", "inf-in-a-group", "int", "batch-1", "ga-beyond-batches", "max-length-3"],
)
def test_vcb_accepted_inputs_train_finitely(tiny_model_path, tmp_path, changes, kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = VCBTrainer(model=tiny_model_path, args=vcb_args(tmp_path, **kw), train_dataset=vcb_data(**changes))
    losses(trainer)
    assert trainer.state.global_step == 1


def test_vcb_float16_rewards_train_finitely(tiny_model_path, tmp_path):
    dataset = vcb_data().cast_column("rewards", Sequence(Value("float16")))
    trainer = VCBTrainer(model=tiny_model_path, args=vcb_args(tmp_path), train_dataset=dataset)
    assert trainer.train_dataset["completion_rewards"][0] == [1.0, 0.5, -1.0]
    losses(trainer)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(gamma=float("nan")), r"`gamma` must be a finite number > 0, got nan"),
        (dict(gamma=float("inf")), r"`gamma` must be a finite number > 0, got inf"),
        (dict(gamma="0.1"), r"`gamma` must be a finite number > 0, got '0\.1'"),
        (dict(lam=0.0), r"`lam` must be a finite number > 0, got 0\.0"),
        (dict(lam=float("nan")), r"`lam` must be a finite number > 0, got nan"),
        (dict(lam="1"), r"`lam` must be a finite number > 0, got '1'"),
        (dict(pair_mode="Paper"), r"`pair_mode` must be one of \('paper', 'appendix'\), got 'Paper'\."),
    ],
)
def test_vcb_config_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        vcb_args(tmp_path, **kw)


def test_vcb_max_length_1_and_same_ref_object(tiny_model_path, tmp_path):
    with pytest.warns(UserWarning, match=r"have a prompt of at least `max_length` \(1\) tokens"):
        with pytest.raises(ValueError, match=r"No usable row in the train dataset: all 4 rows"):
            VCBTrainer(model=tiny_model_path, args=vcb_args(tmp_path, max_length=1), train_dataset=vcb_data())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match=r"`model` and `ref_model` cannot be the same object"):
        VCBTrainer(model=model, ref_model=model, args=vcb_args(tmp_path), train_dataset=vcb_data())


# ----------------------------------------------------------------------------------------------------------------------
# Reward-augmented DPO and reward_augment_dataset
# ----------------------------------------------------------------------------------------------------------------------

PROMPTS = ["Name a colour.", "Say hello.", "Pick a fruit.", "Count to two."]
CHOSEN = ["Blue.", "Hello there!", "An apple.", "One, two."]
REJECTED = ["A car.", "Go away.", "A chair.", "Five."]


def ra_data(conversational=True, **changes):
    rows = {
        "prompt": [U(p) for p in PROMPTS] if conversational else list(PROMPTS),
        "chosen": [A(c) for c in CHOSEN] if conversational else list(CHOSEN),
        "rejected": [A(r) for r in REJECTED] if conversational else list(REJECTED),
        "score_chosen": [9.0, 8.0, 9.0, 7.0],
        "score_rejected": [2.0, 3.0, 4.0, 1.0],
    }
    rows.update(changes)
    return Dataset.from_dict({k: v for k, v in rows.items() if v is not None})


def ra_args(tmp_path, **kw):
    base = dict(max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, beta=0.1, max_length=None)
    base.update(kw)
    return RewardAugmentedDPOConfig(str(tmp_path / "out"), **cpu_args(**base))


NAN = float("nan")


@pytest.mark.parametrize(
    "dataset, match",
    [
        (lambda: ra_data(chosen=None), r"^The dataset has no `chosen` column \(the chosen responses; columns:"),
        (lambda: ra_data(score_rejected=None), r"^The dataset has no `score_rejected` column .* numeric score"),
        (
            lambda: ra_data(score_chosen=[5.0] * 4, score_rejected=[5.0] * 4),
            r"^No pair is left after dropping 0 non-finite and 4 tied pair\(s\) out of 4\. Pass ties='keep'",
        ),
        (
            lambda: ra_data(score_chosen=[NAN] * 4),
            r"^No pair is left after dropping 4 non-finite and 0 tied pair\(s\) out of 4\. Fill in the missing",
        ),
        (
            lambda: ra_data(score_chosen=[90.0, 80.0, 90.0, 70.0]),
            r"^Column `score_chosen` row 0 has 90\.0, outside the score range \[1, 10\] .* `score_range='auto'`",
        ),
        (lambda: ra_data(score_chosen=["9", "8", "9", "7"]), r"^Column `score_chosen` must hold numbers, but row 0"),
        (
            lambda: ra_data(score_chosen=[[9.0]] * 4),
            r"^Column `score_chosen` must hold numbers, but row 0 has \[9\.0\]",
        ),
        (
            lambda: ra_data(rejected=[A(c) for c in CHOSEN]),
            r"^Row 0: `chosen` and `rejected` are identical; there is no preference to learn\. Drop the row\.",
        ),
        (
            lambda: ra_data(False, rejected=["x", "y", "An apple.", "z"]),
            r"^Row 2: `chosen` and `rejected` are identical",
        ),
        (
            lambda: ra_data(prompt=list(PROMPTS)),
            r"^Row 0: the prompts of `chosen` and `rejected` differ: both start with an assistant message, so they "
            r"hold no prompt .* add a `prompt` column of message lists",
        ),
        (
            lambda: ra_data(prompt=None),
            r"^Row 0: the prompts of `chosen` and `rejected` differ: both start with an assistant message",
        ),
        (
            lambda: Dataset.from_dict(
                {
                    "chosen": [U("a") + A("x")] * 2,
                    "rejected": [U("b") + A("y")] * 2,
                    "score_chosen": [9.0, 9.0],
                    "score_rejected": [1.0, 1.0],
                }
            ),
            r"^Row 0: the prompts of `chosen` and `rejected` differ: they share no leading message",
        ),
        (lambda: ra_data(False, prompt=[1, 2, 3, 4]), rf"^Row 0: `prompt` is 1 \(int\): {NOT_TEXT}"),
        (lambda: ra_data(False, prompt=["a", None, "b", "c"]), r"^Row 1: `prompt` is None \(NoneType\)"),
        (lambda: ra_data(False, chosen=["a", None, "b", "c"]), r"^Row 1: `chosen` is None \(NoneType\)"),
        (lambda: ra_data(False, chosen=[{"a": "b"}] * 4), r"^Row 0: `chosen` is \{'a': 'b'\} \(dict\)"),
        (lambda: ra_data(prompt=[[]] + [U("a")] * 3), r"^Row 0: `prompt`: it is an empty message list"),
        (lambda: ra_data(chosen=[[]] + [A("a")] * 3), r"^Row 0: `chosen`: it is an empty message list"),
        (
            lambda: ra_data(prompt=[[{"role": "user"}]] + [U("a")] * 3),
            r"^Row 0: `prompt`: message 0 \('user'\) has no `content`",
        ),
        (
            lambda: ra_data(prompt=[[{"role": "user", "content": 5}]] * 4),
            r"^Row 0: `prompt`: message 0 \('user'\) has content 5 of type int",
        ),
    ],
    ids=[
        "no-chosen",
        "no-score-rejected",
        "all-ties",
        "all-nan",
        "out-of-range",
        "string-scores",
        "nested-scores",
        "chosen-equals-rejected",
        "chosen-equals-rejected-strings",
        "string-prompt-chat-replies",
        "no-prompt",
        "mismatched-conversations",
        "int-prompt",
        "none-prompt",
        "none-chosen",
        "dict-chosen",
        "empty-prompt-messages",
        "empty-chosen-messages",
        "message-without-content",
        "int-content",
    ],
)
def test_reward_augmentation_refuses_malformed_data(tiny_model_path, tiny_tokenizer, tmp_path, dataset, match):
    with pytest.raises(ValueError, match=match):
        reward_augment_dataset(dataset(), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=match):
        RewardAugmentedDPOTrainer(
            model=tiny_model_path, args=ra_args(tmp_path), train_dataset=dataset(), processing_class=tiny_tokenizer
        )


def test_reward_augmentation_skips_and_counts_a_nan_score(tiny_tokenizer, caplog):
    dataset = ra_data(score_chosen=[NAN, 8.0, None, float("inf")])
    with caplog.at_level("WARNING"):
        out, stats = reward_augment_dataset(dataset, tokenizer=tiny_tokenizer, return_stats=True)
    assert (stats["dropped_nonfinite"], len(out)) == (3, 2)
    assert "dropped 3 pair(s) with a missing or non-finite score (rows [0, 2, 3])" in caplog.text


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta=float("inf")), r"beta must be a finite number > 0 \(the DPO KL coefficient.*\), got inf"),
        (dict(beta=float("nan")), r"beta must be a finite number > 0 .*, got nan"),
        (dict(beta="0.1"), r"beta must be a finite number > 0 .*, got '0\.1'"),
        (dict(augment_mode="Both"), r"`mode` \(config: `augment_mode`\) must be one of \('both', 'chosen_only'\)"),
        (dict(augment_fraction=0), r"`fraction` \(config: `augment_fraction`\) must be a number in \(0, 1\]"),
        (dict(augment_fraction=2), r"must be a number in \(0, 1\] \(0\.5 = Half-RA\), got 2\."),
        (dict(augment_fraction=NAN), r"must be a number in \(0, 1\] \(0\.5 = Half-RA\), got nan\."),
        (dict(round_digits=-1), r"`round_digits` must be an int >= 0 or None, got -1"),
        (dict(score_range="1-10"), r"`score_range` for 'score' must be None, 'auto' or 'lo,hi', got '1-10'\."),
        (dict(score_range="10,1"), r"must be \(lo, hi\) with finite lo < hi, got \(10\.0, 1\.0\)\."),
    ],
)
def test_reward_augmented_config_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ra_args(tmp_path, **kw)


def test_reward_augmented_fraction_that_keeps_no_pair(tiny_model_path, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"`fraction=0\.01` of 4 pairs keeps no pair\."):
        RewardAugmentedDPOTrainer(
            model=tiny_model_path, args=ra_args(tmp_path, augment_fraction=0.01), train_dataset=ra_data(),
            processing_class=tiny_tokenizer,
        )  # fmt: skip


@pytest.mark.parametrize(
    "dataset, kw",
    [
        (lambda: ra_data(score_chosen=[9, 8, 9, 7], score_rejected=[2, 3, 4, 1]), {}),
        (lambda: ra_data().cast_column("score_chosen", Value("float16")), {}),
        (lambda: ra_data(False, chosen=["", "Hi", "Pear", "Two"]), {}),
        (lambda: ra_data(), dict(per_device_train_batch_size=1)),
        (lambda: ra_data(), dict(gradient_accumulation_steps=16, max_steps=-1, num_train_epochs=1)),
    ],
    ids=["int-scores", "float16-scores", "empty-chosen-string", "batch-1", "ga-beyond-batches"],
)
def test_reward_augmented_accepted_inputs_train_finitely(tiny_model_path, tiny_tokenizer, tmp_path, dataset, kw):
    trainer = RewardAugmentedDPOTrainer(
        model=tiny_model_path, args=ra_args(tmp_path, **kw), train_dataset=dataset(), processing_class=tiny_tokenizer
    )
    assert len(trainer.train_dataset) == 8
    losses(trainer)
    assert trainer.state.global_step == 1


def test_reward_augmented_max_length_1_and_same_ref_object(tiny_model_path, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"Every row of the train dataset \(8\) has a tokenised prompt of at least "):
        RewardAugmentedDPOTrainer(
            model=tiny_model_path, args=ra_args(tmp_path, max_length=1), train_dataset=ra_data(),
            processing_class=tiny_tokenizer,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match=r"`model` and `ref_model` cannot be the same object"):
        RewardAugmentedDPOTrainer(
            model=model, ref_model=model, args=ra_args(tmp_path), train_dataset=ra_data(),
            processing_class=tiny_tokenizer,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# trl-rw
# ----------------------------------------------------------------------------------------------------------------------


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def groups_jsonl(tmp_path):
    path = tmp_path / "groups.jsonl"
    path.write_text(
        '{"prompt": "Hi", "completions": [" a", " b"], "rewards": [1.0, 2.0]}\n'
        '{"prompt": "Yo", "completions": [" c", " d"], "rewards": [0.5, 0.1]}\n'
    )
    return path


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "bad_scorers_mod.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_scorers_mod"


def test_cli_convert_bad_paths(tmp_path, groups_jsonl, capsys):
    err = _fails(["convert", "--input", str(tmp_path / "nope.jsonl"), "--to", "rows", "--output", "o.jsonl"], capsys)
    assert f"trl-rw convert: error: No such file or folder: {tmp_path / 'nope.jsonl'}" in err
    err = _fails(
        ["convert", "--input", str(groups_jsonl), "--to", "rows", "--output", str(tmp_path / "o.csv")], capsys
    )
    assert "o.csv: .csv files are not written" in err and "Give a .jsonl, .json or .parquet file" in err
    assert not (tmp_path / "o.csv").exists()
    # A missing parent folder is created (documented in save_dataset).
    out = tmp_path / "new" / "sub" / "rows.jsonl"
    assert main(["convert", "--input", str(groups_jsonl), "--to", "rows", "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4


def test_cli_unknown_to_shape(groups_jsonl, tmp_path, capsys):
    err = _fails(["convert", "--input", str(groups_jsonl), "--to", "triples", "--output", str(tmp_path / "o")], capsys)
    assert "argument --to: invalid choice: 'triples' (choose from 'rows', 'groups', 'pairs')" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "--n must be >= 1, got 0."),
        (["--temperature", "-1"], "temperature must be a finite number >= 0 (0 = greedy), got -1.0."),
        (["--temperature", "nan"], "temperature must be a finite number >= 0 (0 = greedy), got nan."),
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0."),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0."),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0."),
    ],
)
def test_cli_generate_bad_numbers(tmp_path, tiny_model_path, capsys, extra, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    argv = ["generate", "--model", tiny_model_path, "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")]
    err = _fails([*argv, "--backend", "transformers", *extra], capsys)
    assert f"trl-rw generate: error: {message}" in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "nosuchmod_xyz:fn",
            "Scorer 'nosuchmod_xyz:fn' looks like 'module:function' but module 'nosuchmod_xyz' cannot be imported",
        ),
        ("{mod}:VALUE", "Scorer '{mod}:VALUE' is not callable (it is a int)."),
        ("{mod}:nothere", "Scorer '{mod}:nothere': module '{mod}' has no attribute 'nothere'."),
    ],
)
def test_cli_bad_scorer_specs(tmp_path, groups_jsonl, scorer_module, capsys, spec, message):
    spec, message = spec.format(mod=scorer_module), message.format(mod=scorer_module)
    err = _fails(
        ["score", "--input", str(groups_jsonl), "--scorer", spec, "--output", str(tmp_path / "o.jsonl")], capsys
    )
    assert f"trl-rw score: error: {message}" in err
