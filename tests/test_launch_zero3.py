"""The launch script (`trl_rewardweighted.scripts.<method>`, recipe + command-line flags) under DeepSpeed ZeRO-3 with 2
CPU ranks and every parameter partitioned, one torchrun launch per trainer:

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/launch_script_zero3.py \
        var RESULTS --config quickstart/var --model_name_or_path TINY --dataset_name rows.jsonl ...

The quickstart recipes on the 7-row sets of tests/distributed/zero3_trainers.py: 2 ranks x batch 2, so the second
(last) step is uneven, and the reference pass is sharded 4 / 3 over the ranks in batches of 2 (the last one partial).
VAR with `ref_weighting: true` (reference pre-pass), VCB with the recipe's `precompute_ref_log_probs: true`, RA-DPO
with a live ZeRO-3 reference model. Both ranks exit 0; the final `save_model` gathers the 16-bit weights into
`output_dir` (`save_strategy: "no"`), and that model loads and differs from the initial one. The trainers' numbers
under ZeRO-3 (equal to a single-process run) are checked in tests/test_zero3.py; VAR runs by default, VCB and RA-DPO
with `-m slow`.
"""

import json
import math
from pathlib import Path

import pytest
from datasets import Dataset

pytest.importorskip("deepspeed")

from tests._helpers import cpu_args, torchrun_deepspeed  # noqa: E402
from tests.distributed.zero3_trainers import RA_DPO_ROWS, VAR_ROWS, VCB_ROWS  # noqa: E402
from tests.test_launch_scripts import check_saved_model  # noqa: E402
from tests.test_zero3 import assert_partitioned  # noqa: E402

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "tests" / "distributed" / "launch_script_zero3.py"
TIMEOUT = 300
CASES = {
    "var": ("quickstart/var", VAR_ROWS, ["--ref_weighting", "true"]),  # the reference pre-pass
    "vcb": ("quickstart/vcb", VCB_ROWS, []),  # the recipe's own precompute_ref_log_probs: true
    # chosen_only: one row a pair, 7 rows (`both` would give 14, even over the ranks); live reference model
    "reward_augmented_dpo": (
        "quickstart/reward_augmented_dpo",
        RA_DPO_ROWS,
        ["--augment_mode", "chosen_only"],
    ),
}
# DeepSpeed's CPU accelerator, not accelerate's CPU mode: `use_cpu` false. The recipe keeps its `save_strategy: "no"`
# and seed.
ZERO3_FLAGS = [f"--{k}={v}" for k, v in cpu_args(use_cpu=False).items() if k not in ("save_strategy", "seed")]


def launch(method, model_path, tmp_path):
    recipe, rows, extra = CASES[method]
    data, out, results = tmp_path / f"{method}.jsonl", tmp_path / "out", tmp_path / "results"
    Dataset.from_dict(rows).to_json(data)
    log = torchrun_deepspeed(
        SCRIPT, method, results, "--config", recipe, "--model_name_or_path", model_path, "--dataset_name", data,
        "--output_dir", out, "--per_device_train_batch_size", "2", "--precompute_ref_batch_size", "2",
        *ZERO3_FLAGS, *extra, nproc=2, timeout=TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    return out, log, [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]


def plain_ref_logps(method, model_path, tmp_path):
    """The reference log-probs of the same rows in one plain process (no DeepSpeed, no sharding)."""
    _, rows, _ = CASES[method]
    args = dict(output_dir=str(tmp_path / "plain"), max_length=512, precompute_ref_batch_size=2, **cpu_args())
    if method == "var":
        from trl_rewardweighted import VARConfig, VARTrainer

        trainer = VARTrainer(model=model_path, args=VARConfig(beta=0.5, **args), train_dataset=Dataset.from_dict(rows))
    else:
        from trl_rewardweighted import VCBConfig, VCBTrainer

        config = VCBConfig(gamma=0.05, precompute_ref_log_probs=True, **args)
        trainer = VCBTrainer(model=model_path, args=config, train_dataset=Dataset.from_dict(rows))
    return list(trainer.train_dataset["ref_logps"])


@pytest.mark.distributed
@pytest.mark.parametrize(
    "method",
    ["var", pytest.param("vcb", marks=pytest.mark.slow), pytest.param("reward_augmented_dpo", marks=pytest.mark.slow)],
)
def test_launch_script_zero3_two_ranks(tiny_model_path, tmp_path, method):
    out, log, ranks = launch(method, tiny_model_path, tmp_path)

    for r, result in enumerate(ranks):
        assert (result["rank"], result["world"], result["distributed_type"]) == (r, 2, "DistributedType.DEEPSPEED")
        assert_partitioned(result["partition"], world=2)  # really ZeRO-3: every parameter sharded over the 2 ranks
        # 7 rows / (2 ranks x 2): 2 steps, the last one uneven; the logged (gathered) losses finite and equal.
        assert result["global_step"] == 2 and len(result["losses"]) == 2, result["losses"]
        assert all(map(math.isfinite, result["losses"])), result["losses"]
        assert result["losses"] == ranks[0]["losses"]
    if method == "reward_augmented_dpo":
        for result in ranks:  # the live reference model: a ZeRO-3 engine of its own, partitioned too
            assert_partitioned(result["ref_partition"], world=2)
            assert result["ref_logps"] is None
    else:
        # The reference pass, sharded 4 / 3 over the ranks, gathered on both: every row once, in order, equal to the
        # unsharded values.
        expected = plain_ref_logps(method, tiny_model_path, tmp_path)
        for result in ranks:
            assert len(result["ref_logps"]) == 7
            assert result["ref_logps"] == ranks[0]["ref_logps"]
            for got, want in zip(result["ref_logps"], expected, strict=True):  # VCB: a list per row
                assert got == pytest.approx(want, rel=1e-5)

    # The final `save_model` (save_strategy "no"): the 16-bit weights gathered into a full model by rank 0.
    assert f"Model saved to {out}" in log
    assert (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert not list(out.glob("global_step*")), "a sharded DeepSpeed checkpoint instead of the gathered weights"
    check_saved_model(out, tiny_model_path)
