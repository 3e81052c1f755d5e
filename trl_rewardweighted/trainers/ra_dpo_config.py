"""Configuration of the reward-augmented DPO trainer (arXiv 2410.08067)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

from ..data.relabel import AUGMENT_MODES, SYSTEM_ROLES, TIE_POLICIES, AugmentOptions

__all__ = ["RewardAugmentedDPOConfig"]


@dataclass
class RewardAugmentedDPOConfig(DPOConfig):
    r"""
    Configuration for [`RewardAugmentedDPOTrainer`]: every [`~trl.DPOConfig`] field plus the relabeling options below
    (the options of `reward_augment_dataset`, validated by one [`AugmentOptions`] object: the config and the function
    accept the same values and raise the same messages).

    Data: preference pairs with one numeric score per response (`prompt`, `chosen`, `rejected`, `score_chosen`,
    `score_rejected`, the columns of `HuggingFaceH4/ultrafeedback_binarized`), standard or conversational, explicit or
    implicit prompt. Without judge scores, relabel with implicit rewards first
    (`trl_rewardweighted.ira.implicit_reward_relabel`).

    Hyperparameters: the paper trains with β = 0.01, learning rate 5e-7, cosine schedule, warmup ratio 0.1, one epoch,
    effective batch 128, seed 42 (and `label_smoothing=0.3` for Qwen2-7B-It / Gemma-2-9B-It). This config keeps
    DPOConfig's defaults (β = 0.1, lr 1e-6), which are tuned for TRL's examples; the paper's values are in
    `recipes/reward_augmented_dpo/`. Note that `augment_mode="both"` doubles the number of rows, so an epoch has twice
    the steps; ratio-based warmup adapts, a fixed `max_steps` does not. `beta` must be > 0.

    Length: the goal text is part of the prompt, so it counts against `max_length` (the default goal text is about
    45-50 tokens with common BPE tokenizers). Rows whose prompt fills `max_length` are dropped by DPO; the trainer
    counts and reports them (`augment/dropped_too_long`).

    Parameters:
        augment_mode (`str`, *optional*, defaults to `"both"`):
            `"both"` (RA: one copy conditioned on each response's score, 2 rows per pair) or `"chosen_only"` (RA+:
            only the chosen response's goal; same size as the input).
        augment_fraction (`float`, *optional*, defaults to `1.0`):
            Half-RA: keep and augment only the first `floor(fraction × N)` training pairs (input order).
            `0.5` with `augment_mode="both"` gives a training set of the original size.
        ties (`str`, *optional*, defaults to `"drop"`):
            Pairs whose goal scores are equal (after rescaling and rounding) carry no preference under the paper's
            indicator reward: `"drop"` removes them, `"keep"` follows the released code (contradictory twin pairs).
        score_chosen_column (`str`, *optional*, defaults to `"score_chosen"`):
            Column with the chosen response's score.
        score_rejected_column (`str`, *optional*, defaults to `"score_rejected"`):
            Column with the rejected response's score.
        score_range (`str`, `tuple` or `None`, *optional*, defaults to `None`):
            `None`: scores are goals on the 1-10 scale as they are (they must lie in [1, 10], as UltraFeedback's).
            `(lo, hi)` or `"lo,hi"`: linear map `1 + 9 (s - lo) / (hi - lo)` (scores outside raise). `"auto"`: the
            same map with the training set's min/max (reward-model scores). With `attribute_columns`, a dict
            `{attribute: spec}` sets it per attribute.
        round_digits (`int` or `None`, *optional*, defaults to `2`):
            Decimals the goals are rounded to after rescaling (`None`: no rounding).
        goal_template (`str` or `None`, *optional*, defaults to `None`):
            `None` uses the released code's text ("You are an assistant that generates responses for the instruction
            while implicitly achieving the following target scores (on a scale of 1-10, where 1 is lowest and 10 is
            highest):\nOverall score: {score}."). A custom template is a `str.format` string with `{scores}` and/or
            `{score}`; use the same one at inference.
        system_role (`str`, *optional*, defaults to `"auto"`):
            Where the goal goes in conversational prompts: `"system"` (a system message, merged into an existing one),
            `"prefix"` (before the first user turn, then a blank line), or `"auto"` (system if the tokenizer's chat
            template renders a system role, prefix otherwise). String prompts always get the prefix.
        attribute_columns (`dict` or `None`, *optional*, defaults to `None`):
            Multi-attribute goals: `{name: [chosen column, rejected column]}` (a JSON string on the command line),
            one `"<name>: <value>."` line per attribute. Replaces the single overall score.
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
    """

    augment_mode: str = field(
        default="both",
        metadata={
            "help": "'both' (RA: both goals, 2N rows) or 'chosen_only' (RA+: the chosen goal only, N rows).",
            "choices": list(AUGMENT_MODES),
        },
    )
    augment_fraction: float = field(
        default=1.0,
        metadata={"help": "Half-RA: augment only the first floor(fraction*N) training pairs (0.5 keeps the size)."},
    )
    ties: str = field(
        default="drop",
        metadata={
            "help": "Pairs with equal goal scores: 'drop' (paper's indicator reward) or 'keep' (released code).",
            "choices": list(TIE_POLICIES),
        },
    )
    score_chosen_column: str = field(default="score_chosen", metadata={"help": "Score column of the chosen response."})
    score_rejected_column: str = field(
        default="score_rejected", metadata={"help": "Score column of the rejected response."}
    )
    score_range: str | None = field(
        default=None,
        metadata={
            "help": "None (scores already on 1-10), 'lo,hi' (linear map to 1-10) or 'auto' (training-set min/max)."
        },
    )
    round_digits: int | None = field(
        default=2, metadata={"help": "Decimals the goal scores are rounded to after rescaling (None: no rounding)."}
    )
    goal_template: str | None = field(
        default=None,
        metadata={"help": "Goal text template with {scores} and/or {score}; None = the released code's wording."},
    )
    system_role: str = field(
        default="auto",
        metadata={
            "help": "Goal placement for conversational prompts: 'auto', 'system' or 'prefix'.",
            "choices": list(SYSTEM_ROLES),
        },
    )
    attribute_columns: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": 'Multi-attribute goals as JSON: {"Helpfulness": ["help_chosen", "help_rejected"], ...}.'},
    )
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

    def __post_init__(self):
        super().__post_init__()
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
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, (int, float))
            or not self.beta > 0
            or not math.isfinite(self.beta)
        ):
            raise ValueError(
                f"beta must be a finite number > 0 (the DPO KL coefficient; the paper uses 0.01), got {self.beta!r}: beta = 0 makes "
                "the loss constant (nothing is learned), a negative beta trains toward the rejected responses and an "
                "infinite beta makes the loss infinite."
            )
        # One validation for the config and `reward_augment_dataset`: build the options object (same messages), then
        # keep its normalised values (`score_range` as a float pair, `attribute_columns` as a dict of column pairs).
        options = self.augment_options()
        self.score_range = options.score_range
        self.attribute_columns = options.attributes

    def augment_options(self) -> AugmentOptions:
        """The [`AugmentOptions`] these fields stand for (validated); the trainer passes them to
        `reward_augment_dataset`."""
        return AugmentOptions(
            mode=self.augment_mode,
            fraction=self.augment_fraction,
            ties=self.ties,
            score_columns=(self.score_chosen_column, self.score_rejected_column),
            score_range=self.score_range,
            round_digits=self.round_digits,
            goal_template=self.goal_template,
            system_role=self.system_role,
            attributes=self.attribute_columns,
        )
