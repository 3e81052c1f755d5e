"""Shared launch logic for the methods (Alignment-Handbook style recipes).

    trl-rw train var --config var/smollm2-135m/config_full --accelerate-config zero3 --num-processes 8
    accelerate launch --config_file "$(trl-rw recipes path zero3)" -m trl_rewardweighted.scripts.var \
        --config var/smollm2-135m/config_full

`--config` is a recipe file or the name of a packaged recipe ([`trl_rewardweighted.packaged`]). A recipe YAML sets
defaults that command-line flags override. Parsing is strict: an unknown or misspelled key is an
error (TRL's own scripts parse leniently and silently drop such keys). `dataset_name` is a Hub id or a local path
(`save_to_disk` folder, `.jsonl`/`.json`, `.parquet`). The methods and their trainers come from
[`trl_rewardweighted.methods`] (`LAUNCH_METHODS`: var, vcb, reward_augmented_dpo, online_var; `trl-rw train METHOD`
runs the same in one process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trl_rewardweighted.methods import get_method, method_names

# The methods the launch scripts train: this package's own (TRL's baselines have TRL's own scripts: `trl sft`, ...).
LAUNCH_METHODS = tuple(method_names(baselines=False))


def _method(method: str):
    spec = get_method(method)  # a deprecated name warns and resolves
    if spec.baseline:
        raise ValueError(
            f"{spec.name} is TRL's own method: train it with `trl {spec.name}`. The launch scripts train "
            f"{', '.join(LAUNCH_METHODS)}."
        )
    return spec


_SCRIPT_ARGUMENTS = None


def script_arguments_class():
    """TRL's `ScriptArguments` plus `dataset_adapter`, `dataset_adapter_kwargs` and `dataset_mixture` (built on first
    use, so that importing this module does not import TRL)."""
    global _SCRIPT_ARGUMENTS
    if _SCRIPT_ARGUMENTS is None:
        import json
        from dataclasses import dataclass, field

        from trl import ScriptArguments

        from trl_rewardweighted.data.adapters import ADAPTERS, parse_adapter_kwargs

        @dataclass
        class RecipeScriptArguments(ScriptArguments):
            """[`~trl.ScriptArguments`] with a dataset adapter and a dataset mixture (see `docs/datasets.md`)."""

            dataset_adapter: str | None = field(
                default=None,
                metadata={
                    "help": "Adapter applied to each loaded split (see trl_rewardweighted.data.adapters.ADAPTERS).",
                    "choices": sorted(ADAPTERS),
                },
            )
            dataset_adapter_kwargs: dict | str | None = field(
                default=None, metadata={"help": "Options of `dataset_adapter`: a mapping, or a JSON object string."}
            )
            reward_funcs: list[str] | None = field(
                default=None,
                metadata={
                    "help": "Online methods only: the rewards of the sampled completions, each a "
                    "`module:function` scorer `f(prompts, completions) -> list[float]` (e.g. "
                    "`trl_rewardweighted.rewards:vader_positivity`) or a reward model id / path (loaded by GRPO)."
                },
            )
            dataset_mixture: dict | str | None = field(
                default=None,
                metadata={
                    "help": "The alignment handbook's mixture block (datasets with id / config / split / columns / "
                    "weight / adapter, seed, test_split_size), a mapping or a JSON object string. Replaces "
                    "`dataset_name`."
                },
            )

            def __post_init__(self):
                if self.dataset_adapter is not None and self.dataset_adapter not in ADAPTERS:
                    raise ValueError(
                        f"dataset_adapter: unknown adapter {self.dataset_adapter!r}; choose one of {sorted(ADAPTERS)}."
                    )
                self.dataset_adapter_kwargs = parse_adapter_kwargs(self.dataset_adapter_kwargs)
                if isinstance(self.dataset_mixture, str):
                    try:
                        self.dataset_mixture = json.loads(self.dataset_mixture)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"dataset_mixture: not valid JSON ({err}).") from None

        _SCRIPT_ARGUMENTS = RecipeScriptArguments
    return _SCRIPT_ARGUMENTS


def make_parser(method: str):
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    spec = _method(method)
    return TrlParser(
        (script_arguments_class(), spec.config_class(), ModelConfig, DatasetMixtureConfig),
        prog=f"trl_rewardweighted.scripts.{spec.name}",
    )


def load_splits(script_args, mixture_args=None):
    """Return (train, eval-or-None): from `dataset_name` (a local path or a Hub id) with `dataset_adapter` applied to
    each split, or from a mixture (`dataset_mixture`, or TRL's `datasets:` list in `mixture_args`)."""
    mixture = getattr(script_args, "dataset_mixture", None)
    adapter = getattr(script_args, "dataset_adapter", None)
    adapter_kwargs = getattr(script_args, "dataset_adapter_kwargs", None)
    if mixture_args is not None and mixture_args.datasets:
        if mixture is not None:
            raise ValueError("Set either `dataset_mixture` or TRL's `datasets:` list, not both.")
        mixture = mixture_args
    if mixture is not None:
        if script_args.dataset_name is not None:
            raise ValueError(
                "Set either `dataset_name` or a mixture (`dataset_mixture` / `datasets`), not both: the mixture would "
                "replace the dataset."
            )
        from trl_rewardweighted.data.adapters import load_mixture

        return load_mixture(mixture, adapter, adapter_kwargs)
    train, test = _load_named(script_args)
    if adapter:
        from trl_rewardweighted.data.adapters import apply_adapter

        train = apply_adapter(train, adapter, adapter_kwargs)
        test = apply_adapter(test, adapter, adapter_kwargs) if test is not None else None
    return train, test


def _load_named(script_args):
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


_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0", "none", "")


def resolve_resume_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, given `resume_from_checkpoint` as a recipe or the command line sets it.

    `TrainingArguments.resume_from_checkpoint` is a string field, so `--resume_from_checkpoint true` arrives as the
    string `"true"` (and `resume_from_checkpoint: true` in a recipe as the boolean) and would otherwise be taken as a
    path.

    Args:
        value (`str`, `bool` or `None`):
            `True` / `"true"` / `"yes"`: the last `checkpoint-N` folder in `output_dir`. `None` / `False` / `"false"` /
            `"no"`: no resume. Anything else: the path of a checkpoint folder.
        output_dir (`str`):
            The run's output folder, searched for the last checkpoint.

    Returns:
        `str` or `None`: the checkpoint folder, or `None` to train from scratch.

    Example:

    ```python
    >>> resolve_resume_checkpoint("false", "outputs/run")  # None
    >>> resolve_resume_checkpoint("true", "outputs/run")
    'outputs/run/checkpoint-500'
    ```
    """
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        value = value.strip().lower() in _TRUE
    if value is None or value is False:
        return None
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(
                f"resume_from_checkpoint is true, but there is no checkpoint in output_dir {output_dir!r} (no "
                "`checkpoint-N` folder). Remove `resume_from_checkpoint` to train from scratch, or set it to the path "
                "of a checkpoint folder."
            )
        return last
    if not os.path.isdir(value):
        raise ValueError(
            f"resume_from_checkpoint: {value!r} is not a folder. Set it to a checkpoint folder (`output_dir/"
            "checkpoint-N`), to `true` for the last checkpoint in output_dir, or to `false`."
        )
    return str(value)


def check_model_sources(model_args, script_args) -> None:
    """Refuse a model, tokenizer or reward-model path of the recipe that does not exist locally, naming its key, before
    anything is loaded (a Hub id is left to transformers)."""
    from trl_rewardweighted.model_utils import check_model_source

    check_model_source(model_args.model_name_or_path, "model_name_or_path")
    for spec in getattr(script_args, "reward_funcs", None) or []:
        if isinstance(spec, str):
            check_model_source(spec, "reward_funcs")


def resolve_config_argument(argv: list[str]) -> list[str]:
    """`argv` with its `--config` (`--config VALUE` or `--config=VALUE`) given as a file: a packaged recipe's name
    ([`trl_rewardweighted.packaged.resolve_recipe`]) becomes its path, and the files the packaged recipe names
    relative to the recipes folder come first as absolute-path overrides (so that later flags still override them).

    Raises:
        `FileNotFoundError`: the value is neither a file nor a packaged recipe name (the message names `--config`).
        `ValueError`: `--config` without a value.
    """
    from trl_rewardweighted.packaged import packaged_overrides, resolve_recipe

    args = [str(a) for a in argv]
    for i, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            value = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
            if value is None:
                raise ValueError("--config needs a value: a recipe file or a packaged recipe name.")
            (path,) = resolve_recipe(value)
            rest = args[:i] + args[i + (1 if "=" in arg else 2) :]
            return [*packaged_overrides(path), "--config", str(path), *rest]
    return args


LAUNCH_OPTIONS = {
    "accelerate_config": ("--accelerate-config", "--accelerate_config"),
    "num_processes": ("--num-processes", "--num_processes"),
}


def split_launch_options(argv: list[str], accelerate_config: str | None = None, num_processes: int | None = None):
    """Take `--accelerate-config NAME|PATH` and `--num-processes N` (also spelled with underscores, as `trl dpo
    --accelerate_config` spells it) out of a `trl-rw train` command line.

    Args:
        argv (`list[str]`):
            The arguments after the method: `--config RECIPE` and config overrides, the launch options among them.
        accelerate_config (`str`, *optional*), num_processes (`int`, *optional*):
            The same options given before the method; giving one in both places is refused.

    Returns:
        `tuple[str | None, int | None, list[str]]`: the accelerate config, the number of processes and the remaining
        arguments (for the launch script's parser).
    """
    found = {"accelerate_config": accelerate_config, "num_processes": num_processes}
    rest = []
    args = [str(a) for a in argv]
    i = 0
    while i < len(args):
        arg = args[i]
        key = next(
            (k for k, flags in LAUNCH_OPTIONS.items() for f in flags if arg == f or arg.startswith(f + "=")), None
        )
        if key is None:
            rest.append(arg)
            i += 1
            continue
        flag = LAUNCH_OPTIONS[key][0]
        if "=" in arg:
            value, i = arg.partition("=")[2], i + 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            raise ValueError(f"{flag} needs a value.")
        if found[key] is not None:
            raise ValueError(f"{flag} is given twice.")
        if key == "num_processes":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{flag} expects an integer number of processes, got {value!r}.") from None
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}.")
        found[key] = value
    return found["accelerate_config"], found["num_processes"], rest


def launch_train_command(
    method: str, argv: list[str], accelerate_config: str | None = None, num_processes: int | None = None
) -> list[str]:
    """The `accelerate launch` command line that runs `method`'s launch script (`trl_rewardweighted.scripts.<method>`)
    on `argv`, its `--config` resolved first (a packaged name becomes its path, see [`resolve_config_argument`]), so
    that a missing recipe or config fails before anything starts.

    Args:
        method (`str`): a launch method (`LAUNCH_METHODS`; a deprecated name warns and resolves).
        argv (`list[str]`): `--config RECIPE` and config overrides.
        accelerate_config (`str`, *optional*): an accelerate config path or name
            ([`trl_rewardweighted.launch.resolve_accelerate_config`]).
        num_processes (`int`, *optional*): the number of processes (overrides the config's).

    Returns:
        `list[str]`: the command, for [`trl_rewardweighted.launch.run_launched`].
    """
    from trl_rewardweighted.launch import launch_command

    spec = _method(method)
    module = f"trl_rewardweighted.scripts.{spec.name}"
    return launch_command([module, *resolve_config_argument(argv)], accelerate_config, num_processes)


def main(method: str, argv: list[str] | None = None):
    """Parse a recipe and the command line (`argv`, default `sys.argv[1:]`) for `method`, train, save the model.
    `--config` is a recipe file or a packaged recipe's name (see [`resolve_config_argument`])."""
    from trl_rewardweighted.methods import build_trainer, check_reward_funcs

    spec = _method(method)
    parser = make_parser(spec.name)
    argv = resolve_config_argument(sys.argv[1:] if argv is None else argv)
    parsed = parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)
    script_args, training_args, model_args, mixture_args = parsed[:4]
    # Resolved before the (slow) model and data loading, so that a missing checkpoint fails at once.
    resume_from_checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_reward_funcs(spec.name, script_args.reward_funcs)  # before the (slow) data loading
    check_model_sources(model_args, script_args)
    train_dataset, eval_dataset = load_splits(script_args, mixture_args)
    trainer = build_trainer(
        spec.name,
        model_args.model_name_or_path,
        training_args,
        train_dataset,
        eval_dataset=None if training_args.eval_strategy == "no" else eval_dataset,
        reward_funcs=script_args.reward_funcs,
        model_config=model_args,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
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
