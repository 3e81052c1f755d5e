"""VAR: reward-weighted SFT from the variational view of RLHF (arXiv 2502.11026).

The loss is ``-sum_i w_i log pi_theta(y_i|x_i)`` with ``w = softmax(r / beta + log pi_ref(y|x))`` over the batch
(``ref_weighting=False``: ``softmax(r / beta)``). See ``docs/var.md`` and the shared spec ALGORITHMS.md sections 1 and 6.
"""

from __future__ import annotations

import contextlib
import textwrap
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel
from trl import SFTTrainer
from trl.models.utils import prepare_deepspeed

from ..data.utils import check_float_column, to_float
from ..losses import var_log_weights, weighted_nll
from ..model_utils import (
    KeepFloat32InputsMixin,
    adapters_disabled,
    compute_rowwise_distributed,
    ensure_fused_lm_head,
    sequence_logps,
)
from .var_config import VARConfig

__all__ = ["VARTrainer", "DataCollatorForVAR"]

REF_LOGPS_COLUMN = "ref_logps"


class DataCollatorForVAR:
    """Wraps a language-modeling collator and adds the float32 `rewards` (and `ref_logps`) tensors of the batch.

    A missing/None reward becomes NaN (the trainer skips and counts such rows).
    """

    def __init__(self, base_collator, reward_column: str = "reward"):
        self.base_collator = base_collator
        self.reward_column = reward_column

    @staticmethod
    def _floats(values) -> torch.Tensor:
        return torch.tensor([to_float(v, f"Batch row {i}") for i, v in enumerate(values)], dtype=torch.float32)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base_collator(examples)
        if self.reward_column not in examples[0]:
            raise ValueError(
                f"A training example has no `{self.reward_column}` field (keys: {sorted(examples[0])}). Add a float "
                f"reward column or set `reward_column` in VARConfig."
            )
        batch["rewards"] = self._floats([ex[self.reward_column] for ex in examples])
        if REF_LOGPS_COLUMN in examples[0]:
            batch[REF_LOGPS_COLUMN] = self._floats([ex[REF_LOGPS_COLUMN] for ex in examples])
        return batch


_FLOAT_KEYS = ("rewards", REF_LOGPS_COLUMN, "var_weights")


class VARTrainer(KeepFloat32InputsMixin, SFTTrainer):
    """Trainer for VAR, reward-weighted SFT with batch-normalised exponential reward weights (arXiv 2502.11026).

    Takes everything [`~trl.SFTTrainer`] takes plus `ref_model`. The reference log-probs that enter the weights come
    from, in order: a `ref_logps` column in the dataset; the given `ref_model`; the base model with adapters disabled
    (PEFT); the initial policy. They are computed once, before training, sharded over processes. Not needed with
    `ref_weighting=False`.

    Example:

    ```python
    from datasets import Dataset
    from trl_rewardweighted import VARConfig, VARTrainer

    dataset = Dataset.from_dict({
        "prompt": ["The sky is", "The sky is"],
        "completion": [" blue and lovely.", " grey and sad."],
        "reward": [0.8, -0.4],
    })
    trainer = VARTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        args=VARConfig(output_dir="var-out", beta=0.5, ref_weighting=False),
        train_dataset=dataset,
    )
    trainer.train()
    ```
    """

    # Rewards, reference log-probs and weights stay float32 under DeepSpeed's bf16 input cast.
    _float32_input_keys = _FLOAT_KEYS

    _tag_names = ["trl", "sft", "var", "reward-weighted", "trl-rewardweighted"]
    _name = "VAR"
    _paper = {
        "title": "Simplify RLHF as Reward-Weighted SFT: A Variational Method",
        "id": "2502.11026",
        "citation": textwrap.dedent(
            """\
            @article{du2025simplify,
                title        = {{Simplify RLHF as Reward-Weighted SFT: A Variational Method}},
                author       = {Yuhao Du and Zhuo Li and Pengyu Cheng and Zhihong Chen and Yuejiao Xie and Xiang Wan and Anningzhe Gao},
                year         = 2025,
                eprint       = {arXiv:2502.11026}
            }"""
        ),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: VARConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        peft_config=None,
        formatting_func=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = VARConfig(f"{str(name).split('/')[-1] or 'model'}-VAR")
        elif not isinstance(args, VARConfig):
            raise TypeError(
                f"`args` must be a VARConfig, got {type(args).__name__}. Build one with VARConfig(**your_args.to_dict())."
            )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        fix = f"VAR needs a float reward per row: add a `{args.reward_column}` column or set `reward_column` in VARConfig."
        check_float_column(train_dataset, args.reward_column, fix)
        for name, ds in self._as_dict(eval_dataset).items():
            check_float_column(ds, args.reward_column, f"(eval dataset {name!r}) {fix}")
        if isinstance(ref_model, str):
            from trl.trainer.utils import create_model_from_path

            ref_model = create_model_from_path(ref_model, **dict(args.model_init_kwargs or {}))
        # Only used by the reference pre-pass in __init__, then released.
        self._var_ref_model = ref_model
        self._var_external_ref = ref_model is not None
        self._var_rows_skipped = 0

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        # Carry rewards (and reference log-probs) through the collator as float32 tensors.
        if not isinstance(self.data_collator, DataCollatorForVAR):
            self.data_collator = DataCollatorForVAR(self.data_collator, args.reward_column)

        self._precompute_engine = None
        if args.ref_weighting:
            self.train_dataset = self._maybe_add_ref_logps(self.train_dataset, "train")
            if self.eval_dataset is not None:
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {
                        k: self._maybe_add_ref_logps(v, f"eval[{k}]") for k, v in self.eval_dataset.items()
                    }
                else:
                    self.eval_dataset = self._maybe_add_ref_logps(self.eval_dataset, "eval")
        self._release_reference()

    # ------------------------------------------------------------------------------------------------------------------
    # Trainer plumbing
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def loss_is_scaled_for_ga(self) -> bool:
        # "step": the weights are normalised over the whole optimizer step, so micro-batch losses add up to the step's
        # loss (no division by the number of accumulation steps). "micro_batch": each micro-batch is a mean; the Trainer
        # averages them over accumulation steps.
        return self.args.z_scope == "step"

    @staticmethod
    def _as_dict(eval_dataset) -> dict:
        if eval_dataset is None or isinstance(eval_dataset, str):
            return {}
        return dict(eval_dataset) if isinstance(eval_dataset, dict) else {"eval": eval_dataset}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "seq_lengths", self.args.reward_column, REF_LOGPS_COLUMN]

    # ------------------------------------------------------------------------------------------------------------------
    # Reference log-probs (computed once, before training)
    # ------------------------------------------------------------------------------------------------------------------

    def _maybe_add_ref_logps(self, dataset, name: str):
        if dataset is None:
            return None
        columns = dataset.column_names or []
        if REF_LOGPS_COLUMN in columns:
            check_float_column(
                dataset, REF_LOGPS_COLUMN, "The `ref_logps` column must hold summed completion log-probs (floats)."
            )
            return dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"The {name} dataset is an IterableDataset without a `{REF_LOGPS_COLUMN}` column: reference log-probs "
                "cannot be precomputed for it. Add the column, use a map-style Dataset, or set ref_weighting=False."
            )
        values = self._compute_ref_logps(dataset, name)
        return dataset.add_column(REF_LOGPS_COLUMN, values.tolist())

    def _reference_forward_model(self):
        """The module to run reference forwards with, and whether PEFT adapters must be disabled around it."""
        if self._var_ref_model is not None:
            ref = self._var_ref_model
            ensure_fused_lm_head(ref)
            if self.is_deepspeed_enabled:
                return prepare_deepspeed(ref, self.accelerator), False
            ref.eval()
            return ref.to(self.accelerator.device), False
        if self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine, is_peft_model(self.model)
        return self.model, is_peft_model(self.model)

    @torch.no_grad()
    def _compute_ref_logps(self, dataset: Dataset, name: str) -> torch.Tensor:
        ref, disable_adapters = self._reference_forward_model()
        collate = self.data_collator.base_collator  # __init__ wraps the collator before the pre-pass
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        was_training = self.model.training
        self.model.eval()

        columns = dataset.select_columns(["input_ids", "labels"])

        def compute(indices):
            batch = collate([columns[int(i)] for i in indices])
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with adapters_disabled(self.model) if disable_adapters else contextlib.nullcontext():
                logps, _ = sequence_logps(ref, batch["input_ids"], batch.get("attention_mask"), batch["labels"])
            return logps

        try:
            values = compute_rowwise_distributed(
                self.accelerator, len(dataset), batch_size, compute, desc=f"Reference log-probs ({name})"
            )
        finally:
            self.model.train(was_training)
        return values

    def _release_reference(self):
        # The reference is only needed for the pre-pass: free it. A DeepSpeed inference engine built around the policy
        # must be destroyed: its ZeRO-3 hooks stay on the shared modules and would break the training engine's forward.
        if self._precompute_engine is not None and hasattr(self._precompute_engine, "destroy"):
            self._precompute_engine.destroy()
        self._var_ref_model = None
        self._precompute_engine = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # Datasets passed here are prepared like at init: tokenised by SFT, then given reference log-probs.
        if eval_dataset is not None and not isinstance(eval_dataset, str) and not self._skip_prepare_dataset:
            datasets = self._as_dict(eval_dataset)
            fix = f"Evaluation needs the `{self.args.reward_column}` column too."
            prepared = {}
            for key, ds in datasets.items():
                check_float_column(ds, self.args.reward_column, fix)
                ds = self._prepare_dataset(ds, self.processing_class, self.args, False, self._formatting_func, key)
                if self.args.ref_weighting and REF_LOGPS_COLUMN not in (ds.column_names or []):
                    if self._var_external_ref or (self.state.global_step > 0 and not is_peft_model(self.model)):
                        raise ValueError(
                            f"Evaluation dataset {key!r} has no `ref_logps` column, and the reference is no longer "
                            "available (a `ref_model` is released after the init pre-pass; after training started the "
                            "policy is no longer the reference). Pass evaluation datasets at init (their reference "
                            "log-probs are computed then), or add a `ref_logps` column."
                        )
                    ds = self._maybe_add_ref_logps(ds, key)
                prepared[key] = ds
            eval_dataset = prepared if isinstance(eval_dataset, dict) else prepared["eval"]
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Weights and loss
    # ------------------------------------------------------------------------------------------------------------------

    def _row_log_weights(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised log-weights of a collated micro-batch, and its rows' validity before the reward check."""
        labels = batch["labels"]
        num_tokens = (labels[:, 1:] != -100).sum(dim=-1)
        has_tokens = num_tokens > 0
        ref = None
        if self.args.ref_weighting:
            if REF_LOGPS_COLUMN not in batch:
                raise RuntimeError("ref_weighting=True but the batch carries no `ref_logps` (internal error).")
            ref = batch[REF_LOGPS_COLUMN].float()
            if self.args.length_normalize:
                ref = ref / num_tokens.clamp(min=1).to(ref.device, torch.float32)
        log_e = var_log_weights(batch["rewards"].float(), self.args.beta, ref, mask=has_tokens)
        return log_e, batch["rewards"].float()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self._assign_step_weights(batch_samples)
        return batch_samples, num_items_in_batch

    def _assign_step_weights(self, batch_samples: list[dict]) -> None:
        """Compute the VAR weights of one optimizer step and attach them to each micro-batch as `var_weights`."""
        acc = self.accelerator
        per_batch = [self._row_log_weights(b) for b in batch_samples]
        sizes = [lw.numel() for lw, _ in per_batch]
        if self.args.z_scope == "step":
            local_lw = torch.cat([lw for lw, _ in per_batch]).to(acc.device)
            local_r = torch.cat([r for _, r in per_batch]).to(acc.device)
            all_lw, all_r, offset = self._gather_padded(local_lw, local_r)
            groups = [(all_lw, all_r)]
        else:
            groups = [(lw.to(acc.device), r.to(acc.device)) for lw, r in per_batch]
        # Decide on validity with the same information on every process, so all raise together (no hang).
        num_valid = torch.stack([torch.isfinite(lw).sum() for lw, _ in groups])
        num_rows = torch.tensor([lw.numel() for lw, _ in groups], device=acc.device)
        if self.args.z_scope == "micro_batch" and acc.num_processes > 1:
            num_valid = acc.gather(num_valid)
            num_rows = acc.gather(num_rows)
        if (num_valid == 0).any():
            raise ValueError(
                f"A VAR normalisation batch (z_scope={self.args.z_scope!r}) has no valid row: every reward in it is "
                f"NaN/inf/None, every reference log-prob is non-finite, or every completion is empty. Drop such rows "
                f"from the dataset (column `{self.args.reward_column}`), or use a larger batch / z_scope='step'."
            )
        ess, max_w, mean_r = [], [], []
        if self.args.z_scope == "step":
            w = torch.softmax(all_lw, dim=0)
            local_w = w[offset : offset + local_lw.numel()]
            start = 0
            for batch, n in zip(batch_samples, sizes):
                batch["var_weights"] = local_w[start : start + n].detach()
                start += n
            self._add_weight_stats(w, all_lw, all_r, ess, max_w, mean_r)
        else:
            for batch, (lw, r) in zip(batch_samples, groups):
                w = torch.softmax(lw, dim=0)
                batch["var_weights"] = w.detach()
                self._add_weight_stats(w, lw, r, ess, max_w, mean_r)
        skipped = int((num_rows - num_valid).sum().item())
        self._var_rows_skipped += skipped
        m = self._metrics["train"]
        if self.args.z_scope == "micro_batch" and acc.num_processes > 1:
            stats = acc.gather(torch.tensor([ess, max_w, mean_r], device=acc.device).T.reshape(-1, 3))
            ess, max_w, mean_r = stats[:, 0].tolist(), stats[:, 1].tolist(), stats[:, 2].tolist()
        m["var/ess"].append(sum(ess) / len(ess))
        m["var/max_weight"].append(sum(max_w) / len(max_w))
        m["var/weighted_reward"].append(sum(mean_r) / len(mean_r))
        m["var/rows_skipped"] = [float(self._var_rows_skipped)]

    @staticmethod
    def _add_weight_stats(w, lw, r, ess, max_w, mean_r):
        valid = torch.isfinite(lw)
        ess.append(float(1.0 / (w**2).sum()))
        max_w.append(float(w.max()))
        mean_r.append(float((w[valid] * r[valid]).sum()))

    def _gather_padded(self, local_lw: torch.Tensor, local_r: torch.Tensor):
        """Gather the step's log-weights (and rewards) from all processes; returns them and this process's offset."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return local_lw, local_r, 0
        n_local = torch.tensor([local_lw.numel()], device=acc.device)
        counts = acc.gather(n_local)
        max_n = int(counts.max())
        pad = max_n - local_lw.numel()
        lw = torch.cat([local_lw, local_lw.new_full((pad,), float("-inf"))])
        r = torch.cat([local_r, local_r.new_zeros(pad)])
        all_lw, all_r = acc.gather(lw), acc.gather(r)
        # Padding rows are -inf (weight 0); they are not counted as skipped rows because num_rows counts real ones.
        keep = torch.cat([torch.arange(max_n, device=acc.device) < c for c in counts])
        offset = int(counts[: acc.process_index].sum())
        return all_lw[keep], all_r[keep], offset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        weights = inputs.pop("var_weights", None)
        rewards = inputs.pop("rewards")
        ref_logps = inputs.pop(REF_LOGPS_COLUMN, None)
        labels = inputs["labels"]
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        token_logps = outputs.log_probs.float()
        num_tokens = (labels[:, 1:] != -100).sum(dim=-1)
        logps = token_logps.sum(dim=-1)
        if self.args.length_normalize:
            logps = logps / num_tokens.clamp(min=1).to(torch.float32)

        if weights is None:
            # Evaluation (and any call outside the training loop): normalise over this micro-batch.
            batch = {"labels": labels, "rewards": rewards}
            if ref_logps is not None:
                batch[REF_LOGPS_COLUMN] = ref_logps
            log_e, r = self._row_log_weights(batch)
            valid = torch.isfinite(log_e)
            if valid.any():
                weights = torch.softmax(log_e, dim=0)
                self._metrics[mode]["var/ess"].append(float(1.0 / (weights**2).sum()))
                self._metrics[mode]["var/max_weight"].append(float(weights.max()))
                self._metrics[mode]["var/weighted_reward"].append(float((weights[valid] * r[valid]).sum()))
            else:
                weights = torch.zeros_like(log_e)
        loss = weighted_nll(logps, weights.to(logps.device))
        if mode == "train" and self.args.z_scope == "step":
            # The weights sum to 1 over all processes; DDP averages gradients across processes, so undo that average.
            loss = loss * self.accelerator.num_processes

        # Same per-token diagnostics as SFTTrainer.
        num_valid = self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        if outputs.entropy is not None:
            entropy_sum = self.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        if outputs.is_top1 is not None:
            num_correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append(
                (num_correct / num_valid).item() if num_valid > 0 else 0.0
            )
        nll = -(token_logps.sum() / num_tokens.sum().clamp(min=1))
        self._metrics[mode]["nll"].append(self.accelerator.gather_for_metrics(nll.detach()).mean().item())
        if mode == "train":
            num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens_in_batch
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            return loss, outputs
        return loss
