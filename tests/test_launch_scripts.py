"""The launch entry points (`python -m trl_rewardweighted.scripts.<method>`) under `accelerate launch` with 2 CPU
processes: both processes exit 0 within a timeout (no rank left hanging at exit) and the saved model loads.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m trl_rewardweighted.scripts.var --config recipes/var/smollm2-135m/config_full.yaml \
        --model_name_or_path TINY --dataset_name rows.jsonl ...
"""

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests._helpers import accelerate_two_processes, cpu_args
from tests.distributed.zero3_trainers import RA_DPO_ROWS, VAR_ROWS, VCB_ROWS

ROOT = Path(__file__).parent.parent
TIMEOUT = 300
RECIPES = {
    "var": ("recipes/var/smollm2-135m/config_full.yaml", VAR_ROWS),
    "vcb": ("recipes/vcb/smollm2-135m/config_full.yaml", VCB_ROWS),
    "ra_dpo": ("recipes/reward_augmented_dpo/smollm2-135m/config_full.yaml", RA_DPO_ROWS),
}
# The recipe's own `save_strategy: steps` stays: the run ends with a checkpoint save (collectives at exit).
SKIP = ("disable_tqdm", "dataloader_num_workers", "save_strategy")
CPU_FLAGS = [f"--{k}={v}" for k, v in cpu_args().items() if k not in SKIP]


def launch_script(method, model_path, tmp_path, extra=()):
    recipe, rows = RECIPES[method]
    data = tmp_path / f"{method}.jsonl"
    Dataset.from_dict(rows).to_json(data)
    out = tmp_path / f"{method}-out"
    log = accelerate_two_processes(
        "-m", f"trl_rewardweighted.scripts.{method}", "--config", ROOT / recipe,
        "--model_name_or_path", model_path, "--dataset_name", data, "--dtype", "float32",
        "--output_dir", out, "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--eval_strategy", "no", "--do_eval", "false", "--push_to_hub", "false", "--max_length", "256",
        *CPU_FLAGS, *extra, timeout=TIMEOUT,
    )  # fmt: skip
    assert (out / "checkpoint-2" / "model.safetensors").exists()  # the end-of-training checkpoint
    return out, log


def check_saved_model(out, model_path):
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    changed = [
        name
        for (name, p), (_, q) in zip(saved.named_parameters(), initial.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert changed, "the saved model equals the initial one: nothing was trained or saved"


@pytest.mark.distributed
def test_var_script_two_processes_exit_and_save(tiny_model_path, tmp_path):
    out, log = launch_script("var", tiny_model_path, tmp_path)
    assert f"Model saved to {out}" in log
    check_saved_model(out, tiny_model_path)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["vcb", "ra_dpo"])
def test_dpo_scripts_two_processes_exit_and_save(tiny_model_path, tmp_path, method):
    out, log = launch_script(method, tiny_model_path, tmp_path)
    assert f"Model saved to {out}" in log
    check_saved_model(out, tiny_model_path)
