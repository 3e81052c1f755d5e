"""Configuration of the VCB trainer (value-based calibration, arXiv 2402.16030)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trl import DPOConfig

from ..losses import VCB_PAIR_MODES
from .common import sample_weight_column_field

__all__ = ["VCBConfig"]

# DPO-only knobs that mean nothing for VCB. Setting one to anything but its `DPOConfig` default is an error.
_DPO_ONLY_FIELDS = ("loss_type", "loss_weights", "label_smoothing", "f_divergence_type", "ld_alpha", "use_weighting")


def _dpo_default(name: str):
    """The default of the `DPOConfig` field `name`, read from the dataclass (so it follows TRL)."""
    for f in dataclasses.fields(DPOConfig):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return f.default
    raise AttributeError(f"`DPOConfig` has no field `{name}`.")


@dataclass
class VCBConfig(DPOConfig):
    r"""
    Configuration class for [`VCBTrainer`] (Value-based CaliBration, Mao et al., arXiv 2402.16030).

    Inherits every field of [`~trl.DPOConfig`] (reference model, precomputation, `max_length`, ...) and of
    [`~transformers.TrainingArguments`]. Only the fields below are VCB-specific.

    Parameters:
        > VCB loss (Eqs. 19-20 of the paper; see `docs/vcb.md`)

        gamma (`float`, *optional*, defaults to `0.05`):
            Scale γ > 0 of the log-ratio in `s_i = γ·log(π(y_i|x)/π_ref(y_i|x)) − r_i/σ(x)`. The optimum is
            `π ∝ π_ref·exp(r/(γσ))`: a smaller γ moves the policy further from the reference. 0.05 is the paper's best
            value on Anthropic-HH. The paper's Appendix A.4 code calls it `beta`; DPO's `beta` is *not* used and
            setting it is an error.
        lam (`float`, *optional*, defaults to `1.0`):
            Temperature λ > 0 of the log-sum-exp over pairs, `λ·log Σ exp(l_ij/λ)`. Large λ approaches a plain
            average of the pair losses; small λ focuses on the worst pair. The paper reports it barely matters.
        pair_mode (`str`, *optional*, defaults to `"paper"`):
            `"paper"`: Eq. 20, unordered pairs `j ≥ i` including the diagonal, population σ (1/n).
            `"appendix"`: the Appendix A.4 code, all ordered pairs, `l_ij/2`, unbiased σ (1/(n−1)).
        sigma_eps_abs (`float`, *optional*, defaults to `1e-6`):
            Absolute part of the threshold under which a group's reward std counts as 0, see `sigma_eps_rel`.
        sigma_eps_rel (`float`, *optional*, defaults to `1e-6`):
            A group whose reward std is `σ ≤ sigma_eps_abs + sigma_eps_rel·max|r|` (all rewards equal, up to float
            noise) gets normalised reward gaps of 0: its loss only pulls the completions' log-ratios together.

        > Data

        completions_column (`str`, *optional*, defaults to `"completions"`):
            Column holding, per row, the list of completions of the row's `prompt`: strings, or (conversational
            data) assistant message lists / assistant texts.
        rewards_column (`str`, *optional*, defaults to `"rewards"`):
            Column holding, per row, a list with one reward (float) per completion, in the same order. NaN/inf/None
            entries are masked out of the loss and counted.
        sample_weight_column (`str`, *optional*, defaults to `"sample_weight"`):
            Column with one weight per prompt group, a finite number >= 0 that multiplies the group's loss; the loss
            is then `sum_g w_g l_g / sum_g w_g` over the valid groups of the optimizer step (see `docs/weights.md`).
            A dataset without a column of the default name is unweighted (every group weighs 1); a name you set must
            exist. Negative, NaN or missing weights, and a training column of zeros only, are refused naming the rows.

        > Not used

        beta (`None`):
            DPO's KL coefficient is not used by VCB, whose log-ratio scale is `gamma`. Any value is an error.

    Notes:
        - `per_device_train_batch_size` / `per_device_eval_batch_size` count **prompts (groups)**, not sequences:
          a micro-batch of 4 prompts with 8 completions each forwards 32 sequences. A group is never split across
          micro-batches or processes.
        - The training loss is the mean over the valid groups (at least 2 completions with a finite reward) of the
          whole optimizer step, over every gradient-accumulation micro-batch and every process, so the gradient does
          not depend on how the step is split. (The paper sums over prompts; the mean only rescales the learning
          rate.) With sample weights it is the weighted mean over the same groups.
        - The DPO-only `loss_type`, `loss_weights`, `label_smoothing`, `f_divergence_type`, `ld_alpha` and
          `use_weighting` must stay at their `DPOConfig` defaults.
        - `accelerator_config.split_batches` and `dispatch_batches=True` are not supported (they would cut groups
          apart); an unset `dispatch_batches` is set to `False` by the trainer.
    """

    gamma: float = field(
        default=0.05,
        metadata={
            "help": "Scale γ > 0 of the log-ratio; the optimum is π ∝ π_ref·exp(r/(γσ)). Paper default 0.05. "
            "(DPO's `beta` is not used.)"
        },
    )
    lam: float = field(
        default=1.0,
        metadata={"help": "Temperature λ > 0 of the log-sum-exp over the pairs of a prompt (Eq. 20)."},
    )
    pair_mode: str = field(
        default="paper",
        metadata={
            "help": "'paper': Eq. 20 (pairs j >= i incl. diagonal, population std). 'appendix': the Appendix A.4 "
            "code (all ordered pairs, l/2, unbiased std).",
            "choices": list(VCB_PAIR_MODES),
        },
    )
    completions_column: str = field(
        default="completions",
        metadata={"help": "Column with the list of completions of each prompt."},
    )
    rewards_column: str = field(
        default="rewards",
        metadata={"help": "Column with a list of one reward per completion (same order)."},
    )
    sample_weight_column: str = sample_weight_column_field("prompt group", optional=True)
    sigma_eps_abs: float = field(
        default=1e-6,
        metadata={"help": "Absolute threshold under which a group's reward std counts as 0 (reward gaps set to 0)."},
    )
    sigma_eps_rel: float = field(
        default=1e-6,
        metadata={"help": "Relative threshold (times max|r|) under which a group's reward std counts as 0."},
    )
    # Overrides DPOConfig.beta (default 0.1) so that an explicitly set value can always be told apart and refused.
    beta: float | None = field(
        default=None,
        metadata={"help": "Not used by VCB (DPO's KL coefficient): VCB's log-ratio scale is `gamma`. Leave unset."},
    )

    def __post_init__(self):
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"`gamma` must be a finite number > 0, got {self.gamma!r} (paper default: 0.05).")
        if not (isinstance(self.lam, (int, float)) and self.lam > 0 and math.isfinite(self.lam)):
            raise ValueError(f"`lam` must be a finite number > 0, got {self.lam!r} (default: 1.0).")
        if self.pair_mode not in VCB_PAIR_MODES:
            raise ValueError(f"`pair_mode` must be one of {VCB_PAIR_MODES}, got {self.pair_mode!r}.")
        for name in ("sigma_eps_abs", "sigma_eps_rel"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
        for name in ("completions_column", "rewards_column", "sample_weight_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty column name, got {value!r}.")
        if self.completions_column == self.rewards_column:
            raise ValueError(f"`completions_column` and `rewards_column` are both {self.completions_column!r}.")
        for name in _DPO_ONLY_FIELDS:
            value, default = getattr(self, name), _dpo_default(name)
            if name == "loss_type" and isinstance(value, str):
                value = [value]
            if value != default:
                raise ValueError(
                    f"`{name}={value!r}` is a DPO-only option that VCB does not use; leave it at its default "
                    f"({default!r}). VCB's loss is set by `gamma`, `lam` and `pair_mode`."
                )
        if self.beta is not None:
            raise ValueError(
                f"`beta={self.beta!r}` is not used by VCB: its log-ratio scale is `gamma` (the paper's Appendix A.4 "
                f"code calls it `beta`). Set `gamma={self.beta!r}` instead and leave `beta` unset."
            )
        super().__post_init__()
