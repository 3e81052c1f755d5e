"""Configuration of the VAR trainer (reward-weighted SFT, arXiv 2502.11026)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

__all__ = ["VARConfig"]


@dataclass
class VARConfig(SFTConfig):
    r"""
    Configuration for [`VARTrainer`]: every [`~trl.SFTConfig`] field plus the VAR parameters below.

    Data: prompt/completion rows (standard strings or conversational messages) with a float reward column. Optional
    `ref_logps` column (summed completion log-probs under the reference, computed on the same tokenisation) skips the
    reference pass.

    Parameters:
        beta (`float`, *optional*, defaults to `1.0`):
            KL coefficient of the RLHF objective (the paper's λ): the temperature of the weights
            `softmax(r / beta + log π_ref)`. It must match the scale of the rewards: the weights depend on
            `(r_i - r_j) / beta`, so rewards spanning tens of units with `beta=1` give one-hot weights.
        ref_weighting (`bool`, *optional*, defaults to `True`):
            Include `log π_ref(y|x)` in the weights (the paper, which treats its offline data as drawn from a uniform
            proposal). Use `False` when the completions were *sampled from the reference model itself* (e.g. by
            `trl-rw sample`): the sampling already carries π_ref, the weight is `softmax(r / beta)`, and no reference
            model is needed. With the wrong choice, summed reference log-probs that differ by tens of nats make the
            weights nearly one-hot on the response the reference likes most.
        z_scope (`str`, *optional*, defaults to `"step"`):
            Batch over which the softmax normaliser Z is estimated. `"step"`: every gradient-accumulation micro-batch
            on every process of one optimizer step, so the update does not depend on how the step is split across
            devices and accumulation steps. `"micro_batch"`: each per-device micro-batch separately (one reading of
            the paper's B=8 "mini-batch"); the loss is then averaged over micro-batches and processes.
        length_normalize (`bool`, *optional*, defaults to `False`):
            Use the mean token log-prob instead of the summed one, in both the weight (reference term) and the loss.
            The paper sums (the derivation is over sequences).
        reward_column (`str`, *optional*, defaults to `"reward"`):
            Name of the float reward column. Rows whose reward is NaN/inf/None are skipped (weight 0) and counted in
            the `rows_skipped` metric.
        precompute_ref_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Batch size of the one-off reference pass that fills the `ref_logps` column before training. `None` uses
            `per_device_eval_batch_size`.
    """

    _VALID_Z_SCOPES = ("step", "micro_batch")

    beta: float = field(
        default=1.0,
        metadata={
            "help": "KL coefficient λ: temperature of the weights softmax(r/beta + log pi_ref). Match the reward scale."
        },
    )
    ref_weighting: bool = field(
        default=True,
        metadata={
            "help": "Include log pi_ref(y|x) in the weights (paper). False for data sampled from the reference."
        },
    )
    z_scope: str = field(
        default="step",
        metadata={
            "help": "Softmax normaliser scope: 'step' (all micro-batches and processes of a step) or 'micro_batch'."
        },
    )
    length_normalize: bool = field(
        default=False,
        metadata={"help": "Use mean token log-probs (weight and loss) instead of summed ones (paper: summed)."},
    )
    reward_column: str = field(default="reward", metadata={"help": "Name of the float reward column."})
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the reference pre-pass; None uses per_device_eval_batch_size."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(
                f"VARConfig.beta must be > 0, got {self.beta!r}. It is the temperature of the weights "
                "softmax(r / beta + log pi_ref); set it to the scale of your rewards (e.g. their std)."
            )
        if self.z_scope not in self._VALID_Z_SCOPES:
            raise ValueError(f"VARConfig.z_scope must be one of {self._VALID_Z_SCOPES}, got {self.z_scope!r}.")
        if self.packing:
            raise ValueError(
                "VARConfig.packing=True is not supported: packing concatenates rows into one sequence and drops the "
                "reward column, so each completion's log-prob and weight can no longer be told apart. Set packing=False."
            )
        if self.padding_free:
            raise ValueError(
                "VARConfig.padding_free=True is not supported: VAR needs one summed log-prob per row. Set "
                "padding_free=False."
            )
