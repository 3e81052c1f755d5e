"""Shared launch logic for the three methods (Alignment-Handbook style recipes).

    accelerate launch --config_file accelerate_configs/zero3.yaml -m trl_rewardweighted.scripts.var \
        --config recipes/var/smollm2-135m/config_full.yaml

A recipe YAML sets defaults that command-line flags override. Parsing is strict: an unknown or misspelled key is an
error (TRL's own scripts parse leniently and silently drop such keys). `dataset_name` is a Hub id or a local path
(`save_to_disk` folder, `.jsonl`/`.json`, `.parquet`).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

METHODS = {
    "var": ("VARConfig", "VARTrainer"),
    "vcb": ("VCBConfig", "VCBTrainer"),
    "ra_dpo": ("RewardAugmentedDPOConfig", "RewardAugmentedDPOTrainer"),
}


def _classes(method: str):
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    import trl_rewardweighted

    config_name, trainer_name = METHODS[method]
    return getattr(trl_rewardweighted, config_name), getattr(trl_rewardweighted, trainer_name)


def make_parser(method: str):
    from trl import ModelConfig, ScriptArguments, TrlParser

    config_cls, _ = _classes(method)
    return TrlParser((ScriptArguments, config_cls, ModelConfig), prog=f"trl_rewardweighted.scripts.{method}")


def load_splits(script_args):
    """Return (train, eval-or-None) from a local path or a Hub dataset id."""
    name = script_args.dataset_name
    if name is None:
        raise ValueError("Set `dataset_name` (a Hub id or a local dataset path) in the recipe or on the command line.")
    if Path(name).exists():
        from datasets import DatasetDict

        from trl_rewardweighted.data.convert import load_dataset_any

        data = load_dataset_any(name, keep_splits=True)
        if not isinstance(data, DatasetDict):
            return data, None
    else:
        from datasets import load_dataset

        data = load_dataset(name, name=script_args.dataset_config)
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    if train_split not in data:
        raise ValueError(
            f"Dataset {name!r} has no split {train_split!r} (splits: {list(data)}). Set dataset_train_split."
        )
    return data[train_split], data[test_split] if test_split in data else None


def main(method: str, argv: list[str] | None = None):
    from trl import get_peft_config, get_quantization_config

    _, trainer_cls = _classes(method)
    parser = make_parser(method)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)[:3]

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:  # QLoRA: each process loads its own quantized copy on its own device
        from accelerate import PartialState

        model_init_kwargs.update(
            device_map={"": PartialState().local_process_index}, quantization_config=quantization_config
        )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    train_dataset, eval_dataset = load_splits(script_args)
    if training_args.eval_strategy == "no":
        eval_dataset = None
    kwargs = dict(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer = trainer_cls(
        **{k: v for k, v in kwargs.items() if k in inspect.signature(trainer_cls.__init__).parameters}
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def run(method: str):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(method)
    # Leave together: every rank waits for the others (rank 0 may still be writing the model), then the process group
    # is torn down explicitly instead of at interpreter exit, where a rank was seen to hang.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
