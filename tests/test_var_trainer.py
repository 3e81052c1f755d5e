"""VARTrainer on the tiny offline model: layouts, reference sources, closed-form optimum, PEFT, chat data, bad input."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests._helpers import cpu_args
from tests.distributed.var_grad_layout import ROWS, run_layout
from trl_rewardweighted import VARConfig, VARTrainer


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3)
    base.update(kw)
    return VARConfig(**cpu_args(**base))


def manual_completion_logps(model, tokenizer, prompt, completion):
    """Summed completion log-probs from the full logits (the slow path the fused head must match)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    ids = torch.tensor([full_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    targets = ids[0, 1:]
    token_lp = logprobs[torch.arange(len(targets)), targets]
    return float(token_lp[len(prompt_ids) - 1 :].sum())


# ------------------------------------------------------------------------------------------------------------------
# Gradient-accumulation layouts (in-process); the 2-process layouts are in test_var_distributed.py
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bs,ga", [(2, 2), (1, 4)])
def test_step_scope_gradient_is_layout_independent(tiny_model_path, tmp_path, bs, ga):
    reference, _, trainer = run_layout(tiny_model_path, str(tmp_path / "a"), bs=4, ga=1)
    assert trainer.state.log_history[0]["var/ess"] > 1.5  # non-degenerate weights: a per-micro-batch Z would differ
    grad, _, _ = run_layout(tiny_model_path, str(tmp_path / "b"), bs=bs, ga=ga)
    assert rel_diff(grad, reference) < 1e-5


def test_micro_batch_scope_normalises_per_micro_batch(tiny_model_path, tmp_path):
    reference, _, _ = run_layout(tiny_model_path, str(tmp_path / "a"), bs=4, ga=1, z_scope="micro_batch")
    step, _, _ = run_layout(tiny_model_path, str(tmp_path / "b"), bs=4, ga=1, z_scope="step")
    assert rel_diff(step, reference) < 1e-5  # one micro-batch per step: both scopes agree
    split, _, _ = run_layout(tiny_model_path, str(tmp_path / "c"), bs=2, ga=2, z_scope="micro_batch")
    assert rel_diff(split, reference) > 1e-3  # two normalisers of 2 rows each: a different update, as documented


def test_gradient_equals_hand_weighted_nll(tiny_model_path, tmp_path):
    """One step's gradient equals the gradient of -sum_i w_i log pi(y_i|x_i) with w computed by hand."""
    grad, ref, _ = run_layout(tiny_model_path, str(tmp_path / "a"), bs=4, ga=1, ref_weighting=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    logps = []
    for p, c in zip(ROWS["prompt"], ROWS["completion"]):
        prompt_ids = tok(p)["input_ids"]
        ids = torch.tensor([tok(p + c + tok.eos_token)["input_ids"]])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        logps.append(lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(prompt_ids) - 1 :].sum())
    logps = torch.stack(logps)
    for ref_i, lp in zip(ref, logps):
        assert ref_i == pytest.approx(float(lp), abs=1e-4)  # precomputed reference = initial policy
    x = [r / 0.7 + float(lp) for r, lp in zip(ROWS["reward"], logps)]
    m = max(x)
    w = torch.tensor([math.exp(v - m) for v in x])
    w = w / w.sum()
    (-(w * logps).sum()).backward()
    manual = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert rel_diff(grad, manual) < 1e-4


# ------------------------------------------------------------------------------------------------------------------
# Reference log-probs
# ------------------------------------------------------------------------------------------------------------------


def test_ref_logps_from_initial_policy_match_full_logits(tiny_model_path, tmp_path):
    ds = Dataset.from_dict(ROWS)
    trainer = VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    for row, ref in zip(ROWS["prompt"], trainer.train_dataset["ref_logps"]):
        i = ROWS["prompt"].index(row)
        assert ref == pytest.approx(manual_completion_logps(model, tok, row, ROWS["completion"][i]), abs=1e-4)


def test_explicit_ref_model_is_used(tiny_model_path, tmp_path):
    from trl_rewardweighted.testing import build_tiny_model

    other_path = build_tiny_model(tmp_path / "other", seed=123)
    other = AutoModelForCausalLM.from_pretrained(other_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    trainer = VARTrainer(
        model=tiny_model_path, ref_model=other_path, args=make_args(tmp_path), train_dataset=Dataset.from_dict(ROWS)
    )
    got = trainer.train_dataset["ref_logps"]
    want = [manual_completion_logps(other, tok, p, c) for p, c in zip(ROWS["prompt"], ROWS["completion"])]
    assert got == pytest.approx(want, abs=1e-4)
    trainer.train()


def test_given_ref_logps_column_is_used_as_is(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({**ROWS, "ref_logps": [-1.0, -2.0, -3.0, -4.0]})
    trainer = VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds)
    assert list(trainer.train_dataset["ref_logps"]) == [-1.0, -2.0, -3.0, -4.0]


def test_no_reference_pass_without_ref_weighting(tiny_model_path, tmp_path):
    args = make_args(tmp_path, ref_weighting=False)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(ROWS))
    assert "ref_logps" not in trainer.train_dataset.column_names
    trainer.train()
    assert trainer.state.log_history[0]["var/ess"] > 1.0


def test_eval_dataset_and_later_evaluate(tiny_model_path, tmp_path):
    ds = Dataset.from_dict(ROWS)
    trainer = VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds, eval_dataset=ds)
    assert "ref_logps" in trainer.eval_dataset.column_names
    before = trainer.evaluate(Dataset.from_dict(ROWS))  # before training, the policy is still the reference
    assert math.isfinite(before["eval_loss"]) and "eval_var/ess" in before
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    with pytest.raises(ValueError, match=r"has no `ref_logps` column, and the reference is no longer available"):
        trainer.evaluate(Dataset.from_dict(ROWS))


# ------------------------------------------------------------------------------------------------------------------
# Convergence to the closed-form optimum (ALGORITHMS.md section 6)
# ------------------------------------------------------------------------------------------------------------------

CANDIDATES = [" likes the red ball.", " sees a good book.", " is blue and bright.", " writes a long letter."]
CAND_REWARDS = [0.0, 0.5, 1.0, 1.5]


def candidate_distribution(model, tok, prompt):
    logps = torch.tensor([manual_completion_logps(model, tok, prompt, c) for c in CANDIDATES])
    return torch.softmax(logps, 0), logps


@pytest.mark.parametrize("ref_weighting", [True, False])
def test_converges_to_closed_form_optimum(tiny_model_path, tmp_path, ref_weighting):
    """One prompt, 4 candidates present in every step. The loss -sum_k w_k log pi(y_k) with sum_k pi(y_k) <= 1 is
    minimised by pi(y_k) = w_k, so the renormalised candidate probabilities must reach
    softmax(log pi_ref + r / beta) (or softmax(r / beta))."""
    beta = 0.5
    prompt = "The cat"
    model0 = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    p0, ref_logps = candidate_distribution(model0, tok, prompt)
    r = torch.tensor(CAND_REWARDS)
    target = torch.softmax(ref_logps + r / beta if ref_weighting else r / beta, 0)
    ds = Dataset.from_dict({"prompt": [prompt] * 4, "completion": CANDIDATES, "reward": CAND_REWARDS})
    args = make_args(
        tmp_path, beta=beta, ref_weighting=ref_weighting, max_steps=150, per_device_train_batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=50, max_grad_norm=0.0,
    )  # fmt: skip
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=ds)
    trainer.train()
    p1, _ = candidate_distribution(trainer.model.cpu(), tok, prompt)
    tv_before = 0.5 * float((p0 - target).abs().sum())
    tv_after = 0.5 * float((p1 - target).abs().sum())
    # The weighted NLL is convex in the candidate log-probs and the tiny model can represent any distribution over 4
    # short sequences; 150 Adam steps take the TV from ~0.4 to ~1e-4..4e-4 (measured). 0.03 leaves a wide margin for
    # optimiser and platform noise while staying more than an order of magnitude below the starting distance.
    assert tv_before > 0.2
    assert tv_after < 0.03, (p1.tolist(), target.tolist())


# ------------------------------------------------------------------------------------------------------------------
# PEFT, conversational data, saving
# ------------------------------------------------------------------------------------------------------------------


def test_lora_reference_is_base_and_only_adapters_train(tiny_model_path, tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = make_args(tmp_path, max_steps=3, learning_rate=1e-2)
    trainer = VARTrainer(
        model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(ROWS), peft_config=peft_config
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    want = [manual_completion_logps(base, tok, p, c) for p, c in zip(ROWS["prompt"], ROWS["completion"])]
    assert list(trainer.train_dataset["ref_logps"]) == pytest.approx(want, abs=1e-4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach().cpu(), before[n].cpu())}
    assert changed and all("lora_" in n for n in changed)
    # A dataset given to evaluate() after training still gets reference log-probs: the base with adapters disabled.
    assert math.isfinite(trainer.evaluate(Dataset.from_dict(ROWS))["eval_loss"])


def test_conversational_data(tiny_model_path, tmp_path):
    ds = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in ROWS["prompt"]],
            "completion": [[{"role": "assistant", "content": c.strip()}] for c in ROWS["completion"]],
            "reward": ROWS["reward"],
        }
    )
    trainer = VARTrainer(model=tiny_model_path, args=make_args(tmp_path, max_steps=2), train_dataset=ds)
    assert all(v < 0 for v in trainer.train_dataset["ref_logps"])
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_save_model_and_card(tiny_model_path, tmp_path):
    trainer = VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=Dataset.from_dict(ROWS))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    trainer.create_model_card(model_name="var-tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2502.11026" in card and "var" in card and "trl-rewardweighted" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.vocab_size == trainer.model.config.vocab_size


def test_logged_metrics(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({**ROWS, "reward": [1.0, float("nan"), None, 2.0]})
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=2, ref_weighting=False)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=ds)
    trainer.train()
    logs = trainer.state.log_history
    for key in ("loss", "var/ess", "var/max_weight", "var/weighted_reward", "var/rows_skipped"):
        assert key in logs[0]
    assert logs[0]["var/rows_skipped"] == 2 and logs[1]["var/rows_skipped"] == 4  # cumulative
    # Two valid rows with rewards 1 and 2 (beta 1): w = softmax([1, 2]).
    w = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    assert logs[0]["var/max_weight"] == pytest.approx(float(w.max()), rel=1e-5)
    assert logs[0]["var/ess"] == pytest.approx(float(1 / (w**2).sum()), rel=1e-5)
    assert logs[0]["var/weighted_reward"] == pytest.approx(float(w[0] * 1 + w[1] * 2), rel=1e-5)
    assert all(math.isfinite(h["loss"]) for h in logs if "loss" in h)


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_missing_reward_column(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({"prompt": ["a"], "completion": [" b"]})
    with pytest.raises(
        ValueError, match=r"The dataset has no `reward` column \(columns: \['prompt', 'completion'\]\)"
    ):
        VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds)


def test_custom_reward_column_name(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({"prompt": ROWS["prompt"], "completion": ROWS["completion"], "score": ROWS["reward"]})
    with pytest.raises(ValueError, match=r"no `reward` column"):
        VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds)
    trainer = VARTrainer(model=tiny_model_path, args=make_args(tmp_path, reward_column="score"), train_dataset=ds)
    trainer.train()


def test_non_numeric_rewards(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({"prompt": ["a", "b"], "completion": [" b", " c"], "reward": ["0.5", "high"]})
    with pytest.raises(ValueError, match=r"Column `reward` must hold numbers, but row 0 has '0.5' \(str\)"):
        VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds)


def test_packing_and_padding_free_rejected():
    with pytest.raises(ValueError, match=r"VARConfig.packing=True is not supported"):
        VARConfig(**cpu_args(output_dir="x", packing=True))
    with pytest.raises(ValueError, match=r"VARConfig.padding_free=True is not supported"):
        VARConfig(**cpu_args(output_dir="x", padding_free=True))


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=rf"VARConfig.beta must be > 0, got {beta}"):
        VARConfig(**cpu_args(output_dir="x", beta=beta))


def test_bad_z_scope():
    with pytest.raises(ValueError, match=r"VARConfig.z_scope must be one of \('step', 'micro_batch'\), got 'global'"):
        VARConfig(**cpu_args(output_dir="x", z_scope="global"))


def test_batch_with_no_valid_row_raises(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({**ROWS, "reward": [float("nan")] * 4})
    trainer = VARTrainer(
        model=tiny_model_path,
        args=make_args(tmp_path, ref_weighting=False, per_device_train_batch_size=4),
        train_dataset=ds,
    )
    with pytest.raises(ValueError, match=r"A VAR normalisation batch \(z_scope='step'\) has no valid row"):
        trainer.train()


def test_nan_rewards_never_give_nan_loss(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({**ROWS, "reward": [float("nan"), float("inf"), -float("inf"), 1.0]})
    args = make_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=1)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=ds)
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["loss"]) and log["var/rows_skipped"] == 3 and log["var/max_weight"] == 1.0


def test_wrong_args_type(tiny_model_path):
    from trl import SFTConfig

    with pytest.raises(TypeError, match=r"`args` must be a VARConfig, got SFTConfig"):
        VARTrainer(
            model=tiny_model_path, args=SFTConfig(**cpu_args(output_dir="x")), train_dataset=Dataset.from_dict(ROWS)
        )


def test_iterable_dataset_without_known_features_is_not_rejected():
    from datasets import IterableDataset

    from trl_rewardweighted.data.utils import check_float_column

    def gen():
        yield {"prompt": "a", "completion": " b", "reward": 1.0}

    check_float_column(IterableDataset.from_generator(gen), "reward", "fix")  # checked later, in the collator
    with pytest.raises(ValueError, match=r"no `reward` column \(columns: \['prompt'\]\)"):
        check_float_column(Dataset.from_dict({"prompt": ["a"]}), "reward", "fix")
