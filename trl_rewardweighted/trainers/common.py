"""What the trainers and their configs share: one construction sequence around the base TRL trainer's `__init__`
([`TrainerInitMixin`]; [`DPOTrainerInitMixin`] and [`SFTTrainerInitMixin`] take the arguments of `DPOTrainer` and
`SFTTrainer` as they are), the `sample_weight_column` field, and the check of the configs' temperatures.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ..data.weights import SAMPLE_WEIGHT_COLUMN
from ..model_utils import default_or_checked_args, hidden_from_base_init, resolve_reference_model

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

__all__ = [
    "DPOTrainerInitMixin",
    "SFTTrainerInitMixin",
    "TrainerInitMixin",
    "check_finite_positive",
    "is_finite_positive",
    "sample_weight_column_field",
]


class TrainerInitMixin:
    """Trainer mixin: the one way the package's trainers are built around their base TRL trainer's `__init__`.

    A trainer's `__init__` takes its arguments explicitly and hands them to `_construct(locals())`, which:

    1. makes `args` the trainer's config: [`~model_utils.default_or_checked_args`] with `_config_class`,
       `_default_output_suffix` and `_config_fix` (a default config named after the model, or a `TypeError` for a
       config of another class);
    2. raises `ValueError(message)` for each argument of `_refused_arguments` (name -> message) that is set, then
       `ValueError("`train_dataset` is required.")` when there is none (unless `_requires_train_dataset` is False);
    3. runs the trainer's `_check_arguments(arguments)`: its own checks, before anything is loaded. It may replace
       values (e.g. resolve `ref_model`) and removes the arguments that the base trainer does not take;
    4. runs the base trainer's `__init__` with the arguments, the config fields returned by
       `_hidden_from_base_init(args)` set to their values meanwhile ([`~model_utils.hidden_from_base_init`]);
    5. runs the trainer's `_after_base_init(args)`.

    `_resolved_ref_model(arguments)` is the reference-model rule of [`~model_utils.resolve_reference_model`] on the
    arguments. A warning raised in `_check_arguments` or `_after_base_init` itself names the caller of `__init__` with
    `stacklevel=4` (`__init__` and `_construct` are in between).
    """

    _config_class: type
    # The default config's output folder is `<model name>-<suffix>`.
    _default_output_suffix: str
    # How to build the right config, for the `TypeError` (default: from the fields of the config given).
    _config_fix: str | None = None
    # Arguments of the base trainer that the trainer refuses when set: name -> the `ValueError` message.
    _refused_arguments: dict[str, str] = {}
    _requires_train_dataset: bool = True

    def _construct(self, arguments: dict[str, Any]) -> None:
        """Build the trainer from its `__init__` arguments by name (`locals()` at the start of `__init__`: `self` is
        left out, a `kwargs` dict of extra keyword arguments is merged in)."""
        extra = arguments.get("kwargs") or {}
        arguments = {name: value for name, value in arguments.items() if name not in ("self", "__class__", "kwargs")}
        arguments.update(extra)
        args = default_or_checked_args(
            arguments["args"], arguments["model"], self._config_class, self._default_output_suffix, self._config_fix
        )
        arguments["args"] = args
        for name, message in self._refused_arguments.items():
            if arguments.get(name) is not None:
                raise ValueError(message)
        if self._requires_train_dataset and arguments.get("train_dataset") is None:
            raise ValueError("`train_dataset` is required.")
        self._check_arguments(arguments)
        with hidden_from_base_init(args, **self._hidden_from_base_init(args)):
            super().__init__(**arguments)
        self._after_base_init(args)

    @staticmethod
    def _resolved_ref_model(arguments: dict[str, Any]):
        """[`~model_utils.resolve_reference_model`] applied to the trainer's arguments."""
        return resolve_reference_model(
            arguments["model"],
            arguments["ref_model"],
            arguments["args"],
            arguments.get("peft_config"),
            arguments.get("quantization_config"),
        )

    def _check_arguments(self, arguments: dict[str, Any]) -> None:
        """The trainer's checks of its arguments (by name, `args` already its config) before the base `__init__`."""

    def _hidden_from_base_init(self, args) -> dict[str, Any]:
        """Config fields set to these values while the base trainer's `__init__` runs (none by default)."""
        return {}

    def _after_base_init(self, args) -> None:
        """The trainer's own set-up once the base trainer's `__init__` has run."""


class DPOTrainerInitMixin(TrainerInitMixin):
    """[`TrainerInitMixin`] with the arguments of [`~trl.DPOTrainer`], which the DPO-based trainers take as they are."""

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        self._construct(locals())


class SFTTrainerInitMixin(TrainerInitMixin):
    """[`TrainerInitMixin`] with the arguments of [`~trl.SFTTrainer`], for a trainer that takes them as they are."""

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
    ):
        self._construct(locals())


def sample_weight_column_field(per: str, optional: bool = False):
    """The `sample_weight_column` field of a trainer config (default `"sample_weight"`), with the help text
    `"Column with one sample weight (a finite number >= 0) per <per>."` (`"...; optional."` when `optional`)."""
    note = "; optional" if optional else ""
    return field(
        default=SAMPLE_WEIGHT_COLUMN,
        metadata={"help": f"Column with one sample weight (a finite number >= 0) per {per}{note}."},
    )


def is_finite_positive(value) -> bool:
    """Whether `value` is a finite real number > 0 (a `bool` is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_finite_positive(name: str, value, meaning: str) -> None:
    """Refuse a config value that is not a finite number > 0 ([`is_finite_positive`]):
    `ValueError("<name> must be a finite number > 0, got <value!r>. <meaning>")`."""
    if not is_finite_positive(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}. {meaning}")
