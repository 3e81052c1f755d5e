"""Weighted DPO: TRL's `DPOTrainer` with one sample weight per pair, normalised over the whole optimizer step.

TRL's DPO loss is the mean over a micro-batch of per-pair losses, which `Trainer` divides by the number of
accumulation steps and DDP averages over processes. Each pair's loss is multiplied by a factor
`w_i * (accumulation steps * micro-batch pairs * processes) / (sum of the weights of the step)`, so that the step's
update is that of the weighted mean `sum_i w_i l_i / sum_i w_i` over every pair of the step, whatever the layout; with
every weight 1 (and equal micro-batches) every factor is exactly 1.

The factor reaches TRL's own loss code through its per-pair multiplier: with `use_weighting`, `DPOTrainer` multiplies
each pair's loss by `exp(mean_t a_t(chosen)) * exp(mean_t a_t(rejected))`, `a_t = log_probs_t - log_sum_sq_probs_t`
over the completion tokens (WPO). The policy's outputs are given a `log_sum_sq_probs` that shifts `a_t` by
`log(factor) / 2` on both responses (on top of the real WPO term when `use_weighting=True`), so every loss type and
metric stays TRL's. See `docs/weights.md`.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from ..data.weights import check_weight_columns, example_weights
from ..losses import sample_weight_factors
from ..model_utils import KeepFloat32InputsMixin
from .common import DPOTrainerInitMixin
from .weighted_dpo_config import WeightedDPOConfig

__all__ = ["DataCollatorWithSampleWeights", "SampleWeightedDPOMixin", "WeightedDPOTrainer"]

SAMPLE_WEIGHTS = "sample_weights"
# The weights turned into per-pair loss factors over the optimizer step (`SampleWeightedDPOMixin.get_batch_samples`).
WEIGHT_FACTORS = "sample_weight_factors"
# log(factor) of a weight-0 pair: exp of it is 0 in float32, without an infinity in the arithmetic.
_LOG_ZERO = -1e4


class DataCollatorWithSampleWeights:
    """Wraps a collator and adds `sample_weights`, a float32 tensor with the weight of each example (first dimension
    of the batch = examples, as for TRL's preference collator).

    An example without the weight field weighs 1 (an evaluation dataset without the column); a weight that is not a
    finite number >= 0 is refused naming its row in the batch.

    Args:
        base_collator (`Callable`):
            The collator that builds the batch from the examples.
        sample_weight_column (`str`, *optional*, defaults to `"sample_weight"`):
            Name of the weight field of each example.
    """

    def __init__(self, base_collator, sample_weight_column: str = "sample_weight"):
        self.base_collator = base_collator
        self.sample_weight_column = sample_weight_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        column = self.sample_weight_column
        weights = example_weights(examples, column)
        batch = self.base_collator(examples)
        batch[SAMPLE_WEIGHTS] = torch.tensor(weights, dtype=torch.float32)
        return batch


class _PairWeightedForward:
    """Stands in for the policy inside `DPOTrainer._compute_loss`: its fused-LM-head outputs get a `log_sum_sq_probs`
    that makes TRL's WPO multiplier equal to each pair's factor (times the real WPO weight when `wpo`)."""

    def __init__(self, model, factors: torch.Tensor, completion_mask: torch.Tensor, wpo: bool):
        self.model = model
        self.factors = factors
        self.completion_mask = completion_mask
        self.wpo = wpo
        self.log_probs = None

    def __call__(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        log_probs = getattr(outputs, "log_probs", None)
        if not kwargs.get("fused_lm_head") or log_probs is None:
            return outputs
        self.log_probs = log_probs
        # float64, so that TRL's `log_probs - log_sum_sq_probs` (promoted to float64) gives back each shift to ~1e-16
        # instead of to the float32 rounding of the log-probs.
        base = (outputs.log_sum_sq_probs if self.wpo else log_probs).detach().double()
        # Half of log(factor) on each response of a pair: exp(mean over its completion tokens) = sqrt(factor).
        half = 0.5 * torch.log(self.factors.to(device=base.device, dtype=torch.float64)).clamp(min=_LOG_ZERO)
        half = torch.cat([half, half])  # the batch is [chosen..., rejected...]
        mask = self.completion_mask[:, 1:].to(base.device).bool()
        tail = base[:, -mask.shape[1] :]
        shifted = torch.where(mask, tail - half[:, None], tail)
        outputs.log_sum_sq_probs = torch.cat([base[:, : base.shape[1] - mask.shape[1]], shifted], dim=1)
        return outputs

    def weighted_chosen_nll(self) -> torch.Tensor:
        """DPO's `sft` term, `-mean log π` over the chosen completion tokens of the micro-batch, with each pair's tokens
        multiplied by its factor (TRL computes it as one mean, which its per-pair multiplier cannot weight)."""
        mask = self.completion_mask[:, 1:].to(self.log_probs.device)
        chosen_mask = mask.chunk(2, dim=0)[0].to(self.log_probs.dtype)
        chosen_logps = self.log_probs[:, -mask.shape[1] :].chunk(2, dim=0)[0]
        factors = self.factors.to(device=chosen_logps.device, dtype=chosen_logps.dtype)
        return -(chosen_logps * chosen_mask * factors[:, None]).sum() / chosen_mask.sum().clamp(min=1)


class SampleWeightedDPOMixin(KeepFloat32InputsMixin):
    """`DPOTrainer` mixin: one sample weight per pair, the loss normalised over the whole optimizer step.

    The trainer sets `_sample_weight_column` (the dataset column) and `_sample_weights_on` (False: the trainer is
    unchanged) before `DPOTrainer.__init__` (`_init_sample_weights`), and wraps its collator with
    [`DataCollatorWithSampleWeights`] after. Per-pair losses are multiplied by [`~losses.sample_weight_factors`] of
    the weights: over the whole step in training (`get_batch_samples`), over the micro-batch in evaluation.
    """

    _float32_input_keys = (SAMPLE_WEIGHTS, WEIGHT_FACTORS)
    _sample_weight_column: str = "sample_weight"
    _sample_weights_on: bool = False

    def _init_sample_weights(self, arguments: dict, required: bool) -> None:
        """Check the weight column of the datasets among the trainer's `arguments` and turn the weights on when the
        training dataset has it (it must when `required`)."""
        column = arguments["args"].sample_weight_column
        self._sample_weight_column = column
        self._sample_weights_on = check_weight_columns(
            arguments["train_dataset"], arguments["eval_dataset"], column, train_required=required
        )

    def _wrap_collator_with_weights(self) -> None:
        if self._sample_weights_on and not isinstance(self.data_collator, DataCollatorWithSampleWeights):
            self.data_collator = DataCollatorWithSampleWeights(self.data_collator, self._sample_weight_column)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            column = self._sample_weight_column
            if self._sample_weights_on and column not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, column]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and turn their weights into per-pair loss factors over the
        whole step (every micro-batch, every process)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples or SAMPLE_WEIGHTS not in batch_samples[0]:
            return batch_samples, num_items_in_batch
        total = torch.tensor(float(sum(b[SAMPLE_WEIGHTS].double().sum() for b in batch_samples)), device=device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        # TRL averages each micro-batch, the Trainer divides by the accumulation steps, DDP averages the processes.
        scale = len(batch_samples) * self.accelerator.num_processes
        for batch in batch_samples:
            weights = batch.pop(SAMPLE_WEIGHTS)
            batch[WEIGHT_FACTORS] = sample_weight_factors(weights, scale * weights.numel(), total)
        return batch_samples, num_items_in_batch

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k not in (SAMPLE_WEIGHTS, WEIGHT_FACTORS)}
        return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        factors = inputs.pop(WEIGHT_FACTORS, None)
        weights = inputs.pop(SAMPLE_WEIGHTS, None)
        if factors is None and weights is not None:
            # Evaluation (or a call outside the training loop): the weighted mean over this micro-batch.
            factors = sample_weight_factors(weights, weights.numel(), weights.double().sum())
        if factors is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        forward = _PairWeightedForward(model, factors, inputs["completion_mask"], wpo=self.use_weighting)
        saved = self.use_weighting, self.loss_types, self.loss_weights
        # TRL's per-pair multiplier carries the factors (see the module docstring). Its `sft` term is one mean over the
        # micro-batch (which the multiplier cannot weight, and which TRL cannot multiply in place): it is left out of
        # TRL's loss and added here, weighted per pair.
        sft_weight = sum(w for t, w in zip(self.loss_types, self.loss_weights, strict=True) if t == "sft")
        self.use_weighting = True
        self.loss_types = [t for t in saved[1] if t != "sft"]
        self.loss_weights = [w for t, w in zip(saved[1], saved[2], strict=True) if t != "sft"]
        try:
            result = super().compute_loss(forward, inputs, return_outputs, num_items_in_batch)
        finally:
            self.use_weighting, self.loss_types, self.loss_weights = saved
        if not sft_weight:
            return result
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + sft_weight * forward.weighted_chosen_nll()
        return (loss, outputs) if return_outputs else loss


class WeightedDPOTrainer(DPOTrainerInitMixin, SampleWeightedDPOMixin, DPOTrainer):
    r"""
    [`~trl.DPOTrainer`] with a sample weight per preference pair.

    The training dataset has, besides DPO's columns (`prompt`, `chosen`, `rejected`, standard or conversational,
    explicit or implicit prompt), a column of weights (`sample_weight`, see [`WeightedDPOConfig`]). Each pair's DPO
    loss is multiplied by its weight and the loss is divided by the sum of the weights of the whole optimizer step:

    `loss = sum_i w_i l_i / sum_i w_i`

    over every pair of every gradient-accumulation micro-batch on every process, so the update does not depend on how
    the step is split. With every weight 1 this is [`~trl.DPOTrainer`]'s loss, value and gradient (when the
    micro-batches of the step hold equally many pairs); a pair of weight 2 counts as that pair twice in the same
    step. Every DPO loss type except `aot` / `aot_unpaired` is supported, as are loss combinations, `f_divergence_type`,
    `ld_alpha` and `use_weighting`; the reference model, PEFT, precomputed reference log-probs and the metrics are
    DPO's.

    Evaluation datasets may leave the weight column out (every pair then weighs 1); with it, the evaluation loss is
    the weighted mean of each batch.

    Example:

    ```python
    from datasets import Dataset
    from trl_rewardweighted import WeightedDPOConfig, WeightedDPOTrainer

    dataset = Dataset.from_dict(
        {
            "prompt": ["The sky is", "Two plus two is"],
            "chosen": [" blue.", " four."],
            "rejected": [" green.", " five."],
            "sample_weight": [1.0, 3.0],
        }
    )
    trainer = WeightedDPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct", args=WeightedDPOConfig("weighted-dpo"), train_dataset=dataset
    )
    trainer.train()
    ```

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
        callbacks, optimizers, quantization_config, peft_config:
            As for [`~trl.DPOTrainer`]; `args` must be a [`WeightedDPOConfig`] (default: one named after the model).
            A `data_collator` is wrapped so that it also returns the weights.
    """

    _tag_names = ["trl", "dpo", "sample-weights", "trl-rewardweighted"]
    _name = "Weighted DPO"

    _config_class = WeightedDPOConfig
    _default_output_suffix = "WeightedDPO"
    _config_fix = (
        "Build one with WeightedDPOConfig(**your_args.to_dict()), plus `sample_weight_column` if your column is not "
        "`sample_weight`."
    )

    def _check_arguments(self, arguments):
        self._init_sample_weights(arguments, required=True)

    def _after_base_init(self, args):
        if self._is_vision_dataset:
            raise ValueError(
                "WeightedDPOTrainer does not support vision datasets (`image`/`images` columns): only text pairs."
            )
        self._wrap_collator_with_weights()
