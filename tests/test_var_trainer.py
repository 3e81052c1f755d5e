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
# Convergence to the closed-form optimum (docs/algorithms.md#optimum-var)
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


def test_packing_needs_max_length_and_whole_rows():
    with pytest.raises(ValueError, match=r"VARConfig.packing / eval_packing need `max_length`: it is the size"):
        VARConfig(**cpu_args(output_dir="x", packing=True, max_length=None))
    for strategy in ("wrapped", "bfd_split"):
        with pytest.raises(ValueError, match=rf"VARConfig.packing_strategy='{strategy}' is not supported: VAR packs"):
            VARConfig(**cpu_args(output_dir="x", packing=True, packing_strategy=strategy))


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=rf"VARConfig.beta must be a finite number > 0, got {beta}"):
        VARConfig(**cpu_args(output_dir="x", beta=beta))


def test_bad_z_scope():
    with pytest.raises(
        ValueError, match=r"VARConfig.z_scope must be one of \('step', 'micro_batch', 'prompt'\), got 'global'"
    ):
        VARConfig(**cpu_args(output_dir="x", z_scope="global"))


def test_batch_with_no_valid_row_raises(tiny_model_path, tmp_path):
    # A map-style dataset with no valid reward is refused at init (test below); a stream is only seen in training.
    ds = Dataset.from_dict({**ROWS, "reward": [float("nan")] * 4}).to_iterable_dataset()
    trainer = VARTrainer(
        model=tiny_model_path,
        args=make_args(tmp_path, ref_weighting=False, per_device_train_batch_size=4, max_steps=1),
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


# ------------------------------------------------------------------------------------------------------------------
# Rows dropped by truncation, empty datasets
# ------------------------------------------------------------------------------------------------------------------

LONG_PROMPT = "The cat and the dog and the bird sat on the red mat by the big blue door"


def test_rows_left_without_completion_tokens_are_counted_and_warned(tiny_model_path, tmp_path, tiny_tokenizer):
    prompt_len = len(tiny_tokenizer(LONG_PROMPT)["input_ids"])
    short_len = max(len(tiny_tokenizer(p)["input_ids"]) for p in ROWS["prompt"])
    assert prompt_len > short_len + 8
    # Row 2 (the top reward) has a prompt that fills max_length: SFT's truncation would leave it fully masked.
    rows = {
        "prompt": [ROWS["prompt"][0], ROWS["prompt"][1], LONG_PROMPT, ROWS["prompt"][3]],
        "completion": ROWS["completion"],
        "reward": [0.0, 0.5, 9.0, 1.0],
    }
    eval_rows = {k: [v[2], v[0]] for k, v in rows.items()}
    args = make_args(tmp_path, max_length=prompt_len, ref_weighting=False)
    with pytest.warns(UserWarning) as record:
        trainer = VARTrainer(
            model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(rows),
            eval_dataset=Dataset.from_dict(eval_rows),
        )  # fmt: skip
    messages = [str(w.message) for w in record]
    want = (
        f"VAR: 1 of 4 rows of the train dataset have no completion token left after truncation to "
        f"`max_length={prompt_len}` (truncation_mode='keep_start') and are dropped: rows [2]. "
        f"`max_length={prompt_len + 1}` would keep them"
    )
    assert any(want in m for m in messages), messages
    assert any("1 of 2 rows of the eval dataset" in m and "rows [0]" in m for m in messages), messages
    assert trainer.dropped_rows == {"train": 1, "eval": 1}
    assert trainer.dropped_row_indices == {"train": [2], "eval": [0]}
    assert len(trainer.train_dataset) == 3 and 9.0 not in trainer.train_dataset["reward"]
    # With the suggested max_length the row is kept.
    trainer = VARTrainer(
        model=tiny_model_path,
        args=make_args(tmp_path, max_length=prompt_len + 1, ref_weighting=False),
        train_dataset=Dataset.from_dict(rows),
    )
    assert trainer.dropped_rows == {"train": 0} and len(trainer.train_dataset) == 4
    # A later evaluate() dataset is counted too (once, although SFT prepares it a second time).
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(ROWS))
    with pytest.warns(UserWarning, match=r"1 of 2 rows of the held_out dataset"):
        trainer.evaluate({"held_out": Dataset.from_dict(eval_rows)})
    assert trainer.dropped_rows["held_out"] == 1


def test_iterable_dataset_rows_without_completion_tokens_are_counted_once(tiny_model_path, tmp_path, tiny_tokenizer):
    from datasets import IterableDataset

    prompt_len = len(tiny_tokenizer(LONG_PROMPT)["input_ids"])
    prompts = [LONG_PROMPT, *ROWS["prompt"][1:]]

    def gen():
        for p, c, r in zip(prompts, ROWS["completion"], ROWS["reward"]):
            yield {"prompt": p, "completion": c, "reward": r}

    args = make_args(tmp_path, max_length=prompt_len, ref_weighting=False, max_steps=3)
    with pytest.warns(
        UserWarning,
        match=rf"VAR: row 0 of the train dataset has no completion token within `max_length={prompt_len}` "
        rf"\(truncation_mode='keep_start'\) and is dropped; `max_length={prompt_len + 1}` would keep it",
    ):
        trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=IterableDataset.from_generator(gen))
        trainer.train()  # 3 steps of 2 rows: the 3 kept rows are read twice (2 epochs of the stream)
    assert trainer.dropped_rows == {"train": 1} and trainer.dropped_row_indices == {"train": [0]}


def test_every_row_dropped_names_max_length(tiny_model_path, tmp_path, tiny_tokenizer):
    longest = max(len(tiny_tokenizer(p)["input_ids"]) for p in ROWS["prompt"])
    with pytest.raises(
        ValueError,
        match=rf"No row of the train dataset keeps a completion token: all 4 rows would be dropped \(truncation to "
        rf"`max_length=2`.*Raise `max_length` to at least {longest + 1} or set `max_length=None`",
    ):
        with pytest.warns(UserWarning, match=r"have no completion token left"):
            VARTrainer(
                model=tiny_model_path, args=make_args(tmp_path, max_length=2), train_dataset=Dataset.from_dict(ROWS)
            )


def test_empty_datasets_are_refused(tiny_model_path, tmp_path):
    empty = Dataset.from_dict({"prompt": [], "completion": [], "reward": []})
    with pytest.raises(ValueError, match=r"The train dataset is empty \(0 rows\)"):
        VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=empty)
    with pytest.raises(ValueError, match=r"The eval dataset is empty \(0 rows\)"):
        VARTrainer(
            model=tiny_model_path, args=make_args(tmp_path), train_dataset=Dataset.from_dict(ROWS), eval_dataset=empty
        )
    with pytest.raises(ValueError, match=r"The eval 'test' dataset is empty \(0 rows\)"):
        VARTrainer(
            model=tiny_model_path, args=make_args(tmp_path), train_dataset=Dataset.from_dict(ROWS),
            eval_dataset={"test": empty},
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# Inherited options VAR does not honour, compute_metrics, single-row normaliser
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [
        ("loss_type", "dft"),
        ("completion_only_loss", False),
        ("packing_strategy", "wrapped"),
        ("dataset_text_field", "content"),
        ("label_smoothing_factor", 0.1),
        ("router_aux_loss_coef", 0.01),
    ],
)
def test_unsupported_sft_options_are_refused(name, value):
    with pytest.raises(
        ValueError, match=rf"VARConfig.{name}={value!r} is not supported: .*Leave `{name}` at its default"
    ):
        VARConfig(**cpu_args(output_dir="x", **{name: value}))


def test_supported_non_default_sft_options_and_choices():
    import dataclasses

    args = VARConfig(
        **cpu_args(output_dir="x", completion_only_loss=True, eval_packing=False, router_aux_loss_coef=0.0)
    )
    assert args.completion_only_loss is True
    z_scope = next(f for f in dataclasses.fields(VARConfig) if f.name == "z_scope")
    assert z_scope.metadata["choices"] == ["step", "micro_batch", "prompt"]


def test_assistant_only_loss_is_honoured(tiny_model_path, tmp_path):
    ds = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in ROWS["prompt"]],
            "completion": [[{"role": "assistant", "content": c.strip()}] for c in ROWS["completion"]],
            "reward": ROWS["reward"],
        }
    )
    plain = VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds)
    args = make_args(tmp_path, assistant_only_loss=True)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=ds)
    # The chat template's newline after <|im_end|> is not an assistant token: it leaves the labels (and ref_logps).
    assert plain.train_dataset[0]["labels"][-1] != -100 and trainer.train_dataset[0]["labels"][-1] == -100
    assert all(a > b for a, b in zip(trainer.train_dataset["ref_logps"], plain.train_dataset["ref_logps"]))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.parametrize("name", ["compute_metrics", "preprocess_logits_for_metrics"])
def test_metrics_from_logits_are_refused(tiny_model_path, tmp_path, name):
    with pytest.raises(
        ValueError, match=rf"VARTrainer does not support `{name}`: its forward runs TRL's fused LM head"
    ):
        VARTrainer(
            model=tiny_model_path, args=make_args(tmp_path), train_dataset=Dataset.from_dict(ROWS),
            **{name: lambda *a: {}},
        )  # fmt: skip


@pytest.mark.parametrize("bs,ga,z_scope", [(1, 1, "step"), (1, 4, "micro_batch")])
def test_single_row_normaliser_warns(tiny_model_path, tmp_path, bs, ga, z_scope):
    args = make_args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, z_scope=z_scope)
    with pytest.warns(UserWarning, match=r"VAR normalises its weights over a single row .* training is plain SFT"):
        VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(ROWS))


def test_no_single_row_warning_for_a_real_normaliser(tiny_model_path, tmp_path):
    import warnings

    args = make_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(ROWS))
    assert not [w for w in record if "single row" in str(w.message)]


# ------------------------------------------------------------------------------------------------------------------
# Weight precision in the trainer (rewards reach the weights in float64)
# ------------------------------------------------------------------------------------------------------------------


def test_large_reward_offset_precision_in_training_and_eval(tiny_model_path, tmp_path):
    rows = {"prompt": ROWS["prompt"][:2], "completion": ROWS["completion"][:2], "reward": [1e4 + 1e-3, 1e4 - 1e-3]}
    args = make_args(tmp_path, beta=1e-3, ref_weighting=False, per_device_train_batch_size=2)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(rows))
    e = math.exp(-2.0)
    w = [1 / (1 + e), e / (1 + e)]  # softmax([1, -1]) = [0.8807970779778823, 0.11920292202211755]
    assert trainer.evaluate(Dataset.from_dict(rows))["eval_var/max_weight"] == pytest.approx(w[0], rel=1e-6)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["var/max_weight"] == pytest.approx(w[0], rel=1e-6)
    assert log["var/ess"] == pytest.approx(1 / (w[0] ** 2 + w[1] ** 2), rel=1e-6)
    assert log["var/weighted_reward"] == pytest.approx(w[0] * (1e4 + 1e-3) + w[1] * (1e4 - 1e-3), rel=1e-12)


def test_r_over_beta_beyond_float32_keeps_the_best_row_in_training(tiny_model_path, tmp_path):
    rows = {"prompt": ROWS["prompt"][:2], "completion": ROWS["completion"][:2], "reward": [1e36, 5e35]}
    args = make_args(tmp_path, beta=1e-3, ref_weighting=False, per_device_train_batch_size=2)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    log = trainer.state.log_history[0]
    # (5e35 - 1e36) / 1e-3 = -5e38: weights exactly [1, 0]; no row is skipped.
    assert log["var/rows_skipped"] == 0 and log["var/max_weight"] == 1.0
    assert log["var/weighted_reward"] == pytest.approx(1e36, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# Cumulative metrics across resume
# ------------------------------------------------------------------------------------------------------------------


def test_cumulative_metrics_continue_after_resume(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({**ROWS, "reward": [1.0, float("nan"), None, 2.0]})
    common = dict(per_device_train_batch_size=4, ref_weighting=False, save_strategy="steps", save_steps=2)
    first = VARTrainer(model=tiny_model_path, args=make_args(tmp_path, max_steps=2, **common), train_dataset=ds)
    first.train()
    logs = [h for h in first.state.log_history if "loss" in h]
    per_step = logs[0]["num_tokens"]
    assert [h["num_tokens"] for h in logs] == [per_step, 2 * per_step]
    assert [h["var/rows_skipped"] for h in logs] == [2, 4]
    resumed = VARTrainer(model=tiny_model_path, args=make_args(tmp_path, max_steps=4, **common), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    new = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert [h["step"] for h in new] == [3, 4]
    assert [h["num_tokens"] for h in new] == [3 * per_step, 4 * per_step]
    assert [h["var/rows_skipped"] for h in new] == [6, 8]
    # resume_from_checkpoint=True picks the last checkpoint (checkpoint-4) the same way.
    again = VARTrainer(model=tiny_model_path, args=make_args(tmp_path, max_steps=5, **common), train_dataset=ds)
    again.train(resume_from_checkpoint=True)
    assert [h["var/rows_skipped"] for h in again.state.log_history if "loss" in h and h["step"] == 5] == [10]


# ------------------------------------------------------------------------------------------------------------------
# Bool rewards
# ------------------------------------------------------------------------------------------------------------------


def test_bool_rewards_are_refused(tiny_model_path, tmp_path):
    ds = Dataset.from_dict({**ROWS, "reward": [True, False, True, False]})
    with pytest.raises(ValueError, match=r"Column `reward` holds booleans .*\(a bool is not read as 1/0\)"):
        VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=ds)


def test_bool_rewards_in_an_iterable_dataset_are_refused_by_the_collator(tiny_model_path, tmp_path):
    from datasets import IterableDataset

    def gen():
        for p, c in zip(ROWS["prompt"], ROWS["completion"]):
            yield {"prompt": p, "completion": c, "reward": True}

    args = make_args(tmp_path, ref_weighting=False)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=IterableDataset.from_generator(gen))
    with pytest.raises(
        ValueError, match=r"Column `reward`, row 0 of a batch: reward True \(bool\) is not a number; give a float"
    ):
        trainer.train()


def test_collator_refuses_numpy_and_tensor_bools():
    import numpy as np

    from trl_rewardweighted.trainers.var_trainer import DataCollatorForVAR

    collate = DataCollatorForVAR(lambda examples: {}, "score")
    for value in (np.bool_(True), torch.tensor(False)):
        with pytest.raises(ValueError, match=r"Column `score`, row 1 of a batch: reward (True|False) \(bool\)"):
            collate([{"score": 1.0}, {"score": value}])
    batch = collate([{"score": 1e4 + 1e-3, "ref_logps": -3.0}, {"score": None, "ref_logps": -1.0}])
    assert batch["rewards"].dtype == torch.float64 and batch["rewards"][0].item() == 1e4 + 1e-3
    assert math.isnan(batch["rewards"][1].item()) and batch["ref_logps"].tolist() == [-3.0, -1.0]


# ------------------------------------------------------------------------------------------------------------------
# Reference: a pretrained adapter, a model id
# ------------------------------------------------------------------------------------------------------------------


def test_reference_of_a_pretrained_adapter_is_the_policy_with_adapters(tiny_model_path, tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    policy = get_peft_model(base, lora)
    pairs = list(zip(ROWS["prompt"], ROWS["completion"]))
    with torch.no_grad():
        with_adapter = [manual_completion_logps(policy, tiny_tokenizer, p, c) for p, c in pairs]
        with policy.disable_adapter():
            without = [manual_completion_logps(policy, tiny_tokenizer, p, c) for p, c in pairs]
    assert max(abs(a - b) for a, b in zip(with_adapter, without)) > 1e-2  # the adapter is not the identity
    trainer = VARTrainer(model=policy, args=make_args(tmp_path), train_dataset=Dataset.from_dict(ROWS))
    assert list(trainer.train_dataset["ref_logps"]) == pytest.approx(with_adapter, abs=1e-4)
    assert not trainer._var_base_is_reference
    trainer.train()
    # After training, the base model is not the starting policy: no reference for a new eval dataset.
    with pytest.raises(ValueError, match=r"has no `ref_logps` column, and the reference is no longer available"):
        trainer.evaluate(Dataset.from_dict(ROWS))


def test_ref_model_id_is_loaded_with_model_init_kwargs(tiny_model_path, tmp_path, monkeypatch):
    import trl.trainer.utils

    from trl_rewardweighted.testing import build_tiny_model

    other_path = build_tiny_model(tmp_path / "other", seed=123)
    calls = []
    original = trl.trainer.utils.create_model_from_path

    def spy(path, **kwargs):
        calls.append((path, kwargs))
        return original(path, **kwargs)

    monkeypatch.setattr(trl.trainer.utils, "create_model_from_path", spy)
    args = make_args(tmp_path, model_init_kwargs={"dtype": "float32"})
    trainer = VARTrainer(model=tiny_model_path, ref_model=other_path, args=args, train_dataset=Dataset.from_dict(ROWS))
    assert calls == [(other_path, {"dtype": "float32", "trust_remote_code": False})]
    assert trainer._var_ref_model is None  # released after the pre-pass


# ------------------------------------------------------------------------------------------------------------------
# Rows repeated by even_batches, signature columns, tensor-parallel token count
# ------------------------------------------------------------------------------------------------------------------


def test_even_batches_repeats_rule():
    from trl_rewardweighted.trainers.var_trainer import even_batches_repeats

    # 2 processes x 2 rows, 3 real rows: the global batch is [r0, r1 | r2, repeat].
    assert even_batches_repeats(2, 0, 3).tolist() == [False, False]
    assert even_batches_repeats(2, 1, 3).tolist() == [False, True]
    # 1 real row: process 1 holds only repeats, process 0 one.
    assert even_batches_repeats(2, 0, 1).tolist() == [False, True]
    assert even_batches_repeats(2, 1, 1).tolist() == [True, True]


@pytest.mark.parametrize("z_scope", ["step", "micro_batch"])
def test_repeated_rows_leave_the_normaliser(tiny_model_path, tmp_path, monkeypatch, z_scope):
    """The last micro-batch's repeats (as `_even_batches_repeats` reports them with several processes) get weight 0,
    are not counted as skipped, and the other rows are normalised without them."""
    args = make_args(tmp_path, ref_weighting=False, z_scope=z_scope)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(ROWS))
    monkeypatch.setattr(trainer, "_even_batches_repeats", lambda n: torch.tensor([False] * (n - 1) + [True]))
    labels = torch.tensor([[-100, 5, 6]] * 2)
    batches = [
        {"labels": labels, "rewards": torch.tensor([0.0, 1.0], dtype=torch.float64)},
        {"labels": labels, "rewards": torch.tensor([2.0, 3.0], dtype=torch.float64)},  # 3.0 is a repeat
    ]
    trainer._assign_step_weights(batches)
    if z_scope == "step":
        w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
        expected = [w[:2].tolist(), [w[2].item(), 0.0]]
    else:
        expected = [torch.softmax(torch.tensor([0.0, 1.0]), 0).tolist(), [1.0, 0.0]]
    for batch, want in zip(batches, expected):
        torch.testing.assert_close(batch["var_weights"], torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert trainer._metrics["train"]["var/rows_skipped"] == [0.0]
    # A micro-batch of repeats only (micro_batch scope) gets zero weights, no error.
    monkeypatch.setattr(trainer, "_even_batches_repeats", lambda n: torch.ones(n, dtype=torch.bool))
    if z_scope == "micro_batch":
        last = [{"labels": labels, "rewards": torch.tensor([2.0, 3.0], dtype=torch.float64)}]
        trainer._assign_step_weights(last)
        assert last[0]["var_weights"].tolist() == [0.0, 0.0]


def test_uneven_last_batch_single_process(tiny_model_path, tmp_path):
    """One process: the last batch of 5 rows / bs 2 holds the 5th row alone (remainder 1), nothing is masked."""
    rows = {k: v + v[:1] for k, v in ROWS.items()}
    args = make_args(tmp_path, ref_weighting=False, max_steps=-1, num_train_epochs=1)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and logs[-1]["var/max_weight"] == 1.0 and logs[-1]["var/rows_skipped"] == 0


def test_signature_columns_extend_sft(tiny_model_path, tmp_path, monkeypatch):
    from trl import SFTTrainer

    trainer = VARTrainer(model=tiny_model_path, args=make_args(tmp_path), train_dataset=Dataset.from_dict(ROWS))

    def sft_columns(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "seq_lengths", "new_sft_column"]

    monkeypatch.setattr(SFTTrainer, "_set_signature_columns_if_needed", sft_columns)
    trainer._signature_columns = None
    trainer._set_signature_columns_if_needed()
    assert trainer._signature_columns == [
        "input_ids",
        "labels",
        "seq_lengths",
        "new_sft_column",
        "reward",
        "ref_logps",
    ]


def test_num_tokens_divides_by_tensor_parallel_size(tiny_model_path, tmp_path):
    counts = []
    for tp in (1, 2):
        args = make_args(tmp_path / str(tp), ref_weighting=False)
        trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(ROWS))
        trainer._tp_size = tp
        trainer.train()
        counts.append(trainer.state.log_history[0]["num_tokens"])
    assert counts[0] > 0 and counts[1] == counts[0] // 2


def test_missing_rewards_warn_at_init_and_all_missing_is_refused(tiny_model_path, tmp_path):
    some = Dataset.from_dict({**ROWS, "reward": [1.0, float("nan"), None, float("inf")]})
    with pytest.warns(
        UserWarning, match=r"VAR: 3 of 4 rows of the train dataset have a NaN/inf/None `reward` \(rows \[1, 2, 3\]\)"
    ):
        VARTrainer(model=tiny_model_path, args=make_args(tmp_path, ref_weighting=False), train_dataset=some)
    none = Dataset.from_dict({**ROWS, "reward": [float("nan"), float("inf"), float("-inf"), float("nan")]})
    with pytest.raises(ValueError, match=r"Every `reward` of the train dataset is NaN/inf/None \(4 rows\)"):
        VARTrainer(model=tiny_model_path, args=make_args(tmp_path, ref_weighting=False), train_dataset=none)
