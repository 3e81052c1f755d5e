"""Weighted SFT: TRL's `SFTTrainer` with one sample weight per row, normalised over the whole optimizer step.

Every token of a row carries the row's weight: the collator adds a `token_weights` tensor shaped like `input_ids`, the
fused LM head's per-token log-probs are multiplied by it, and TRL's own loss (`sum of -log-probs / number of loss
tokens of the step`) is kept. Before the step, the weights are rescaled by `tokens of the step / weighted tokens of the
step` (both summed over every micro-batch and process), so that the loss is the weighted token mean
`sum_i w_i sum_t l_it / sum_i w_i n_i` whatever the accumulation / process layout, and TRL's loss itself when every
weight is 1. See `docs/weights.md`.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from ..data.weights import check_weight_columns, example_weights
from ..losses import sample_weight_factors
from ..model_utils import KeepFloat32InputsMixin
from .common import SFTTrainerInitMixin
from .weighted_sft_config import WeightedSFTConfig

__all__ = ["DataCollatorWithTokenWeights", "WeightedSFTTrainer"]

TOKEN_WEIGHTS = "token_weights"


class DataCollatorWithTokenWeights:
    """Wraps SFT's language-modeling collator and adds `token_weights`: a float32 tensor shaped like `input_ids` in
    which every token of an example holds the example's sample weight (0 on padding).

    Works with padded batches (one row per example) and padding-free ones (the examples concatenated into one row, as
    TRL's collator does with `padding_free=True`). An example without the weight field weighs 1 (an evaluation
    dataset without the column); a weight that is not a finite number >= 0 is refused naming its row in the batch.

    Args:
        base_collator (`Callable`):
            The collator that builds `input_ids` / `labels` from tokenized examples (right padding).
        sample_weight_column (`str`, *optional*, defaults to `"sample_weight"`):
            Name of the weight field of each example.
    """

    def __init__(self, base_collator, sample_weight_column: str = "sample_weight"):
        self.base_collator = base_collator
        self.sample_weight_column = sample_weight_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        column = self.sample_weight_column
        weights = example_weights(examples, column)
        batch = self.base_collator([{k: v for k, v in ex.items() if k != column} for ex in examples])
        input_ids = batch["input_ids"]
        rows = [torch.full((len(ex["input_ids"]),), w, dtype=torch.float32) for ex, w in zip(examples, weights)]
        if input_ids.shape[0] == 1 and len(rows) > 1:  # padding-free: one row of the concatenated examples
            rows = [torch.cat(rows)]
        if input_ids.shape[0] != len(rows) or any(len(r) > input_ids.shape[1] for r in rows):
            raise ValueError(
                f"The data collator returned `input_ids` of shape {tuple(input_ids.shape)} for {len(examples)} "
                "examples: the sample weights need one right-padded row per example, or one row of the examples "
                "concatenated (padding-free)."
            )
        token_weights = torch.zeros(input_ids.shape, dtype=torch.float32)
        for r, row in enumerate(rows):
            token_weights[r, : len(row)] = row
        batch[TOKEN_WEIGHTS] = token_weights
        return batch


class _TokenWeightedForward:
    """Stands in for the model inside `SFTTrainer.compute_loss`: the fused LM head's per-token log-probs come back
    multiplied by the token weights (value and gradient); every other call and output is the model's own."""

    def __init__(self, model, token_weights: torch.Tensor):
        self.model = model
        self.token_weights = token_weights

    def __call__(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        log_probs = getattr(outputs, "log_probs", None)
        if kwargs.get("fused_lm_head") and log_probs is not None:
            weights = self.token_weights[:, 1:].to(device=log_probs.device, dtype=log_probs.dtype)  # label positions
            extra = log_probs.shape[1] - weights.shape[1]  # prompt-learning PEFT prepends virtual tokens
            if log_probs.shape[0] != weights.shape[0] or extra < 0:
                raise RuntimeError(
                    f"Per-token log-probs of shape {tuple(log_probs.shape)} do not match the token weights "
                    f"{tuple(weights.shape)}."
                )
            if extra:
                weights = torch.nn.functional.pad(weights, (extra, 0), value=1.0)
            outputs.log_probs = log_probs * weights
        return outputs


class WeightedSFTTrainer(SFTTrainerInitMixin, KeepFloat32InputsMixin, SFTTrainer):
    r"""
    [`~trl.SFTTrainer`] with a sample weight per row.

    The training dataset has, besides what SFT reads (`prompt`/`completion`, `messages`, `text`, ...), a column of
    weights (`sample_weight`, see [`WeightedSFTConfig`]). Each row's token losses are multiplied by its weight and the
    loss is divided by the weighted number of loss tokens of the whole optimizer step:

    `loss = sum_i w_i sum_t -log π(y_it | ...) / sum_i w_i n_i`

    over every row of every gradient-accumulation micro-batch on every process, so the update does not depend on how
    the step is split. With every weight 1 this is [`~trl.SFTTrainer`]'s loss, value and gradient; a row of weight 2
    counts as that row twice in the same step. Log-probs come from TRL's fused LM head (no logits are built); padded
    and padding-free batches are supported, packing is not.

    Everything else is [`~trl.SFTTrainer`] (PEFT, chat templates, completion-only loss, truncation, evaluation, ...).
    Evaluation datasets may leave the weight column out (every row then weighs 1); with it, the evaluation loss is the
    weighted token mean of each batch.

    Example:

    ```python
    from datasets import Dataset
    from trl_rewardweighted import WeightedSFTConfig, WeightedSFTTrainer

    dataset = Dataset.from_dict(
        {
            "prompt": ["The sky is", "The grass is"],
            "completion": [" blue.", " green."],
            "sample_weight": [2.0, 0.5],
        }
    )
    trainer = WeightedSFTTrainer(
        model="Qwen/Qwen2.5-0.5B", args=WeightedSFTConfig("weighted-sft"), train_dataset=dataset
    )
    trainer.train()
    ```

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
        optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics, quantization_config, peft_config,
        formatting_func:
            As for [`~trl.SFTTrainer`]; `args` must be a [`WeightedSFTConfig`] (default: one named after the model).
            A `data_collator` is wrapped so that it also returns the token weights.
        compute_loss_func (`None`):
            Not supported (an error): it would replace the weighted loss.
    """

    # The token weights reach `compute_loss` as float32 (not bf16 under DeepSpeed).
    _float32_input_keys = (TOKEN_WEIGHTS,)

    # The loss is normalised over the whole optimizer step (`get_batch_samples`): no division by the accumulation steps.
    loss_is_scaled_for_ga = True

    _tag_names = ["trl", "sft", "sample-weights", "trl-rewardweighted"]
    _name = "Weighted SFT"

    _config_class = WeightedSFTConfig
    _default_output_suffix = "WeightedSFT"
    _config_fix = (
        "Build one with WeightedSFTConfig(**your_args.to_dict()), plus `sample_weight_column` if your column is not "
        "`sample_weight`."
    )
    _refused_arguments = {
        "compute_loss_func": "`compute_loss_func` is not supported by WeightedSFTTrainer: it would replace the "
        "weighted loss. Weight the rows with the `sample_weight` column instead, or use SFTTrainer with your loss."
    }

    def _check_arguments(self, arguments):
        args = arguments["args"]
        check_weight_columns(
            arguments["train_dataset"], arguments["eval_dataset"], args.sample_weight_column, train_required=True
        )

    def _after_base_init(self, args):
        if self._is_vision_dataset:
            raise ValueError(
                "WeightedSFTTrainer does not support vision datasets (`image`/`images` columns): their examples are "
                "tokenized in the collator, after the weights are laid out per token."
            )
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError(
                "WeightedSFTTrainer does not support sequence parallelism: the sharded loss would drop the weights."
            )
        if not isinstance(self.data_collator, DataCollatorWithTokenWeights):
            self.data_collator = DataCollatorWithTokenWeights(self.data_collator, args.sample_weight_column)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            if self.args.sample_weight_column not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, self.args.sample_weight_column]

    @staticmethod
    def _token_counts(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss tokens of a collated batch (as TRL counts them: labels after the shift) and their summed weights."""
        counted = batch["labels"][..., 1:] != -100
        weights = batch[TOKEN_WEIGHTS][..., 1:].to(torch.float64)
        return counted.sum(), (weights * counted).sum()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and rescale their token weights over the whole step.

        Returns the step's number of loss tokens (over every process) as `num_items_in_batch`, TRL's normaliser,
        after multiplying every token weight by `tokens / weighted tokens` of the step: SFT's loss then equals the
        step's weighted token mean on any layout.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        counts = [self._token_counts(batch) for batch in batch_samples]
        step = torch.tensor(
            [float(sum(c for c, _ in counts)), float(sum(w for _, w in counts))], dtype=torch.float64, device=device
        )
        if self.accelerator.num_processes > 1:
            step = self.accelerator.gather(step.reshape(1, 2)).sum(dim=0)
        count, total = step[0], step[1]
        for batch in batch_samples:
            batch[TOKEN_WEIGHTS] = sample_weight_factors(batch[TOKEN_WEIGHTS], count, total)
        return batch_samples, count.to(torch.long)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        token_weights = inputs.pop(TOKEN_WEIGHTS)
        if num_items_in_batch is None:
            # Evaluation (or a call outside the training loop): the weighted token mean of this micro-batch. SFT then
            # divides by the micro-batch's own token count.
            count, total = self._token_counts({"labels": inputs["labels"], TOKEN_WEIGHTS: token_weights})
            token_weights = sample_weight_factors(token_weights, count, total)
        loss = super().compute_loss(
            _TokenWeightedForward(model, token_weights), inputs, return_outputs, num_items_in_batch
        )
        if num_items_in_batch is None and self.model.training:
            # Not called through `get_batch_samples` (e.g. a custom loop): a mean per micro-batch, scaled for GA here
            # since the Trainer does not (`loss_is_scaled_for_ga`).
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = (loss[0] / steps, loss[1]) if return_outputs else loss / steps
        return loss
