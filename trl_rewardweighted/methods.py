"""Training a method from code in one place: the table of methods and the builders of their arguments and trainers.

Every command that trains goes through here: the launch scripts and `trl-rw train` (a recipe parsed by `TrlParser`),
`trl-rw compare` and `trl-rw iterate` (settings built in code, from the `cpu-demo` preset by default).

```python
>>> from trl_rewardweighted.methods import build_trainer, build_training_args
>>> args = build_training_args("var", "out", preset="cpu-demo", beta=0.2, max_steps=10)
>>> trainer = build_trainer("var", "HuggingFaceTB/SmolLM2-135M-Instruct", args, rows)
>>> trainer.train()
```

Settings are the fields of the method's config (`VARConfig`, `DPOConfig`, ...): a preset gives defaults and anything
the caller passes wins, so bf16, activation checkpointing, a learning-rate schedule or `deepspeed` are set like in a
recipe; PEFT and the model's loading options (`dtype`, quantization) go to [`build_trainer`] as a `peft_config` or a
TRL `ModelConfig`, as in TRL's own scripts.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEPRECATED_NAMES",
    "METHODS",
    "PRESETS",
    "Method",
    "TrainingBlock",
    "build_trainer",
    "build_training_args",
    "check_batch_layout",
    "check_block_keys",
    "check_reward_funcs",
    "check_training_settings",
    "launch_processes",
    "get_method",
    "method_names",
    "model_init_kwargs",
    "merge_settings",
    "method_recipe",
    "parse_training_settings",
    "preset_settings",
    "read_training_block",
    "resolve_method_name",
    "reward_functions",
    "run_training",
]


@dataclass(frozen=True)
class Method:
    """One trainable method: its public name, classes and the shape of its training data.

    Parameters:
        name (`str`): the public method name (CLI, recipe folder, launch module, compare output).
        config (`str`): the config class as `module:Class`.
        trainer (`str`): the trainer class as `module:Class`.
        data (`str`): the training data shape: `rows` (`prompt`, `completion`, `reward`), `completions` (`prompt`,
            `completion`), `pairs` (`prompt`, `chosen`, `rejected`), `scored_pairs` (pairs with `score_chosen`,
            `score_rejected`), `groups` (`prompt`, `completions`, `rewards`) or `prompts` (the online methods sample
            their own completions).
        sequences_per_row (`int` or `None`): sequences one training row holds (a pair 2); `None` for a group, whose
            size is the number of replies per prompt.
        online (`bool`): whether the method samples completions during training and scores them with `reward_funcs`.
        baseline (`bool`): one of TRL's own trainers (SFT, DPO, GRPO), trained here as a baseline; the launch scripts
            and `trl-rw train` run this package's methods.
    """

    name: str
    config: str
    trainer: str
    data: str
    sequences_per_row: int | None = 1
    online: bool = False
    baseline: bool = False

    def config_class(self) -> type:
        """The config class (imported on first use, so that reading the table does not import TRL)."""
        return _import(self.config)

    def trainer_class(self) -> type:
        """The trainer class (imported on first use)."""
        return _import(self.trainer)

    def rows_per_step(self, sequences: int, group_size: int | None = None) -> int:
        """Training rows holding `sequences` sequences: the per-step batch size of this method's config for a budget
        counted in sequences (a DPO pair counts 2, a VCB group `group_size`). At least 1."""
        per_row = self.sequences_per_row or group_size
        if per_row is None:
            raise ValueError(f"{self.name}: a row is a group of replies; give its size (`group_size`).")
        return max(1, sequences // per_row)


_T = "trl_rewardweighted.trainers."
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("var", _T + "var_config:VARConfig", _T + "var_trainer:VARTrainer", "rows"),
        Method("vcb", _T + "vcb_config:VCBConfig", _T + "vcb_trainer:VCBTrainer", "groups", None),
        Method(
            "reward_augmented_dpo",
            _T + "ra_dpo_config:RewardAugmentedDPOConfig",
            _T + "ra_dpo_trainer:RewardAugmentedDPOTrainer",
            "scored_pairs",
            2,
        ),
        Method(
            "online_var",
            _T + "online_var_config:OnlineVARConfig",
            _T + "online_var_trainer:OnlineVARTrainer",
            "prompts",
            online=True,
        ),
        Method("sft", "trl:SFTConfig", "trl:SFTTrainer", "completions", baseline=True),
        Method("dpo", "trl:DPOConfig", "trl:DPOTrainer", "pairs", 2, baseline=True),
        Method("grpo", "trl:GRPOConfig", "trl:GRPOTrainer", "prompts", online=True, baseline=True),
    )
}

# The one table of old names: each still works, with a FutureWarning naming the new one.
DEPRECATED_NAMES = {"ra_dpo": "reward_augmented_dpo", "ra_dpo_twins": "reward_augmented_dpo_twins"}


def _import(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def method_names(*, baselines: bool = True) -> list[str]:
    """The public method names (this package's methods first, then TRL's baselines unless `baselines=False`)."""
    return [name for name, m in METHODS.items() if baselines or not m.baseline]


def resolve_method_name(name: str, known=None, *, what: str = "method") -> str:
    """The public name of `name`: itself, or the new name of a deprecated one (with a `FutureWarning`).

    Args:
        name (`str`):
            A method name, possibly a deprecated one (`ra_dpo`).
        known (`Iterable[str]`, *optional*, defaults to the names of [`METHODS`]):
            The names accepted here; an unknown name raises `ValueError` listing them.
        what (`str`, *optional*, defaults to `"method"`):
            How the error and the warning call the value (a flag such as `--methods`).

    Returns:
        `str`: the public name.
    """
    known = list(METHODS) if known is None else list(known)
    if name in DEPRECATED_NAMES and DEPRECATED_NAMES[name] in known:
        new = DEPRECATED_NAMES[name]
        warnings.warn(
            f"{what} {name!r} is deprecated and will be removed; it is now called {new!r}.",
            FutureWarning,
            stacklevel=3,
        )
        return new
    if name not in known:
        raise ValueError(f"Unknown {what} {name!r}; choose one of {', '.join(known)}.")
    return name


def get_method(name: str) -> Method:
    """The [`Method`] called `name` (a deprecated name warns and resolves to the new one)."""
    return METHODS[resolve_method_name(name)]


# ----------------------------------------------------------------------------------------------------------------------
# Training arguments
# ----------------------------------------------------------------------------------------------------------------------


def _cpu_demo() -> dict:
    import dataclasses

    import torch
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers >= 5.25 renamed `gradient_checkpointing` (a FutureWarning) to `activation_checkpointing`.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        checkpointing: False,
        "use_cpu": not torch.cuda.is_available(),
    }


def _gpu_bf16() -> dict:
    settings = _cpu_demo()
    checkpointing = next(k for k in settings if k.endswith("_checkpointing"))
    return {**settings, "bf16": True, checkpointing: True, "use_cpu": False}


# Named sets of defaults for [`build_training_args`] and a [`TrainingBlock`]'s `preset`; each value is a function
# returning the settings.
PRESETS = {
    # The demos (quickstart, `trl-rw compare`, `trl-rw iterate`): constant learning rate, a log line every step, no
    # checkpoints and no reporting, float32 without activation checkpointing, on the CPU unless a GPU is visible.
    "cpu-demo": _cpu_demo,
    # The same on a GPU in bf16 with activation checkpointing.
    "gpu-bf16": _gpu_bf16,
}


# Fields that are one setting under two names (transformers 5.25 renamed `gradient_checkpointing`).
_ONE_SETTING = (("activation_checkpointing", "gradient_checkpointing"),)


def preset_settings(preset: str | None) -> dict:
    """The settings of a preset of [`PRESETS`] (`None`: none, the config classes' own defaults)."""
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)} (or none).")
    return PRESETS[preset]()


def merge_settings(*layers: dict) -> dict:
    """Settings layered lowest first: a later layer's value wins, and a setting known under two names
    (`activation_checkpointing`, `gradient_checkpointing`) given in a later layer under either name replaces the earlier
    layers' value under both."""
    merged: dict = {}
    for layer in layers:
        for names in _ONE_SETTING:
            if any(n in layer for n in names):
                merged = {k: v for k, v in merged.items() if k not in names}
        merged.update(layer)
    return merged


def build_training_args(method: str, output_dir, *, preset: str | None = None, **settings):
    """The method's config (`VARConfig`, `DPOConfig`, ...) from a preset and the caller's settings.

    Args:
        method (`str`):
            A name of [`METHODS`].
        output_dir (`str` or `Path`):
            The trainer's output folder.
        preset (`str`, *optional*):
            A preset of [`PRESETS`] (`"cpu-demo"`) whose settings are the defaults; `None` keeps the config class's
            own defaults.
        **settings:
            Fields of the config, overriding the preset: `learning_rate`, `per_device_train_batch_size`, `bf16`,
            `activation_checkpointing`, `beta`, ... A field the config does not have raises `ValueError` naming it.

    Returns:
        The config instance.
    """
    import dataclasses

    cls = get_method(method).config_class()
    values = {**merge_settings(preset_settings(preset), settings), "output_dir": str(output_dir)}
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{method}: {cls.__name__} has no field {', '.join(map(repr, unknown))}.")
    return cls(**values)


# ----------------------------------------------------------------------------------------------------------------------
# Training settings given like a recipe: `trl-rw compare --config`, `trl-rw iterate`'s `training`
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingBlock:
    """The training settings of the methods of a run, given like a recipe (`trl-rw compare --config FILE --set
    KEY=VALUE`, the `training` option of `trl-rw iterate`); read by [`read_training_block`].

    The file is a YAML mapping. Its top-level keys are shared by every method of the run, `methods:` holds per-method
    keys over them, and `preset:` names the defaults ([`PRESETS`]: `cpu-demo` unless set, `none` for the config
    classes' own):

    ```yaml
    bf16: true                     # fields of the methods' configs (VARConfig, DPOConfig, ...)
    activation_checkpointing: true
    gradient_accumulation_steps: 2
    lr_scheduler_type: cosine
    use_peft: true                 # fields of TRL's ModelConfig: LoRA / QLoRA, dtype, attention
    lora_r: 16
    lora_target_modules: [all-linear]
    methods:
      dpo: {learning_rate: 5.0e-7}
    ```

    Parameters:
        shared (`dict`): keys for every method; a method whose config lacks a key does not get it (the command says
            so), a key no method of the run has is refused.
        methods (`dict[str, dict]`): per-method keys, over the shared ones.
        preset (`str` or `None`): the preset of defaults.
        overrides (`tuple[tuple[str | None, str, str], ...]`): command-line settings `(method or None, key, value)`,
            over the file's; the values are strings, converted by the parser like command-line flags.
        source (`str`): where the block came from (the option and the file), for messages.
    """

    shared: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    preset: str | None = "cpu-demo"
    overrides: tuple = ()
    source: str = "--config"

    def as_mapping(self) -> dict:
        """The file's content: the shared keys, `methods` and `preset` (the overrides are not part of it)."""
        return {**self.shared, "methods": self.methods, "preset": self.preset or "none"}

    def keys(self, name: str | None = None) -> list[str]:
        """The keys set for every method (`name=None`), or for the method `name` (its own and the shared ones)."""
        own = [] if name is None else list(self.methods.get(name, {}))
        given = [k for m, k, _ in self.overrides if m is None or m == name]
        return list(dict.fromkeys([*self.shared, *own, *given]))


def read_training_block(source=None, overrides=(), *, option: str = "--config", set_option: str = "--set"):
    """Read a [`TrainingBlock`] from a YAML file or a mapping, with command-line overrides.

    Args:
        source (`str`, `os.PathLike`, `Mapping` or `None`, *optional*):
            A YAML file, its content as a mapping, or `None` (no file: the preset alone).
        overrides (`Iterable[str]`, *optional*):
            `KEY=VALUE` for every method, `METHOD.KEY=VALUE` for one.
        option (`str`, *optional*, defaults to `"--config"`):
            The option that named the file, for messages.
        set_option (`str`, *optional*, defaults to `"--set"`):
            The option of the overrides, for messages.

    Returns:
        [`TrainingBlock`]
    """
    from collections.abc import Mapping

    if source is None:
        data, where = {}, option
    elif isinstance(source, Mapping):
        data, where = dict(source), option
    else:
        import yaml

        path = Path(source)
        where = f"{option} {path}"
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such file.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{where}: invalid YAML: {' '.join(str(err).split())}") from None
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: the training settings are a YAML mapping of `key: value`.")
        data = dict(data)
    preset = data.pop("preset", "cpu-demo")
    preset = None if preset in (None, "none") else preset
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"{where}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or none.")
    methods = data.pop("methods", None) or {}
    if not isinstance(methods, Mapping) or not all(isinstance(v, Mapping) for v in methods.values()):
        raise ValueError(
            f"{where}: `methods` maps a method name to its own keys, e.g. `methods: {{dpo: {{beta: 0.1}}}}`."
        )
    methods = {DEPRECATED_NAMES.get(str(k), str(k)): dict(v or {}) for k, v in methods.items()}
    parsed = []
    for text in overrides:
        key, sep, value = str(text).partition("=")
        method, _, name = key.rpartition(".")
        if not sep or not name:
            raise ValueError(f"{set_option} {text!r}: give KEY=VALUE (every method) or METHOD.KEY=VALUE (one method).")
        parsed.append((DEPRECATED_NAMES.get(method, method) or None, name, value))
    return TrainingBlock(data, methods, preset, tuple(parsed), where)


def _config_fields(method: str) -> tuple[set, set]:
    import dataclasses

    from trl import ModelConfig

    cls = get_method(method).config_class()
    return {f.name for f in dataclasses.fields(cls) if f.init}, {f.name for f in dataclasses.fields(ModelConfig)}


def _closest(key: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f" Did you mean `{close[0]}`?" if close else ""


def check_block_keys(block: TrainingBlock, methods: dict[str, str], owned: dict[str, str] | None = None) -> dict:
    """Check a [`TrainingBlock`] against the methods of a run, before anything runs.

    Args:
        block ([`TrainingBlock`]):
            The training settings.
        methods (`dict[str, str]`):
            The run's names (`reward_augmented_dpo_twins`) and the method of the table each trains.
        owned (`dict[str, str]`, *optional*):
            Keys the command sets itself, and the option that sets them (`{"max_steps": "--steps"}`): refused.

    Returns:
        `dict[str, list[str]]`: each shared key that some methods of the run do not have, and those methods.

    Raises:
        `ValueError`: a per-method block for a method not in the run, a key that is not a field of the method's
        config or of `ModelConfig` (for a shared key: of any method of the run), or a key of `owned`.
    """
    owned = owned or {}
    fields = {name: set().union(*_config_fields(method)) for name, method in methods.items()}
    for name in [*block.methods, *(m for m, _, _ in block.overrides if m is not None)]:
        if name not in methods:
            raise ValueError(
                f"{block.source}: settings for {name}, which is not a method of this run ({', '.join(methods)})."
            )
    for key in block.keys():
        if key in owned:
            raise ValueError(f"{block.source}: `{key}` is set by {owned[key]} in this command; remove it.")
    for name in methods:
        for key in block.keys(name):
            if key in owned:
                raise ValueError(f"{block.source}: `{key}` is set by {owned[key]} in this command; remove it.")
    missing = {}
    every = set().union(*fields.values())
    for key in block.keys():
        if key not in every:
            raise ValueError(
                f"{block.source}: unknown key `{key}`: not a field of the methods' configs or of ModelConfig."
                + _closest(key, every)
            )
        lacking = [name for name in methods if key not in fields[name]]
        if lacking:
            missing[key] = lacking
    for name, method in methods.items():
        own = [*block.methods.get(name, {}), *(k for m, k, _ in block.overrides if m == name)]
        for key in own:
            if key not in fields[name]:
                config = get_method(method).config_class().__name__
                raise ValueError(
                    f"{block.source}: methods.{name}: unknown key `{key}`: not a field of {config} or ModelConfig."
                    + _closest(key, fields[name])
                )
    return missing


def method_recipe(block: TrainingBlock, name: str, method: str, output_dir, defaults=None, forced=None) -> dict:
    """The recipe of one method of a run: what [`parse_training_settings`] parses, recorded with the run so that a
    resumed run can compare it and a launched training process parses the same.

    Args:
        block ([`TrainingBlock`]):
            The training settings (checked by [`check_block_keys`]).
        name (`str`):
            The method's name in the run (`reward_augmented_dpo_twins`).
        method (`str`):
            The method of [`METHODS`] it trains.
        output_dir (`str` or `Path`):
            The trainer's output folder.
        defaults (`dict`, *optional*):
            The command's settings for this method, over the preset and under the block.
        forced (`dict`, *optional*):
            Settings over the block's (the command's explicit flags, the budgets).

    Returns:
        `dict`: `{"values": {key: value}, "argv": ["--key", "value", ...]}`, lowest to highest: the preset, `defaults`,
        the shared keys, the method's keys, `forced`, then the command-line overrides in `argv`.
    """
    fields = set().union(*_config_fields(method))
    shared = {k: v for k, v in block.shared.items() if k in fields}
    given = [(k, v) for m, k, v in block.overrides if (m is None and k in fields) or m == name]
    layers = [preset_settings(block.preset), defaults or {}, shared, block.methods.get(name, {}), forced or {}]
    layers.append({k: v for k, v in given})  # only to drop the other name of a setting given on the command line
    values = merge_settings(*layers)
    for k, _ in given:
        values.pop(k, None)
    values["output_dir"] = str(output_dir)
    return {"values": values, "argv": [x for k, v in given for x in (f"--{k}", str(v))]}


def parse_training_settings(method: str, recipe: dict, *, deepspeed: bool = True, where: str | None = None):
    """Parse a method's recipe ([`method_recipe`]) with `TrlParser` into its config and TRL's `ModelConfig`, as the
    launch scripts parse a recipe file: the values are the parser's defaults (a recipe file's keys), `argv` its
    command line.

    Args:
        method (`str`):
            A name of [`METHODS`].
        recipe (`dict`):
            `{"values": {...}, "argv": [...]}`.
        deepspeed (`bool`, *optional*, defaults to `True`):
            `False` parses without the `deepspeed` key (a DeepSpeed config sets up the launch; it is checked to exist
            here and takes effect in the launched training process).
        where (`str`, *optional*):
            Prefix of the messages (default: the method's name).

    Returns:
        `tuple`: `(config, ModelConfig)`.
    """
    from trl import ModelConfig, TrlParser

    cls = get_method(method).config_class()
    where = where or method
    values, argv = dict(recipe["values"]), list(recipe.get("argv", []))
    if not deepspeed:
        value = values.pop("deepspeed", None)
        if "--deepspeed" in argv:
            i = argv.index("--deepspeed")
            value = argv[i + 1]
            del argv[i : i + 2]
        if isinstance(value, str) and not Path(value).is_file():
            raise FileNotFoundError(f"{where}: deepspeed {value}: no such DeepSpeed config file.")
    parser = TrlParser((cls, ModelConfig), prog=where)

    def error(message):
        raise ValueError(message)

    parser.error = error  # one `ValueError` instead of argparse's usage and exit
    unknown = parser.set_defaults_with_config(**values)
    if unknown:
        raise ValueError(f"{where}: unknown key `{unknown[0][2:]}`: not a field of {cls.__name__} or ModelConfig.")
    try:
        args, model_config, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None
    if rest:
        raise ValueError(f"{where}: unknown setting {rest[0]}: not a field of {cls.__name__} or ModelConfig.")
    return args, model_config


def check_training_settings(method: str, args, model_config, *, where: str | None = None) -> None:
    """Refuse settings this machine cannot train with, before anything runs: QLoRA (`load_in_4bit` / `load_in_8bit`)
    without a CUDA GPU, `bitsandbytes` or LoRA, PEFT without `peft`.

    Args:
        method (`str`):
            The method (for messages).
        args:
            Its config ([`parse_training_settings`]).
        model_config (`trl.ModelConfig`):
            Its model options.
        where (`str`, *optional*):
            Prefix of the messages (default: the method's name).
    """
    import importlib.util

    import torch

    where = where or method
    quantized = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(model_config, k, False)]
    if quantized:
        if not torch.cuda.is_available():
            raise ValueError(
                f"{where}: {quantized[0]} (QLoRA) needs a CUDA GPU (bitsandbytes quantizes on the GPU) and none is "
                "visible; remove it, or train LoRA in full precision (use_peft: true)."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(f"{where}: {quantized[0]} needs bitsandbytes: pip install bitsandbytes.")
        if not model_config.use_peft:
            raise ValueError(
                f"{where}: {quantized[0]}: a quantized model trains through LoRA adapters only; set use_peft: true."
            )
    if model_config.use_peft and importlib.util.find_spec("peft") is None:
        raise ImportError(f"{where}: use_peft needs peft: pip install peft.")


def launch_processes(accelerate_config, num_processes) -> int:
    """The processes of a launched phase (training batches are split over them).

    Args:
        accelerate_config (`str` or `None`):
            An accelerate config path or name ([`~trl_rewardweighted.launch.resolve_accelerate_config`]).
        num_processes (`int` or `None`):
            The processes asked for on the command line.

    Returns:
        `int`: `num_processes`, else the accelerate config's `num_processes` (every machine's), else 1.
    """
    if num_processes is not None:
        if num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {num_processes}.")
        return num_processes
    if accelerate_config is None:
        return 1
    import yaml

    from .launch import resolve_accelerate_config

    config = yaml.safe_load(Path(resolve_accelerate_config(accelerate_config)).read_text()) or {}
    return int(config.get("num_processes", 1))


def check_batch_layout(method: str, args, num_processes: int = 1, group_size: int | None = None) -> None:
    """Refuse a batch layout that breaks VAR's normaliser: weights normalised over a single row (`z_scope="step"`:
    the optimizer step, every process and accumulation micro-batch; `"micro_batch"`: one micro-batch) make VAR plain
    SFT; with `z_scope="prompt"` a prompt's `group_size` rows must fill whole steps.

    Args:
        method (`str`):
            The method; anything but VAR passes.
        args:
            Its config.
        num_processes (`int`, *optional*, defaults to `1`):
            Training processes.
        group_size (`int`, *optional*):
            Rows per prompt in the training data, when known.
    """
    if get_method(method).name != "var":
        return
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    step = per_device * accumulation * num_processes
    layout = (
        f"per_device_train_batch_size {per_device} x gradient_accumulation_steps {accumulation} x {num_processes} "
        "process(es)"
    )
    if args.z_scope == "step" and step < 2:
        raise ValueError(
            f"{method}: an optimizer step holds one row ({layout}): VAR's weights, normalised over the step, are all "
            "1 (plain SFT). Give the step at least 2 rows."
        )
    if args.z_scope == "micro_batch" and per_device < 2:
        raise ValueError(
            f"{method}: z_scope micro_batch with per_device_train_batch_size {per_device}: each micro-batch's weights "
            "are normalised over one row, all 1 (plain SFT). Use z_scope step, or at least 2 rows per device."
        )
    if args.z_scope == "prompt" and group_size and step % group_size:
        raise ValueError(
            f"{method}: z_scope prompt: an optimizer step of {step} rows ({layout}) does not hold whole prompts of "
            f"{group_size} rows each; make the step a multiple of {group_size}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------------------------------------


def model_init_kwargs(model_args, args) -> dict:
    """`model_init_kwargs` for the trainer from TRL's `ModelConfig` (revision, attention, `dtype`, quantization), as
    TRL's scripts build them; the config's own `model_init_kwargs` win. Under quantization (QLoRA) each process loads
    its own copy on its own device."""
    from trl import get_quantization_config

    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        from accelerate import PartialState

        kwargs.update(device_map={"": PartialState().local_process_index}, quantization_config=quantization_config)
    return {**kwargs, **(args.model_init_kwargs or {})}


def reward_functions(specs) -> list:
    """`reward_funcs` for an online trainer: a `module:function` scorer `f(prompts, completions)` is imported and
    adapted ([`~trl_rewardweighted.rewards.as_reward_func`]); a callable is taken as a TRL reward function and passed
    as is, like anything else (a reward model id or path, which the trainer loads)."""
    from .rewards import as_reward_func
    from .sampling import load_scorer

    funcs = []
    for spec in specs:
        if isinstance(spec, str) and ":" in spec and not Path(spec).exists():
            funcs.append(as_reward_func(load_scorer(spec), str(spec).rsplit(":", 1)[-1]))
        else:
            funcs.append(spec)
    return funcs


def check_reward_funcs(method: str, reward_funcs) -> None:
    """Raise `ValueError` unless `reward_funcs` is given for an online method and absent for an offline one."""
    spec = get_method(method)
    if spec.online and not reward_funcs:
        raise ValueError(
            f"{spec.name} samples completions during training and needs `reward_funcs` (a list of `module:function` "
            "scorers or reward model ids), e.g. `reward_funcs: [trl_rewardweighted.rewards:vader_positivity]`."
        )
    if not spec.online and reward_funcs:
        online = ", ".join(n for n, m in METHODS.items() if m.online)
        raise ValueError(
            f"`reward_funcs` is used by the online methods ({online}) only; {spec.name} reads the rewards from its "
            "dataset. Remove `reward_funcs` from the recipe."
        )


def build_trainer(
    method: str,
    model,
    args,
    train_dataset,
    *,
    eval_dataset=None,
    processing_class=None,
    ref_model=None,
    reward_funcs=None,
    peft_config=None,
    model_config=None,
    **kwargs,
):
    """The method's trainer, built the same way for every command.

    Args:
        method (`str`):
            A name of [`METHODS`].
        model (`str` or `PreTrainedModel`):
            The policy: a path / Hub id, or a model object.
        args:
            The method's config ([`build_training_args`], or parsed from a recipe).
        train_dataset (`Dataset`):
            The training data in the method's shape ([`Method.data`]).
        eval_dataset (`Dataset`, *optional*):
            Evaluation data.
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer (default: loaded from `model`).
        ref_model (`str` or `PreTrainedModel`, *optional*):
            The reference model (default: the trainer's own rule, a copy of the starting policy). A path is loaded
            for DPO, which takes a model object only. SFT has no reference: giving one raises `ValueError`.
        reward_funcs (`list`, *optional*):
            Online methods only, and required there: `module:function` scorers, callables `f(prompts, completions)`
            or reward model ids ([`reward_functions`]).
        peft_config (`peft.PeftConfig`, *optional*):
            LoRA / PEFT adapters (default: from `model_config` when it has `use_peft`).
        model_config (`trl.ModelConfig`, *optional*):
            The model's loading options (`dtype`, attention, quantization, PEFT), as TRL's scripts parse them;
            merged into `args.model_init_kwargs` ([`model_init_kwargs`]).
        **kwargs:
            Any other argument of the trainer (`callbacks`, ...).

    Returns:
        The trainer.
    """
    spec = get_method(method)
    trainer_cls = spec.trainer_class()
    check_reward_funcs(spec.name, reward_funcs)
    if model_config is not None:
        from trl import get_peft_config

        args.model_init_kwargs = model_init_kwargs(model_config, args)
        if peft_config is None:
            peft_config = get_peft_config(model_config)
    if spec.name == "dpo" and isinstance(ref_model, str):
        from .model_utils import resolve_reference_model

        ref_model = resolve_reference_model(model, ref_model, args)  # DPOTrainer takes a model object only
    values = dict(
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        ref_model=ref_model,
        reward_funcs=reward_functions(reward_funcs) if reward_funcs else None,
        peft_config=peft_config,
        **kwargs,
    )
    accepted = inspect.signature(trainer_cls.__init__).parameters
    refused = sorted(k for k, v in values.items() if v is not None and k not in accepted)
    if refused:
        raise ValueError(f"{spec.name}: {trainer_cls.__name__} takes no {', '.join(map(repr, refused))}.")
    return trainer_cls(model, **{k: v for k, v in values.items() if v is not None})


def run_training(trainer, **kwargs) -> dict:
    """Run `trainer.train(**kwargs)` and sum it up: `steps` (optimizer steps), `seconds` (wall time of training),
    `first_loss` and `last_loss` (logged losses, `None` when none was logged) and `train_metrics` (the trainer's)."""
    import time

    start = time.time()
    result = trainer.train(**kwargs)
    seconds = time.time() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_metrics": dict(result.metrics),
    }
