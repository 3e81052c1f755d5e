"""TRL's own GRPOTrainer scenarios, run against `OnlineVARTrainer` on the tiny offline model.

The scenarios are adapted from TRL's GRPO test suite (`tests/test_grpo_trainer.py` of the 1.x line), restricted to what
runs on CPU without vLLM: reward functions (sync, async, with extra dataset columns, returning None), reward models
given as an id or as an object with `reward_processing_classes`, several reward functions with `reward_weights`,
string and conversational prompts, the generation-batch layout (`num_iterations`, `steps_per_generation`,
`generation_batch_size`, more generations than the per-device batch), evaluation, PEFT, model objects, the processing
class, callbacks, saving, resuming, the model card, GRPO's generation and reference options, and GRPO's loss options
(which online VAR replaces, so they are refused).

The rule (as in `tests/test_trl_compat.py`): every scenario either passes, or is refused with a clear message where the
user hands the argument over (the config or the trainer constructor) -- never a crash later, never a silently ignored
argument. `EXPECTED` records the outcome per scenario, `REFUSALS` the exception type and message pattern of each
refusal. `python -m tests.test_trl_compat_online` prints the table and the counts.

Each "pass" test checks that the argument had its effect, mostly through the weights of the first generation batch:
the policy is still the reference then, so `log q = log pi_ref` and the weights must be exactly
`softmax(r / beta)` over each prompt's completions, with `r` the rewards the scenario's reward functions returned.
"""

import math

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from tests._helpers import changed_names, cpu_args, first_loss, snapshot, train_logs
from trl_rewardweighted import OnlineVARConfig, OnlineVARTrainer

SCENARIOS = (
    # Rewards
    "reward_func",
    "async_reward_func",
    "reward_model_id",
    "reward_model_object_mixed",
    "reward_weights",
    "reward_weights_wrong_length",
    "reward_processing_classes_wrong_length",
    "reward_func_extra_columns",
    "reward_func_some_none",
    "reward_func_all_none",
    "scale_rewards",
    # Data
    "conversational_prompts",
    "streaming",
    "shuffle_dataset_false",
    "no_train_dataset",
    # Generation-batch layout
    "num_iterations",
    "steps_per_generation",
    "generation_batch_size",
    "num_generations_above_batch_size",
    "auto_find_batch_size",
    # Evaluation
    "eval_steps_num_generations_eval",
    "evaluate_later",
    # Models
    "model_object",
    "processing_class",
    "peft_config",
    "peft_model",
    "peft_gradient_checkpointing",
    "gradient_checkpointing",
    "disable_dropout",
    "cast_lm_head_to_fp32",
    "sync_ref_model",
    "sync_ref_model_peft",
    "sync_ref_model_other_architecture",
    # Training loop
    "callbacks",
    "save_reload",
    "resume",
    "model_card",
    "log_completions",
    # Generation options
    "max_completion_length",
    "mask_truncated_completions",
    "rollout_func",
    "tools",
    "pad_to_multiple_of",
    "continuous_batching",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_kwargs",
    # GRPO's loss options (the loss is replaced)
    "beta_zero",
    "loss_type",
    "epsilon",
    "delta",
    "importance_sampling_level",
    "top_entropy_quantile",
    "entropy_coef",
    "off_policy_mask_threshold",
    "use_bias_correction_kl",
    "multi_objective_aggregation",
)

# GRPO config fields refused by OnlineVARConfig, with the value a TRL GRPO test sets (scenario -> overrides).
CONFIG_REFUSALS = {
    "beta_zero": dict(beta=0.0),
    "loss_type": dict(loss_type="bnpo"),
    "epsilon": dict(epsilon=0.3),
    "delta": dict(delta=2.0),
    "importance_sampling_level": dict(importance_sampling_level="sequence"),
    "top_entropy_quantile": dict(top_entropy_quantile=0.2),
    "entropy_coef": dict(entropy_coef=0.01),
    "off_policy_mask_threshold": dict(off_policy_mask_threshold=0.5),
    "use_bias_correction_kl": dict(use_bias_correction_kl=False),
    "multi_objective_aggregation": dict(multi_objective_aggregation="normalize_then_sum"),
    "temperature": dict(temperature=0.7),
    "top_p": dict(top_p=0.9),
    "top_k": dict(top_k=10),
    "min_p": dict(min_p=0.01),
    "repetition_penalty": dict(repetition_penalty=1.1),
    "generation_kwargs": dict(
        generation_kwargs={"do_sample": True, "top_k": 50, "num_beams": 2, "length_penalty": -0.1}
    ),
    "auto_find_batch_size": dict(auto_find_batch_size=True),
}

# Expected outcome of every scenario: "pass", or "refuse" (a clear exception where the argument is given).
EXPECTED = {scenario: "pass" for scenario in SCENARIOS}
EXPECTED.update({scenario: "refuse" for scenario in CONFIG_REFUSALS})
EXPECTED.update(
    {
        # TRL's own checks at the constructor (kept: they fire before anything is trained).
        "reward_weights_wrong_length": "refuse",
        "reward_processing_classes_wrong_length": "refuse",
        "no_train_dataset": "refuse",
        # GRPO keeps no separate reference model for a PEFT policy (adapters disabled): nothing to synchronise.
        "sync_ref_model_peft": "refuse",
        # The reference is synchronised parameter by parameter: it must have the policy's architecture.
        "sync_ref_model_other_architecture": "refuse",
    }
)

_LOSS = r"is not supported: online VAR replaces GRPO's clipped policy-gradient loss"
_SAMPLER = r"is not supported without vLLM: the weights need log q\(y\|x\)"
# (exception type, regex on the message) of each expected refusal.
REFUSALS = {
    "beta_zero": (ValueError, r"OnlineVARConfig.beta must be a finite number > 0, got 0.0"),
    "loss_type": (ValueError, r"OnlineVARConfig.loss_type='bnpo' " + _LOSS),
    "epsilon": (ValueError, r"OnlineVARConfig.epsilon=0.3 " + _LOSS),
    "delta": (ValueError, r"OnlineVARConfig.delta=2.0 " + _LOSS),
    "importance_sampling_level": (ValueError, r"OnlineVARConfig.importance_sampling_level='sequence' " + _LOSS),
    "top_entropy_quantile": (ValueError, r"OnlineVARConfig.top_entropy_quantile=0.2 " + _LOSS),
    "entropy_coef": (ValueError, r"OnlineVARConfig.entropy_coef=0.01 " + _LOSS),
    "off_policy_mask_threshold": (ValueError, r"OnlineVARConfig.off_policy_mask_threshold=0.5 " + _LOSS),
    "use_bias_correction_kl": (ValueError, r"OnlineVARConfig.use_bias_correction_kl=False is not supported"),
    "multi_objective_aggregation": (ValueError, r"multi_objective_aggregation='normalize_then_sum' is not supported"),
    "temperature": (ValueError, r"OnlineVARConfig.temperature=0.7 is not supported: GRPO scores the policy"),
    "top_p": (ValueError, r"OnlineVARConfig.top_p=0.9 " + _SAMPLER),
    "top_k": (ValueError, r"OnlineVARConfig.top_k=10 " + _SAMPLER),
    "min_p": (ValueError, r"OnlineVARConfig.min_p=0.01 " + _SAMPLER),
    "repetition_penalty": (ValueError, r"OnlineVARConfig.repetition_penalty=1.1 " + _SAMPLER),
    "generation_kwargs": (ValueError, r"changes the sampling distribution \(top_k=50, num_beams=2\)"),
    "auto_find_batch_size": (ValueError, r"auto_find_batch_size is not supported by GRPO"),
    "reward_weights_wrong_length": (
        ValueError,
        r"Number of reward weights \(3\) must match number of reward functions",
    ),
    "reward_processing_classes_wrong_length": (
        ValueError,
        r"number of reward processing classes \(1\) must match the number of reward functions \(2\)",
    ),
    "no_train_dataset": (ValueError, r"`train_dataset` is required"),
    "sync_ref_model_peft": (NotImplementedError, r"sync_ref_model=True` while using a PEFT model"),
    "sync_ref_model_other_architecture": (ValueError, r"`sync_ref_model=True` needs a `ref_model` with the policy's"),
}
assert {k for k, v in EXPECTED.items() if v == "refuse"} == set(REFUSALS)


def counts():
    """{"pass": n, "refuse": m} of `EXPECTED`."""
    out = {"pass": 0, "refuse": 0}
    for outcome in EXPECTED.values():
        out[outcome] += 1
    return out


def expect(scenario, init):
    """Run `init()` (the step that hands the argument over). Returns its result when the scenario is expected to pass,
    or asserts the expected refusal and returns None."""
    if EXPECTED[scenario] == "refuse":
        exc, pattern = REFUSALS[scenario]
        with pytest.raises(exc, match=pattern):
            init()
        return None
    return init()


# ----------------------------------------------------------------------------------------------------------------------
# Data, rewards, configs
# ----------------------------------------------------------------------------------------------------------------------

PROMPTS = ["The cat", "A small dog", "The sky", "My friend"]
G = 4  # num_generations
BETA = 0.5


def U(text):
    return [{"role": "user", "content": text}]


def dataset(conversational=False, **extra):
    prompts = [U(p) for p in PROMPTS] if conversational else list(PROMPTS)
    return Dataset.from_dict({"prompt": prompts * 2, **{k: list(v) * 2 for k, v in extra.items()}})


def score(ids):
    """A deterministic reward of the completion's token ids, spread over a few units (so `BETA` gives soft weights)."""
    return ((sum(ids) % 17) - 8) / 4


def recording_reward(name="reward_ids", fn=score, asynchronous=False):
    """A GRPO reward function returning `fn(completion_ids)`; `.calls` keeps every call's rewards and keyword
    arguments."""
    calls = []

    def reward(prompts, completions, completion_ids, **kwargs):
        out = [fn(c) for c in completion_ids]
        calls.append(dict(kwargs, prompts=prompts, completions=completions, rewards=out))
        return out

    if asynchronous:

        async def async_reward(**kwargs):
            return reward(**kwargs)

        async_reward.__name__ = name
        async_reward.calls = calls
        return async_reward
    reward.__name__ = name
    reward.calls = calls
    return reward


def config(tmp_path, name="out", **overrides):
    # One optimizer step of 2 prompts x 4 completions by default.
    base = dict(
        num_generations=G,
        per_device_train_batch_size=8,
        max_completion_length=6,
        max_steps=1,
        learning_rate=1e-3,
        beta=BETA,
    )
    base.update(overrides)
    return OnlineVARConfig(output_dir=str(tmp_path / name), **cpu_args(**base))


def make(tmp_path, model, reward_funcs=None, args=None, train_dataset=None, **kwargs):
    return OnlineVARTrainer(
        model=model,
        reward_funcs=reward_funcs if reward_funcs is not None else recording_reward(),
        args=args if args is not None else config(tmp_path),
        train_dataset=train_dataset if train_dataset is not None else dataset(),
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Recording and checking
# ----------------------------------------------------------------------------------------------------------------------


def _clone(out):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}


def record(trainer):
    """Record every generation batch (`trainer.generations`: (mode, output) in call order) and the `var_weights` of
    every loss micro-batch (`trainer.loss_weights`)."""
    trainer.generations, trainer.loss_weights = [], []
    generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def recorded_generate(inputs):
        out = generate(inputs)
        trainer.generations.append(("train" if trainer.model.training else "eval", _clone(out)))
        return out

    def recorded_loss(model, inputs):
        trainer.loss_weights.append(inputs["var_weights"].clone())
        return compute_loss(model, inputs)

    trainer._generate_and_score_completions = recorded_generate
    trainer._compute_loss = recorded_loss
    return trainer


def train_generations(trainer):
    return [out for mode, out in trainer.generations if mode == "train"]


def expected_weights(rewards, group=G, beta=BETA):
    """softmax(r / beta) over each prompt's completions: the weights while the sampling policy is the reference."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    return torch.softmax(r.view(-1, group) / beta, dim=1).view(-1)


def assert_weights(out, rewards, group=G):
    torch.testing.assert_close(out["var_weights"].double(), expected_weights(rewards, group), rtol=1e-4, atol=1e-6)


def expected_first_loss(out, rows, group=G):
    """The first step's loss -(G / rows) sum_i w_i log pi(y_i|x): the policy is still the reference, so its summed
    log-probs are the reference's, over the tokens the loss counts (completion mask times tool mask)."""
    mask = out["completion_mask"] * out.get("tool_mask", 1)
    logps = (out["ref_per_token_logps"].double() * mask).sum(1)
    return float(-(out["var_weights"].double() * logps).sum() * group / rows)


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **kwargs)


def step_generations(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """Stand-in for `GRPOTrainer._generate_single_turn`: completions of 1-5 tokens that depend only on the prompt, the
    row and the training step (so an interrupted and resumed run sees the same ones); every other one ends with EOS."""
    step = self.state.global_step
    eos = self.eos_token_ids[0]
    out = []
    for i, ids in enumerate(prompt_ids):
        length = 1 + (3 * i + step) % 5
        tokens = [100 + (ids[-1] * 7 + 13 * i + 5 * k + 11 * step) % 400 for k in range(length)]
        if (i + step) % 2 == 0:
            tokens.append(eos)
        out.append(tokens)
    return out, None


@pytest.fixture(scope="module")
def baseline(tiny_model_path, tmp_path_factory):
    """The default run (model id, one recorded reward function, string prompts, one step), recorded: (trainer,
    reward function)."""
    reward = recording_reward()
    trainer = record(make(tmp_path_factory.mktemp("baseline"), tiny_model_path, reward))
    trainer.train()
    return trainer, reward


# ----------------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------------


def test_reward_func(baseline):
    """A reward function given as a callable, on string prompts (TRL's `test_training_reward_func_standard`)."""
    trainer, reward = baseline
    (out,) = train_generations(trainer)
    assert len(reward.calls) == 1 and isinstance(reward.calls[0]["completions"][0], str)
    assert_weights(out, reward.calls[0]["rewards"])
    assert trainer.state.log_history[0]["online_var/kl"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 < trainer.state.log_history[0]["online_var/ess"] < G
    assert first_loss(trainer) == pytest.approx(expected_first_loss(out, rows=8), rel=1e-4)


def test_async_reward_func(tiny_model_path, tmp_path):
    sync, asynchronous = recording_reward("sync_reward"), recording_reward("async_reward", fn=len, asynchronous=True)
    trainer = expect("async_reward_func", lambda: make(tmp_path, tiny_model_path, [sync, asynchronous]))
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    r = torch.tensor(sync.calls[0]["rewards"]) + torch.tensor(asynchronous.calls[0]["rewards"], dtype=torch.float)
    assert_weights(out, r)


def _rm_scores(model, tokenizer, texts):
    """Scores of a sequence-classification reward model, one text at a time (no padding)."""
    with torch.no_grad():
        return [
            float(model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]) for t in texts
        ]


def _logged_texts(trainer):
    return [p + c for p, c in zip(trainer._logs["prompt"], trainer._logs["completion"])]


def test_reward_model_id(tiny_model_path, tiny_reward_model_path, tmp_path):
    trainer = expect("reward_model_id", lambda: make(tmp_path, tiny_model_path, tiny_reward_model_path))
    if trainer is None:
        return
    assert isinstance(trainer.reward_funcs[0], torch.nn.Module)
    record(trainer).train()
    (out,) = train_generations(trainer)
    (logged,) = trainer._logs["rewards"].values()
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_path)
    expected = _rm_scores(rm, AutoTokenizer.from_pretrained(tiny_reward_model_path), _logged_texts(trainer))
    assert list(logged) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert max(expected) - min(expected) > 1e-3  # the reward model's scores are not constant
    assert_weights(out, list(logged))


def test_reward_model_object_mixed(tiny_model_path, tiny_reward_model_path, tmp_path):
    """A reward model object with its own `reward_processing_classes` entry, next to a reward function (TRL's
    `test_training_different_reward_model` and `test_training_multiple_mixed_reward_funcs`)."""
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_path)
    rm_tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_path)
    reward = recording_reward()
    trainer = expect(
        "reward_model_object_mixed",
        lambda: make(tmp_path, tiny_model_path, [reward, rm], reward_processing_classes=[None, rm_tokenizer]),
    )
    if trainer is None:
        return
    assert trainer.reward_processing_classes[1] is rm_tokenizer
    record(trainer).train()
    (out,) = train_generations(trainer)
    rm_rewards = _rm_scores(rm, rm_tokenizer, _logged_texts(trainer))
    assert_weights(out, torch.tensor(reward.calls[0]["rewards"]) + torch.tensor(rm_rewards))


def test_reward_weights(tiny_model_path, tmp_path):
    """Two reward functions with `reward_weights`: the weights use the weighted sum of the rewards."""
    first, second = recording_reward("first"), recording_reward("second", fn=len)
    trainer = expect(
        "reward_weights",
        lambda: make(tmp_path, tiny_model_path, [first, second], config(tmp_path, reward_weights=[0.7, 0.3])),
    )
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    r = 0.7 * torch.tensor(first.calls[0]["rewards"]) + 0.3 * torch.tensor(
        second.calls[0]["rewards"], dtype=torch.float
    )
    assert_weights(out, r)
    log = trainer.state.log_history[0]
    assert "rewards/first/mean" in log and "rewards/second/mean" in log


def test_reward_weights_wrong_length(tiny_model_path, tmp_path):
    args = config(tmp_path, reward_weights=[1.0, 1.0, 1.0])
    expect("reward_weights_wrong_length", lambda: make(tmp_path, tiny_model_path, [score_reward, len_reward], args))


def score_reward(completion_ids, **kwargs):
    return [score(c) for c in completion_ids]


def len_reward(completion_ids, **kwargs):
    return [float(len(c)) for c in completion_ids]


def test_reward_processing_classes_wrong_length(tiny_model_path, tiny_reward_model_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_path)
    expect(
        "reward_processing_classes_wrong_length",
        lambda: make(
            tmp_path,
            tiny_model_path,
            [tiny_reward_model_path, tiny_reward_model_path],
            reward_processing_classes=tokenizer,
        ),
    )


def test_reward_func_extra_columns(tiny_model_path, tmp_path):
    """Extra dataset columns and the trainer state reach the reward function, aligned with the prompts, and its
    `log_metric` is logged."""
    targets = [0.5, -1.0, 2.0, 0.0]
    calls = []

    def reward(completion_ids, prompts, target, trainer_state, log_metric, **kwargs):
        calls.append((prompts, target, trainer_state))
        log_metric("mean_target", sum(target) / len(target))
        return [score(c) + t for c, t in zip(completion_ids, target)]

    trainer = expect(
        "reward_func_extra_columns",
        lambda: make(tmp_path, tiny_model_path, reward, train_dataset=dataset(target=targets)),
    )
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    ((prompts, target, state),) = calls
    assert target == [targets[PROMPTS.index(p)] for p in prompts]
    assert state is trainer.state
    assert trainer.state.log_history[0]["mean_target"] == pytest.approx(sum(target) / len(target))
    ids = [c[m.bool()].tolist() for c, m in zip(out["completion_ids"], out["completion_mask"])]
    assert_weights(out, [score(c) + t for c, t in zip(ids, target)])


def test_reward_func_some_none(tiny_model_path, tmp_path):
    """One reward function returns None everywhere, the other scores (TRL's
    `test_training_multiple_reward_funcs_with_None_output`): the weights use the scores that exist."""
    applicable = recording_reward("applicable")

    def not_applicable(completions, **kwargs):
        return [None] * len(completions)

    trainer = expect("reward_func_some_none", lambda: make(tmp_path, tiny_model_path, [applicable, not_applicable]))
    if trainer is None:
        return
    before = snapshot(trainer.model)
    record(trainer).train()
    (out,) = train_generations(trainer)
    assert_weights(out, applicable.calls[0]["rewards"])
    assert trainer.skipped_completions == 0 and trainer.skipped_groups == 0
    assert changed_names(trainer.model, before)


def test_reward_func_all_none(tiny_model_path, tmp_path, caplog):
    """Every reward is None: every completion is unscorable, every prompt is skipped and nothing is learned."""

    def always_none(completions, **kwargs):
        return [None] * len(completions)

    trainer = expect("reward_func_all_none", lambda: make(tmp_path, tiny_model_path, always_none))
    if trainer is None:
        return
    before = snapshot(trainer.model)
    with caplog.at_level("WARNING", logger="trl.trainer.grpo_trainer"):
        record(trainer).train()
    assert "All reward functions returned None" in caplog.text
    (out,) = train_generations(trainer)
    assert (out["var_weights"] == 0).all()
    assert trainer.skipped_groups == 2 and trainer.state.log_history[0]["online_var/skipped_groups"] == 2
    assert first_loss(trainer) == 0.0
    assert not changed_names(trainer.model, before)


def test_scale_rewards(tiny_model_path, tmp_path, baseline):
    """`scale_rewards` changes GRPO's (logged) advantages, not the weights: they use the raw rewards."""
    base_trainer, _ = baseline
    trainer = expect(
        "scale_rewards", lambda: make(tmp_path, tiny_model_path, args=config(tmp_path, scale_rewards="none"))
    )
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    (base,) = train_generations(base_trainer)
    assert torch.equal(out["completion_ids"], base["completion_ids"])  # same seed, same completions
    torch.testing.assert_close(out["var_weights"], base["var_weights"])
    assert (out["advantages"] - base["advantages"]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def test_conversational_prompts(tiny_model_path, tmp_path):
    reward = recording_reward()
    trainer = expect(
        "conversational_prompts",
        lambda: make(tmp_path, tiny_model_path, reward, train_dataset=dataset(conversational=True)),
    )
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    (call,) = reward.calls
    assert call["prompts"][0][0]["role"] == "user" and call["completions"][0][0]["role"] == "assistant"
    prompt_text = trainer.processing_class.decode(out["prompt_ids"][0][out["prompt_mask"][0].bool()])
    assert prompt_text.endswith("<|im_start|>assistant\n"), prompt_text  # the chat template was applied
    assert_weights(out, call["rewards"])


def test_streaming(tiny_model_path, tmp_path):
    """An `IterableDataset` of prompts: two steps, each a generation batch of whole prompt groups."""

    def rows():
        for prompt in PROMPTS * 2:
            yield {"prompt": prompt}

    reward = recording_reward()
    trainer = expect(
        "streaming",
        lambda: make(
            tmp_path,
            tiny_model_path,
            reward,
            config(tmp_path, max_steps=2),
            train_dataset=IterableDataset.from_generator(rows),
        ),
    )
    if trainer is None:
        return
    record(trainer).train()
    outs = train_generations(trainer)
    assert len(outs) == 2 and len(train_logs(trainer)) == 2
    for call in reward.calls:
        prompts = call["prompts"]
        assert all(len(set(prompts[i : i + G])) == 1 for i in range(0, len(prompts), G))  # whole groups
    assert_weights(outs[0], reward.calls[0]["rewards"])


def test_shuffle_dataset_false(tiny_model_path, tmp_path):
    reward = recording_reward()
    trainer = expect(
        "shuffle_dataset_false",
        lambda: make(tmp_path, tiny_model_path, reward, config(tmp_path, max_steps=2, shuffle_dataset=False)),
    )
    if trainer is None:
        return
    trainer.train()
    seen = [call["prompts"] for call in reward.calls]
    assert seen == [[PROMPTS[0]] * G + [PROMPTS[1]] * G, [PROMPTS[2]] * G + [PROMPTS[3]] * G]


def test_no_train_dataset(tiny_model_path, tmp_path):
    expect(
        "no_train_dataset",
        lambda: OnlineVARTrainer(tiny_model_path, score_reward, args=config(tmp_path), train_dataset=None),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Generation-batch layout
# ----------------------------------------------------------------------------------------------------------------------


def test_num_iterations(tiny_model_path, tmp_path):
    """`num_iterations=2`: one generation batch for two optimizer steps; its weights are computed once (from the
    sampling policy) and reused."""
    reward = recording_reward()
    trainer = expect(
        "num_iterations",
        lambda: make(tmp_path, tiny_model_path, reward, config(tmp_path, max_steps=2, num_iterations=2)),
    )
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    assert "old_per_token_logps" in out  # GRPO keeps the sampling policy's log-probs: they are log q
    assert_weights(out, reward.calls[0]["rewards"])
    assert len(trainer.loss_weights) == 2 and len(train_logs(trainer)) == 2
    for used in trainer.loss_weights:
        torch.testing.assert_close(used.sort().values, out["var_weights"].sort().values)


def test_steps_per_generation(tiny_model_path, tmp_path):
    """`steps_per_generation=2` with `gradient_accumulation_steps=1`: one generation batch of 2 prompts cut into two
    optimizer steps of 4 rows (groups split across steps); the weights are normalised per whole group."""
    reward = recording_reward()
    args = config(tmp_path, max_steps=2, per_device_train_batch_size=4, steps_per_generation=2)
    trainer = expect("steps_per_generation", lambda: make(tmp_path, tiny_model_path, reward, args))
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    assert out["completion_ids"].size(0) == 2 * G
    assert_weights(out, reward.calls[0]["rewards"])
    assert [w.numel() for w in trainer.loss_weights] == [4, 4]
    torch.testing.assert_close(torch.cat(trainer.loss_weights).sort().values, out["var_weights"].sort().values)


def test_generation_batch_size(tiny_model_path, tmp_path):
    reward = recording_reward()
    args = config(tmp_path, max_steps=2, generation_batch_size=16)
    trainer = expect("generation_batch_size", lambda: make(tmp_path, tiny_model_path, reward, args))
    if trainer is None:
        return
    assert trainer.args.steps_per_generation == 2
    record(trainer).train()
    (out,) = train_generations(trainer)
    assert out["completion_ids"].size(0) == 16  # 4 prompts x 4 completions, sampled once
    assert_weights(out, reward.calls[0]["rewards"])
    assert [w.numel() for w in trainer.loss_weights] == [8, 8]


def test_num_generations_above_batch_size(tiny_model_path, tmp_path):
    """More completions per prompt than rows per micro-batch (TRL's
    `test_training_num_generations_larger_than_batch_size`): a group spans the accumulation steps of one optimizer
    step."""
    reward = recording_reward()
    args = config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = expect("num_generations_above_batch_size", lambda: make(tmp_path, tiny_model_path, reward, args))
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    assert out["completion_ids"].size(0) == G
    assert_weights(out, reward.calls[0]["rewards"])
    assert [w.numel() for w in trainer.loss_weights] == [2, 2]


@pytest.mark.parametrize("scenario", sorted(CONFIG_REFUSALS))
def test_config_refusal(scenario, tmp_path):
    """GRPO options online VAR replaces or cannot honour: refused by the config, with the reason."""
    expect(scenario, lambda: config(tmp_path, **CONFIG_REFUSALS[scenario]))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def test_eval_steps_num_generations_eval(tiny_model_path, tmp_path):
    """Evaluation during training (at the start and every step) with 2 completions per prompt instead of 4: the eval
    weights are normalised over groups of `num_generations_eval`."""
    args = config(
        tmp_path,
        eval_strategy="steps",
        eval_steps=1,
        eval_on_start=True,
        num_generations_eval=2,
        per_device_eval_batch_size=4,
    )
    reward = recording_reward()
    trainer = expect(
        "eval_steps_num_generations_eval",
        lambda: make(tmp_path, tiny_model_path, reward, args, eval_dataset=Dataset.from_dict({"prompt": PROMPTS})),
    )
    if trainer is None:
        return
    record(trainer).train()
    evals = [out for mode, out in trainer.generations if mode == "eval"]
    assert len(evals) == 4  # 2 batches of 2 prompts, at step 0 and after step 1
    eval_calls = [call for call in reward.calls if len(call["rewards"]) == 4]
    assert_weights(evals[0], eval_calls[0]["rewards"], group=2)  # the policy is the reference at step 0
    for out in evals:
        torch.testing.assert_close(out["var_weights"].view(-1, 2).sum(1), torch.ones(2))
    logs = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in logs] == [0, 1]
    assert all(math.isfinite(e["eval_loss"]) and 1.0 <= e["eval_online_var/ess"] <= 2.0 for e in logs), logs


def test_evaluate_later(tiny_model_path, tmp_path):
    """`evaluate()` with datasets given only then (one, then a dict of two)."""
    trainer = make(tmp_path, tiny_model_path)
    metrics = expect("evaluate_later", lambda: trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS[:2]})))
    if metrics is None:
        return
    assert math.isfinite(metrics["eval_loss"]) and 1.0 <= metrics["eval_online_var/ess"] <= G, metrics
    # Not trained: the sampling policy is the reference.
    assert metrics["eval_online_var/kl"] == pytest.approx(0.0, abs=1e-6)
    metrics = trainer.evaluate({"a": Dataset.from_dict({"prompt": PROMPTS[:2]}), "b": dataset(conversational=True)})
    assert math.isfinite(metrics["eval_a_loss"]) and math.isfinite(metrics["eval_b_loss"]), metrics


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def test_model_object(tiny_model_path, tmp_path, baseline):
    """A model object instead of its id: the same completions (same seed) and the same first step."""
    base_trainer, _ = baseline
    model = load(tiny_model_path)
    trainer = expect("model_object", lambda: make(tmp_path, model))
    if trainer is None:
        return
    assert trainer.model is model
    record(trainer).train()
    (out,) = train_generations(trainer)
    (base,) = train_generations(base_trainer)
    assert torch.equal(out["completion_ids"], base["completion_ids"])
    torch.testing.assert_close(out["var_weights"], base["var_weights"])
    assert first_loss(trainer) == pytest.approx(first_loss(base_trainer), rel=1e-5)


def _upper_roles_tokenizer(path):
    from trl_rewardweighted.testing import TINY_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TINY_CHAT_TEMPLATE.replace(
        "'<|im_start|>' + message['role']", "'<|im_start|>' + message['role'] | upper"
    )
    assert tok.chat_template != TINY_CHAT_TEMPLATE
    return tok


def test_processing_class(tiny_model_path, tmp_path):
    """An explicit tokenizer (with its own chat template) is the one that renders the prompts."""
    tok = _upper_roles_tokenizer(tiny_model_path)
    trainer = expect(
        "processing_class",
        lambda: make(tmp_path, tiny_model_path, train_dataset=dataset(conversational=True), processing_class=tok),
    )
    if trainer is None:
        return
    assert trainer.processing_class is tok
    record(trainer).train()
    (out,) = train_generations(trainer)
    text = tok.decode(out["prompt_ids"][0][out["prompt_mask"][0].bool()])
    assert "<|im_start|>USER\n" in text and "<|im_start|>user\n" not in text, text


def _assert_lora_step(trainer, base_trainer):
    from peft import PeftModel

    assert isinstance(trainer.model, PeftModel)
    before = snapshot(trainer.model)
    record(trainer).train()
    changed = changed_names(trainer.model, before)
    assert changed and all("lora_" in n and ".default." in n for n in changed), sorted(changed)[:5]
    # LoRA starts with B = 0: the policy is the base model, and so is the reference (adapters disabled). Same seed,
    # same completions, same first step as the full model.
    assert trainer.state.log_history[0]["online_var/kl"] == pytest.approx(0.0, abs=1e-5)
    (out,) = train_generations(trainer)
    (base,) = train_generations(base_trainer)
    assert torch.equal(out["completion_ids"], base["completion_ids"])
    assert first_loss(trainer) == pytest.approx(first_loss(base_trainer), rel=1e-4)


def test_peft_config(tiny_model_path, tmp_path, baseline):
    trainer = expect("peft_config", lambda: make(tmp_path, tiny_model_path, peft_config=lora()))
    if trainer is None:
        return
    assert trainer.ref_model is None
    _assert_lora_step(trainer, baseline[0])


def test_peft_gradient_checkpointing(tiny_model_path, tmp_path, baseline):
    args = config(tmp_path, gradient_checkpointing=True)
    trainer = expect(
        "peft_gradient_checkpointing", lambda: make(tmp_path, tiny_model_path, args=args, peft_config=lora())
    )
    if trainer is None:
        return
    _assert_lora_step(trainer, baseline[0])
    assert trainer.model.base_model.model.is_gradient_checkpointing  # switched on by `train()`


def test_peft_model(tiny_model_path, tmp_path):
    """A `PeftModel` with a trained (here: random, non-zero) adapter: GRPO copies it into a frozen "ref" adapter, and
    that copy, not the base model, is the reference."""
    from peft import get_peft_model

    model = get_peft_model(load(tiny_model_path), lora(init_lora_weights=False))
    trainer = expect("peft_model", lambda: make(tmp_path, model))
    if trainer is None:
        return
    assert set(trainer.model.peft_config) == {"default", "ref"}
    before = snapshot(trainer.model)
    record(trainer).train()
    changed = changed_names(trainer.model, before)
    assert changed and all(".default." in n for n in changed), sorted(changed)[:5]
    # The reference is the "ref" copy of the adapter, not the base model (which the random adapter moved away from).
    assert trainer.state.log_history[0]["online_var/kl"] == pytest.approx(0.0, abs=1e-5)
    (out,) = train_generations(trainer)
    assert_weights(out, trainer._logs["rewards"]["reward_ids"])


def test_gradient_checkpointing(tiny_model_path, tmp_path, baseline):
    base_trainer, _ = baseline
    trainer = expect(
        "gradient_checkpointing",
        lambda: make(tmp_path, tiny_model_path, args=config(tmp_path, gradient_checkpointing=True)),
    )
    if trainer is None:
        return
    before = snapshot(trainer.model)
    record(trainer).train()
    assert trainer.model.is_gradient_checkpointing  # switched on by `train()`
    assert changed_names(trainer.model, before)
    (out,) = train_generations(trainer)
    torch.testing.assert_close(out["var_weights"], train_generations(base_trainer)[0]["var_weights"])
    assert first_loss(trainer) == pytest.approx(first_loss(base_trainer), rel=1e-5)


def test_disable_dropout(tiny_model_path, tmp_path):
    """`disable_dropout=True` switches off the dropout of the policy and of the reference (a frozen copy of the
    policy object): the first-step log q equals log pi_ref exactly, although the policy is in training mode."""
    model = load(tiny_model_path)
    mlp = model.model.layers[0].mlp
    mlp.act_fn = torch.nn.Sequential(mlp.act_fn, torch.nn.Dropout(0.3))
    args = config(tmp_path, disable_dropout=True)
    trainer = expect("disable_dropout", lambda: make(tmp_path, model, args=args))
    if trainer is None:
        return
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    dropouts = [m for net in (trainer.model, ref) for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 2 and all(m.p == 0 for m in dropouts)
    trainer.train()
    assert trainer.state.log_history[0]["online_var/kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("as_object", [False, True], ids=["id", "object"])
def test_cast_lm_head_to_fp32(as_object, tiny_model_path, tmp_path):
    """A bfloat16 model with `cast_lm_head_to_fp32=True`: the policy's LM head is float32, and the reference (loaded
    by GRPO from the id, or the frozen copy of the object) scores like the policy at the first step."""
    if as_object:
        model, init_kwargs = load(tiny_model_path, dtype=torch.bfloat16), None
    else:
        model, init_kwargs = tiny_model_path, {"dtype": "bfloat16"}
    args = config(tmp_path, cast_lm_head_to_fp32=True, model_init_kwargs=init_kwargs)
    trainer = expect("cast_lm_head_to_fp32", lambda: make(tmp_path, model, args=args))
    if trainer is None:
        return
    assert trainer.model.lm_head.weight.dtype == torch.float32
    assert trainer.model.model.embed_tokens.weight.dtype == torch.bfloat16
    record(trainer).train()
    assert trainer.state.log_history[0]["online_var/kl"] == pytest.approx(0.0, abs=1e-5)
    (out,) = train_generations(trainer)
    assert_weights(out, trainer._logs["rewards"]["reward_ids"])


@pytest.mark.parametrize("as_object", [False, True], ids=["id", "object"])
def test_sync_ref_model(as_object, tiny_model_path, tmp_path):
    """`sync_ref_model=True` every step with mixup 0.5: after one step the reference is the average of the initial and
    the trained policy (GRPO's own reference for an id, online VAR's frozen copy for an object)."""
    model = load(tiny_model_path) if as_object else tiny_model_path
    args = config(tmp_path, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, learning_rate=1e-2)
    trainer = expect("sync_ref_model", lambda: make(tmp_path, model, args=args))
    if trainer is None:
        return
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    start = snapshot(ref)
    trainer.train()
    policy = snapshot(trainer.model)
    synced = snapshot(ref)
    assert synced.keys() == policy.keys()
    assert any(not torch.equal(policy[n], start[n]) for n in policy)
    for n in policy:
        torch.testing.assert_close(synced[n], 0.5 * start[n] + 0.5 * policy[n])


def test_sync_ref_model_peft(tiny_model_path, tmp_path):
    """Refused by GRPO (no reference model is kept for a PEFT policy) and, with an explicit `ref_model`, by online VAR
    (the adapter-wrapped policy cannot be mixed into it)."""
    args = config(tmp_path, sync_ref_model=True)
    expect("sync_ref_model_peft", lambda: make(tmp_path, tiny_model_path, args=args, peft_config=lora()))
    ref = load(tiny_model_path)
    expect(
        "sync_ref_model_peft", lambda: make(tmp_path, tiny_model_path, args=args, peft_config=lora(), ref_model=ref)
    )


def test_sync_ref_model_other_architecture(tiny_model_path, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trl_rewardweighted.testing import tiny_model_kwargs

    policy = load(tiny_model_path)
    ref = Qwen2ForCausalLM(Qwen2Config(**{**tiny_model_kwargs(policy.config.vocab_size), "intermediate_size": 96}))
    args = config(tmp_path, sync_ref_model=True)
    expect("sync_ref_model_other_architecture", lambda: make(tmp_path, policy, args=args, ref_model=ref))
    assert make(tmp_path, policy, args=config(tmp_path), ref_model=ref).ref_model is not None  # fine without sync


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks, saving, resuming, model card, completion logs
# ----------------------------------------------------------------------------------------------------------------------


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_callbacks(tiny_model_path, tmp_path):
    recorder = RecordLogs()
    args = config(tmp_path, max_steps=2)
    trainer = expect("callbacks", lambda: make(tmp_path, tiny_model_path, args=args, callbacks=[recorder]))
    if trainer is None:
        return
    trainer.train()
    steps = [entry for entry in recorder.logs if "loss" in entry]
    assert len(steps) == 2, recorder.logs
    assert all(math.isfinite(e["online_var/ess"]) and math.isfinite(e["online_var/kl"]) for e in steps), steps


def test_save_reload(tiny_model_path, tmp_path):
    trainer = expect("save_reload", lambda: make(tmp_path, tiny_model_path))
    if trainer is None:
        return
    before = snapshot(trainer.model)
    trainer.train()
    assert changed_names(trainer.model, before)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded, trained = snapshot(load(tmp_path / "saved")), snapshot(trainer.model)
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[n], trained[n]) for n in trained)


def test_resume(tiny_model_path, tmp_path):
    """Interrupted after step 1 and resumed from its checkpoint: the same losses, weights and final parameters as one
    run. Completions are a function of the step (the sampler's RNG is not part of this check)."""

    def run(out, **train_kwargs):
        args = config(
            tmp_path,
            out,
            max_steps=3,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=1,
            learning_rate=1e-2,
        )
        trainer = record(make(tmp_path, tiny_model_path, args=args))
        trainer._generate_single_turn = step_generations.__get__(trainer)
        trainer.train(**train_kwargs)
        return trainer

    full = expect("resume", lambda: run("a"))
    if full is None:
        return
    resumed = run("b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    want = train_logs(full)
    got = [e for e in train_logs(resumed) if e["step"] > 1]  # the log history up to step 1 comes from the checkpoint
    assert [e["step"] for e in want] == [1, 2, 3] and [e["step"] for e in got] == [2, 3]
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in want[1:]], rel=1e-5, abs=1e-6)
    assert [e["online_var/kl"] for e in got] == pytest.approx([e["online_var/kl"] for e in want[1:]], abs=1e-6)
    for a, b in zip(train_generations(full)[1:], train_generations(resumed)):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        torch.testing.assert_close(a["var_weights"], b["var_weights"], rtol=1e-5, atol=1e-6)
    a, b = snapshot(full.model), snapshot(resumed.model)
    assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a)


def test_model_card(tiny_model_path, tmp_path):
    args = config(tmp_path, save_strategy="steps", save_steps=1)
    trainer = expect("model_card", lambda: make(tmp_path, tiny_model_path, args=args))
    if trainer is None:
        return
    trainer.train()
    card = (tmp_path / "out" / "README.md").read_text()  # written with the checkpoint
    assert "Online VAR" in card and "2502.11026" in card and "trl-rewardweighted" in card
    assert "DeepSeekMath" not in card  # not GRPO's paper
    (tmp_path / "out" / "README.md").unlink()
    trainer.create_model_card(model_name="tiny-online")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Online VAR" in card and "tiny-online" in card
    assert set(OnlineVARTrainer._tag_names) <= set(trainer.model.model_tags)


def test_log_completions(tiny_model_path, tmp_path):
    """`log_completions=True` writes the step's completions table, with each completion's online VAR weight."""
    import pandas as pd

    args = config(tmp_path, log_completions=True, num_completions_to_print=1)
    trainer = expect("log_completions", lambda: make(tmp_path, tiny_model_path, args=args))
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    table = pd.read_parquet(tmp_path / "out" / "completions" / "completions_00001.parquet")
    assert len(table) == 2 * G and table["prompt"].tolist() == list(trainer._logs["prompt"])
    assert table["var_weight"].tolist() == pytest.approx(out["var_weights"].tolist(), abs=1e-6)
    assert table["reward_ids"].tolist() == pytest.approx(trainer._logs["rewards"]["reward_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# Generation options
# ----------------------------------------------------------------------------------------------------------------------


def test_max_completion_length(tiny_model_path, tmp_path):
    args = config(tmp_path, max_completion_length=3)
    trainer = expect("max_completion_length", lambda: make(tmp_path, tiny_model_path, args=args))
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    assert out["completion_ids"].size(1) <= 3 and int(out["completion_mask"].sum(1).max()) == 3
    assert trainer.state.log_history[0]["completions/max_length"] == 3


def test_mask_truncated_completions(tiny_model_path, tmp_path):
    """Completions that did not end with EOS get weight 0; the others of their prompt share the weight."""
    reward = recording_reward()
    args = config(tmp_path, mask_truncated_completions=True)
    trainer = expect("mask_truncated_completions", lambda: make(tmp_path, tiny_model_path, reward, args=args))
    if trainer is None:
        return
    trainer._generate_single_turn = step_generations.__get__(trainer)
    record(trainer).train()
    (out,) = train_generations(trainer)
    eos = trainer.eos_token_ids[0]
    ends_with_eos = torch.tensor(
        [c[m.bool()][-1] == eos if m.any() else False for c, m in zip(out["completion_ids"], out["completion_mask"])]
    )
    assert 0 < int(ends_with_eos.sum()) < 2 * G
    w = out["var_weights"]
    assert (w[~ends_with_eos] == 0).all() and (w[ends_with_eos] > 0).all()
    r = torch.tensor(reward.calls[0]["rewards"], dtype=torch.float64).view(-1, G)
    logits = torch.where(ends_with_eos.view(-1, G), r / BETA, float("-inf"))
    torch.testing.assert_close(w.double(), torch.softmax(logits, 1).view(-1), rtol=1e-4, atol=1e-6)
    assert trainer.skipped_completions == int((~ends_with_eos).sum())


def test_rollout_func(tiny_model_path, tmp_path, monkeypatch):
    """A `rollout_func` that returns its own completions and sampling log-probs: those log-probs are log q."""
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    per_token = -0.75

    def rollout(prompts, trainer):
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completion_ids = [[100 + (7 * i + 3 * k) % 300 for k in range(1 + i % 4)] for i in range(len(prompts))]
        logprobs = [[per_token] * len(c) for c in completion_ids]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    reward = recording_reward()
    trainer = expect("rollout_func", lambda: make(tmp_path, tiny_model_path, reward, rollout_func=rollout))
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    lengths = out["completion_mask"].sum(1).double()
    ref = (out["ref_per_token_logps"].double() * out["completion_mask"]).sum(1)
    r = torch.tensor(reward.calls[0]["rewards"], dtype=torch.float64)
    expected = torch.softmax((r / BETA + ref - per_token * lengths).view(-1, G), 1).view(-1)
    torch.testing.assert_close(out["var_weights"].double(), expected, rtol=1e-4, atol=1e-6)
    assert abs(trainer.state.log_history[0]["online_var/kl"]) > 0.1  # log q is the rollout's, not the policy's


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


def test_tools(tiny_model_path, tmp_path, monkeypatch):
    """A tool (TRL's `test_training_with_tools`): one completion per prompt calls it, the tool's answer is appended and
    generation continues. The tool-result tokens are not the policy's: they are left out of log pi, log pi_ref and
    log q (GRPO's `tool_mask`). Needs a tool-calling chat template (Qwen2.5's, on the tiny tokenizer) and a longer
    position range than the tiny model's 512 (the template's tool instructions take about 600 tokens)."""
    from trl.chat_template_utils import qwen2_5_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = qwen2_5_chat_template
    call = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # First round: even rows call the tool, odd rows answer; second round (after the tool result): "Done!".
        self._rounds = getattr(self, "_rounds", 0) + 1
        texts = (
            ["Done!<|im_end|>"] * len(prompt_ids)
            if self._rounds % 2 == 0
            else [call if i % 2 == 0 else "No tool.<|im_end|>" for i in range(len(prompt_ids))]
        )
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts], None

    reward = recording_reward(fn=lambda ids: len(ids) / 40)
    args = config(
        tmp_path,
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=128,
        model_init_kwargs={"max_position_embeddings": 2048},
    )
    trainer = expect(
        "tools",
        lambda: make(
            tmp_path,
            tiny_model_path,
            reward,
            args,
            train_dataset=Dataset.from_dict({"prompt": [U("What is 3 times 4?")] * 2}),
            processing_class=tok,
            tools=[multiply],
        ),
    )
    if trainer is None:
        return
    trainer._generate_single_turn = generate.__get__(trainer)
    record(trainer).train()
    (out,) = train_generations(trainer)
    log = trainer.state.log_history[0]
    assert log["tools/call_frequency"] == 0.5 and log["tools/failure_frequency"] == 0.0
    model_tokens = (out["completion_mask"] * out["tool_mask"]).sum(1)
    assert model_tokens[0] < out["completion_mask"][0].sum() and model_tokens[1] == out["completion_mask"][1].sum()
    assert "<tool_response>\n12\n</tool_response>" in tok.decode(out["completion_ids"][0])
    assert_weights(out, reward.calls[0]["rewards"], group=2)
    assert first_loss(trainer) == pytest.approx(expected_first_loss(out, rows=2, group=2), rel=1e-4)


def test_pad_to_multiple_of(tiny_model_path, tmp_path, baseline):
    """`pad_to_multiple_of=16`: longer padded tensors, the same completions, weights and first step."""
    base_trainer, _ = baseline
    trainer = expect(
        "pad_to_multiple_of", lambda: make(tmp_path, tiny_model_path, args=config(tmp_path, pad_to_multiple_of=16))
    )
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    (base,) = train_generations(base_trainer)
    assert out["completion_ids"].size(1) == 16 and out["prompt_ids"].size(1) % 16 == 0
    torch.testing.assert_close(out["completion_ids"][:, : base["completion_ids"].size(1)], base["completion_ids"])
    torch.testing.assert_close(out["var_weights"], base["var_weights"], rtol=1e-4, atol=1e-6)
    assert first_loss(trainer) == pytest.approx(first_loss(base_trainer), rel=1e-4)


@pytest.mark.slow
def test_continuous_batching(tiny_model_path, tmp_path):
    """`use_transformers_continuous_batching=True`: transformers' `generate_batch` samples (about 25 s for one step on
    CPU, hence `slow`); it returns no log-probs, so log q is the policy's, computed by a forward after sampling."""
    reward = recording_reward()
    args = config(tmp_path, use_transformers_continuous_batching=True)
    trainer = expect("continuous_batching", lambda: make(tmp_path, tiny_model_path, reward, args))
    if trainer is None:
        return
    record(trainer).train()
    (out,) = train_generations(trainer)
    assert_weights(out, reward.calls[0]["rewards"])
    assert first_loss(trainer) == pytest.approx(expected_first_loss(out, rows=8), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The table itself
# ----------------------------------------------------------------------------------------------------------------------


def test_expected_table_is_complete():
    """Every scenario has an outcome, every refusal its exception type and message pattern, and a test runs it."""
    assert set(EXPECTED) == set(SCENARIOS) and len(SCENARIOS) == len(set(SCENARIOS))
    assert set(EXPECTED.values()) <= {"pass", "refuse"}
    for key, (exc, pattern) in REFUSALS.items():
        assert issubclass(exc, Exception) and pattern, key
    tested = {name[len("test_") :] for name in globals() if name.startswith("test_")} | set(CONFIG_REFUSALS)
    assert set(SCENARIOS) <= tested, set(SCENARIOS) - tested


if __name__ == "__main__":
    width = max(map(len, SCENARIOS))
    for scenario in SCENARIOS:
        print(f"{scenario:<{width}}  {EXPECTED[scenario]}")
    c = counts()
    print(f"online_var: {c['pass']} pass, {c['refuse']} refuse")
