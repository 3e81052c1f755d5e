"""VAR's `sample_weight` column: a prior weight inside the softmax (`log s` added to the logits). Weight 1 changes
nothing (bit for bit), other weights match a hand computation and stay layout-independent, bad weights are refused
naming the rows. The per-prompt normaliser with sample weights is tested in tests/test_var_zscope.py (2 processes
included)."""

import math

import pytest
import torch
from datasets import Dataset

from tests._helpers import cpu_args, first_loss
from tests.distributed.var_grad_layout import ROWS
from tests.distributed.var_prompt_layout import ROWS as GROUP_ROWS
from tests.distributed.var_prompt_layout import hand_logps_and_grad_model, run_prompt_layout
from trl_rewardweighted import VARConfig, VARTrainer
from trl_rewardweighted.trainers.var_trainer import DataCollatorForVAR

WEIGHTS = [2.0, 0.0, 1.0, 0.5]


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def run_layout(model_path, out_dir, bs, ga, z_scope="step", rows=None, **overrides):
    """One VAR step on `rows` (default: the 4 rows of var_grad_layout, reference weighting on): its gradient, the
    reference log-probs of the rows and the trainer."""
    overrides.setdefault("ref_weighting", True)
    grads, trainer = run_prompt_layout(model_path, out_dir, bs, ga, z_scope, rows or ROWS, max_steps=1, **overrides)
    ref = trainer.train_dataset["ref_logps"] if "seq_lengths" not in trainer.train_dataset.column_names else None
    return grads[0], ref, trainer


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3)
    base.update(kw)
    return VARConfig(**cpu_args(**base))


@pytest.mark.parametrize("z_scope", ["step", "micro_batch"])
def test_weights_of_one_give_exactly_the_unweighted_step(tiny_model_path, tmp_path, z_scope):
    grad, _, trainer = run_layout(tiny_model_path, str(tmp_path / "a"), bs=2, ga=2, z_scope=z_scope)
    ones = dict(ROWS, sample_weight=[1.0] * 4)
    grad_ones, _, trainer_ones = run_layout(
        tiny_model_path, str(tmp_path / "b"), bs=2, ga=2, z_scope=z_scope, rows=ones
    )
    assert torch.equal(grad, grad_ones)
    assert first_loss(trainer) == first_loss(trainer_ones)
    assert trainer_ones._var_sample_weight_column == "sample_weight" and trainer._var_sample_weight_column is None


def test_weights_of_one_give_exactly_the_unweighted_prompt_step(tiny_model_path, tmp_path):
    rows = {k: v for k, v in GROUP_ROWS.items() if k != "sample_weight"}
    grads, _ = run_prompt_layout(tiny_model_path, str(tmp_path / "a"), 4, 2, rows=rows)
    ones, _ = run_prompt_layout(tiny_model_path, str(tmp_path / "b"), 4, 2, rows=dict(rows, sample_weight=[1.0] * 8))
    assert all(torch.equal(a, b) for a, b in zip(grads, ones, strict=True))


def test_gradient_equals_hand_weighted_nll(tiny_model_path, tmp_path):
    """softmax(r / beta + log pi_ref + log s) by hand; the row with s = 0 gets weight 0 and is not counted as
    skipped."""
    rows = dict(ROWS, sample_weight=WEIGHTS)
    grad, ref, trainer = run_layout(tiny_model_path, str(tmp_path), bs=4, ga=1, rows=rows)
    model, logps = hand_logps_and_grad_model(tiny_model_path, ROWS)
    x = [r / 0.7 + ref_i + (math.log(s) if s > 0 else -math.inf) for r, ref_i, s in zip(ROWS["reward"], ref, WEIGHTS)]
    z = sum(math.exp(v) for v in x if math.isfinite(v))
    w = torch.tensor([math.exp(v) / z if math.isfinite(v) else 0.0 for v in x])
    assert w[1] == 0 and 0.05 < w.max() < 0.95  # not one-hot: the comparison is sensitive
    (-(w * logps).sum()).backward()
    manual = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert rel_diff(grad, manual) < 1e-4
    log = trainer.state.log_history[0]
    assert log["var/rows_skipped"] == 0 and log["var/max_weight"] == pytest.approx(float(w.max()), rel=1e-5)


@pytest.mark.parametrize("bs,ga", [(2, 2), (1, 4)])
def test_weighted_step_is_layout_independent(tiny_model_path, tmp_path, bs, ga):
    rows = dict(ROWS, sample_weight=WEIGHTS)
    reference, _, _ = run_layout(tiny_model_path, str(tmp_path / "a"), bs=4, ga=1, rows=rows)
    grad, _, _ = run_layout(tiny_model_path, str(tmp_path / "b"), bs=bs, ga=ga, rows=rows)
    assert rel_diff(grad, reference) < 1e-5
    unweighted, _, _ = run_layout(tiny_model_path, str(tmp_path / "c"), bs=4, ga=1)
    assert rel_diff(unweighted, reference) > 1e-2  # the weights matter


def test_custom_column_name_and_none(tiny_model_path, tmp_path):
    rows = dict(ROWS, importance=WEIGHTS, sample_weight=[1.0, 1.0, 1.0, 5.0])
    custom, _, _ = run_layout(tiny_model_path, str(tmp_path / "a"), 4, 1, rows=rows, sample_weight_column="importance")
    hand, _, _ = run_layout(tiny_model_path, str(tmp_path / "b"), 4, 1, rows=dict(ROWS, sample_weight=WEIGHTS))
    assert rel_diff(custom, hand) < 1e-6  # `importance` used, `sample_weight` ignored
    ignored, _, _ = run_layout(tiny_model_path, str(tmp_path / "c"), 4, 1, rows=rows, sample_weight_column=None)
    plain, _, _ = run_layout(tiny_model_path, str(tmp_path / "d"), 4, 1)
    assert torch.equal(ignored, plain)
    with pytest.raises(
        ValueError, match=r"VARConfig.sample_weight_column='importance', but the train dataset has no such"
    ):
        VARTrainer(tiny_model_path, args=make_args(tmp_path, sample_weight_column="importance"),
                   train_dataset=Dataset.from_dict(ROWS))  # fmt: skip


@pytest.mark.parametrize(
    "weights,message",
    [
        ([1.0, -1.0, 1.0, -0.5], r"Column `sample_weight` of the train dataset has negative sample weights in rows "
                                 r"\[1, 3\] \(values \[-1.0, -0.5\]\)"),
        ([1.0, float("nan"), None, 1.0], r"has NaN, infinite or missing sample weights in rows \[1, 2\]"),
        ([1.0, float("inf"), 1.0, 1.0], r"has NaN, infinite or missing sample weights in rows \[1\]"),
        ([0.0, 0.0, 0.0, 0.0], r"Every value of column `sample_weight` of the train dataset is 0 \(4 rows\)"),
        ([True, False, True, True], r"Column `sample_weight` holds booleans"),
    ],
)  # fmt: skip
def test_bad_weights_are_refused(tiny_model_path, tmp_path, weights, message):
    with pytest.raises(ValueError, match=message):
        VARTrainer(
            tiny_model_path,
            args=make_args(tmp_path),
            train_dataset=Dataset.from_dict(dict(ROWS, sample_weight=weights)),
        )


def test_bad_eval_weights_are_refused(tiny_model_path, tmp_path):
    good = Dataset.from_dict(dict(ROWS, sample_weight=WEIGHTS))
    bad = Dataset.from_dict(dict(ROWS, sample_weight=[1.0, 1.0, -2.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"Column `sample_weight` of the eval dataset has negative sample weights in rows \[2\]"
    ):
        VARTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=good, eval_dataset=bad)
    trainer = VARTrainer(tiny_model_path, args=make_args(tmp_path), train_dataset=good)
    with pytest.raises(ValueError, match=r"of the eval dataset has negative sample weights in rows \[2\]"):
        trainer.evaluate(bad)


def test_a_stream_is_checked_by_the_collator(tiny_model_path, tmp_path):
    collate = DataCollatorForVAR(
        lambda examples: {"input_ids": torch.zeros(len(examples), 2, dtype=torch.long),
                          "attention_mask": torch.ones(len(examples), 2, dtype=torch.long)},
        sample_weight_column="sample_weight",
    )  # fmt: skip
    batch = collate([{"reward": 1.0, "sample_weight": 0.5}, {"reward": 0.0, "sample_weight": 0}])
    assert batch["sample_weights"].tolist() == [0.5, 0.0] and batch["sample_weights"].dtype == torch.float64
    with pytest.raises(ValueError, match=r"Column `sample_weight`, rows \[1\] of a batch: sample weights \[-1.0\]"):
        collate([{"reward": 1.0, "sample_weight": 0.5}, {"reward": 0.0, "sample_weight": -1.0}])
    stream = Dataset.from_dict(dict(ROWS, sample_weight=[1.0, 1.0, float("nan"), 1.0])).to_iterable_dataset()
    args = make_args(tmp_path, ref_weighting=False)
    with pytest.raises(ValueError, match=r"Column `sample_weight`, rows \[0\] of a batch: sample weights \[nan\]"):
        VARTrainer(tiny_model_path, args=make_args(tmp_path, ref_weighting=False, per_device_train_batch_size=2,
                                                   max_steps=2), train_dataset=stream).train()  # fmt: skip
    assert args.sample_weight_column == "sample_weight"


def test_packing_keeps_each_rows_weight(tiny_model_path, tmp_path):
    """One step over every row: packed (padding-free) and padded rows give the same weighted update."""
    rows = dict(ROWS, sample_weight=WEIGHTS)
    padded, _, _ = run_layout(tiny_model_path, str(tmp_path / "a"), 4, 1, rows=rows, max_length=64)
    packed, _, trainer = run_layout(tiny_model_path, str(tmp_path / "b"), 4, 1, rows=rows, max_length=64, packing=True)
    assert len(trainer.train_dataset) < 4 and "sample_weight" in trainer.train_dataset.column_names
    assert rel_diff(packed, padded) < 1e-5


def test_evaluation_uses_the_weights(tiny_model_path, tmp_path):
    weighted = Dataset.from_dict(dict(ROWS, sample_weight=WEIGHTS))
    trainer = VARTrainer(
        tiny_model_path, args=make_args(tmp_path, ref_weighting=False, beta=0.7), train_dataset=weighted
    )
    got = trainer.evaluate(weighted)
    plain = trainer.evaluate(Dataset.from_dict(ROWS))
    x = [r / 0.7 + (math.log(s) if s else -math.inf) for r, s in zip(ROWS["reward"], WEIGHTS)]
    z = sum(math.exp(v) for v in x if math.isfinite(v))
    assert got["eval_var/max_weight"] == pytest.approx(max(math.exp(v) / z for v in x if math.isfinite(v)), rel=1e-5)
    assert got["eval_var/max_weight"] != pytest.approx(plain["eval_var/max_weight"], rel=1e-3)
