"""VAR: reward-weighted SFT from the variational view of RLHF (arXiv 2502.11026).

The loss is `-sum_i w_i log pi_theta(y_i|x_i)` with `w = softmax(r / beta + log pi_ref(y|x))` over the batch
(`ref_weighting=False`: `softmax(r / beta)`). See `docs/var.md`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import textwrap
import warnings
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel
from trl import SFTTrainer, pack_dataset
from trl.models.utils import prepare_deepspeed

from ..data.utils import check_float_column, check_prompt_and_completion, first_row, to_float
from ..losses import var_log_weights, weighted_nll
from ..model_utils import (
    CheckpointedCountersMixin,
    KeepFloat32InputsMixin,
    adapters_disabled,
    compute_rowwise_distributed,
    ensure_fused_lm_head,
    hidden_from_base_init,
    resolve_reference_model,
    sequence_logps,
    warn_if_padding_free_attention_is_dense,
)
from .var_config import VARConfig

__all__ = ["VARTrainer", "DataCollatorForVAR", "even_batches_repeats", "unpack_examples"]

REF_LOGPS_COLUMN = "ref_logps"
# Cumulative counters saved next to each checkpoint (`trainer_state.json` has no room for them) and restored on resume.
# At most this many row indices are listed in a warning.
_MAX_LISTED_ROWS = 10


def _listed(rows: list[int]) -> str:
    more = f" and {len(rows) - _MAX_LISTED_ROWS} more" if len(rows) > _MAX_LISTED_ROWS else ""
    return f"{rows[:_MAX_LISTED_ROWS]}{more}"


def _check_one_row_per_example(batch: dict, num_examples: int) -> None:
    """Refuse a collated batch that is not one padded row (with its `attention_mask`) per example."""
    if "input_ids" not in batch:
        return
    if batch["input_ids"].shape[0] != num_examples or "attention_mask" not in batch:
        raise ValueError(
            f"The data collator returned `input_ids` of shape {tuple(batch['input_ids'].shape)} "
            f"{'without an `attention_mask` ' if 'attention_mask' not in batch else ''}for {num_examples} "
            "examples: VAR needs one padded row per example, with its `attention_mask`, to give each row its own "
            "weight (a padding-free collator that concatenates the rows loses them). Use a padded collator and set "
            "`padding_free=True` in VARConfig: VAR then concatenates the rows at the forward and keeps them apart."
        )


def unpack_examples(packs: list[dict[str, Any]], row_columns: list[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """Split packed examples (`input_ids`/`labels` of several rows back to back, their `seq_lengths`, and a list with
    one value per row in each of `row_columns`) into one example per row; also returns each row's pack position."""
    rows, pack_ids = [], []
    for p, pack in enumerate(packs):
        start = 0
        for j, length in enumerate(pack["seq_lengths"]):
            row = {key: pack[key][start : start + length] for key in ("input_ids", "labels")}
            row.update({column: pack[column][j] for column in row_columns if column in pack})
            rows.append(row)
            pack_ids.append(p)
            start += length
    return rows, pack_ids


class DataCollatorForVAR:
    """Wraps a language-modeling collator and adds the `rewards` (and `ref_logps`) tensors of the batch.

    They are float64 (`dtype`), so that the trainer computes the weights from the rewards as given: float32 would round
    `1e4 + 1e-3` to `1e4 + 9.8e-4`, which `beta=1e-3` turns into a wrong weight. A missing/None value becomes NaN (the
    trainer skips and counts such rows); booleans and strings are refused.

    Packed examples (a `seq_lengths` list, and one reward per segment, see `VARTrainer._pack`) are split back into
    their rows first; the batch then also holds `pack_ids` (the position in the batch of each row's pack).

    Args:
        base_collator (`Callable`):
            The language-modeling collator that builds `input_ids`, `attention_mask` and `labels`.
        reward_column (`str`, *optional*, defaults to `"reward"`):
            Name of the reward field of each example.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float64`):
            Dtype of the `rewards` and `ref_logps` tensors (float32 on devices without float64, such as MPS).
    """

    def __init__(self, base_collator, reward_column: str = "reward", dtype: torch.dtype = torch.float64):
        self.base_collator = base_collator
        self.reward_column = reward_column
        self.dtype = dtype

    def _floats(self, values, column: str, what: str) -> torch.Tensor:
        out = []
        for i, value in enumerate(values):
            if isinstance(value, np.bool_) or (torch.is_tensor(value) and value.dtype == torch.bool):
                value = bool(value)  # refused by `to_float` like a Python bool
            out.append(to_float(value, f"Column `{column}`, row {i} of a batch", what))
        return torch.tensor(out, dtype=self.dtype)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.reward_column not in examples[0]:
            raise ValueError(
                f"A training example has no `{self.reward_column}` field (keys: {sorted(examples[0])}). Add a float "
                f"reward column or set `reward_column` in VARConfig."
            )
        pack_ids = None
        if "seq_lengths" in examples[0]:
            examples, pack_ids = unpack_examples(examples, [self.reward_column, REF_LOGPS_COLUMN])
        batch = self.base_collator(examples)
        _check_one_row_per_example(batch, len(examples))
        if pack_ids is not None:
            batch["pack_ids"] = torch.tensor(pack_ids, dtype=torch.long)
        batch["rewards"] = self._floats([ex[self.reward_column] for ex in examples], self.reward_column, "reward")
        if REF_LOGPS_COLUMN in examples[0]:
            batch[REF_LOGPS_COLUMN] = self._floats(
                [ex[REF_LOGPS_COLUMN] for ex in examples], REF_LOGPS_COLUMN, "reference log-prob"
            )
        return batch


def even_batches_repeats(num_local: int, process_index: int, remainder: int) -> torch.Tensor:
    """Which rows of this process's share of the **last** batch of an epoch are repeats added by accelerate.

    With several processes and `even_batches=True` (accelerate's default), the last global batch of a map-style
    dataset is completed with rows from the start of the epoch so that every process gets `num_local` rows. The global
    batch is laid out process by process (rank-major, as [`~accelerate.Accelerator.gather`] returns it): its first
    `remainder` rows (`accelerator.gradient_state.remainder`, the dataset length modulo the global batch size) are real
    and the rest are repeats. This is the rule `Accelerator.gather_for_metrics` uses to drop them.

    Args:
        num_local (`int`):
            Number of rows of the last batch on this process (the same on every process).
        process_index (`int`):
            Rank of this process.
        remainder (`int`):
            Number of real rows in the last global batch (`> 0`).

    Returns:
        `torch.Tensor`: Boolean tensor of shape `(num_local,)`, `True` on repeated rows.

    Example:

    ```python
    >>> even_batches_repeats(num_local=2, process_index=1, remainder=3)  # 2 processes x 2 rows, 3 real rows
    tensor([False,  True])
    ```
    """
    positions = process_index * num_local + torch.arange(num_local)
    return positions >= remainder


_FLOAT32_KEYS = ("rewards", REF_LOGPS_COLUMN, "var_weights")


class VARTrainer(CheckpointedCountersMixin, KeepFloat32InputsMixin, SFTTrainer):
    """Trainer for VAR, reward-weighted SFT with batch-normalised exponential reward weights (arXiv 2502.11026).

    Takes everything [`~trl.SFTTrainer`] takes plus `ref_model`, except `compute_metrics` and
    `preprocess_logits_for_metrics` (the fused LM head builds no logits; see the error they raise). The reference
    log-probs that enter the weights come from, in order: a `ref_logps` column in the dataset; the given `ref_model`
    (an object, or a model id loaded with `model_init_kwargs`); the starting policy itself (with its PEFT adapters, if
    any, enabled: a pretrained adapter is part of the policy training starts from). They are computed once, before
    training, sharded over processes. Not needed with `ref_weighting=False`.

    Rows that truncation to `max_length` leaves without any completion token are dropped (like SFT does), counted in
    `dropped_rows[dataset_name]` (their indices in `dropped_row_indices[dataset_name]`) and reported in a warning with
    the `max_length` that would keep them.

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

    # Rewards, reference log-probs and weights reach `compute_loss` as float32 (not bf16 under DeepSpeed). The weights
    # themselves are computed before that cast, from the float64 values of the collator.
    _float32_input_keys = _FLOAT32_KEYS

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
        for what, value in (
            ("compute_metrics", compute_metrics),
            ("preprocess_logits_for_metrics", preprocess_logits_for_metrics),
        ):
            if value is not None:
                raise ValueError(
                    f"VARTrainer does not support `{what}`: its forward runs TRL's fused LM head, which computes the "
                    "completion log-probs without ever building the logits that `compute_metrics` and "
                    "`preprocess_logits_for_metrics` receive. VAR logs `eval_loss`, `eval_nll`, "
                    "`eval_mean_token_accuracy`, `eval_entropy` and the weight statistics `eval_var/ess`, "
                    "`eval_var/max_weight` and `eval_var/weighted_reward` instead; compute other metrics from "
                    "generations, e.g. in a `TrainerCallback`."
                )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        if not isinstance(train_dataset, (Dataset, IterableDataset)):
            raise TypeError(
                f"`train_dataset` must be a `Dataset` or `IterableDataset`, got `{type(train_dataset).__name__}`"
                + (
                    f" with splits {list(train_dataset)}: pass one split, e.g. `dataset['train']`."
                    if isinstance(train_dataset, dict)
                    else "."
                )
            )
        self._check_not_empty(train_dataset, "train", args.reward_column)
        self._check_rows(train_dataset, "train")
        for name, ds in self._as_dict(eval_dataset).items():
            label = "eval" if name == "eval" else f"eval {name!r}"
            self._check_not_empty(ds, label, args.reward_column)
            self._check_rows(ds, label)
        fix = f"VAR needs a float reward per row: add a `{args.reward_column}` column or set `reward_column` in VARConfig."
        check_float_column(train_dataset, args.reward_column, fix)
        for name, ds in self._as_dict(eval_dataset).items():
            check_float_column(ds, args.reward_column, f"(eval dataset {name!r}) {fix}")
        for label, ds in [("train", train_dataset), *self._as_dict(eval_dataset).items()]:
            self._warn_missing_rewards(ds, label, args.reward_column)
        if isinstance(ref_model, str):
            # Loaded like the DPO-based trainers load theirs: `model_init_kwargs`, `trust_remote_code`, no device map
            # when distributed.
            ref_model = resolve_reference_model(model, ref_model, args)
        # Only used by the reference pre-pass in __init__, then released.
        self._var_ref_model = ref_model
        self._var_external_ref = ref_model is not None
        # Whether the base model (PEFT adapters disabled) gives the starting policy's log-probs, so that it can stand
        # in for the reference once training has changed the adapters. Set by the pre-pass.
        self._var_base_is_reference = False
        self._var_rows_skipped = 0
        self._var_passthrough_prepare = False
        # Rows dropped by `_prepare_dataset` (no completion token within `max_length`), per dataset name.
        self.dropped_rows: dict[str, int] = {}
        self.dropped_row_indices: dict[str, list[int]] = {}

        # Padding-free forwards are run here (`sequence_logps(padding_free=True)`), on SFT's padded collator, and
        # packing is done here (after the reference pre-pass, keeping each row's reward): SFT must do neither.
        hidden = dict(padding_free=False, packing=False, eval_packing=False)
        with hidden_from_base_init(args, **hidden):
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                peft_config=peft_config,
                formatting_func=formatting_func,
            )
        # Packed rows are unpacked by the collator and always run padding-free (one row per pack), as in SFT.
        self.padding_free = args.padding_free or args.packing
        if self.padding_free:
            warn_if_padding_free_attention_is_dense(self.model)
        if self._is_vision_dataset:
            raise ValueError(
                "VARTrainer does not support vision datasets (`image`/`images` columns): the reference pre-pass and "
                "the weights need tokenized prompt/completion rows."
            )
        if self.aux_loss_enabled:
            raise ValueError(
                f"VARTrainer does not add the Mixture-of-Experts router auxiliary loss, which SFT enables for this model "
                f"(router_aux_loss_coef={self.router_aux_loss_coef}). Set `router_aux_loss_coef=0.0` in VARConfig."
            )
        # Carry rewards (and reference log-probs) through the collator as float64 tensors (float32 on MPS).
        if not isinstance(self.data_collator, DataCollatorForVAR):
            dtype = torch.float32 if self.args.device.type == "mps" else torch.float64
            self.data_collator = DataCollatorForVAR(self.data_collator, args.reward_column, dtype)
        if not args.packing:  # packs hold a varying number of rows
            self._warn_single_row_normaliser()

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
            if not self._var_external_ref and is_peft_model(self.model) and isinstance(self.train_dataset, Dataset):
                self._var_base_is_reference = self._base_matches_policy(self.train_dataset)
        self._release_reference()
        if args.packing:
            self.train_dataset = self._pack(self.train_dataset, "train")
        if self._eval_packing and self.eval_dataset is not None:
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._pack(v, f"eval[{k}]") for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._pack(self.eval_dataset, "eval")

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

    @staticmethod
    def _check_not_empty(dataset, label: str, reward_column: str) -> None:
        first_row(
            dataset,
            f"{label} dataset",
            f"VAR needs prompt/completion rows with a `{reward_column}` reward: check the split, the filtering or the "
            "file that produced it.",
        )

    @staticmethod
    def _check_rows(dataset, label: str) -> None:
        """Refuse a missing `prompt`/`completion` column, or a row whose prompt or completion is not a string / a
        well-formed message list, with the row and the fix (SFT would raise a bare `KeyError` or a tokenizer/chat
        template error). Streams are checked on their first row. Tokenized datasets are left alone."""
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            columns = list(first_row(dataset, f"{label} dataset"))
        if "input_ids" in columns:
            return
        missing = [c for c in ("prompt", "completion") if c not in columns]
        if missing:
            raise ValueError(
                f"The {label} dataset has no {' and no '.join(f'`{c}`' for c in missing)} column (columns: "
                f"{list(columns)}). VAR trains on prompt/completion rows (strings, or message lists for chat data) "
                "with a reward per row: rename your columns to `prompt` and `completion`."
            )
        if isinstance(dataset, Dataset):
            start = 0
            for batch in dataset.select_columns(["prompt", "completion"]).iter(batch_size=1024):
                for i, (prompt, completion) in enumerate(zip(batch["prompt"], batch["completion"])):
                    check_prompt_and_completion(prompt, completion, start + i)
                start += len(batch["prompt"])
        else:
            row = first_row(dataset, f"{label} dataset")
            check_prompt_and_completion(row["prompt"], row["completion"], 0)

    @staticmethod
    def _warn_missing_rewards(dataset, label: str, reward_column: str) -> None:
        """Warn once per dataset about rows whose reward is NaN/inf/None: they get weight 0 and are counted in the
        `var/rows_skipped` metric (streamed datasets are only counted, in training)."""
        if not isinstance(dataset, Dataset):
            return
        values = np.asarray([np.nan if v is None else v for v in dataset[reward_column]], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if values.size and bad.size == values.size:
            raise ValueError(
                f"Every `{reward_column}` of the {label} dataset is NaN/inf/None ({values.size} rows): VAR has no row "
                "to weight. Fill in the rewards (or drop the rows without one)."
            )
        if bad.size:
            warnings.warn(
                f"VAR: {bad.size} of {values.size} rows of the {label} dataset have a NaN/inf/None "
                f"`{reward_column}` (rows {_listed(bad.tolist())}); they get weight 0 and are counted in the "
                "`var/rows_skipped` metric.",
                UserWarning,
                stacklevel=3,
            )

    def _warn_single_row_normaliser(self) -> None:
        args = self.args
        if args.z_scope == "step":
            size = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes
            layout = (
                f"per_device_train_batch_size={args.per_device_train_batch_size} x gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps} x {self.accelerator.num_processes} process(es)"
            )
        else:
            size = args.per_device_train_batch_size
            layout = f"per_device_train_batch_size={args.per_device_train_batch_size} with z_scope='micro_batch'"
        if size == 1:
            warnings.warn(
                f"VAR normalises its weights over a single row ({layout}): every valid row gets weight 1, so training "
                "is plain SFT and the rewards and `beta` have no effect. Use a larger per_device_train_batch_size or "
                "gradient_accumulation_steps (with z_scope='step').",
                UserWarning,
                stacklevel=3,
            )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = [c for c in (self.args.reward_column, REF_LOGPS_COLUMN) if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *extra]

    # ------------------------------------------------------------------------------------------------------------------
    # Data: rows that truncation leaves without a completion token
    # ------------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        packing = False  # VAR packs after the reference pre-pass, keeping the rewards (`_pack`)
        if self._var_passthrough_prepare or args.max_length is None:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        # Tokenise without truncation (and without shuffling) first, so that the rows SFT's truncation would leave
        # fully masked (and silently drop) can be counted, named by their index and dropped here; the second pass
        # (idempotent on tokenized data) truncates and shuffles as SFT does.
        untruncated = copy.copy(args)
        untruncated.max_length = None
        untruncated.shuffle_dataset = False
        dataset = super()._prepare_dataset(
            dataset, processing_class, untruncated, packing, formatting_func, dataset_name
        )
        dataset = self._drop_rows_without_completion_tokens(dataset, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, packing, None, dataset_name)

    @staticmethod
    def _length_needed(labels, keep_end: bool) -> int | None:
        """The smallest `max_length` that leaves a completion token (a label other than -100); None if there is none.

        This is SFT's criterion: a truncated row is kept when any of its labels is not -100.
        """
        positions = [i for i, label in enumerate(labels) if label != -100]
        if not positions:
            return None
        return len(labels) - positions[-1] if keep_end else positions[0] + 1

    def _drop_rows_without_completion_tokens(self, dataset, args, name: str):
        max_length, mode = args.max_length, args.truncation_mode
        keep_end = mode == "keep_end"
        if isinstance(dataset, IterableDataset):
            # Counted as the stream is read, once per row index (SFT peeks at the first rows, epochs re-read them).
            self.dropped_rows[name] = 0
            self.dropped_row_indices[name] = []
            seen: set[int] = set()

            def keep(example, index):
                needed = self._length_needed(example["labels"], keep_end)
                if needed is not None and needed <= max_length:
                    return True
                if index not in seen:
                    seen.add(index)
                    self.dropped_rows[name] = len(seen)
                    if len(seen) <= _MAX_LISTED_ROWS:
                        self.dropped_row_indices[name].append(index)
                        warnings.warn(
                            f"VAR: row {index} of the {name} dataset has no completion token within `max_length="
                            f"{max_length}` (truncation_mode={mode!r}) and is dropped"
                            + (
                                f"; `max_length={needed}` would keep it."
                                if needed is not None
                                else " (empty completion)."
                            ),
                            UserWarning,
                            stacklevel=2,
                        )
                return False

            return dataset.filter(keep, with_indices=True)

        needed = []
        for batch in dataset.select_columns(["labels"]).iter(batch_size=1024):
            needed.extend(self._length_needed(labels, keep_end) for labels in batch["labels"])
        too_long = [i for i, n in enumerate(needed) if n is not None and n > max_length]
        empty = [i for i, n in enumerate(needed) if n is None]
        dropped = sorted(too_long + empty)
        self.dropped_rows[name] = len(dropped)
        self.dropped_row_indices[name] = dropped
        longest = max((needed[i] for i in too_long), default=None)
        if too_long:
            warnings.warn(
                f"VAR: {len(too_long)} of {len(needed)} rows of the {name} dataset have no completion token left "
                f"after truncation to `max_length={max_length}` (truncation_mode={mode!r}) and are dropped: rows "
                f"{_listed(too_long)}. `max_length={longest}` would keep them (or set `max_length=None`).",
                UserWarning,
                stacklevel=3,
            )
        if empty:
            warnings.warn(
                f"VAR: {len(empty)} of {len(needed)} rows of the {name} dataset have no completion token at all (an "
                f"empty completion, or every completion token masked) and are dropped: rows {_listed(empty)}.",
                UserWarning,
                stacklevel=3,
            )
        if len(dropped) == len(needed):
            fix = f"Raise `max_length` to at least {longest} or set `max_length=None`" if longest else "Fix the data"
            raise ValueError(
                f"No row of the {name} dataset keeps a completion token: all {len(needed)} rows would be dropped "
                f"(truncation to `max_length={max_length}`, truncation_mode={mode!r}, leaves "
                f"{len(too_long)} of them fully masked; {len(empty)} have an empty completion). {fix}."
            )
        if dropped:
            drop = set(dropped)
            dataset = dataset.select([i for i in range(len(needed)) if i not in drop])
        return dataset

    @property
    def _eval_packing(self) -> bool:
        return self.args.packing if self.args.eval_packing is None else self.args.eval_packing

    def _pack(self, dataset, name: str):
        """Pack tokenised rows into rows of at most `max_length` tokens (best-fit decreasing, TRL's `pack_dataset`),
        keeping each row's reward (and reference log-prob) as a list per pack, in segment order.

        No row is cut: rows are truncated to `max_length` when the dataset is prepared, so every row fits a pack
        whole. The collator ([`DataCollatorForVAR`]) unpacks the segments back into rows, and the forward runs
        padding-free, so each row keeps its own log-prob and weight.
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"VAR packing (`packing=True`) needs a map-style Dataset, but the {name} dataset is an "
                "IterableDataset (the packs are built from the whole dataset before training). Use a map-style "
                "Dataset, or `padding_free=True` without packing: it saves the same padding compute."
            )
        columns = [c for c in (self.args.reward_column, REF_LOGPS_COLUMN) if c in dataset.column_names]
        values = {c: dataset[c] for c in columns}
        # A per-token row index rides along with the tokens, so that each segment of a pack names its row.
        rows = dataset.select_columns(["input_ids", "labels"]).map(
            lambda example, index: {"_row": [index] * len(example["input_ids"])},
            with_indices=True,
            desc=f"Indexing {name} rows for packing",
        )
        packed = pack_dataset(rows, self.args.max_length, "bfd", {"desc": f"Packing {name} dataset"})

        def attach(example):
            starts = np.cumsum([0, *example["seq_lengths"][:-1]])
            index = [example["_row"][int(start)] for start in starts]
            return {column: [column_values[i] for i in index] for column, column_values in values.items()}

        return packed.map(attach, remove_columns=["_row"], desc=f"Attaching rewards to {name} packs")

    # ------------------------------------------------------------------------------------------------------------------
    # Reference log-probs (computed once, before training)
    # ------------------------------------------------------------------------------------------------------------------

    def _maybe_add_ref_logps(self, dataset, name: str):
        if dataset is None:
            return None
        columns = dataset.column_names
        if columns is None:  # an IterableDataset whose features are unknown (e.g. after `map`): read its first row
            columns = list(next(iter(dataset)).keys())
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
        """The module to run reference forwards with, and whether PEFT adapters must be disabled around it.

        Before training the starting policy is the reference, adapters enabled (a pretrained adapter is part of it).
        Once training has started, only the base model can stand in for it, and only when it gives the starting
        policy's log-probs (`_var_base_is_reference`, checked by `evaluate`).
        """
        disable_adapters = is_peft_model(self.model) and self.state.global_step > 0
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
            return self._precompute_engine, disable_adapters
        return self.model, disable_adapters

    def _logps_fn(self, dataset: Dataset, ref, disable_adapters: bool):
        collate = self.data_collator.base_collator  # __init__ wraps the collator before the pre-pass
        columns = dataset.select_columns(["input_ids", "labels"])

        def compute(indices):
            batch = collate([columns[int(i)] for i in indices])
            _check_one_row_per_example(batch, len(indices))
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with adapters_disabled(self.model) if disable_adapters else contextlib.nullcontext():
                logps, _ = sequence_logps(
                    ref,
                    batch["input_ids"],
                    batch.get("attention_mask"),
                    batch["labels"],
                    padding_free=self.padding_free,
                )
            return logps

        return compute

    @torch.no_grad()
    def _compute_ref_logps(self, dataset: Dataset, name: str) -> torch.Tensor:
        ref, disable_adapters = self._reference_forward_model()
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        was_training = self.model.training
        self.model.eval()
        try:
            values = compute_rowwise_distributed(
                self.accelerator,
                len(dataset),
                batch_size,
                self._logps_fn(dataset, ref, disable_adapters),
                desc=f"Reference log-probs ({name})",
            )
        finally:
            self.model.train(was_training)
        return values

    @torch.no_grad()
    def _base_matches_policy(self, dataset: Dataset) -> bool:
        """Whether the PEFT base model (adapters disabled) gives the starting policy's log-probs on the first rows.

        True for an adapter that starts as the identity (a fresh LoRA); False for a pretrained one. Every process runs
        the same rows (collective forwards under ZeRO-3 stay in step) and reaches the same answer.
        """
        ref, _ = self._reference_forward_model()
        compute_on = self._logps_fn(dataset, ref, False)
        compute_off = self._logps_fn(dataset, ref, True)
        rows = list(range(min(len(dataset), self.args.precompute_ref_batch_size or 8)))
        was_training = self.model.training
        self.model.eval()
        try:
            on, off = compute_on(rows).float(), compute_off(rows).float()
        finally:
            self.model.train(was_training)
        return bool(torch.allclose(on, off, rtol=1e-5, atol=1e-4))

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
                self._check_not_empty(ds, "eval" if key == "eval" else f"eval {key!r}", self.args.reward_column)
                check_float_column(ds, self.args.reward_column, fix)
                ds = self._prepare_dataset(ds, self.processing_class, self.args, False, self._formatting_func, key)
                if self.args.ref_weighting and REF_LOGPS_COLUMN not in (ds.column_names or []):
                    trained = self.state.global_step > 0
                    if self._var_external_ref or (trained and not self._var_base_is_reference):
                        raise ValueError(
                            f"Evaluation dataset {key!r} has no `ref_logps` column, and the reference is no longer "
                            "available (a `ref_model` is released after the init pre-pass; after training started the "
                            "policy is no longer the reference, and no base model without adapters equals the starting "
                            "policy). Pass evaluation datasets at init (their reference log-probs are computed then), "
                            "or add a `ref_logps` column."
                        )
                    ds = self._maybe_add_ref_logps(ds, key)
                if self._eval_packing and "seq_lengths" not in ds.column_names:
                    ds = self._pack(ds, key)
                prepared[key] = ds
            eval_dataset = prepared if isinstance(eval_dataset, dict) else prepared["eval"]
        # SFT's evaluate prepares the (already prepared) datasets again: do not count their rows a second time.
        self._var_passthrough_prepare = True
        try:
            return super().evaluate(
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
        finally:
            self._var_passthrough_prepare = False

    # ------------------------------------------------------------------------------------------------------------------
    # Cumulative counters across checkpoints
    # ------------------------------------------------------------------------------------------------------------------

    def _cumulative_counters(self) -> dict[str, float]:
        return {"num_tokens": self._total_train_tokens, "rows_skipped": self._var_rows_skipped}

    def _restore_cumulative_counters(self, counters: dict[str, float]) -> None:
        self._total_train_tokens = counters.get("num_tokens", 0)
        self._var_rows_skipped = counters.get("rows_skipped", 0)

    # ------------------------------------------------------------------------------------------------------------------
    # Weights and loss
    # ------------------------------------------------------------------------------------------------------------------

    def _row_table(self, batch: dict, repeats: torch.Tensor | None = None) -> torch.Tensor:
        """A `(B, 4)` float64 table of a collated micro-batch: reward, reference term (0 when unused), whether the row
        has a completion token, whether it is a repeat added by `even_batches` (not part of the normaliser)."""
        labels = batch["labels"]
        num_tokens = (labels[:, 1:] != -100).sum(dim=-1)
        rewards = batch["rewards"].to(torch.float64)
        ref = torch.zeros_like(rewards)
        if self.args.ref_weighting:
            if REF_LOGPS_COLUMN not in batch:
                raise RuntimeError("ref_weighting=True but the batch carries no `ref_logps` (internal error).")
            ref = batch[REF_LOGPS_COLUMN].to(device=rewards.device, dtype=torch.float64)
            if self.args.length_normalize:
                ref = ref / num_tokens.clamp(min=1).to(ref)
        if repeats is None:
            repeats = torch.zeros_like(rewards, dtype=torch.bool)
        columns = [rewards, ref, (num_tokens > 0).to(rewards), repeats.to(rewards)]
        return torch.stack(columns, dim=1)

    def _log_weights(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centred log-weights (float32, -inf on rows outside the normaliser) of a row table, and its real rows."""
        real = table[:, 3] == 0
        ref = table[:, 1] if self.args.ref_weighting else None
        log_e = var_log_weights(table[:, 0], self.args.beta, ref, mask=(table[:, 2] > 0) & real)
        return log_e, real

    def _even_batches_repeats(self, num_local: int) -> torch.Tensor | None:
        """Repeats in this process's last micro-batch of the epoch (see [`even_batches_repeats`]); None if none."""
        acc = self.accelerator
        state = acc.gradient_state
        if acc.num_processes == 1 or not acc.even_batches or not state.end_of_dataloader or state.remainder <= 0:
            return None
        return even_batches_repeats(num_local, acc.process_index, state.remainder)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self._assign_step_weights(batch_samples)
        return batch_samples, num_items_in_batch

    def _assign_step_weights(self, batch_samples: list[dict]) -> None:
        """Compute the VAR weights of one optimizer step and attach them to each micro-batch as `var_weights`."""
        acc = self.accelerator
        tables = []
        for i, batch in enumerate(batch_samples):
            # Only the last micro-batch of an epoch can hold rows repeated by `even_batches`. Accelerate repeats
            # dataset examples: with packing, whole packs, so every row of a repeated pack is a repeat.
            pack_ids = batch.get("pack_ids")
            n = batch["rewards"].shape[0] if pack_ids is None else int(pack_ids.max()) + 1
            repeats = self._even_batches_repeats(n) if i == len(batch_samples) - 1 else None
            if repeats is not None and pack_ids is not None:
                repeats = repeats[pack_ids.to(repeats.device)]
            tables.append(self._row_table(batch, repeats).to(acc.device))
        sizes = [t.shape[0] for t in tables]
        if self.args.z_scope == "step":
            all_rows, offset = self._gather_rows(torch.cat(tables))
            groups = [all_rows]
        else:
            groups = tables
        log_weights = [self._log_weights(t) for t in groups]
        # Decide on validity with the same information on every process, so all raise together (no hang).
        num_valid = torch.stack([torch.isfinite(lw).sum() for lw, _ in log_weights])
        num_real = torch.stack([real.sum() for _, real in log_weights])
        if self.args.z_scope == "micro_batch" and acc.num_processes > 1:
            num_valid = acc.gather(num_valid)
            num_real = acc.gather(num_real)
        if ((num_valid == 0) & (num_real > 0)).any():
            raise ValueError(
                f"A VAR normalisation batch (z_scope={self.args.z_scope!r}) has no valid row: every reward in it is "
                f"NaN/inf/None, every reference log-prob is non-finite, or every completion is empty. Drop such rows "
                f"from the dataset (column `{self.args.reward_column}`), or use a larger batch / z_scope='step'."
            )
        stats = []  # (ess, max weight, weighted reward) per normalisation group; NaN for a group of repeats only
        weights = []
        for (lw, _), table in zip(log_weights, groups):
            if torch.isfinite(lw).any():
                w = torch.softmax(lw, dim=0)
                stats.append(self._weight_stats(lw, table[:, 0]))
            else:  # only rows repeated by `even_batches`: no weight
                w = torch.zeros_like(lw)
                stats.append((math.nan, math.nan, math.nan))
            weights.append(w)
        if self.args.z_scope == "step":
            local_w = weights[0][offset : offset + sum(sizes)]
            weights = list(torch.split(local_w, sizes))
        for batch, w in zip(batch_samples, weights):
            batch["var_weights"] = w.detach()
        self._var_rows_skipped += int((num_real - num_valid).sum().item())
        stats = torch.tensor(stats, dtype=torch.float64, device=acc.device)
        if self.args.z_scope == "micro_batch" and acc.num_processes > 1:
            stats = acc.gather(stats)
        stats = stats[~torch.isnan(stats[:, 0])].mean(dim=0).tolist()
        m = self._metrics["train"]
        m["var/ess"].append(stats[0])
        m["var/max_weight"].append(stats[1])
        m["var/weighted_reward"].append(stats[2])
        m["var/rows_skipped"] = [float(self._var_rows_skipped)]

    @staticmethod
    def _weight_stats(log_weights: torch.Tensor, rewards: torch.Tensor) -> tuple[float, float, float]:
        """Effective sample size, largest weight and weighted reward of one normalisation group (in float64, so that
        `sum_i w_i r_i` keeps the precision of rewards with a large common offset)."""
        w = torch.softmax(log_weights.to(torch.float64), dim=0)
        on = w > 0
        weighted_reward = (w[on] * rewards[on].to(device=w.device, dtype=torch.float64)).sum()
        return float(1.0 / (w**2).sum()), float(w.max()), float(weighted_reward)

    def _gather_rows(self, local: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Gather the step's row tables from all processes (in rank order); returns them and this process's offset."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return local, 0
        counts = acc.gather(torch.tensor([local.shape[0]], device=acc.device))
        max_n = int(counts.max())
        pad = local.new_zeros((max_n - local.shape[0], local.shape[1]))
        gathered = acc.gather(torch.cat([local, pad]))
        # Padding rows (uneven micro-batch counts with `even_batches=False`) are dropped here; they never count.
        keep = torch.cat([torch.arange(max_n, device=acc.device) < c for c in counts])
        offset = int(counts[: acc.process_index].sum())
        return gathered[keep], offset

    def _micro_batch_weights(self, inputs: dict, mode: str) -> torch.Tensor:
        """Weights normalised over one micro-batch (evaluation, or `compute_loss` called outside the training loop)."""
        log_e, _ = self._log_weights(self._row_table(inputs))
        if not torch.isfinite(log_e).any():
            return torch.zeros_like(log_e)
        w = torch.softmax(log_e, dim=0)
        ess, max_w, weighted_reward = self._weight_stats(log_e, inputs["rewards"])
        self._metrics[mode]["var/ess"].append(ess)
        self._metrics[mode]["var/max_weight"].append(max_w)
        self._metrics[mode]["var/weighted_reward"].append(weighted_reward)
        return w

    def _prepare_inputs(self, inputs):
        # Outside the training loop (evaluation) the weights are computed here, from the float64 rewards, before the
        # float32 cast of `KeepFloat32InputsMixin`.
        if "var_weights" not in inputs and torch.is_tensor(inputs.get("rewards")):
            inputs["var_weights"] = self._micro_batch_weights(inputs, "train" if self.model.training else "eval")
        return super()._prepare_inputs(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        weights = inputs.pop("var_weights", None)
        if weights is None:
            weights = self._micro_batch_weights(inputs, mode)
        inputs.pop("rewards")
        inputs.pop(REF_LOGPS_COLUMN, None)
        inputs.pop("pack_ids", None)
        labels = inputs["labels"]
        logps, num_tokens, outputs = sequence_logps(
            model,
            inputs["input_ids"],
            inputs.get("attention_mask"),
            labels,
            self.args.length_normalize,
            return_outputs=True,
            padding_free=self.padding_free,
        )
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
        nll = -(outputs.log_probs.float().sum() / num_tokens.sum().clamp(min=1))
        self._metrics[mode]["nll"].append(self.accelerator.gather_for_metrics(nll.detach()).mean().item())
        if mode == "train":
            num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            # As in SFTTrainer: tensor-parallel ranks see the same batch, so the gathered count repeats each token.
            self._total_train_tokens += num_tokens_in_batch // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            return loss, outputs
        return loss
