"""The launch entry points (`python -m trl_rewardweighted.scripts.<method>`) under `accelerate launch` with 2 CPU
processes: both processes exit 0 within a timeout (no rank left hanging at exit) and the saved model loads and differs
from the initial one.

The quickstart recipes run as a user runs them, by name from some other folder (their `dataset_name` is relative to
the packaged recipes folder: quickstart/data/), `trl-rw train` starting `accelerate launch` itself, with only the model
and the output folder replaced:

    ACCELERATE_USE_CPU=1 trl-rw train var --config quickstart/var --num-processes 2 \
        --model_name_or_path TINY --output_dir OUT

The smollm2-135m recipes (marked slow) run on synthetic rows with their own `save_strategy: steps`, so the run ends
with a checkpoint save (collectives at exit).
"""

import json
import math
import sys

import pytest
import torch
from datasets import Dataset

from tests._helpers import accelerate_two_processes, cpu_args, run_launcher
from tests.distributed.zero3_trainers import RA_DPO_ROWS, VAR_ROWS, VCB_ROWS
from trl_rewardweighted.packaged import recipes_root

RECIPES_ROOT = recipes_root()
TIMEOUT = 300
RECIPES = {
    "var": ("var/smollm2-135m/config_full.yaml", VAR_ROWS),
    "vcb": ("vcb/smollm2-135m/config_full.yaml", VCB_ROWS),
    "reward_augmented_dpo": ("reward_augmented_dpo/smollm2-135m/config_full.yaml", RA_DPO_ROWS),
}
# The recipe's own `save_strategy` stays (steps in the smollm2-135m recipes: the run ends with a checkpoint save, with
# collectives at exit; "no" in the quickstart ones: the final `save_model` alone must write the model).
SKIP = ("disable_tqdm", "dataloader_num_workers", "save_strategy")
CPU_FLAGS = [f"--{k}={v}" for k, v in cpu_args().items() if k not in SKIP]
# The quickstart recipes also keep their own seed.
QUICKSTART_FLAGS = [f"--{k}={v}" for k, v in cpu_args().items() if k not in (*SKIP, "seed")]


def launch_script(method, model_path, tmp_path, extra=()):
    recipe, rows = RECIPES[method]
    data = tmp_path / f"{method}.jsonl"
    Dataset.from_dict(rows).to_json(data)
    out = tmp_path / f"{method}-out"
    log = accelerate_two_processes(
        "-m", f"trl_rewardweighted.scripts.{method}", "--config", RECIPES_ROOT / recipe,
        "--model_name_or_path", model_path, "--dataset_name", data, "--dtype", "float32",
        "--output_dir", out, "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--eval_strategy", "no", "--do_eval", "false", "--push_to_hub", "false", "--max_length", "256",
        *CPU_FLAGS, *extra, timeout=TIMEOUT,
    )  # fmt: skip
    assert (out / "checkpoint-2" / "model.safetensors").exists()  # the end-of-training checkpoint
    return out, log


def check_saved_model(out, model_path):
    from transformers import AutoModelForCausalLM

    saved, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    # Every weight comes from the file (none left at a fresh random init, which would "differ" trivially).
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    initial = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    changed = [
        name
        for (name, p), (_, q) in zip(saved.named_parameters(), initial.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert changed, "the saved model equals the initial one: nothing was trained or saved"


def logged_losses(log):
    """The `loss` of every training log line (`{'loss': ...}` printed by rank 0 with `disable_tqdm`)."""
    losses = []
    for line in log.splitlines():
        line = line.strip()
        if line.startswith("{") and "'loss'" in line:
            losses.append(float(line.split("'loss': ")[1].split(",")[0].strip("'")))
    return losses


def quickstart_rows(method):
    name = {"var": "rows", "vcb": "groups", "reward_augmented_dpo": "pairs"}[method]
    path = RECIPES_ROOT / "quickstart" / "data" / name
    return [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["var", "vcb", "reward_augmented_dpo"])
def test_quickstart_recipe_two_processes(tiny_model_path, tmp_path, method):
    """The quickstart recipe as it is (its own data, epochs, batch size, `save_strategy: "no"`), on the tiny model, by
    name from another folder, `trl-rw train --num-processes 2` starting `accelerate launch` itself."""
    out = tmp_path / "out"
    log = run_launcher(
        [
            sys.executable, "-m", "trl_rewardweighted.cli", "train", method, "--config", f"quickstart/{method}",
            "--num-processes", "2", "--model_name_or_path", tiny_model_path, "--output_dir", out,
            "--disable_tqdm", "true", *QUICKSTART_FLAGS,
        ],
        {"ACCELERATE_USE_CPU": "1"}, TIMEOUT, cwd=tmp_path,
    )  # fmt: skip
    assert f"Model saved to {out}" in log
    # save_strategy "no": no checkpoint folder, the final `trainer.save_model` wrote the model.
    assert not list(out.glob("checkpoint-*"))
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    check_saved_model(out, tiny_model_path)
    # One epoch of the recipe's own data over 2 processes: ceil(rows / (2 x per-device batch)) logged steps (VCB: 1
    # prompt a process; RA-DPO `augment_mode: both`: 2 rows a pair).
    rows = len(quickstart_rows(method)) * (2 if method == "reward_augmented_dpo" else 1)
    batch = 1 if method == "vcb" else 2
    losses = logged_losses(log)
    assert len(losses) == math.ceil(rows / (2 * batch)), losses
    assert all(map(math.isfinite, losses)), losses


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["var", "vcb", "reward_augmented_dpo"])
def test_smollm2_recipe_two_processes_exit_and_save(tiny_model_path, tmp_path, method):
    out, log = launch_script(method, tiny_model_path, tmp_path)
    assert f"Model saved to {out}" in log
    check_saved_model(out, tiny_model_path)
