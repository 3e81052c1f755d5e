"""OnlineVARTrainer: the weights against a hand computation, layouts, the closed-form optimum on a bandit, refusals."""

import copy
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests._helpers import accelerate_two_processes, cpu_args
from tests.distributed.online_var_layout import GROUP, PROMPTS, fixed_generations, reward_fn, run_online_layout
from trl_rewardweighted import OnlineVARConfig, OnlineVARTrainer
from trl_rewardweighted.losses import online_var_weights

SCRIPT = Path(__file__).parent / "distributed" / "online_var_layout.py"


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------------------------
# The pure weight function
# ----------------------------------------------------------------------------------------------------------------------


def test_online_var_weights_by_hand():
    beta = 0.5
    r = [[1.0, 0.0, -1.0], [2.0, float("nan"), 0.5]]
    ref = [[-3.0, -2.0, -4.0], [-1.0, -1.0, -2.5]]
    q = [[-2.5, -2.0, -5.0], [-1.5, -1.0, -2.0]]
    w, valid = online_var_weights(torch.tensor(r), beta, torch.tensor(ref), torch.tensor(q))
    for p in range(2):
        logits = [r[p][i] / beta + ref[p][i] - q[p][i] for i in range(3)]
        keep = [math.isfinite(x) for x in logits]
        z = sum(math.exp(x) for x, k in zip(logits, keep) if k)
        expected = [math.exp(x) / z if k else 0.0 for x, k in zip(logits, keep)]
        torch.testing.assert_close(w[p], torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert valid.tolist() == [[True, True, True], [True, False, True]]
    assert w.dtype == torch.float32 and not w.requires_grad


def test_online_var_weights_per_prompt_normaliser_and_skips():
    # The normaliser is per prompt: a prompt's weights do not depend on the other prompts' rewards.
    r = torch.tensor([[0.0, 1.0], [100.0, 50.0]])
    zeros = torch.zeros(2, 2)
    w, _ = online_var_weights(r, 1.0, zeros, zeros)
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([0.0, 1.0]), 0))
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    # q = pi_ref * exp(r / beta) / Z already (the fixed point): uniform weights.
    ref = torch.tensor([[-1.0, -2.0, -0.5]])
    rr = torch.tensor([[0.3, -0.2, 1.1]])
    target = ref + rr / 0.4
    w, _ = online_var_weights(rr, 0.4, ref, target - torch.logsumexp(target, 1, keepdim=True))
    torch.testing.assert_close(w, torch.full((1, 3), 1 / 3))
    # A large common offset and a tiny beta keep the exact differences (float64 centring): softmax([1, -1]).
    w, _ = online_var_weights(
        torch.tensor([[1e4 + 1e-3, 1e4 - 1e-3]], dtype=torch.float64), 1e-3, torch.zeros(1, 2), torch.zeros(1, 2)
    )
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([1.0, -1.0]), 0))
    # A prompt with no valid completion gets zero weights, the mask removes completions.
    w, valid = online_var_weights(
        torch.tensor([[float("nan"), float("inf")], [1.0, 2.0]]),
        1.0,
        torch.zeros(2, 2),
        torch.zeros(2, 2),
        mask=torch.tensor([[True, True], [True, False]]),
    )
    assert w.tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert valid.any(1).tolist() == [False, True]


def test_online_var_weights_refuses_bad_input():
    with pytest.raises(ValueError, match=r"`beta` must be > 0, got 0.0"):
        online_var_weights(torch.zeros(1, 2), 0.0, torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"`sampling_logps` has shape \(2,\), expected \(1, 2\)"):
        online_var_weights(torch.zeros(1, 2), 1.0, torch.zeros(1, 2), torch.zeros(2))


# ----------------------------------------------------------------------------------------------------------------------
# Config refusals
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beta=0.0), r"OnlineVARConfig.beta must be a finite number > 0, got 0.0"),
        (dict(loss_type="grpo"), r"OnlineVARConfig.loss_type='grpo' is not supported: online VAR replaces GRPO"),
        (dict(epsilon=0.3), r"OnlineVARConfig.epsilon=0.3 is not supported: .*no ratio clipping"),
        (dict(temperature=0.7), r"OnlineVARConfig.temperature=0.7 is not supported: GRPO scores the policy"),
        (dict(top_p=0.9), r"OnlineVARConfig.top_p=0.9 is not supported without vLLM: the weights need log q"),
        (dict(top_k=50), r"OnlineVARConfig.top_k=50 is not supported without vLLM"),
        (
            dict(generation_kwargs={"no_repeat_ngram_size": 3}),
            r"changes the sampling distribution \(no_repeat_ngram_size=3\)",
        ),
        (
            dict(multi_objective_aggregation="normalize_then_sum"),
            r"multi_objective_aggregation='normalize_then_sum' is not supported",
        ),
        (dict(log_q_from="sampler"), r"OnlineVARConfig.log_q_from='sampler' is not one of 'auto', 'generate', 'po"),
        (
            dict(log_q_from="generate", use_transformers_continuous_batching=True),
            r"log_q_from='generate' applies to transformers' `generate` only: with "
            r"`use_transformers_continuous_batching=True`, log q is a forward of the policy after sampling\. Leave",
        ),
    ],
)
def test_config_refusals(tmp_path, kwargs, message):
    base = dict(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, use_cpu=True)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        OnlineVARConfig(**base)


def test_trainer_refuses_wrong_config_and_missing_rewards(tiny_model_path, tmp_path):
    from trl import GRPOConfig

    ds = Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(TypeError, match=r"`args` must be an OnlineVARConfig, got GRPOConfig"):
        OnlineVARTrainer(tiny_model_path, reward_fn, args=GRPOConfig(str(tmp_path), use_cpu=True), train_dataset=ds)
    args = OnlineVARConfig(str(tmp_path), num_generations=2, per_device_train_batch_size=2, **cpu_args())
    with pytest.raises(ValueError, match=r"OnlineVARTrainer needs `reward_funcs`"):
        OnlineVARTrainer(tiny_model_path, None, args=args, train_dataset=ds)


def test_sampled_token_logps_recorder_and_generate_patch():
    """The recorder keeps log_softmax(scores / T) of each step at the token drawn next (read at the next call, the
    last one from the returned sequences); the patch hands it to `generate` and puts back what was there."""
    from trl_rewardweighted.trainers.online_var_trainer import _recording_sampled_logps, _SampledTokenLogps

    torch.manual_seed(0)
    steps, tokens = [torch.randn(2, 5) for _ in range(3)], torch.tensor([[1, 4, 0], [3, 3, 2]])

    class Model:
        def generate(self, input_ids, logits_processor=None):
            for t, scores in enumerate(steps):
                for processor in logits_processor:
                    assert processor(input_ids, scores) is scores
                input_ids = torch.cat([input_ids, tokens[:, t : t + 1]], dim=1)
            return input_ids

    expected = torch.stack(
        [torch.log_softmax(x / 2.0, -1).gather(1, tokens[:, t : t + 1])[:, 0] for t, x in enumerate(steps)], dim=1
    )
    model, recorder = Model(), _SampledTokenLogps(temperature=2.0)
    with _recording_sampled_logps(model, recorder):
        out = model.generate(torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(out[:, 1:], tokens)
    torch.testing.assert_close(recorder.result, expected)
    assert "generate" not in vars(model)  # the class's method again

    own = Model.generate.__get__(model)
    model.generate = own  # an instance attribute (a wrapper someone installed) is called, then put back
    recorder = _SampledTokenLogps(temperature=2.0)
    with _recording_sampled_logps(model, recorder):
        model.generate(torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(recorder.result, expected)
    assert vars(model)["generate"] is own


def test_log_q_source_auto_is_policy_pass_in_half_precision(tiny_model_path, tmp_path):
    """`log_q_from="auto"` records log q while sampling only where the cached and the full forward agree to float32
    rounding: a bfloat16 model recomputes it with the policy pass, as `log_q_from="policy"` does."""
    from transformers import AutoModelForCausalLM

    ds = Dataset.from_dict({"prompt": PROMPTS})

    def trainer(model, **kwargs):
        args = OnlineVARConfig(str(tmp_path), num_generations=2, per_device_train_batch_size=2, **cpu_args(), **kwargs)
        return OnlineVARTrainer(model, reward_fn, args=args, train_dataset=ds)

    assert trainer(tiny_model_path).log_q_from_generate
    assert not trainer(tiny_model_path, log_q_from="policy").log_q_from_generate
    half = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16)
    assert not trainer(half).log_q_from_generate
    assert trainer(half, log_q_from="generate").log_q_from_generate


def test_model_generation_config_that_changes_sampling_is_refused(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.generation_config.no_repeat_ngram_size = 2
    args = OnlineVARConfig(str(tmp_path), num_generations=2, per_device_train_batch_size=2, **cpu_args())
    with pytest.raises(ValueError, match=r"generation_config sets no_repeat_ngram_size=2, which changes"):
        OnlineVARTrainer(model, reward_fn, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


# ----------------------------------------------------------------------------------------------------------------------
# The trainer's weights against a hand computation (q != pi_ref, several iterations per generation batch)
# ----------------------------------------------------------------------------------------------------------------------


def _hand_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Summed completion log-probs from full logits (no fused head), row by row without padding."""
    out = []
    with torch.no_grad():
        for p, pm, c, cm in zip(prompt_ids, prompt_mask, completion_ids, completion_mask):
            ids = torch.cat([p[pm.bool()], c[cm.bool()]])
            n = int(cm.sum())
            logits = model(input_ids=ids[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
            out.append(float(logp[-n:].sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "num_iterations,generation",
    [(1, "fixed"), (2, "fixed"), (1, "generate"), (1, "policy")],
    ids=["fixed", "fixed-2it", "generate", "policy"],
)
def test_weights_equal_hand_computation(tiny_model_path, tmp_path, num_iterations, generation):
    """`fixed`: stand-in completions, log q from a no-grad pass of the policy; `generate`: transformers' `generate`
    with `log_q_from="auto"` (float32: log q recorded while sampling, no second pass); `policy`: `generate` with
    `log_q_from="policy"` (the no-grad pass). Each checked against the sampling policy's full-logit recomputation."""
    from transformers import AutoModelForCausalLM

    beta = 0.7
    args = OnlineVARConfig(
        str(tmp_path),
        num_generations=GROUP,
        per_device_train_batch_size=8,
        max_completion_length=8,
        max_steps=2 * num_iterations,
        num_iterations=num_iterations,
        learning_rate=0.05,
        optim="sgd",
        beta=beta,
        log_q_from="policy" if generation == "policy" else "auto",
        **cpu_args(),
    )
    trainer = OnlineVARTrainer(
        tiny_model_path, reward_fn, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4})
    )
    assert trainer.log_q_from_generate == (generation != "policy")
    if generation == "fixed":
        trainer._generate_single_turn = fixed_generations.__get__(trainer)
    generations, step_weights = [], []
    generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss
    policy_passes = []
    logps_and_entropies = trainer._get_per_token_logps_and_entropies

    def count_passes(model, *args, **kwargs):
        policy_passes.append(model is trainer.model)
        return logps_and_entropies(model, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = count_passes

    def record_generation(inputs):
        state = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model).state_dict())
        out = generate(inputs)
        generations.append((state, {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}))
        return out

    def record_loss(model, inputs):
        step_weights.append(inputs["var_weights"].clone())
        return compute_loss(model, inputs)

    trainer._generate_and_score_completions = record_generation
    trainer._compute_loss = record_loss
    trainer.train()

    assert len(generations) == 2 and len(step_weights) == 2 * num_iterations
    # Per generation batch: the reference pass; the policy's no-grad log q pass only without sampler log-probs; per
    # optimizer step, the loss pass.
    q_passes = 0 if generation == "generate" else 1
    assert policy_passes.count(True) == 2 * (q_passes + num_iterations)
    assert ("sampling_per_token_logps" in generations[0][1]) == (generation == "generate")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    sampler = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    for k, (state, out) in enumerate(generations):
        sampler.load_state_dict({name: t for name, t in state.items()}, strict=False)
        tensors = [out[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
        ref = _hand_logps(reference, *tensors)
        q = _hand_logps(sampler, *tensors)
        ids = [c[m.bool()].tolist() for c, m in zip(out["completion_ids"], out["completion_mask"])]
        r = torch.tensor(reward_fn(ids), dtype=torch.float64)
        expected = torch.softmax((r / beta + ref - q).view(-1, GROUP), dim=1).view(-1)
        torch.testing.assert_close(out["var_weights"].double(), expected, rtol=1e-4, atol=1e-5)
        if k == 0:  # the policy is the reference when the first batch is sampled
            torch.testing.assert_close(q, ref, rtol=1e-5, atol=1e-4)
        else:  # after training steps, q != pi_ref, and it matters
            assert (q - ref).abs().max() > 1e-2
        # The weights of a generation batch stay fixed for all of its iterations (shuffled into micro-batches).
        for it in range(num_iterations):
            used = step_weights[k * num_iterations + it]
            torch.testing.assert_close(used.sort().values, out["var_weights"].sort().values)
    assert trainer.skipped_groups == 0 and trainer.skipped_completions == 0


# ----------------------------------------------------------------------------------------------------------------------
# Same update for every split of a step over accumulation steps and processes
# ----------------------------------------------------------------------------------------------------------------------


def test_gradient_accumulation_layouts_match(tiny_model_path, tmp_path):
    reference, trainer = run_online_layout(tiny_model_path, str(tmp_path / "a"), bs=8, ga=1)
    # The test is sensitive: the weights are not one-hot, and by step 2 q != pi_ref.
    assert 1.2 < trainer.state.log_history[0]["online_var/ess"] < GROUP
    assert abs(trainer.state.log_history[1]["online_var/kl"]) > 1e-3
    for bs, ga in [(4, 2), (2, 4)]:
        grads, _ = run_online_layout(tiny_model_path, str(tmp_path / f"{bs}x{ga}"), bs=bs, ga=ga)
        assert len(grads) == 2
        for g, ref in zip(grads, reference):
            assert rel_diff(g, ref) < 1e-5


@pytest.mark.distributed
def test_two_processes_match_single_process(tiny_model_path, tmp_path):
    reference, _ = run_online_layout(tiny_model_path, str(tmp_path / "single"), bs=8, ga=1)
    accelerate_two_processes(SCRIPT, tiny_model_path, tmp_path, 4, 1)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(result["grads"]) == 2
        for g, ref in zip(result["grads"], reference):
            assert rel_diff(g, ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Skips: unscorable completions, truncated completions
# ----------------------------------------------------------------------------------------------------------------------


def test_unscorable_and_truncated_completions_get_zero_weight(tiny_model_path, tmp_path):
    def reward_some_none(completion_ids, prompts, **kwargs):
        # Every completion of "The cat" is unscorable; one other completion per batch too.
        return [
            None if p == "The cat" or i == 5 else float(len(c))
            for i, (p, c) in enumerate(zip(prompts, completion_ids))
        ]

    args = OnlineVARConfig(
        str(tmp_path),
        num_generations=GROUP,
        per_device_train_batch_size=8,
        max_completion_length=8,
        max_steps=2,
        mask_truncated_completions=True,
        **cpu_args(),
    )
    trainer = OnlineVARTrainer(
        tiny_model_path, reward_some_none, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4})
    )
    trainer._generate_single_turn = fixed_generations.__get__(trainer)
    outputs = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: outputs.append(generate(inputs)) or outputs[-1]
    trainer.train()
    skipped_groups = skipped = 0
    for out in outputs:
        w = out["var_weights"].view(-1, GROUP)
        truncated = out["completion_mask"].sum(1) == 0  # masked by `mask_truncated_completions`
        assert (w.view(-1)[truncated] == 0).all()
        sums = w.sum(1)
        assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
        skipped_groups += int((sums == 0).sum())
        skipped += int(((w == 0) & (sums > 0)[:, None]).sum())
    assert skipped_groups > 0 and skipped > 0
    assert trainer.skipped_groups == skipped_groups and trainer.skipped_completions == skipped
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


# ----------------------------------------------------------------------------------------------------------------------
# Closed-form optimum: a one-token bandit
# ----------------------------------------------------------------------------------------------------------------------

BANDIT_VOCAB = ["<eos>", "q", "a", "b", "c", "d"]
BANDIT_REWARDS = torch.tensor([0.0, -1.0, 1.0, 0.5, 2.0, 0.2])


def _build_bandit(path):
    """A 1-layer Llama over a 6-token vocabulary; every token is an arm (completions are one token)."""
    from tests._helpers import build_word_bandit

    return build_word_bandit(path, BANDIT_VOCAB)


def _arm_probs(model):
    with torch.no_grad():
        return torch.softmax(model(input_ids=torch.tensor([[1]])).logits[0, -1].double(), -1)


def test_bandit_converges_to_closed_form_optimum(tmp_path):
    from transformers import AutoModelForCausalLM

    beta, steps, group = 1.0, 400, 32
    tokenizer = _build_bandit(tmp_path / "bandit")
    p_ref = _arm_probs(AutoModelForCausalLM.from_pretrained(tmp_path / "bandit"))
    target = p_ref * torch.exp(BANDIT_REWARDS.double() / beta)
    target /= target.sum()

    def reward(completion_ids, **kwargs):
        return [float(BANDIT_REWARDS[c[0]]) for c in completion_ids]

    args = OnlineVARConfig(
        str(tmp_path / "out"),
        beta=beta,
        num_generations=group,
        per_device_train_batch_size=group,
        max_completion_length=1,
        max_steps=steps,
        learning_rate=0.03,
        lr_scheduler_type="linear",
        logging_steps=50,
        **{k: v for k, v in cpu_args().items() if k != "logging_steps"},
    )
    trainer = OnlineVARTrainer(
        str(tmp_path / "bandit"),
        reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["q"] * steps}),
        processing_class=tokenizer,
    )
    trainer.train()
    p = _arm_probs(trainer.model)

    def tv(a, b):
        return 0.5 * float((a - b).abs().sum())

    greedy = torch.nn.functional.one_hot(BANDIT_REWARDS.argmax(), len(BANDIT_VOCAB)).double()
    assert tv(p_ref, target) > 0.3 and tv(greedy, target) > 0.4  # the optimum is neither the start nor the argmax
    assert tv(p, target) < 0.02, (p.tolist(), target.tolist())
    assert tv(p, greedy) > 0.4 and tv(p, p_ref) > 0.3


# ----------------------------------------------------------------------------------------------------------------------
# What TRL trainers accept: a model object (its reference is a frozen copy), an explicit ref_model, PEFT
# ----------------------------------------------------------------------------------------------------------------------


def test_model_object_explicit_reference_and_peft(tiny_model_path, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    def args(name):
        return OnlineVARConfig(
            str(tmp_path / name),
            num_generations=GROUP,
            per_device_train_batch_size=8,
            max_completion_length=6,
            max_steps=1,
            **cpu_args(),
        )

    ds = Dataset.from_dict({"prompt": PROMPTS * 2})
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():  # a policy changed in memory: its reference must be this object, not the saved weights
        policy.model.embed_tokens.weight.mul_(1.5)
    trainer = OnlineVARTrainer(policy, reward_fn, args=args("object"), train_dataset=ds)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    torch.testing.assert_close(ref.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert all(not p.requires_grad for p in ref.parameters())
    trainer._generate_single_turn = fixed_generations.__get__(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["online_var/kl"] == pytest.approx(0.0, abs=1e-4)

    other = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = OnlineVARTrainer(tiny_model_path, reward_fn, args=args("ref"), train_dataset=ds, ref_model=other)
    assert trainer.accelerator.unwrap_model(trainer.ref_model) is other
    trainer._generate_single_turn = fixed_generations.__get__(trainer)
    trainer.train()

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = OnlineVARTrainer(
        tiny_model_path, reward_fn, args=args("peft"), train_dataset=ds, peft_config=peft_config
    )
    assert trainer.ref_model is None  # the reference is the base model with the adapter disabled (as in GRPO)
    trainer._generate_single_turn = fixed_generations.__get__(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["online_var/kl"] == pytest.approx(0.0, abs=1e-4)
