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
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEPRECATED_NAMES",
    "METHODS",
    "PRESETS",
    "Method",
    "build_trainer",
    "build_training_args",
    "check_reward_funcs",
    "get_method",
    "method_names",
    "model_init_kwargs",
    "preset_settings",
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


# Named sets of defaults for [`build_training_args`]; each value is a function returning the settings.
PRESETS = {
    # The demos (quickstart, `trl-rw compare`, `trl-rw iterate`): constant learning rate, a log line every step, no
    # checkpoints and no reporting, float32 without activation checkpointing, on the CPU unless a GPU is visible.
    "cpu-demo": _cpu_demo,
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
    defaults = preset_settings(preset)
    for names in _ONE_SETTING:  # a setting given under either name replaces the preset's, whichever name it uses
        if any(n in settings for n in names):
            defaults = {k: v for k, v in defaults.items() if k not in names}
    values = {**defaults, **settings, "output_dir": str(output_dir)}
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{method}: {cls.__name__} has no field {', '.join(map(repr, unknown))}.")
    return cls(**values)


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
