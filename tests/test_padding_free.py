"""Padding-free forwards (`padding_free=True`): one row of the batch's real tokens, kept apart by `position_ids`.

Each row's summed log-prob, its weight and one training step must be those of the padded forward (to 1e-5), for
sequences *after the first* in the concatenated row (the ones a wrong mask or a cache would let see their
predecessors).
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests._helpers import cpu_args, make_grad_capture
from trl_rewardweighted import VARConfig, VARTrainer, VCBConfig, VCBTrainer
from trl_rewardweighted.model_utils import ensure_fused_lm_head, padding_free_inputs, sequence_logps

# Completions of very different lengths, so that the padded batch really pads.
VAR_ROWS = {
    "prompt": ["The cat", "A small dog that lives by the sea", "The sky", "My friend"],
    "completion": [
        " likes the red ball and the blue one too, every day.",
        " barks.",
        " is blue and bright above the quiet town.",
        " writes.",
    ],
    "reward": [1.0, -1.0, 0.3, 2.0],
}
VCB_ROWS = {
    "prompt": ["The cat", "A dog", "Hello", "The sun over the hills"],
    "completions": [
        [" sat on the mat near the door all afternoon.", " ran.", " is blue."],
        [" barks.", " sleeps all day long in the warm sun."],
        [" world", " there", " my friend, how are you today?", " you"],
        [" rises.", " sets in the west, slowly.", " is hot."],
    ],
    "rewards": [[1.0, 0.5, -1.0], [0.2, 0.4], [1.0, 2.0, 3.0, 4.0], [0.1, 0.3, -0.2]],
}


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------------------------
# The concatenation itself and the per-row log-probs
# ----------------------------------------------------------------------------------------------------------------------


def test_padding_free_inputs_by_hand():
    input_ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 0, 0, 0], [0, 0, 0, 0, 0], [31, 32, 33, 34, 35]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor(
        [[-100, -100, -100, 12, 13], [-100, 22, -100, -100, -100], [-100] * 5, [-100, -100, 33, 34, 35]]
    )
    flat = padding_free_inputs(input_ids, attention_mask, labels)  # left padding, right padding, an empty row
    assert flat["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34, 35]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    # The first token of each sequence is never a target (it would be predicted from the previous sequence).
    assert flat["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, 33, 34, 35]]
    assert flat["segment_ids"].tolist() == [0, 0, 0, 1, 1, 3, 3, 3, 3, 3]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5, 10] and flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == 5 and flat["num_rows"] == 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("training", [False, True])
def test_sequence_logps_padding_free_equals_padded(tiny_model_path, attn, training):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation=attn)
    ensure_fused_lm_head(model).train(training)  # train mode: the trainers' forward (no cache either way)
    torch.manual_seed(0)
    lengths = torch.tensor([12, 5, 9, 3, 7])
    input_ids = torch.randint(5, 500, (5, 12))
    attention_mask = (torch.arange(12)[None] < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100  # a two-token prompt
    padded, n_padded = sequence_logps(model, input_ids, attention_mask, labels)
    free, n_free = sequence_logps(model, input_ids, attention_mask, labels, padding_free=True)
    assert n_free.tolist() == n_padded.tolist() == (lengths - 2).tolist()
    torch.testing.assert_close(free, padded, rtol=1e-5, atol=1e-5)
    mean, _ = sequence_logps(model, input_ids, attention_mask, labels, length_normalize=True, padding_free=True)
    torch.testing.assert_close(mean, padded / (lengths - 2), rtol=1e-5, atol=1e-5)

    # The check has teeth: without restarting positions every sequence after the first sees its predecessors.
    flat = padding_free_inputs(input_ids, attention_mask, labels)
    leaky = model(
        input_ids=flat["input_ids"],
        labels=flat["labels"],
        position_ids=torch.arange(flat["input_ids"].shape[1])[None],
        fused_lm_head=True,
        use_cache=False,
    ).log_probs[0]
    second = slice(int(flat["cu_seq_lens_q"][1]), int(flat["cu_seq_lens_q"][2]) - 1)
    assert (leaky[second].sum() - padded[1]).abs() > 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# VAR
# ----------------------------------------------------------------------------------------------------------------------


def run_var(model_path, out, padding_free, **kw):
    args = VARConfig(
        **cpu_args(
            output_dir=str(out),
            per_device_train_batch_size=4,
            max_steps=1,
            learning_rate=1e-3,
            max_grad_norm=0.0,
            beta=0.7,
            padding_free=padding_free,
            **kw,
        )
    )
    capture = make_grad_capture()
    ds = Dataset.from_dict(VAR_ROWS)
    trainer = VARTrainer(model=model_path, args=args, train_dataset=ds, eval_dataset=ds, callbacks=[capture])
    packed = "seq_lengths" in trainer.train_dataset.column_names  # packs hold lists of rows: no per-row columns
    ref = None if packed else torch.tensor(trainer.train_dataset["ref_logps"])
    prompts = None if packed else list(trainer.train_dataset["prompt"])
    trainer.train()
    return trainer, capture.grad, ref, prompts


@pytest.mark.parametrize("max_length", [1024, None])
def test_var_padding_free_matches_padded(tiny_model_path, tmp_path, max_length):
    # Mean token log-probs: summed ones of such different lengths would make the weights one-hot.
    kw = dict(max_length=max_length, length_normalize=True)
    padded, grad_padded, ref_padded, order = run_var(tiny_model_path, tmp_path / "a", False, **kw)
    free, grad_free, ref_free, order_free = run_var(tiny_model_path, tmp_path / "b", True, **kw)
    assert free.padding_free and order == order_free
    # Reference pre-pass (padding-free too) gives the same per-row log-probs.
    torch.testing.assert_close(ref_free, ref_padded, rtol=1e-5, atol=1e-5)
    # The same weights (their statistics) and the same loss and update.
    log_padded, log_free = padded.state.log_history[0], free.state.log_history[0]
    for key in ("var/ess", "var/max_weight", "var/weighted_reward", "loss", "nll", "num_tokens"):
        assert log_free[key] == pytest.approx(log_padded[key], rel=1e-5), key
    assert 1.5 < log_free["var/ess"] < 3.9  # non-degenerate weights
    assert rel_diff(grad_free, grad_padded) < 1e-5
    # Evaluation (a padding-free forward of the trained model) too.
    ev_padded, ev_free = padded.evaluate(), free.evaluate()
    assert ev_free["eval_loss"] == pytest.approx(ev_padded["eval_loss"], rel=1e-5)


def test_var_padding_free_with_sft_style_collator_is_refused(tiny_model_path, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    args = VARConfig(
        **cpu_args(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, ref_weighting=False)
    )
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    trainer = VARTrainer(
        model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(VAR_ROWS), data_collator=collator
    )
    with pytest.raises(
        ValueError, match=r"returned `input_ids` of shape \(1, \d+\) without an `attention_mask` for 2"
    ):
        trainer.train()
    with pytest.raises(ValueError, match=r"without an `attention_mask` for \d+ examples: VAR needs one padded row"):
        VARTrainer(  # the reference pre-pass collates with it too
            model=tiny_model_path,
            args=VARConfig(**cpu_args(output_dir=str(tmp_path), per_device_train_batch_size=2)),
            train_dataset=Dataset.from_dict(VAR_ROWS),
            data_collator=collator,
        )


# ----------------------------------------------------------------------------------------------------------------------
# VCB
# ----------------------------------------------------------------------------------------------------------------------


def run_vcb(model_path, out, padding_free, precompute):
    args = VCBConfig(
        **cpu_args(
            output_dir=str(out),
            per_device_train_batch_size=4,
            max_steps=1,
            learning_rate=1e-3,
            max_grad_norm=0.0,
            padding_free=padding_free,
            precompute_ref_log_probs=precompute,
        )
    )
    capture = make_grad_capture()
    ds = Dataset.from_dict(VCB_ROWS)
    trainer = VCBTrainer(model=model_path, args=args, train_dataset=ds, callbacks=[capture])
    ref = trainer.train_dataset["ref_logps"] if precompute else None
    trainer.train()
    return trainer, capture.grad, ref


@pytest.mark.parametrize("precompute", [True, False])
def test_vcb_padding_free_matches_padded(tiny_model_path, tmp_path, precompute):
    padded, grad_padded, ref_padded = run_vcb(tiny_model_path, tmp_path / "a", False, precompute)
    free, grad_free, ref_free = run_vcb(tiny_model_path, tmp_path / "b", True, precompute)
    assert free.padding_free and not padded.padding_free
    if precompute:
        for got, expected in zip(ref_free, ref_padded, strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    log_padded, log_free = padded.state.log_history[0], free.state.log_history[0]
    for key in ("loss", "calibration_error", "logratio", "sigma"):
        assert math.isfinite(log_free[key])
        assert log_free[key] == pytest.approx(log_padded[key], rel=1e-4, abs=1e-4), key
    assert rel_diff(grad_free, grad_padded) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# VAR packing (best-fit decreasing, whole rows; each row keeps its reward)
# ----------------------------------------------------------------------------------------------------------------------

SIX_ROWS = {key: values + values[:2] for key, values in VAR_ROWS.items()}
SIX_ROWS["reward"] = [1.0, -1.0, 0.3, 2.0, -0.4, 0.9]


def test_var_packing_keeps_every_row_with_its_reward(tiny_model_path, tmp_path):
    args = VARConfig(
        **cpu_args(output_dir=str(tmp_path), packing=True, max_length=40, per_device_train_batch_size=2, beta=0.7)
    )
    ds = Dataset.from_dict(SIX_ROWS)
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=ds)
    rows = VARTrainer(
        model=tiny_model_path,
        args=VARConfig(**cpu_args(output_dir=str(tmp_path), max_length=40, beta=0.7)),
        train_dataset=ds,
    ).train_dataset
    packed = trainer.train_dataset
    assert trainer.padding_free and len(packed) < len(rows)  # fewer, fuller rows
    assert all(sum(p["seq_lengths"]) == len(p["input_ids"]) <= 40 for p in packed)
    # Every row in exactly one pack, with its own reward and reference log-prob (computed before packing).
    expected = sorted((tuple(r["input_ids"]), r["reward"], r["ref_logps"]) for r in rows)
    got = []
    for pack in packed:
        start = 0
        for length, reward, ref in zip(pack["seq_lengths"], pack["reward"], pack["ref_logps"], strict=True):
            got.append((tuple(pack["input_ids"][start : start + length]), reward, ref))
            start += length
    got.sort()
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    # (the packed trainer's pre-pass ran padding-free: equal to float rounding)
    torch.testing.assert_close(torch.tensor([g[2] for g in got]), torch.tensor([e[2] for e in expected]))
    # The collator splits the packs back into rows.
    batch = trainer.data_collator([packed[0], packed[1]])
    n0, n1 = len(packed[0]["seq_lengths"]), len(packed[1]["seq_lengths"])
    assert batch["input_ids"].shape[0] == batch["rewards"].shape[0] == n0 + n1
    assert batch["pack_ids"].tolist() == [0] * n0 + [1] * n1
    assert batch["rewards"].tolist() == packed[0]["reward"] + packed[1]["reward"]


def test_var_packed_step_equals_padded_step(tiny_model_path, tmp_path):
    """One step over the whole dataset: the same rows, the same normaliser, so the same update as padded rows."""
    kw = dict(length_normalize=True, max_length=64)
    padded, grad_padded, _, _ = run_var(tiny_model_path, tmp_path / "a", False, **kw)
    # per_device_train_batch_size=4 packs: more than there are, so that one step holds every row.
    packed, grad_packed, _, _ = run_var(tiny_model_path, tmp_path / "b", False, packing=True, **kw)
    assert len(packed.train_dataset) < 4
    log_padded, log_packed = padded.state.log_history[0], packed.state.log_history[0]
    for key in ("var/ess", "var/max_weight", "var/weighted_reward", "loss", "num_tokens"):
        assert log_packed[key] == pytest.approx(log_padded[key], rel=1e-5), key
    assert rel_diff(grad_packed, grad_padded) < 1e-5
    # Evaluation on packs: the same rows, so the same weighted loss as padded evaluation of one batch of 4 rows.
    assert packed.evaluate()["eval_loss"] == pytest.approx(padded.evaluate()["eval_loss"], rel=1e-5)


def test_var_packing_refuses_a_stream(tiny_model_path, tmp_path):
    stream = Dataset.from_dict(VAR_ROWS).to_iterable_dataset()
    args = VARConfig(**cpu_args(output_dir=str(tmp_path), packing=True, max_steps=1, ref_weighting=False))
    with pytest.raises(ValueError, match=r"VAR packing \(`packing=True`\) needs a map-style Dataset, but the train"):
        VARTrainer(model=tiny_model_path, args=args, train_dataset=stream)
