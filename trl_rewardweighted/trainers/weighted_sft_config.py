"""Configuration of the weighted SFT trainer (TRL's SFT with one sample weight per row)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig

from ..data.weights import check_weight_column_name
from .common import sample_weight_column_field

__all__ = ["WeightedSFTConfig"]


@dataclass
class WeightedSFTConfig(SFTConfig):
    r"""
    Configuration for [`WeightedSFTTrainer`]: every [`~trl.SFTConfig`] field plus the name of the weight column.

    The loss is TRL's token-level negative log-likelihood with every token of a row multiplied by the row's weight,
    divided by the sum of the weights of all the loss tokens of the optimizer step (every gradient-accumulation
    micro-batch, every process):

    `loss = sum_i w_i sum_t -log π(y_it | ...) / sum_i w_i n_i`,  `n_i` the number of loss tokens of row `i`.

    With every weight 1 it is TRL's SFT loss exactly (TRL divides by the step's token count); a row of weight 2 counts
    as that row twice in the same step; multiplying every weight by a constant changes nothing. See
    `docs/weights.md`.

    Parameters:
        sample_weight_column (`str`, *optional*, defaults to `"sample_weight"`):
            Column with one weight per row, a finite number >= 0 (0 leaves the row out of the loss). Required in the
            training dataset; an evaluation dataset without it weighs every row 1. Negative, NaN, infinite or missing
            weights, and a training column of zeros only, are refused naming the rows.

    Not supported (refused when set): `loss_type="dft"` (its per-token factor is the token's probability, which a
    weight would change), `label_smoothing_factor > 0` (it needs the full logits), `packing=True` (packing keeps only
    the token columns, losing the weights; `padding_free=True` is supported) and `average_tokens_across_devices=False`
    (the weighted loss is always normalised over every process, so it does not depend on their number).
    """

    sample_weight_column: str = sample_weight_column_field("row")

    def __post_init__(self):
        super().__post_init__()
        check_weight_column_name(self.sample_weight_column)
        refused = {
            "loss_type": (
                self.loss_type != "nll",
                "the DFT loss multiplies each token's loss by its probability; only `loss_type='nll'` is weighted",
            ),
            "label_smoothing_factor": (
                self.label_smoothing_factor != 0,
                "label smoothing needs the full (batch, length, vocabulary) logits, which the fused LM head that "
                "weights the rows never builds",
            ),
            "packing": (
                bool(self.packing),
                "packing keeps only the token columns and would lose the weights; use `padding_free=True` (the same "
                "speed-up without padding, rows kept apart)",
            ),
            "average_tokens_across_devices": (
                not self.average_tokens_across_devices,
                "the weighted loss is always normalised over the weights of every process, so that it does not depend "
                "on the number of processes",
            ),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` is not supported by WeightedSFTTrainer: {why}. Leave it at its "
                    "default."
                )
