"""Configuration of the VAR trainer (reward-weighted SFT, arXiv 2502.11026)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trl import SFTConfig

from .common import check_finite_positive

__all__ = ["VARConfig"]

VAR_Z_SCOPES = ("step", "micro_batch", "prompt")
DEFAULT_SAMPLE_WEIGHT_COLUMN = "sample_weight"


def _sft_default(name: str):
    """The default of an inherited [`~trl.SFTConfig`] field, read from the dataclass (never copied here)."""
    for f in dataclasses.fields(SFTConfig):
        if f.name == name:
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    raise KeyError(name)


# Inherited SFT options VAR does not honour, with the reason. A value other than SFTConfig's default is refused (the
# exceptions, values VAR does honour, are in `_ALLOWED_NON_DEFAULT`). Every other SFTConfig / TrainingArguments field is
# honoured as in SFTTrainer (see the class docstring for the ones that have no effect on VAR's loss).
_UNSUPPORTED_SFT_FIELDS = {
    "loss_type": "VAR's loss is the reward-weighted NLL -sum_i w_i log pi(y_i|x_i); SFT's alternative token losses "
    "('dft') are not applied",
    "completion_only_loss": "VAR weights log pi(completion | prompt): the loss and the reference log-probs must cover "
    "the completion tokens only",
    "packing_strategy": "VAR packs whole rows only ('bfd'): 'bfd_split' and 'wrapped' cut rows into pieces across "
    "packs, and a piece of a completion has no reward or weight of its own",
    "dataset_text_field": "VAR reads prompt/completion rows; the text field of language-modeling datasets is not used",
    "label_smoothing_factor": "VAR's loss is the reward-weighted NLL; label smoothing is not applied",
    "router_aux_loss_coef": "VAR does not add the Mixture-of-Experts router auxiliary loss",
}
# Non-default values of the fields above that VAR does honour.
_ALLOWED_NON_DEFAULT = {
    "completion_only_loss": (True,),
    "router_aux_loss_coef": (0.0,),
}


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
            on every process of one optimizer step (the paper's batch normaliser), so the update does not depend on
            how the step is split across devices and accumulation steps. `"micro_batch"`: each per-device micro-batch
            separately (one reading of the paper's B=8 "mini-batch"); the loss is then averaged over micro-batches and
            processes. `"prompt"`: one normaliser per prompt, over the rows that share it (see `group_column`), and
            the step's loss is the mean over its prompts of `-sum_i w_i log π(y_i|x)`; a sampler keeps each prompt's
            rows in one optimizer step, so the update does not depend on the layout either. For data with several
            scored replies per prompt (`trl-rw sample`). See `docs/var.md`.
        group_column (`str` or `None`, *optional*, defaults to `None`):
            With `z_scope="prompt"`: the column whose value names each row's prompt group (any hashable value, e.g.
            an integer id). `None` groups rows with identical prompts. Refused with another `z_scope`.
        sample_weight_column (`str` or `None`, *optional*, defaults to `"sample_weight"`):
            Column of prior weights `s_i >= 0` (e.g. importance weights of off-policy data): `log s_i` is added to the
            softmax logits, for every `z_scope`. The default name is used when a dataset has that column and ignored
            otherwise; any other name must exist in the train dataset. `None` ignores sample weights. Negative, NaN or
            infinite weights, or all-zero ones, are refused naming the rows; rows with weight 0 get weight 0.
        length_normalize (`bool`, *optional*, defaults to `False`):
            Use the mean token log-prob instead of the summed one, in both the weight (reference term) and the loss.
            The paper sums (the derivation is over sequences).
        reward_column (`str`, *optional*, defaults to `"reward"`):
            Name of the float reward column. Rows whose reward is NaN/inf/None are skipped (weight 0) and counted in
            the `rows_skipped` metric.
        precompute_ref_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Batch size of the one-off reference pass that fills the `ref_logps` column before training. `None` uses
            `per_device_eval_batch_size`.

    Inherited SFT options that VAR does not honour are refused when set to anything but their [`~trl.SFTConfig`]
    default: `loss_type` (VAR has its own loss), `completion_only_loss=False` (the weights and the loss are over the
    completion tokens), `packing_strategy` other than `"bfd"` (it would cut rows apart), `dataset_text_field` (VAR
    reads prompt/completion rows), `label_smoothing_factor`, and
    `router_aux_loss_coef` other than `0.0` (VAR does not add the MoE auxiliary loss). `assistant_only_loss`,
    `max_length`, `truncation_mode`, `use_liger_kernel` (layer kernels only, as in SFT), `activation_offloading`,
    `chat_template_path`, `eos_token`, `pad_token` and the data options work as in SFT.
    `average_tokens_across_devices` has no effect: the loss is a weighted sum over rows, not a token mean.

    `padding_free=True` runs every forward (training, evaluation and the reference pre-pass) on one row holding the
    micro-batch's sequences back to back, kept apart by `position_ids` (no compute on padding). Unlike SFT it works
    with `max_length` (rows are truncated when the dataset is prepared) and with any collator that returns padded
    rows: the rows are concatenated at the forward, so each row's summed log-prob and weight stay its own. It needs
    an attention implementation that honours packed `position_ids` (`sdpa`, `eager`, `flash_attention_2/3`).

    `packing=True` (strategy `"bfd"`, best-fit decreasing) packs whole rows into rows of at most `max_length` tokens
    after the reference pre-pass, keeping each row's reward and reference log-prob; `per_device_train_batch_size`
    then counts packs, and the weights are still normalised over the rows (segments) of the step. Packed batches run
    padding-free. `eval_packing` (default: as `packing`) does the same for evaluation. Packing needs a map-style
    dataset and `max_length`.
    """

    _VALID_Z_SCOPES = VAR_Z_SCOPES

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
            "help": "Softmax normaliser scope: 'step' (all micro-batches and processes of a step), 'micro_batch', "
            "or 'prompt' (one normaliser per prompt group, its rows kept in one step).",
            "choices": list(VAR_Z_SCOPES),
        },
    )
    group_column: str | None = field(
        default=None,
        metadata={
            "help": "z_scope='prompt': column naming each row's prompt group; None groups rows with identical prompts."
        },
    )
    sample_weight_column: str | None = field(
        default=DEFAULT_SAMPLE_WEIGHT_COLUMN,
        metadata={
            "help": "Column of prior weights s >= 0 (log s is added to the softmax logits); the default name is used "
            "only when present. None ignores sample weights."
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
        check_finite_positive(
            "VARConfig.beta",
            self.beta,
            "It is the temperature of the weights softmax(r / beta + log pi_ref); set it to the scale of your rewards "
            "(e.g. their std).",
        )
        if self.z_scope not in self._VALID_Z_SCOPES:
            raise ValueError(f"VARConfig.z_scope must be one of {self._VALID_Z_SCOPES}, got {self.z_scope!r}.")
        if self.group_column is not None and self.z_scope != "prompt":
            raise ValueError(
                f"VARConfig.group_column={self.group_column!r} is only used with z_scope='prompt' (z_scope is "
                f"{self.z_scope!r}). Set z_scope='prompt' to normalise per prompt group, or leave group_column unset."
            )
        if self.z_scope == "prompt":
            for name, bad, why in (
                ("packing", self.packing, "a pack mixes rows of different prompts"),
                ("eval_packing", self.eval_packing, "a pack mixes rows of different prompts"),
                (
                    "dataloader_drop_last",
                    self.dataloader_drop_last,
                    "dropping the last incomplete batch would drop part of a prompt group",
                ),
                (
                    "train_sampling_strategy",
                    getattr(self, "train_sampling_strategy", "random") != "random",
                    "VAR's prompt-group sampler decides the order (whole groups, shuffled per epoch)",
                ),
            ):
                if bad:
                    raise ValueError(
                        f"VARConfig.z_scope='prompt' does not support `{name}={getattr(self, name)!r}`: {why}. Leave "
                        f"`{name}` at its default, or use z_scope='step'."
                    )
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError(
                "VARConfig.packing / eval_packing need `max_length`: it is the size of the packs. Set `max_length`, "
                "or use `padding_free=True` without packing."
            )
        for name, why in _UNSUPPORTED_SFT_FIELDS.items():
            value, default = getattr(self, name), _sft_default(name)
            if value != default and value not in _ALLOWED_NON_DEFAULT.get(name, ()):
                raise ValueError(
                    f"VARConfig.{name}={value!r} is not supported: {why}. Leave `{name}` at its default ({default!r})."
                )
