"""VAR with 2 real processes (CPU, gloo): the step-wide softmax makes the update independent of the batch layout,
and the reference pre-pass works with an in-memory dataset on every rank."""

from pathlib import Path

import pytest
import torch

from tests._helpers import accelerate_two_processes
from tests.distributed.var_grad_layout import ROWS, run_layout

SCRIPT = Path(__file__).parent / "distributed" / "var_grad_layout.py"
ROOT = Path(__file__).parent.parent


def launch_two_processes(model_path, out_dir, bs, ga, scope="step"):
    accelerate_two_processes(SCRIPT, model_path, out_dir, bs, ga, scope)
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.distributed
@pytest.mark.parametrize("bs,ga", [(2, 1), (1, 2)])
def test_two_processes_match_single_process(tiny_model_path, tmp_path, bs, ga):
    reference_grad, reference_ref, _ = run_layout(tiny_model_path, str(tmp_path / "single"), bs=4, ga=1)
    results = launch_two_processes(tiny_model_path, tmp_path, bs, ga)
    for r in results:
        # DDP all-reduces gradients: both ranks hold the step's gradient, equal to the single-process bs=4 one.
        assert rel_diff(r["grad"], reference_grad) < 1e-5
        # The reference pre-pass was sharded over both ranks and gathered: every rank has every row, in order.
        assert r["prompts"] == ROWS["prompt"]
        torch.testing.assert_close(torch.tensor(r["ref_logps"]), torch.tensor(reference_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_two_processes_micro_batch_scope_runs_and_differs(tiny_model_path, tmp_path):
    """z_scope='micro_batch' normalises per device: a different (documented) update, still finite and in sync."""
    reference_grad, _, trainer = run_layout(tiny_model_path, str(tmp_path / "single"), bs=4, ga=1)
    assert trainer.state.log_history[0]["var/ess"] > 1.5  # the weights are not one-hot: the test is sensitive
    results = launch_two_processes(tiny_model_path, tmp_path, 2, 1, scope="micro_batch")
    assert rel_diff(results[0]["grad"], results[1]["grad"]) < 1e-6  # ranks in sync
    assert torch.isfinite(results[0]["grad"]).all()
    assert rel_diff(results[0]["grad"], reference_grad) > 1e-3


@pytest.mark.distributed
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_uneven_last_batch_repeats_get_no_weight(tiny_model_path, tmp_path, packed):
    """5 rows, 2 processes x batch 2: accelerate's `even_batches` fills the last step (1 real row) with 3 rows from the
    start of the epoch. Under the step-wide softmax those repeats must get weight 0: the real row gets all of it, and
    every step's gradient equals the single-process (batch 4) gradient of the same rows."""
    from tests.distributed.var_uneven import ROWS as UNEVEN_ROWS
    from tests.distributed.var_uneven import run as run_uneven

    script = Path(__file__).parent / "distributed" / "var_uneven.py"
    accelerate_two_processes(script, tiny_model_path, tmp_path, *(["packed"] if packed else []))
    ranks = [torch.load(tmp_path / f"uneven_rank{r}.pt") for r in (0, 1)]
    single = run_uneven(tiny_model_path, str(tmp_path / "single"), bs=4, packed=packed)
    assert ranks[0]["num_rows"] == single["num_rows"] == 5  # packed: 5 packs of one row

    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 2
    rows = {step: [(r, w) for x in ranks for rec in x["records"] if rec["step"] == step
                   for r, w in zip(rec["rewards"], rec["weights"])] for step in (0, 1)}  # fmt: skip
    first = {r for r, _ in rows[0]}
    assert len(rows[0]) == 4 and len(first) == 4
    # The last step: 4 rows on the 2 processes, only one of them new; the other 3 repeat rows of the first step.
    real = [(r, w) for r, w in rows[1] if r not in first]
    repeats = [(r, w) for r, w in rows[1] if r in first]
    assert len(rows[1]) == 4 and len(real) == 1 and len(repeats) == 3
    assert sorted([*first, real[0][0]]) == pytest.approx(sorted(UNEVEN_ROWS["reward"]))  # every row once
    assert real[0][1] == pytest.approx(1.0, abs=1e-6), rows[1]  # the weights sum to 1 over the distinct rows only
    assert all(w == 0.0 for _, w in repeats), rows[1]
    # Same gradients as one process with batch 4 (whose last step holds only the real row).
    assert len(single["grads"]) == len(ranks[0]["grads"]) == 2
    for r in ranks:
        for got, expected in zip(r["grads"], single["grads"], strict=True):
            assert rel_diff(got, expected) < 1e-5
