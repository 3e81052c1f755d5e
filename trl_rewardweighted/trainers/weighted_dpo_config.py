"""Configuration of the weighted DPO trainer (TRL's DPO with one sample weight per pair)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig

from ..data.weights import check_weight_column_name
from .common import sample_weight_column_field

__all__ = ["WeightedDPOConfig", "check_pairwise_loss_types"]

# DPO loss types whose per-pair losses mix the pairs of a batch (they sort the log-ratios across it), so a pair's
# weight cannot be attached to its own loss.
UNPAIRED_LOSS_TYPES = ("aot", "aot_unpaired")


def check_pairwise_loss_types(loss_type, trainer: str) -> None:
    """Refuse the DPO loss types that sort log-ratios across the batch (their losses are not one per pair)."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    mixed = [t for t in loss_types if t in UNPAIRED_LOSS_TYPES]
    if mixed:
        raise ValueError(
            f"`loss_type={loss_type!r}` is not supported with sample weights by {trainer}: {mixed} sort the "
            "log-ratios across the batch, so a pair's loss is not its own and cannot carry its weight. Use another "
            "loss type (e.g. 'sigmoid'), or no weight column."
        )


@dataclass
class WeightedDPOConfig(DPOConfig):
    r"""
    Configuration for [`WeightedDPOTrainer`]: every [`~trl.DPOConfig`] field plus the name of the weight column.

    The loss is TRL's DPO loss of each pair multiplied by the pair's weight, divided by the sum of the weights of all
    the pairs of the optimizer step (every gradient-accumulation micro-batch, every process):

    `loss = sum_i w_i l_i / sum_i w_i`

    With every weight 1 it is TRL's loss (the mean over the pairs; exactly TRL's when the micro-batches of a step hold
    the same number of pairs, as all but an epoch's last step do); a pair of weight 2 counts as that pair twice in
    the same step; multiplying every weight by a constant changes nothing. For a combination of loss types
    (`loss_type=[...]` with `loss_weights`) every per-pair term is weighted; the `sft` term, which TRL computes as one
    token mean over the micro-batch, is multiplied by the mean weight factor of the micro-batch. See
    `docs/weights.md`.

    Parameters:
        sample_weight_column (`str`, *optional*, defaults to `"sample_weight"`):
            Column with one weight per pair, a finite number >= 0 (0 leaves the pair out of the loss). Required in the
            training dataset; an evaluation dataset without it weighs every pair 1. Negative, NaN, infinite or missing
            weights, and a training column of zeros only, are refused naming the rows.

    Not supported (refused): `loss_type` `"aot"` / `"aot_unpaired"`, which sort the log-ratios across the batch.
    `use_weighting=True` (WPO) is supported: its weight multiplies the sample weight.
    """

    sample_weight_column: str = sample_weight_column_field("preference pair")

    def __post_init__(self):
        super().__post_init__()
        check_weight_column_name(self.sample_weight_column)
        check_pairwise_loss_types(self.loss_type, "WeightedDPOTrainer")
