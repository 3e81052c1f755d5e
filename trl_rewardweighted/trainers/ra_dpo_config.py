"""Configuration of the reward-augmented DPO trainer (arXiv 2410.08067)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ..data.relabel import RewardAugmentFields
from ..data.weights import check_weight_column_name
from .common import is_finite_positive, sample_weight_column_field

__all__ = ["RewardAugmentedDPOConfig"]


@dataclass
class RewardAugmentedDPOConfig(RewardAugmentFields, DPOConfig):
    r"""
    Configuration for [`RewardAugmentedDPOTrainer`]: every [`~trl.DPOConfig`] field, the relabeling fields of
    [`RewardAugmentFields`] (the options of `reward_augment_dataset`, inherited with their docs, listed below; the
    config and the function accept the same values and raise the same messages) and the evaluation and batching
    fields below.

    Data: preference pairs with one numeric score per response (`prompt`, `chosen`, `rejected`, `score_chosen`,
    `score_rejected`, the columns of `HuggingFaceH4/ultrafeedback_binarized`), standard or conversational, explicit or
    implicit prompt. Without judge scores, relabel with implicit rewards first
    (`trl_rewardweighted.ira.implicit_reward_relabel`).

    Hyperparameters: the paper trains with β = 0.01, learning rate 5e-7, cosine schedule, warmup ratio 0.1, one epoch,
    effective batch 128, seed 42 (and `label_smoothing=0.3` for Qwen2-7B-It / Gemma-2-9B-It). This config keeps
    DPOConfig's defaults (β = 0.1, lr 1e-6), which are tuned for TRL's examples; the paper's values are in
    the packaged recipes `reward_augmented_dpo/` (`trl-rw recipes list`). Note that `augment_mode="both"` doubles the
    number of rows, so an epoch has twice the steps; ratio-based warmup adapts, a fixed `max_steps` does not. `beta`
    must be > 0.

    Length: the goal text is part of the prompt, so it counts against `max_length` (the default goal text is about
    45-50 tokens with common BPE tokenizers). Rows whose prompt fills `max_length` are dropped by DPO; the trainer
    counts and reports them (`augment/dropped_too_long`).

    Parameters:
        augment_eval (`bool`, *optional*, defaults to `False`):
            Augment evaluation datasets too (also those passed to `evaluate()` later). By default they stay as given,
            like the released code, which evaluates on the original pairs.
        eval_goal_score (`float` or `None`, *optional*, defaults to `None`):
            When evaluation data is not augmented, condition every evaluation prompt on this goal (e.g. `10`, the
            inference goal) without doubling or swapping. `None` leaves evaluation prompts untouched.
        keep_twins_together (`bool`, *optional*, defaults to `False`):
            Beyond the paper. With `augment_mode="both"` each pair becomes two twins that differ only in the goal and
            have opposite labels. `False` (the paper's code and TRL): rows are shuffled independently, so twins land
            in different steps, and each step learns a goal-independent preference that the twin's step undoes.
            `True`: pairs are shuffled (anew every epoch, seeded by `data_seed` or `seed`) but the twins of a pair stay
            adjacent, so every micro-batch (on every process, for any gradient accumulation) holds whole pairs and
            their goal-independent gradients cancel. Needs an even `per_device_train_batch_size`. Rows whose twin
            was dropped (e.g. by `max_length`) are shuffled and placed after all pairs of the epoch; with an odd row
            count, accelerate completes the last batch with rows from the start of the epoch, which may split one
            pair there. See `docs/reward_augmented_dpo.md`.
        sample_weight_column (`str`, *optional*, defaults to `"sample_weight"`):
            Column with one weight per pair, a finite number >= 0 that multiplies the pair's loss (both of its
            goal-conditioned twins carry it); the loss is then `sum_i w_i l_i / sum_i w_i` over the pairs of the
            optimizer step (see `docs/weights.md`). A dataset without a column of the default name is unweighted (and
            trains exactly as without this option); a name you set must exist. Negative, NaN or missing weights, and a
            training column of zeros only, are refused naming the rows. `loss_type` `"aot"` / `"aot_unpaired"` cannot
            carry weights.
    """

    augment_eval: bool = field(
        default=False, metadata={"help": "Augment evaluation datasets too (default: evaluate on the original pairs)."}
    )
    eval_goal_score: float | None = field(
        default=None,
        metadata={"help": "Condition un-augmented evaluation prompts on this goal (e.g. 10); None leaves them as is."},
    )

    keep_twins_together: bool = field(
        default=False,
        metadata={
            "help": "Keep each pair's two goal-conditioned twins in the same micro-batch (pairs still shuffled)."
        },
    )
    sample_weight_column: str = sample_weight_column_field("pair", optional=True)

    def __post_init__(self):
        super().__post_init__()
        check_weight_column_name(self.sample_weight_column)
        if self.keep_twins_together:
            if self.augment_mode != "both":
                raise ValueError(
                    f"keep_twins_together=True needs augment_mode='both' (got {self.augment_mode!r}): only then does "
                    "each pair have two twins to keep together."
                )
            if self.per_device_train_batch_size % 2:
                raise ValueError(
                    f"keep_twins_together=True needs an even per_device_train_batch_size (got "
                    f"{self.per_device_train_batch_size}): the two twins of a pair take two rows of the same "
                    "micro-batch. Use e.g. per_device_train_batch_size="
                    f"{max(2, self.per_device_train_batch_size - 1)} or {self.per_device_train_batch_size + 1}."
                )
        if not is_finite_positive(self.beta):
            raise ValueError(
                f"beta must be a finite number > 0 (the DPO KL coefficient; the paper uses 0.01), got {self.beta!r}: beta = 0 makes "
                "the loss constant (nothing is learned), a negative beta trains toward the rejected responses and an "
                "infinite beta makes the loss infinite."
            )
        # One validation for the config and `reward_augment_dataset` (same messages); keeps the normalised values
        # (`score_range` as a float pair, `attribute_columns` as a dict of column pairs).
        self.normalise_augment_fields()


# The relabeling fields' docs live once, in `RewardAugmentFields`; `help()` and the doc builder show them here too.
RewardAugmentedDPOConfig.__doc__ = (
    RewardAugmentedDPOConfig.__doc__.rstrip() + "\n" + RewardAugmentFields.__doc__.split("    Parameters:\n", 1)[1]
)
