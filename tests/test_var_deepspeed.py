"""VAR under DeepSpeed ZeRO-3 (one CPU process via torchrun): the reference pre-pass runs through a DeepSpeed
inference engine, which is torn down before training; results equal the plain run and the weight inputs stay fp32.
Every parameter is a ZeRO-3 parameter (persistence threshold 0), empty outside a gather. The 2-rank cases are in
tests/test_zero3.py."""

import json
import sys
from pathlib import Path

import pytest

from tests._helpers import run_launcher, torchrun_deepspeed

pytest.importorskip("deepspeed")

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "tests" / "distributed" / "var_zero3.py"


def run(model_path, out, mode):
    if mode == "zero3":
        output = torchrun_deepspeed(SCRIPT, model_path, out, mode)
    else:
        output = run_launcher([sys.executable, SCRIPT, model_path, out, mode], {"DS_ACCELERATOR": "cpu"})
    line = next(ln for ln in output.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.distributed
def test_zero3_matches_plain_run(tiny_model_path, tmp_path):
    plain = run(tiny_model_path, tmp_path / "plain", "plain")
    zero3 = run(tiny_model_path, tmp_path / "zero3", "zero3")
    assert zero3["ref_logps"] == pytest.approx(plain["ref_logps"], rel=1e-5)
    assert zero3["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    # ZeRO-3 really manages every parameter: empty outside a gather (`numel() == 0`), so forwards gather them.
    assert zero3["partition"] and all(
        status == "NOT_AVAILABLE" and visible == 0 and local == full > 0
        for _, full, visible, local, status in zero3["partition"]
    ), zero3["partition"]
    assert all(status == "NOT_ZERO3" for *_, status in plain["partition"])
    assert zero3["dtypes"] == {
        "rewards": "torch.float32",
        "ref_logps": "torch.float32",
        "var_weights": "torch.float32",
    }
