"""VCB's step-wide normaliser: the gradient of one optimizer step does not depend on how its prompt groups are split
across gradient-accumulation micro-batches or processes; the reference precompute works on 2 processes in memory."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests._helpers import accelerate_two_processes, torchrun_deepspeed
from tests.distributed.vcb_grad_layout import ROWS, precompute_ref_logps, run_layout

SCRIPT = Path(__file__).parent / "distributed" / "vcb_grad_layout.py"
ROOT = Path(__file__).parent.parent


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def single_process(tiny_model_path, tmp_path_factory):
    """The bs 4 x GA 1 gradient (the whole step in one micro-batch) and the logged step loss."""
    grad, trainer = run_layout(tiny_model_path, str(tmp_path_factory.mktemp("vcb-bs4")), bs=4, ga=1)
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert trainer.state.log_history[0]["groups_skipped"] == 1  # the 1-valid-completion group reached the loss
    return grad, loss


def test_grad_accumulation_matches_one_big_batch(tiny_model_path, tmp_path, single_process):
    reference, reference_loss = single_process
    grad, trainer = run_layout(tiny_model_path, str(tmp_path), bs=2, ga=2)
    assert rel_diff(grad, reference) < 1e-5
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert loss == pytest.approx(reference_loss, rel=1e-5)  # the logged loss is the step's mean too


def test_per_micro_batch_mean_would_differ(tiny_model_path, tmp_path, single_process, monkeypatch):
    """Sensitivity check: without the step-wide count (fallback = mean per micro-batch / GA), bs 2 x GA 2 differs."""
    from trl_rewardweighted import VCBTrainer

    original = VCBTrainer.get_batch_samples

    def no_count(self, epoch_iterator, num_batches, device):
        return original(self, epoch_iterator, num_batches, device)[0], None

    monkeypatch.setattr(VCBTrainer, "get_batch_samples", no_count)
    grad, _ = run_layout(tiny_model_path, str(tmp_path), bs=2, ga=2)
    assert rel_diff(grad, single_process[0]) > 1e-3


@pytest.mark.distributed
def test_two_processes_match_single_process(tiny_model_path, tmp_path, single_process):
    reference, reference_loss = single_process
    accelerate_two_processes(SCRIPT, tiny_model_path, tmp_path, "2x1", "1x2")

    # 2 processes x bs 2 and 2 processes x bs 1 x GA 2: DDP all-reduces, both ranks hold the bs-4 gradient.
    for layout in ("2x1", "1x2"):
        for rank in (0, 1):
            result = torch.load(tmp_path / f"grad_{layout}_rank{rank}.pt")
            assert rel_diff(result["grad"], reference) < 1e-5, (layout, rank)
            assert result["loss"] == pytest.approx(reference_loss, rel=1e-5)

    # Reference precompute sharded over 2 ranks, gathered on both: identical to the single-process column, in order.
    single, _ = precompute_ref_logps(tiny_model_path, str(tmp_path / "precompute-single"))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"ref_rank{rank}.json").read_text())
        assert result["prompts"] == ROWS["prompt"]
        assert [len(r) for r in result["ref_logps"]] == [len(r) for r in ROWS["completions"]]
        for got, expected in zip(result["ref_logps"], single, strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_deepspeed_zero3_keeps_rewards_and_ref_logps_float32(tiny_model_path, tmp_path):
    """One ZeRO-3 + bf16 process (DeepSpeed runs on CPU with one process): live, precomputed and column references all
    train, with float32 rewards / reference log-probs at the loss (DeepSpeed would cast them to bf16)."""
    pytest.importorskip("deepspeed")
    torchrun_deepspeed(SCRIPT, "--deepspeed", tiny_model_path, tmp_path)
    results = json.loads((tmp_path / "deepspeed.json").read_text())
    for name, result in results.items():
        assert len(result["losses"]) == 2 and all(map(math.isfinite, result["losses"])), name
        assert result["dtypes"] and all(d["rewards"] == "torch.float32" for d in result["dtypes"]), name
        if name != "live":
            assert all(d["ref_logps"] == "torch.float32" for d in result["dtypes"]), name
        # Every parameter partitioned by ZeRO-3 (persistence threshold 0): empty outside a gather.
        assert result["partition"] and all(
            status == "NOT_AVAILABLE" and visible == 0 and local == full > 0
            for _, full, visible, local, status in result["partition"]
        ), (name, result["partition"])
    # A reference log-prob of -310.123 survives (bf16 would round it to -310).
    assert results["column"]["ref_logps"][0] == [-310.123, -311.5, -312.25]
    assert results["precompute"]["losses"] == pytest.approx(results["live"]["losses"], rel=1e-3)
