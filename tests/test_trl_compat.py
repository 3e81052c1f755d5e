"""TRL's own SFTTrainer / DPOTrainer scenarios, run against each of the three trainers on the tiny offline model.

The scenarios are adapted from TRL's test suite (`tests/test_sft_trainer.py`, `tests/test_dpo_trainer.py` of the 1.x
line): PEFT, reference handling, precomputed reference log-probs, truncation, evaluation, callbacks, saving, resuming,
the model card, data formats, streaming, `compute_metrics`, model/processing-class arguments and gradient
accumulation.

The rule: every (scenario, trainer) either passes, or is refused with a clear message where the user hands the
argument over (the config or trainer constructor; for a dataset given to `evaluate()`, that call) -- never a crash
later, never a silently ignored argument. `EXPECTED` records the outcome per (scenario, trainer); `REFUSALS` the
exception type and message pattern of each refusal. `python -m tests.test_trl_compat` prints the counts.

Each "pass" test checks that the argument had its effect (the first-step loss against the default run, parameters
that changed or stayed, exact token ids), not just that nothing raised.
"""

import math

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from tests._helpers import changed_names, cpu_args, first_loss, make_grad_capture, snapshot, train_logs
from trl_rewardweighted import (
    RewardAugmentedDPOConfig,
    RewardAugmentedDPOTrainer,
    VARConfig,
    VARTrainer,
    VCBConfig,
    VCBTrainer,
)

TRAINERS = ("var", "vcb", "ra")

SCENARIOS = (
    "peft_config",
    "peft_model",
    "ref_model_object",
    "ref_model_id",
    "no_ref_in_memory_model",
    "precompute_ref",
    "ref_logps_column",
    "truncation_keep_start",
    "truncation_keep_end",
    "truncation_prompt_fills_max_length",
    "eval_steps",
    "eval_dict",
    "evaluate_later",
    "evaluate_after_training_precomputed",
    "callbacks",
    "save_reload",
    "resume",
    "model_card",
    "string_data",
    "conversational_data",
    "streaming",
    "streaming_ref_logps",
    "streaming_evaluate",
    "compute_metrics",
    "model_object",
    "processing_class",
    "gradient_accumulation",
    "padding_free",
    "no_train_dataset",
    "dataset_dict_as_train_dataset",
)

# Expected outcome of every (scenario, trainer): "pass", or "refuse" (a clear exception where the argument is given).
EXPECTED = {(scenario, name): "pass" for scenario in SCENARIOS for name in TRAINERS}
EXPECTED.update(
    {
        # VAR precomputes reference log-probs before training: a stream without a `ref_logps` column cannot get them.
        ("streaming", "var"): "refuse",
        ("streaming_evaluate", "var"): "refuse",
        # Reward augmentation reads the whole dataset (rescaling, fraction, drop counts): map-style only.
        ("streaming", "ra"): "refuse",
        ("streaming_ref_logps", "ra"): "refuse",
        # Reference log-probs of the original pairs do not apply to the goal-conditioned prompts of the relabeled pairs.
        ("ref_logps_column", "ra"): "refuse",
        # The fused LM head builds no logits: nothing to give `compute_metrics` (RA-DPO is plain DPO, which does).
        ("compute_metrics", "var"): "refuse",
        ("compute_metrics", "vcb"): "refuse",
        # Reference log-probs precomputed from the initial policy (no reference model kept): a dataset given to
        # `evaluate()` after training cannot get correct ones (TRL's DPO refuses this too).
        ("evaluate_after_training_precomputed", "var"): "refuse",
        ("evaluate_after_training_precomputed", "vcb"): "refuse",
        ("evaluate_after_training_precomputed", "ra"): "refuse",
        ("no_train_dataset", "var"): "refuse",
        ("no_train_dataset", "vcb"): "refuse",
        ("no_train_dataset", "ra"): "refuse",
        ("dataset_dict_as_train_dataset", "var"): "refuse",
        ("dataset_dict_as_train_dataset", "vcb"): "refuse",
        ("dataset_dict_as_train_dataset", "ra"): "refuse",
    }
)

# (exception type, regex on the message) of each expected refusal.
REFUSALS = {
    ("streaming", "var"): (ValueError, r"IterableDataset without a `ref_logps` column"),
    ("streaming_evaluate", "var"): (ValueError, r"IterableDataset without a `ref_logps` column"),
    ("streaming", "ra"): (TypeError, r"needs a map-style `datasets.Dataset`"),
    ("streaming_ref_logps", "ra"): (TypeError, r"needs a map-style `datasets.Dataset`"),
    ("ref_logps_column", "ra"): (ValueError, r"ref_chosen_logps"),
    ("compute_metrics", "var"): (ValueError, r"compute_metrics"),
    ("compute_metrics", "vcb"): (ValueError, r"compute_metrics"),
    ("evaluate_after_training_precomputed", "var"): (ValueError, r"the reference is no longer available"),
    ("evaluate_after_training_precomputed", "vcb"): (ValueError, r"Cannot compute reference log-probs for a dataset"),
    ("evaluate_after_training_precomputed", "ra"): (ValueError, r"Cannot compute reference log-probs for a dataset"),
    **{("no_train_dataset", n): (ValueError, r"`train_dataset` is required") for n in TRAINERS},
    **{
        ("dataset_dict_as_train_dataset", n): (TypeError, r"`train_dataset` must be a `Dataset` or `IterableDataset`")
        for n in TRAINERS
    },
}
assert {k for k, v in EXPECTED.items() if v == "refuse"} == set(REFUSALS)


def counts():
    """{trainer: {"pass": n, "refuse": m}} of `EXPECTED`."""
    out = {name: {"pass": 0, "refuse": 0} for name in TRAINERS}
    for (_, name), outcome in EXPECTED.items():
        out[name][outcome] += 1
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Data and configs per trainer
# ----------------------------------------------------------------------------------------------------------------------

PROMPTS = ["The cat", "A small dog", "The sky", "My friend"]
# Completions of equal token length: VAR's reference term then does not make the weights one-hot, so a different
# reference visibly changes the loss.
COMPLETIONS = [" likes the red ball.", " sees a good book.", " is blue and bright.", " writes a long letter."]
OTHERS = [" ran away.", " sat on the mat.", " is grey.", " sleeps all day."]


def U(text):
    return [{"role": "user", "content": text}]


def A(text):
    return [{"role": "assistant", "content": text.strip()}]


def var_rows(conversational=False):
    rows = {"prompt": list(PROMPTS), "completion": list(COMPLETIONS), "reward": [1.0, -1.0, 0.3, 2.0]}
    if conversational:
        rows["prompt"] = [U(p) for p in rows["prompt"]]
        rows["completion"] = [A(c) for c in rows["completion"]]
    return rows


def vcb_rows(conversational=False):
    completions = [[c, o] for c, o in zip(COMPLETIONS, OTHERS)]
    completions[0].append(" is blue.")
    completions[3].append(" is hot.")
    rows = {
        "prompt": list(PROMPTS),
        "completions": completions,
        "rewards": [[1.0, 0.5, -1.0], [0.2, 0.4], [1.0, 2.0], [0.1, 0.3, -0.2]],
    }
    if conversational:
        rows["prompt"] = [U(p) for p in rows["prompt"]]
        rows["completions"] = [[c.strip() for c in group] for group in completions]
    return rows


def ra_rows(conversational=False):
    rows = {
        "prompt": list(PROMPTS),
        "chosen": list(COMPLETIONS),
        "rejected": list(OTHERS),
        "score_chosen": [9.0, 8.0, 9.0, 7.0],
        "score_rejected": [2.0, 3.0, 4.0, 1.0],
    }
    if conversational:
        rows["prompt"] = [U(p) for p in rows["prompt"]]
        rows["chosen"] = [A(c) for c in rows["chosen"]]
        rows["rejected"] = [A(r) for r in rows["rejected"]]
    return rows


class Kit:
    """What differs between the trainers: classes, data, the full-batch size, the logged metric, the paper id."""

    def __init__(self, name, trainer_cls, config_cls, rows, full_batch, metric, paper_id, ref_column, zero_at_ref):
        self.name, self.trainer_cls, self.config_cls = name, trainer_cls, config_cls
        self.rows, self.full_batch, self.metric = rows, full_batch, metric
        self.paper_id, self.ref_column = paper_id, ref_column
        # A logged metric that is exactly 0 while the policy equals the reference (None: VAR has none).
        self.zero_at_ref = zero_at_ref

    def dataset(self, conversational=False, **extra):
        return Dataset.from_dict({**self.rows(conversational), **extra})

    def stream(self, conversational=False, **extra):
        rows = {**self.rows(conversational), **extra}

        def gen():
            for i in range(len(rows["prompt"])):
                yield {key: values[i] for key, values in rows.items()}

        return IterableDataset.from_generator(gen)

    def config(self, tmp_path, name="out", **overrides):
        # Full batch by default: one step sees every row, so first-step losses do not depend on the row order.
        base = dict(
            max_steps=1,
            per_device_train_batch_size=self.full_batch,
            per_device_eval_batch_size=self.full_batch,
            learning_rate=1e-3,
        )
        if self.name == "ra":
            base["max_length"] = None
        base.update(overrides)
        return self.config_cls(output_dir=str(tmp_path / name), **cpu_args(**base))

    def make(self, tmp_path, model, config=None, train_dataset=None, **kwargs):
        return self.trainer_cls(
            model=model,
            args=config if config is not None else self.config(tmp_path),
            train_dataset=train_dataset if train_dataset is not None else self.dataset(),
            **kwargs,
        )


KITS = {
    # RA: 4 pairs give 8 goal-conditioned rows.
    "var": Kit("var", VARTrainer, VARConfig, var_rows, 4, "var/ess", "2502.11026", "ref_logps", None),
    "vcb": Kit("vcb", VCBTrainer, VCBConfig, vcb_rows, 4, "calibration_error", "2402.16030", "ref_logps", "logratio"),
    "ra": Kit(
        "ra",
        RewardAugmentedDPOTrainer,
        RewardAugmentedDPOConfig,
        ra_rows,
        8,
        "rewards/margins",
        "2410.08067",
        "ref_chosen_logps",
        "rewards/margins",
    ),
}


def expect(scenario, name, init):
    """Run `init()` (the step that hands the argument over). Returns its result when the scenario is expected to pass,
    or asserts the expected refusal and returns None."""
    if EXPECTED[(scenario, name)] == "refuse":
        exc, pattern = REFUSALS[(scenario, name)]
        with pytest.raises(exc, match=pattern):
            init()
        return None
    return init()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers and shared fixtures
# ----------------------------------------------------------------------------------------------------------------------


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def first_sequence(trainer, dataset=None):
    """Token ids the model sees for the first row (its first sequence), through the trainer's own collator."""
    dataset = trainer.train_dataset if dataset is None else dataset
    batch = trainer.data_collator([dataset[0]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    while ids.dim() > 1:  # (B, T), or (G, n, T) for VCB's groups: the first sequence
        ids, mask = ids[0], mask[0]
    return ids[mask.bool()].tolist()


@pytest.fixture(scope="module")
def other_model_path(tmp_path_factory):
    """A second tiny model (another seed, same tokenizer): a reference that differs from the policy."""
    from trl_rewardweighted.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-other"), seed=123)


_CACHE = {}


@pytest.fixture(scope="module")
def baseline(tiny_model_path, tmp_path_factory):
    """First-step loss of the default run (model id, string data, full batch, reference = initial policy)."""

    def get(name):
        if ("baseline", name) not in _CACHE:
            kit = KITS[name]
            trainer = kit.make(tmp_path_factory.mktemp(f"base-{name}"), tiny_model_path)
            trainer.train()
            _CACHE[("baseline", name)] = first_loss(trainer)
        return _CACHE[("baseline", name)]

    return get


@pytest.fixture(scope="module")
def ref_object_loss(tiny_model_path, other_model_path, tmp_path_factory):
    """First-step loss with the other-seed model given as a `ref_model` object, and the object's parameters before."""

    def get(name):
        if ("ref_object", name) not in _CACHE:
            kit = KITS[name]
            ref = load(other_model_path)
            before = snapshot(ref)
            trainer = kit.make(tmp_path_factory.mktemp(f"ref-{name}"), tiny_model_path, ref_model=ref)
            trainer.train()
            _CACHE[("ref_object", name)] = (first_loss(trainer), before, ref)
        return _CACHE[("ref_object", name)]

    return get


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


parametrize_trainers = pytest.mark.parametrize("name", TRAINERS)


# ----------------------------------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------------------------------


def _check_lora_training(trainer, baseline_loss):
    from peft import PeftModel

    assert isinstance(trainer.model, PeftModel)
    before = snapshot(trainer.model)
    trainer.train()
    changed = changed_names(trainer.model, before)
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    # LoRA starts with B = 0: the first-step policy is the base model, and so is the reference (adapters disabled).
    assert first_loss(trainer) == pytest.approx(baseline_loss, rel=1e-4, abs=1e-5)


@parametrize_trainers
def test_peft_config(name, tiny_model_path, tmp_path, baseline):
    kit = KITS[name]
    cfg = kit.config(tmp_path, max_steps=2, learning_rate=1e-2)
    trainer = expect("peft_config", name, lambda: kit.make(tmp_path, tiny_model_path, cfg, peft_config=lora()))
    if trainer is not None:
        _check_lora_training(trainer, baseline(name))


@parametrize_trainers
def test_peft_model(name, tiny_model_path, tiny_tokenizer, tmp_path, baseline):
    from peft import get_peft_model

    kit = KITS[name]
    model = get_peft_model(load(tiny_model_path), lora())
    cfg = kit.config(tmp_path, max_steps=2, learning_rate=1e-2)
    trainer = expect("peft_model", name, lambda: kit.make(tmp_path, model, cfg, processing_class=tiny_tokenizer))
    if trainer is not None:
        _check_lora_training(trainer, baseline(name))


# ----------------------------------------------------------------------------------------------------------------------
# Reference handling
# ----------------------------------------------------------------------------------------------------------------------


@parametrize_trainers
def test_ref_model_object(name, tiny_model_path, other_model_path, tmp_path, baseline, ref_object_loss):
    kit = KITS[name]
    ref = load(other_model_path)
    trainer = expect("ref_model_object", name, lambda: kit.make(tmp_path, tiny_model_path, ref_model=ref))
    if trainer is None:
        return
    before = snapshot(ref)
    policy_before = snapshot(trainer.model)
    trainer.train()
    assert changed_names(trainer.model, policy_before)
    assert not changed_names(ref, before)  # the reference is frozen
    # The reference is used: another model than the initial policy gives another first-step loss.
    assert abs(first_loss(trainer) - baseline(name)) > 1e-4, (first_loss(trainer), baseline(name))
    # ... and the same one as the cached run with the same reference object.
    assert first_loss(trainer) == pytest.approx(ref_object_loss(name)[0], rel=1e-5, abs=1e-6)


@parametrize_trainers
def test_ref_model_id(name, tiny_model_path, other_model_path, tmp_path, baseline, ref_object_loss):
    kit = KITS[name]
    trainer = expect("ref_model_id", name, lambda: kit.make(tmp_path, tiny_model_path, ref_model=other_model_path))
    if trainer is None:
        return
    trainer.train()
    # A model id loads the same reference as the object: same first-step loss, not the initial policy's.
    assert first_loss(trainer) == pytest.approx(ref_object_loss(name)[0], rel=1e-5, abs=1e-6)
    assert abs(first_loss(trainer) - baseline(name)) > 1e-4


@parametrize_trainers
def test_no_ref_in_memory_model(name, tiny_model_path, tiny_tokenizer, tmp_path, baseline):
    """No `ref_model`, and a model object that cannot be reloaded from a path: the reference is the initial policy."""
    kit = KITS[name]
    model = load(tiny_model_path)
    model.config._name_or_path = ""
    trainer = expect(
        "no_ref_in_memory_model", name, lambda: kit.make(tmp_path, model, processing_class=tiny_tokenizer)
    )
    if trainer is None:
        return
    trainer.train()
    assert first_loss(trainer) == pytest.approx(baseline(name), rel=1e-5, abs=1e-6)


PRECOMPUTE = {
    "var": dict(precompute_ref_batch_size=1),  # VAR always precomputes; this is its knob
    "vcb": dict(precompute_ref_log_probs=True, precompute_ref_batch_size=1),
    "ra": dict(precompute_ref_log_probs=True, precompute_ref_batch_size=1),
}


@parametrize_trainers
def test_precompute_ref(name, tiny_model_path, tmp_path, baseline):
    kit = KITS[name]

    def init():
        cfg = kit.config(tmp_path, **PRECOMPUTE[name])
        return kit.make(tmp_path, tiny_model_path, cfg, eval_dataset=kit.dataset())

    trainer = expect("precompute_ref", name, init)
    if trainer is None:
        return
    assert getattr(trainer, "ref_model", None) is None  # no reference model kept
    assert kit.ref_column in trainer.train_dataset.column_names
    assert kit.ref_column in trainer.eval_dataset.column_names
    trainer.train()
    assert first_loss(trainer) == pytest.approx(baseline(name), rel=1e-5, abs=1e-6)
    # The eval set got its reference log-probs at init: evaluating after training needs no reference model.
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def _perturbed_ref_column(name, trainer_values):
    if name == "var":
        return [v + d for v, d in zip(trainer_values, [0.0, 3.0, 0.0, -3.0])]
    if name == "vcb":
        return [[v + 2.0 * j for j, v in enumerate(group)] for group in trainer_values]
    raise AssertionError(name)


@parametrize_trainers
def test_ref_logps_column(name, tiny_model_path, tmp_path, baseline):
    kit = KITS[name]
    if name == "ra":
        extra = {"ref_chosen_logps": [-10.0, -11.0, -12.0, -13.0], "ref_rejected_logps": [-9.0, -8.0, -7.0, -6.0]}
    else:
        # Reference log-probs of the initial policy, as the trainer computes them, then shifted per completion.
        cfg = kit.config(tmp_path, "pre", **PRECOMPUTE[name])
        computed = kit.make(tmp_path, tiny_model_path, cfg).train_dataset[kit.ref_column]
        extra = {kit.ref_column: _perturbed_ref_column(name, computed)}
    trainer = expect(
        "ref_logps_column", name, lambda: kit.make(tmp_path, tiny_model_path, train_dataset=kit.dataset(**extra))
    )
    if trainer is None:
        return
    assert getattr(trainer, "ref_model", None) is None
    assert trainer.train_dataset[kit.ref_column] == extra[kit.ref_column]  # used as given
    trainer.train()
    assert abs(first_loss(trainer) - baseline(name)) > 1e-4  # and it is what the loss uses


# ----------------------------------------------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@parametrize_trainers
def test_truncation(name, mode, tiny_model_path, tmp_path):
    kit = KITS[name]
    full = first_sequence(kit.make(tmp_path, tiny_model_path, kit.config(tmp_path, "full", max_length=None)))
    max_length = len(full) - 2  # the first row's prompt is shorter: it keeps completion tokens either way

    def init():
        cfg = kit.config(tmp_path, max_length=max_length, truncation_mode=mode)
        return kit.make(tmp_path, tiny_model_path, cfg)

    trainer = expect(f"truncation_{mode}", name, init)
    if trainer is None:
        return
    got = first_sequence(trainer)
    assert got == (full[:max_length] if mode == "keep_start" else full[-max_length:])
    trainer.train()
    assert math.isfinite(first_loss(trainer))


@parametrize_trainers
def test_truncation_prompt_fills_max_length(name, tiny_model_path, tmp_path):
    """A row whose prompt alone fills `max_length` (keep_start) has no completion token left: it is dropped at init
    (TRL drops such rows too); the other rows train."""
    kit = KITS[name]
    full = first_sequence(kit.make(tmp_path, tiny_model_path, kit.config(tmp_path, "full", max_length=None)))
    rows = kit.rows()
    rows["prompt"][1] = " ".join(["The small dog sees a good book and the red ball."] * 8)
    dataset = Dataset.from_dict(rows)
    n_rows = len(
        kit.make(tmp_path, tiny_model_path, kit.config(tmp_path, "full"), train_dataset=dataset).train_dataset
    )

    def init():
        cfg = kit.config(tmp_path, max_length=len(full) - 2, per_device_train_batch_size=2, max_steps=2)
        return kit.make(tmp_path, tiny_model_path, cfg, train_dataset=dataset)

    trainer = expect("truncation_prompt_fills_max_length", name, init)
    if trainer is None:
        return
    assert len(trainer.train_dataset) == n_rows - n_rows // 4  # one of the 4 prompts (RA: its 2 goal rows) dropped
    assert all(len(first_sequence(trainer, trainer.train_dataset.select([i]))) <= len(full) - 2 for i in range(2))
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in train_logs(trainer))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def _has_eval_metric(entry, metric, split=None):
    keys = [f"eval_{metric}"] + ([f"eval_{split}_{metric}"] if split else [])
    return any(k in entry and math.isfinite(entry[k]) for k in keys)


@parametrize_trainers
def test_eval_steps(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    cfg = kit.config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer = expect("eval_steps", name, lambda: kit.make(tmp_path, tiny_model_path, cfg, eval_dataset=kit.dataset()))
    if trainer is None:
        return
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [1, 2]
    assert all(math.isfinite(e["eval_loss"]) and _has_eval_metric(e, kit.metric) for e in evals), evals


@parametrize_trainers
def test_eval_dict(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    cfg = kit.config(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1)
    eval_dataset = {"data1": kit.dataset(), "data2": kit.dataset(conversational=False).select(range(2))}
    trainer = expect("eval_dict", name, lambda: kit.make(tmp_path, tiny_model_path, cfg, eval_dataset=eval_dataset))
    if trainer is None:
        return
    trainer.train()
    logs = trainer.state.log_history
    for split in ("data1", "data2"):
        entries = [e for e in logs if f"eval_{split}_loss" in e]
        assert len(entries) == 1 and math.isfinite(entries[0][f"eval_{split}_loss"]), logs
        assert _has_eval_metric(entries[0], kit.metric, split), entries[0]


@parametrize_trainers
def test_evaluate_later(name, tiny_model_path, tmp_path):
    """`evaluate()` with raw datasets given only then (single and dict), as TRL's DPO test does."""
    kit = KITS[name]
    trainer = kit.make(tmp_path, tiny_model_path)
    metrics = expect("evaluate_later", name, lambda: trainer.evaluate(kit.dataset()))
    if metrics is None:
        return
    assert math.isfinite(metrics["eval_loss"]) and _has_eval_metric(metrics, kit.metric), metrics
    if kit.zero_at_ref:  # before training the reference is the policy: the dataset got the right reference
        assert metrics[f"eval_{kit.zero_at_ref}"] == pytest.approx(0.0, abs=1e-5), metrics
    metrics = trainer.evaluate({"data1": kit.dataset(), "data2": kit.dataset(conversational=True)})
    assert math.isfinite(metrics["eval_data1_loss"]) and math.isfinite(metrics["eval_data2_loss"]), metrics


@parametrize_trainers
def test_streaming_evaluate(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    trainer = kit.make(tmp_path, tiny_model_path)
    metrics = expect("streaming_evaluate", name, lambda: trainer.evaluate(kit.stream()))
    if metrics is None:
        return
    assert math.isfinite(metrics["eval_loss"]) and _has_eval_metric(metrics, kit.metric), metrics
    # The same rows as a map-style dataset give the same loss.
    assert metrics["eval_loss"] == pytest.approx(trainer.evaluate(kit.dataset())["eval_loss"], rel=1e-5, abs=1e-6)


@parametrize_trainers
def test_evaluate_after_training_precomputed(name, tiny_model_path, tmp_path):
    """Reference log-probs come from the initial policy and no reference model is kept: a dataset first given to
    `evaluate()` after training must be refused (the trained policy is no longer the reference), while the eval set
    given at init (precomputed then) still evaluates."""
    kit = KITS[name]
    cfg = kit.config(tmp_path, **PRECOMPUTE[name])
    trainer = kit.make(tmp_path, tiny_model_path, cfg, eval_dataset=kit.dataset())
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    metrics = expect("evaluate_after_training_precomputed", name, lambda: trainer.evaluate(kit.dataset()))
    if metrics is None:
        return
    assert math.isfinite(metrics["eval_loss"])


@parametrize_trainers
def test_compute_metrics(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    seen = []

    def compute_metrics(eval_pred):
        seen.append(eval_pred)
        return {"my_metric": 0.123}

    cfg = kit.config(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1)
    trainer = expect(
        "compute_metrics",
        name,
        lambda: kit.make(tmp_path, tiny_model_path, cfg, eval_dataset=kit.dataset(), compute_metrics=compute_metrics),
    )
    if trainer is None:
        return
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 1 and evals[0].get("eval_my_metric") == 0.123, evals
    assert len(seen) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks, saving, resuming, model card
# ----------------------------------------------------------------------------------------------------------------------


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@parametrize_trainers
def test_callbacks(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    recorder = RecordLogs()
    cfg = kit.config(tmp_path, max_steps=2)
    trainer = expect("callbacks", name, lambda: kit.make(tmp_path, tiny_model_path, cfg, callbacks=[recorder]))
    if trainer is None:
        return
    trainer.train()
    steps = [entry for entry in recorder.logs if "loss" in entry]
    assert len(steps) == 2, recorder.logs
    assert all(kit.metric in entry and math.isfinite(entry[kit.metric]) for entry in steps), steps


@parametrize_trainers
def test_save_reload(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    trainer = expect("save_reload", name, lambda: kit.make(tmp_path, tiny_model_path))
    if trainer is None:
        return
    before = snapshot(trainer.model)
    trainer.train()
    assert changed_names(trainer.model, before)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = snapshot(load(tmp_path / "saved"))
    trained = snapshot(trainer.model)
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[n], trained[n]) for n in trained)


@parametrize_trainers
def test_resume(name, tiny_model_path, tmp_path):
    """Interrupted after step 1 and resumed from its checkpoint: the same losses and final weights as one run.

    Half batches and 3 steps, so the run crosses an epoch and the resumed sampler must skip the right rows."""
    kit = KITS[name]

    def config(out):
        half = kit.full_batch // 2
        return kit.config(
            tmp_path, out, max_steps=3, per_device_train_batch_size=half, save_strategy="steps", save_steps=1
        )

    full = expect("resume", name, lambda: kit.make(tmp_path, tiny_model_path, config("a")))
    if full is None:
        return
    full.train()
    resumed = kit.make(tmp_path, tiny_model_path, config("b"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    want = train_logs(full)
    got = [e for e in train_logs(resumed) if e["step"] > 1]  # the log history up to step 1 comes from the checkpoint
    assert [e["step"] for e in want] == [1, 2, 3] and [e["step"] for e in got] == [2, 3]
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in want[1:]], rel=1e-5, abs=1e-6)
    a, b = snapshot(full.model), snapshot(resumed.model)
    assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a)


@parametrize_trainers
def test_model_card(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    cfg = kit.config(tmp_path, save_strategy="steps", save_steps=1)
    trainer = expect("model_card", name, lambda: kit.make(tmp_path, tiny_model_path, cfg))
    if trainer is None:
        return
    trainer.train()
    # Written with the checkpoint ...
    card = (tmp_path / "out" / "README.md").read_text()
    assert kit.trainer_cls._name in card and kit.trainer_cls._paper["id"] == kit.paper_id and kit.paper_id in card
    # ... and on request.
    (tmp_path / "out" / "README.md").unlink()
    trainer.create_model_card(model_name="tiny-compat")
    card = (tmp_path / "out" / "README.md").read_text()
    assert kit.trainer_cls._name in card and kit.paper_id in card and "tiny-compat" in card
    assert "trl-rewardweighted" in card
    assert set(kit.trainer_cls._tag_names) <= set(trainer.model.model_tags)


# ----------------------------------------------------------------------------------------------------------------------
# Data formats
# ----------------------------------------------------------------------------------------------------------------------


def assert_trains_two_logged_steps(trainer, kit):
    """Two training steps change the weights and log a finite loss and the method's own metric each."""
    before = snapshot(trainer.model)
    trainer.train()
    assert changed_names(trainer.model, before)
    logs = train_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) and kit.metric in e for e in logs), logs


@pytest.mark.parametrize("conversational", [False, True], ids=["string_data", "conversational_data"])
@parametrize_trainers
def test_data_format(name, conversational, tiny_model_path, tmp_path):
    kit = KITS[name]
    scenario = "conversational_data" if conversational else "string_data"
    cfg = kit.config(tmp_path, max_steps=2, per_device_train_batch_size=kit.full_batch // 2)
    trainer = expect(
        scenario, name, lambda: kit.make(tmp_path, tiny_model_path, cfg, train_dataset=kit.dataset(conversational))
    )
    if trainer is None:
        return
    assert_trains_two_logged_steps(trainer, kit)


@parametrize_trainers
def test_streaming(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    cfg = kit.config(tmp_path, max_steps=2, per_device_train_batch_size=2)
    trainer = expect("streaming", name, lambda: kit.make(tmp_path, tiny_model_path, cfg, train_dataset=kit.stream()))
    if trainer is None:
        return
    assert_trains_two_logged_steps(trainer, kit)


@parametrize_trainers
def test_streaming_ref_logps(name, tiny_model_path, tmp_path):
    """A stream that carries its reference log-probs needs no reference pass."""
    kit = KITS[name]
    if name == "var":
        extra = {"ref_logps": [-20.0, -21.0, -22.0, -23.0]}
    elif name == "vcb":
        extra = {"ref_logps": [[-20.0 - j for j in range(len(g))] for g in vcb_rows()["rewards"]]}
    else:
        extra = {"ref_chosen_logps": [-20.0] * 4, "ref_rejected_logps": [-21.0] * 4}
    trainer = expect(
        "streaming_ref_logps",
        name,
        lambda: kit.make(tmp_path, tiny_model_path, kit.config(tmp_path), train_dataset=kit.stream(**extra)),
    )
    if trainer is None:
        return
    assert getattr(trainer, "ref_model", None) is None
    trainer.train()
    # The stream's column is used as the same column of a map-style dataset is (one full batch: order-independent).
    mapped = kit.make(tmp_path, tiny_model_path, kit.config(tmp_path, "mapped"), train_dataset=kit.dataset(**extra))
    mapped.train()
    assert first_loss(trainer) == pytest.approx(first_loss(mapped), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Model and processing class arguments, gradient accumulation
# ----------------------------------------------------------------------------------------------------------------------


@parametrize_trainers
def test_model_object(name, tiny_model_path, tmp_path, baseline):
    """A model object instead of its id (tokenizer resolved from the model's path): the same first step."""
    kit = KITS[name]
    model = load(tiny_model_path)
    trainer = expect("model_object", name, lambda: kit.make(tmp_path, model))
    if trainer is None:
        return
    assert trainer.model is model
    trainer.train()
    assert first_loss(trainer) == pytest.approx(baseline(name), rel=1e-5, abs=1e-6)


def _upper_roles_tokenizer(path):
    from trl_rewardweighted.testing import TINY_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TINY_CHAT_TEMPLATE.replace(
        "'<|im_start|>' + message['role']", "'<|im_start|>' + message['role'] | upper"
    )
    assert tok.chat_template != TINY_CHAT_TEMPLATE
    return tok


@parametrize_trainers
def test_processing_class(name, tiny_model_path, tmp_path):
    """An explicit tokenizer (with its own chat template) is the one used to tokenize."""
    kit = KITS[name]
    tok = _upper_roles_tokenizer(tiny_model_path)
    cfg = kit.config(tmp_path, per_device_train_batch_size=kit.full_batch // 2)
    trainer = expect(
        "processing_class",
        name,
        lambda: kit.make(
            tmp_path, tiny_model_path, cfg, train_dataset=kit.dataset(conversational=True), processing_class=tok
        ),
    )
    if trainer is None:
        return
    assert trainer.processing_class is tok
    text = tok.decode(first_sequence(trainer))
    assert "<|im_start|>USER\n" in text and "<|im_start|>user\n" not in text, text
    trainer.train()
    assert math.isfinite(first_loss(trainer))


@parametrize_trainers
def test_gradient_accumulation(name, tiny_model_path, tmp_path):
    """One optimizer step over the same rows, as one batch or as 2 accumulated half batches: the same gradient."""
    kit = KITS[name]
    grads = []
    for bs, ga in ((kit.full_batch, 1), (kit.full_batch // 2, 2)):
        capture = make_grad_capture()
        cfg = kit.config(tmp_path, f"bs{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        trainer = expect(
            "gradient_accumulation",
            name,
            lambda cfg=cfg, capture=capture: kit.make(tmp_path, tiny_model_path, cfg, callbacks=[capture]),
        )
        if trainer is None:
            return
        trainer.train()
        grads.append(capture.grad)
    assert grads[0] is not None and float(grads[0].norm()) > 0
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-4


@parametrize_trainers
def test_padding_free(name, tiny_model_path, tmp_path, baseline):
    """`padding_free=True`: VAR and VCB run padding-free forwards with the same first step as padded ones; RA-DPO is
    `DPOTrainer`, which in TRL 1.16 warns that padding-free is unavailable and pads."""
    kit = KITS[name]
    cfg = kit.config(tmp_path, padding_free=True)
    trainer = expect("padding_free", name, lambda: kit.make(tmp_path, tiny_model_path, cfg))
    if trainer is None:
        return
    assert trainer.padding_free is (name != "ra")
    assert cfg.padding_free is True  # the user's config is left as given
    trainer.train()
    assert first_loss(trainer) == pytest.approx(baseline(name), rel=1e-5, abs=1e-6)


@parametrize_trainers
def test_no_train_dataset(name, tiny_model_path, tmp_path):
    kit = KITS[name]
    cfg = kit.config(tmp_path)
    expect("no_train_dataset", name, lambda: kit.trainer_cls(model=tiny_model_path, args=cfg, train_dataset=None))


@parametrize_trainers
def test_dataset_dict_as_train_dataset(name, tiny_model_path, tmp_path):
    from datasets import DatasetDict

    kit = KITS[name]
    cfg = kit.config(tmp_path)
    dataset = DatasetDict({"train": kit.dataset()})
    trainer = expect(
        "dataset_dict_as_train_dataset", name, lambda: kit.make(tmp_path, tiny_model_path, cfg, train_dataset=dataset)
    )
    if trainer is None:
        return
    trainer.train()
    assert math.isfinite(first_loss(trainer))


# ----------------------------------------------------------------------------------------------------------------------
# The table itself
# ----------------------------------------------------------------------------------------------------------------------


def test_expected_table_is_complete():
    """Every scenario has an outcome for every trainer, and every refusal its exception type and message pattern."""
    assert set(EXPECTED) == {(s, n) for s in SCENARIOS for n in TRAINERS}
    assert set(EXPECTED.values()) <= {"pass", "refuse"}
    for key, (exc, pattern) in REFUSALS.items():
        assert issubclass(exc, Exception) and pattern, key


if __name__ == "__main__":
    width = max(map(len, SCENARIOS))
    print(f"{'scenario':<{width}}  " + "  ".join(f"{n:>6}" for n in TRAINERS))
    for scenario in SCENARIOS:
        print(f"{scenario:<{width}}  " + "  ".join(f"{EXPECTED[(scenario, n)]:>6}" for n in TRAINERS))
    for name, c in counts().items():
        print(f"{name}: {c['pass']} pass, {c['refuse']} refuse")
