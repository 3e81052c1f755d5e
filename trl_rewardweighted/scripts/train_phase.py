"""One training phase of `trl-rw compare` or `trl-rw iterate`: one method trained on one saved dataset, described by a
phase file. It runs in the command's own process, or as its own `accelerate launch` subprocess when the command is
given `--accelerate-config` / `--num-processes` (or a recipe sets `deepspeed`):

    accelerate launch --config_file zero3.yaml -m trl_rewardweighted.scripts.train_phase OUT/models/var.phase.json

The phase file is JSON, written by the command before the phase starts ([`write_phase`]):

- `method`: the method of [`~trl_rewardweighted.methods.METHODS`]; `name`: its name in the run (for messages);
- `model`: the policy to train; `ref_model`: the reference (`null`: the trainer's own rule);
- `data`: the training dataset (a file or a `save_to_disk` folder); `columns`: the columns trained on (`null`: all);
- `recipe`: the method's settings (`{"values": ..., "argv": ...}`, see
  [`~trl_rewardweighted.methods.method_recipe`]), parsed by `TrlParser` into its config and `ModelConfig`;
- `reward`: online methods: the reward (`module:function` or a reward model), scored as `reward`;
- `output`: the folder the trained model (with PEFT: the adapter) and the tokenizer go to, replaced atomically;
- `merged`: with PEFT, a folder for the adapter merged into the policy (`trl-rw iterate`: the next round's start);
- `result`: the JSON file of the phase's metrics, written last by the main process: once it exists, the phase is
  finished.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from trl_rewardweighted.data.utils import remove_path, write_json

__all__ = ["main", "phase_finished", "run_phase", "train", "write_phase"]

_KEYS = ("method", "name", "model", "data", "recipe", "output", "result")


def write_phase(path, **phase) -> Path:
    """Write a phase file (see the module docstring); `columns`, `ref_model`, `reward` and `merged` default to
    `None`. Returns its path."""
    missing = [k for k in _KEYS if k not in phase]
    if missing:
        raise ValueError(f"A phase needs {', '.join(missing)}.")
    for key in ("columns", "ref_model", "reward", "merged"):
        phase.setdefault(key, None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, phase)
    return Path(path)


def phase_finished(phase: dict) -> bool:
    """Whether the phase's result file and output folder exist."""
    return Path(phase["result"]).is_file() and Path(phase["output"]).is_dir()


def _replace(tmp: Path, final: Path) -> None:
    remove_path(final)
    os.replace(tmp, final)


def _merge_adapter(model: str, adapter: Path, out: Path, dtype) -> None:
    """Load `model`, apply the LoRA adapter saved in `adapter`, merge it into the weights and save the model to
    `out` (in `dtype`; quantized training still merges into an unquantized copy)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))


def run_phase(phase_file) -> dict:
    """Run the phase described in `phase_file` in this process (one process of a launch, or the command's own):
    train, save the model and the tokenizer to `output` atomically, and on the main process write the metrics to
    `result` last.

    Returns:
        `dict`: `steps`, `seconds`, `first_loss`, `last_loss`, `train_metrics` ([`~methods.run_training`]) and
        `log_history`, `num_processes`, `peft`.
    """
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from trl_rewardweighted.data.convert import load_dataset_any
    from trl_rewardweighted.methods import build_trainer, parse_training_settings, run_training
    from trl_rewardweighted.rewards import as_reward_func
    from trl_rewardweighted.sampling import load_scorer

    phase = json.loads(Path(phase_file).read_text())
    args, model_config = parse_training_settings(phase["method"], phase["recipe"], where=phase["name"])
    data = load_dataset_any(phase["data"])
    if phase["columns"]:
        data = data.select_columns(phase["columns"])
    tokenizer = AutoTokenizer.from_pretrained(phase["model"])
    reward_funcs = [as_reward_func(load_scorer(phase["reward"]), "reward")] if phase["reward"] else None
    trainer = build_trainer(
        phase["method"],
        phase["model"],
        args,
        data,
        processing_class=tokenizer,
        ref_model=phase["ref_model"],
        reward_funcs=reward_funcs,
        model_config=model_config,
    )
    run = run_training(trainer)
    state = PartialState()
    output = Path(phase["output"])
    tmp = output.with_name(f".{output.name}.tmp")
    if state.is_main_process:
        remove_path(tmp)
    state.wait_for_everyone()
    trainer.save_model(str(tmp))  # on every process: ZeRO-3 and FSDP gather the weights
    metrics = {
        **run,
        "log_history": trainer.state.log_history,
        "num_processes": state.num_processes,
        "peft": bool(model_config.use_peft),
        "mixed_precision": trainer.accelerator.mixed_precision,
        "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
    }
    if state.is_main_process:
        tokenizer.save_pretrained(str(tmp))
        if phase["merged"] and model_config.use_peft:
            merged = Path(phase["merged"])
            merged_tmp = merged.with_name(f".{merged.name}.tmp")
            remove_path(merged_tmp)
            _merge_adapter(phase["model"], tmp, merged_tmp, model_config.dtype)
            tokenizer.save_pretrained(str(merged_tmp))
            _replace(merged_tmp, merged)
        _replace(tmp, output)
        shutil.rmtree(args.output_dir, ignore_errors=True)  # the trainer's own folder (no checkpoints are kept)
        write_json(phase["result"], metrics)  # last: the phase is finished
    state.wait_for_everyone()
    del trainer
    return metrics


def train(phase_file, accelerate_config=None, num_processes: int | None = None) -> dict:
    """Run the phase of `phase_file`: in this process, or as its own `accelerate launch` subprocess when
    `accelerate_config` or `num_processes` is given or the recipe sets `deepspeed` (then with 1 process unless
    `num_processes` says otherwise). Returns the metrics the phase wrote.

    Args:
        phase_file (`str` or `Path`):
            The phase ([`write_phase`]).
        accelerate_config (`str`, *optional*):
            An accelerate config path or name ([`~trl_rewardweighted.launch.resolve_accelerate_config`]).
        num_processes (`int`, *optional*):
            Processes of the launch.
    """
    from trl_rewardweighted.launch import launch_command, run_launched

    phase = json.loads(Path(phase_file).read_text())
    recipe = phase["recipe"]
    deepspeed = recipe["values"].get("deepspeed") is not None or "--deepspeed" in recipe.get("argv", [])
    if accelerate_config is None and num_processes is None and not deepspeed:
        return run_phase(phase_file)
    module = ["trl_rewardweighted.scripts.train_phase", str(phase_file)]
    processes = num_processes if num_processes is not None or accelerate_config is not None else 1
    run_launched(launch_command(module, accelerate_config, processes), env={"TOKENIZERS_PARALLELISM": "false"})
    return json.loads(Path(phase["result"]).read_text())


def main(argv: list[str] | None = None) -> None:
    """`python -m trl_rewardweighted.scripts.train_phase PHASE.json` (each process of an `accelerate launch`)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m trl_rewardweighted.scripts.train_phase PHASE.json")
    run_phase(argv[0])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # leave together (see scripts.train.run)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
