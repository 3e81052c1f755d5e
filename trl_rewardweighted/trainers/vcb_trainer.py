"""VCB: value-based calibration over n scored responses per prompt (arXiv 2402.16030), built on TRL's `DPOTrainer`.

One dataset row is one *prompt group*: a `prompt`, a list of `completions` and one reward per completion. The loss
([`~trl_rewardweighted.losses.vcb_loss`]) pulls the gap between the policy/reference log-ratios of every pair of
completions of a prompt towards their reward gap divided by `gamma * sigma(x)`, so the optimum is
`pi(y) ∝ pi_ref(y) exp(r(x, y) / (gamma * sigma(x)))` on the candidates.

`DPOTrainer` provides the processing class, the reference model handling (a live `ref_model`, the PEFT base with
adapters disabled, DeepSpeed/FSDP placement, precomputation) and the fused LM head; this module changes the data
(groups instead of pairs), the collator, the loss and the metrics. See `docs/vcb.md` for the user guide.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import global_then_local_main_first, pad, use_adapter

from ..data.utils import check_float_column, first_row, to_float
from ..data.weights import check_weight_columns, example_weights
from ..losses import vcb_loss, vcb_pair_stats
from ..model_utils import (
    CheckpointedCountersMixin,
    KeepFloat32InputsMixin,
    adapters_disabled,
    compute_rowwise_distributed,
    sequence_logps,
    tokenize_prompt_completions,
    warn_if_padding_free_attention_is_dense,
)
from .common import DPOTrainerInitMixin
from .vcb_config import VCBConfig

__all__ = ["VCBTrainer", "DataCollatorForVCB"]

logger = get_logger(__name__)


# Columns produced by `VCBTrainer._prepare_dataset` (and read by `DataCollatorForVCB`).
PROMPT_IDS = "prompt_ids"
COMPLETION_IDS = "completion_ids"
COMPLETION_REWARDS = "completion_rewards"
REF_LOGPS = "ref_logps"
# The batch tensor with one sample weight per prompt group (from the `sample_weight_column`).
GROUP_WEIGHTS = "group_weights"

# Sums accumulated per logging window (gathered over processes), see `VCBTrainer._record_metrics`.
_STAT_KEYS = (
    "calib_abs_sum",
    "num_pairs",
    "agree_sum",
    "agree_count",
    "sigma_sum",
    "num_groups",
    "logratio_sum",
    "num_valid",
    "groups_skipped",
    "masked_completions",
    "num_tokens",
    "loss_sum",
    "weight_sum",
)
# Training metrics logged as running totals; saved with each checkpoint (`CheckpointedCountersMixin`) and restored on resume.
_CUMULATIVE_KEYS = ("groups_skipped", "masked_completions", "num_tokens")


# ----------------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DataCollatorForVCB(DataCollatorMixin):
    """
    Data collator for [`VCBTrainer`]: pads prompt groups into group-shaped tensors.

    Each example has `prompt_ids` (`list[int]`), `completion_ids` (list of `list[int]`), `completion_rewards`
    (`list[float]`) and optionally `ref_logps` (`list[float]`). For G groups of at most `n_max` completions and
    sequences of at most T tokens, the output holds:

    - `rewards` (G, n_max) float32 (0 on padding) and `group_mask` (G, n_max) bool (True on real completions);
    - `ref_logps` (G, n_max) float32 when every example carries them;
    - `group_weights` (G,) float32, each group's sample weight, when `sample_weight_column` is set (an example
      without the field weighs 1);
    - `input_ids`, `attention_mask`, `completion_mask` (G, n_max, T): row `[g, j]` is prompt g followed by its
      completion j, right-padded, truncated to `max_length` like DPO's collator; padding slots (`group_mask` False)
      are all padding.

    Every tensor has the number of groups as its first dimension, so `find_batch_size` counts groups and
    accelerate's batch slicing / concatenation never cuts a group apart. [`VCBTrainer`] flattens the real rows to
    (N, T), N = total number of completions, group-major, before the forward.

    Args:
        pad_token_id (`int`):
            Token ID used to pad `input_ids`.
        max_length (`int`, *optional*):
            Maximum length of each prompt + completion; longer ones are truncated (see `truncation_mode`).
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`):
            `"keep_start"` keeps the first `max_length` tokens, `"keep_end"` the last ones.
        pad_to_multiple_of (`int`, *optional*):
            Pad the sequence length to a multiple of this value.
        return_tensors (`str`, *optional*, defaults to `"pt"`):
            Only `"pt"` is supported.
        sample_weight_column (`str`, *optional*):
            Field with each group's sample weight; `None` (default) returns no `group_weights`.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    sample_weight_column: str | None = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        num_groups = len(examples)
        n_max = max(len(example[COMPLETION_IDS]) for example in examples)
        rewards = torch.zeros(num_groups, n_max, dtype=torch.float32)
        group_mask = torch.zeros(num_groups, n_max, dtype=torch.bool)
        has_ref = all(example.get(REF_LOGPS) is not None for example in examples)
        ref_logps = torch.zeros(num_groups, n_max, dtype=torch.float32) if has_ref else None
        if self.max_length is None:
            sl = slice(None)
        elif self.truncation_mode == "keep_start":
            sl = slice(None, self.max_length)
        elif self.truncation_mode == "keep_end":
            sl = slice(-self.max_length, None)
        else:
            raise ValueError(
                f"Unsupported truncation mode: {self.truncation_mode!r}, expected 'keep_start' or 'keep_end'."
            )

        input_ids, completion_mask = [], []
        for g, example in enumerate(examples):
            prompt_ids = list(example[PROMPT_IDS])
            completions = example[COMPLETION_IDS]
            values = example[COMPLETION_REWARDS]
            if len(values) != len(completions):
                raise ValueError(
                    f"Group {g} of the batch has {len(completions)} completions but {len(values)} rewards."
                )
            for j, completion in enumerate(completions):
                ids = prompt_ids + list(completion)
                mask = [0] * len(prompt_ids) + [1] * len(completion)
                input_ids.append(torch.tensor(ids[sl], dtype=torch.long))
                completion_mask.append(torch.tensor(mask[sl], dtype=torch.long))
                group_mask[g, j] = True
            rewards[g, : len(values)] = torch.tensor([to_float(v, f"Group {g}") for v in values], dtype=torch.float32)
            if has_ref:
                ref = example[REF_LOGPS]
                ref_logps[g, : len(ref)] = torch.tensor(
                    [to_float(v, f"Group {g}", "reference log-prob") for v in ref], dtype=torch.float32
                )

        attention_mask = [torch.ones_like(ids) for ids in input_ids]
        output = {"rewards": rewards, "group_mask": group_mask}
        if has_ref:
            output["ref_logps"] = ref_logps
        column = self.sample_weight_column
        if column is not None:
            output[GROUP_WEIGHTS] = torch.tensor(example_weights(examples, column, "group"), dtype=torch.float32)
        for key, rows, value in (
            ("input_ids", input_ids, self.pad_token_id),
            ("attention_mask", attention_mask, 0),
            ("completion_mask", completion_mask, 0),
        ):
            flat = pad(rows, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
            grouped = flat.new_full((num_groups, n_max, flat.shape[1]), value)
            grouped[group_mask] = flat
            output[key] = grouped
        return output


def flatten_groups(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real sequences of a collated VCB batch as (N, T) `input_ids`, `attention_mask` and `labels` (-100 off the
    completion), group-major: the rows of group g follow those of group g-1, in completion order."""
    group_mask = batch["group_mask"].bool()
    input_ids = batch["input_ids"][group_mask]
    attention_mask = batch["attention_mask"][group_mask]
    labels = input_ids.masked_fill(batch["completion_mask"][group_mask] == 0, -100)
    return input_ids, attention_mask, labels


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


class VCBTrainer(DPOTrainerInitMixin, CheckpointedCountersMixin, KeepFloat32InputsMixin, DPOTrainer):
    r"""
    Trainer for Value-based CaliBration (VCB, Mao et al., arXiv 2402.16030) over n scored completions per prompt.

    The dataset has one row per prompt: `prompt` (a string, or a list of chat messages), `completions` (a list of
    strings; for conversational data a list of assistant texts or of `[{"role": "assistant", ...}]` lists) and
    `rewards` (a list with one float per completion). An optional `ref_logps` column (one summed reference log-prob
    per completion) is used instead of running a reference model.

    Everything else is [`~trl.DPOTrainer`]: pass a model id or a model object, an optional `ref_model`, a
    `peft_config` (then the reference is the base model with the adapters disabled), or
    `precompute_ref_log_probs=True` (computed once, sharded over processes). Without any of these and with a model
    *object*, the reference is a frozen copy of that object taken before training.

    Example:

    ```python
    from datasets import Dataset
    from trl_rewardweighted import VCBConfig, VCBTrainer

    dataset = Dataset.from_dict(
        {
            "prompt": ["The sky is", "Two plus two is"],
            "completions": [[" blue.", " green.", " falling."], [" four.", " five."]],
            "rewards": [[1.0, 0.2, -0.5], [1.0, -1.0]],
        }
    )
    trainer = VCBTrainer(
        model="path/to/sft-model",
        args=VCBConfig(output_dir="vcb-model", gamma=0.05, per_device_train_batch_size=2),
        train_dataset=dataset,
    )
    trainer.train()
    ```

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The policy, as for [`~trl.DPOTrainer`].
        ref_model ([`~transformers.PreTrainedModel`] or `str`, *optional*):
            Reference model (an object or a model id). See `docs/vcb.md` for the reference options and their order.
        args ([`VCBConfig`], *optional*):
            Configuration; must be a [`VCBConfig`] (a [`~trl.DPOConfig`] is refused).
        data_collator ([`~transformers.DataCollator`], *optional*):
            Defaults to [`DataCollatorForVCB`] with the tokenizer's pad token.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Prompt groups, see above. Must not be empty.
        eval_dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `dict`, *optional*):
            Prompt groups for evaluation (one dataset or a dict of them).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            A tokenizer (text only); loaded from the model by [`~trl.DPOTrainer`] when not given.
        compute_metrics (`None`):
            Not supported (an error): the fused LM head builds no logits, so the evaluation loop has nothing to pass
            it. The VCB metrics (calibration error, pair agreement, σ, log-ratio, ...) are logged at every
            evaluation.
        callbacks, optimizers, quantization_config, peft_config:
            As for [`~trl.DPOTrainer`].
    """

    # Rewards, reference log-probs and sample weights stay float32 under DeepSpeed's bf16 input cast.
    _float32_input_keys = ("rewards", REF_LOGPS, GROUP_WEIGHTS)

    # The loss is normalised over the whole optimizer step in `_compute_vcb_loss` (see `get_batch_samples`).
    loss_is_scaled_for_ga = True

    _tag_names = ["trl", "vcb", "trl-rewardweighted"]
    _name = "VCB"
    _paper = {
        "title": "Don't Forget Your Reward Values: Language Model Alignment via Value-based Calibration",
        "id": "2402.16030",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{mao2024dont,
                title        = {{Don't Forget Your Reward Values: Language Model Alignment via Value-based Calibration}},
                author       = {Xin Mao and Feng-Lin Li and Huimin Xu and Wei Zhang and Anh Tuan Luu},
                year         = 2024,
                eprint       = {arXiv:2402.16030},
                journal      = {arXiv preprint arXiv:2402.16030},
                note         = {EMNLP 2024},
            }"""),
    }

    _config_class = VCBConfig
    _default_output_suffix = "VCB"
    _config_fix = (
        "VCB needs its own fields (`gamma`, `lam`, `pair_mode`, column names): build `VCBConfig(...)` with the same "
        "arguments."
    )
    _refused_arguments = {
        "compute_metrics": "`compute_metrics` is not supported by VCBTrainer: the fused LM head builds no logits, so "
        "the evaluation loop only gets the loss and would never call it. The VCB metrics (`calibration_error`, "
        "`pair_agreement`, `sigma`, `logratio`, ...) are logged at every evaluation; remove `compute_metrics`."
    }

    def _check_arguments(self, arguments):
        args, train_dataset, eval_dataset = arguments["args"], arguments["train_dataset"], arguments["eval_dataset"]
        acc = args.accelerator_config
        if getattr(acc, "split_batches", False):
            raise ValueError(
                "`accelerator_config.split_batches=True` is not supported by VCBTrainer: splitting a batch across "
                "processes would cut prompt groups apart. Leave it False (batch sizes count prompts per device)."
            )
        if getattr(acc, "dispatch_batches", None) is True and not isinstance(train_dataset, IterableDataset):
            raise ValueError(
                "`accelerator_config.dispatch_batches=True` is not supported by VCBTrainer: dispatching concatenates "
                "and re-splits batches, which would cut prompt groups apart. Leave it unset."
            )
        # Every process reads its own batches (accelerate would otherwise dispatch IterableDataset batches from the
        # main process, concatenating groups of different sizes and lengths).
        if getattr(acc, "dispatch_batches", None) is None:
            acc.dispatch_batches = False

        first = _first_row(train_dataset, "train", args)
        if "image" in first or "images" in first:
            raise NotImplementedError("VCBTrainer supports text data only (the dataset has an image column).")
        if isinstance(eval_dataset, dict):
            for name, dataset in eval_dataset.items():
                _first_row(dataset, name, args)
        elif eval_dataset is not None:
            _first_row(eval_dataset, "eval", args)

        # Sample weights: used when the train dataset has the column (a name the user set must exist).
        self.sample_weighted = check_weight_columns(
            train_dataset, eval_dataset, args.sample_weight_column, train_required=False
        )

        # A dataset that already carries reference log-probs needs no reference model.
        if REF_LOGPS in _column_names(train_dataset, first) and not args.precompute_ref_log_probs:
            logger.info(
                f"The train dataset has a `{REF_LOGPS}` column: it is used as the reference and no reference model is "
                "kept (`precompute_ref_log_probs` set to True)."
            )
            args.precompute_ref_log_probs = True

        arguments["ref_model"] = self._resolved_ref_model(arguments)

        # Counters filled by `_prepare_dataset` (rows dropped per dataset name).
        self.dropped_rows: dict[str, int] = {}
        self.nonfinite_rewards: dict[str, int] = {}
        # The user's collator, or None for `DataCollatorForVCB`. `DPOTrainer.__init__` resolves the processing class
        # and the pad token and builds its own pair collator; the VCB one replaces it below, and is built by
        # `_vcb_collator` when the reference log-probs are precomputed inside `DPOTrainer.__init__`.
        self._user_collator = arguments["data_collator"]
        # Padding-free forwards are run here (`sequence_logps(padding_free=True)`), also by the precompute that
        # `DPOTrainer.__init__` triggers; DPO 1.16 itself ignores the flag (with a warning) and pads.
        self.padding_free = args.padding_free

    def _hidden_from_base_init(self, args):
        return {"padding_free": False}

    def _after_base_init(self, args):
        self.padding_free = args.padding_free
        if self.padding_free:
            warn_if_padding_free_attention_is_dense(self.model)
        self.data_collator = self._vcb_collator()

        if self.aux_loss_enabled:
            warnings.warn(
                "VCBTrainer does not add the MoE router auxiliary loss; set `router_aux_loss_coef=0.0` to silence "
                "this warning.",
                UserWarning,
                stacklevel=4,  # the caller of `__init__`
            )

        self._vcb_sums = {mode: torch.zeros(len(_STAT_KEYS), dtype=torch.float64) for mode in ("train", "eval")}
        self._vcb_cumulative = dict.fromkeys(_CUMULATIVE_KEYS, 0.0)
        self._warned_fallback = False

    def _vcb_collator(self):
        """The collator of the VCB batches: the user's, or [`DataCollatorForVCB`] with the tokenizer's pad token (as
        set by `DPOTrainer.__init__`, which validates `args.pad_token`)."""
        if self._user_collator is not None:
            return self._user_collator
        if not isinstance(getattr(self, "_default_vcb_collator", None), DataCollatorForVCB):
            args = self.args
            self._default_vcb_collator = DataCollatorForVCB(
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
                sample_weight_column=args.sample_weight_column if self.sample_weighted else None,
            )
        return self._default_vcb_collator

    # ------------------------------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args: VCBConfig, dataset_name: str):
        """Validate and tokenize one row per prompt group (idempotent: a tokenized dataset is returned as is)."""
        first = _first_row(dataset, dataset_name, args)
        names = _column_names(dataset, first)
        if {PROMPT_IDS, COMPLETION_IDS, COMPLETION_REWARDS} <= set(names):
            return dataset
        if isinstance(processing_class, ProcessorMixin) or not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError(
                f"VCBTrainer needs a tokenizer as `processing_class` (text only), got {type(processing_class).__name__}."
            )
        completions_column, rewards_column = args.completions_column, args.rewards_column
        if "prompt" not in names:
            raise ValueError(
                f"The {dataset_name} dataset has no `prompt` column (columns: {names}). VCB needs one row per prompt "
                "with a `prompt` (a string or a list of chat messages) shared by the row's completions."
            )
        if completions_column not in names:
            raise ValueError(
                f"The {dataset_name} dataset has no `{completions_column}` column (columns: {names}). Each row needs "
                f"the list of completions of its prompt: rename your column to `{completions_column}` or set "
                "`VCBConfig(completions_column=...)`."
            )
        rewards_fix = (
            f"Each row needs one reward per completion: rename your column to `{rewards_column}` or set "
            "`VCBConfig(rewards_column=...)`."
        )
        if rewards_column not in names:
            raise ValueError(
                f"The {dataset_name} dataset has no `{rewards_column}` column (columns: {names}). {rewards_fix}"
            )
        if isinstance(dataset, Dataset):
            check_float_column(dataset, rewards_column, rewards_fix, list_valued=True)
        has_ref = REF_LOGPS in names

        map_kwargs = {}
        if isinstance(dataset, Dataset):
            map_kwargs["num_proc"] = args.dataset_num_proc
            map_kwargs["desc"] = f"Tokenizing {dataset_name} dataset"
        with global_then_local_main_first():
            dataset = dataset.map(
                _tokenize_group,
                with_indices=True,
                fn_kwargs={
                    "processing_class": processing_class,
                    "completions_column": completions_column,
                    "rewards_column": rewards_column,
                    "has_ref": has_ref,
                },
                **map_kwargs,
            )

        max_length = args.max_length if args.truncation_mode == "keep_start" else None
        if isinstance(dataset, IterableDataset):
            dataset = dataset.filter(
                lambda ex: (
                    len(ex[COMPLETION_REWARDS]) >= 2 and (max_length is None or len(ex[PROMPT_IDS]) < max_length)
                )
            )
            # Rows are tokenized lazily: read the first kept one now, so that a malformed column (e.g. a scalar
            # reward) fails here, on every process at once, rather than inside a training step on some of them.
            try:
                next(iter(dataset))
            except StopIteration:
                raise ValueError(
                    f"No usable row in the {dataset_name} dataset: every row has fewer than 2 completions (or a prompt "
                    f"that fills `max_length`). VCB compares completions of the same prompt: give each row at least 2 "
                    f"entries in `{completions_column}` and `{rewards_column}`."
                ) from None
            return dataset

        # Map-style: drop unusable rows, count and report them.
        rewards_lists = dataset[COMPLETION_REWARDS]
        prompt_lengths = [len(p) for p in dataset[PROMPT_IDS]] if max_length is not None else None
        too_few = [i for i, r in enumerate(rewards_lists) if len(r) < 2]
        too_long = [] if max_length is None else [i for i, n in enumerate(prompt_lengths) if n >= max_length]
        dropped = sorted(set(too_few) | set(too_long))
        self.dropped_rows[dataset_name] = len(dropped)
        if too_few:
            warnings.warn(
                f"VCB: {len(too_few)} of {len(dataset)} rows of the {dataset_name} dataset have fewer than 2 "
                f"completions and are skipped (no pair to calibrate), e.g. rows {too_few[:5]}.",
                UserWarning,
                stacklevel=2,
            )
        if too_long:
            warnings.warn(
                f"VCB: {len(too_long)} rows of the {dataset_name} dataset have a prompt of at least `max_length` "
                f"({max_length}) tokens, which leaves no completion token, and are skipped, e.g. rows {too_long[:5]}.",
                UserWarning,
                stacklevel=2,
            )
        if len(dropped) == len(dataset):
            raise ValueError(
                f"No usable row in the {dataset_name} dataset: all {len(dataset)} rows have fewer than 2 completions "
                f"(or a prompt that fills `max_length`). VCB compares completions of the same prompt: give each row "
                f"at least 2 entries in `{completions_column}` and `{rewards_column}`."
            )
        if dropped:
            keep = sorted(set(range(len(dataset))) - set(dropped))
            dataset = dataset.select(keep)
            rewards_lists = [rewards_lists[i] for i in keep]
        nonfinite = [sum(not math.isfinite(v) for v in r) for r in rewards_lists]
        if not any(len(r) - k >= 2 for r, k in zip(rewards_lists, nonfinite, strict=True)):
            raise ValueError(
                f"No prompt group of the {dataset_name} dataset has 2 finite rewards: every row of `{rewards_column}` "
                f"has at most one reward that is not NaN/inf/None ({sum(nonfinite)} of "
                f"{sum(len(r) for r in rewards_lists)} are), so VCB would train on a zero loss. Fix the reward "
                "column (score the completions) or drop those rows."
            )
        self.nonfinite_rewards[dataset_name] = sum(nonfinite)
        if sum(nonfinite):
            warnings.warn(
                f"VCB: {sum(nonfinite)} rewards in {sum(1 for k in nonfinite if k)} rows of the {dataset_name} dataset "
                "are NaN/inf. Those completions are masked out of the loss; a group left with fewer than 2 finite "
                "rewards contributes nothing and is counted in the `groups_skipped` metric.",
                UserWarning,
                stacklevel=2,
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [PROMPT_IDS, COMPLETION_IDS, COMPLETION_REWARDS, REF_LOGPS]
            if self.sample_weighted:
                self._signature_columns.append(self.args.sample_weight_column)

    # ------------------------------------------------------------------------------------------------------------------
    # Reference log-probs
    # ------------------------------------------------------------------------------------------------------------------

    def _reference_context(self):
        """Adapters off (or the "ref" adapter) when the reference is the PEFT policy itself."""
        if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(self.model)):
            unwrapped = self.accelerator.unwrap_model(self.model)
            if "ref" in unwrapped.peft_config:
                return use_adapter(unwrapped, adapter_name="ref")
            return adapters_disabled(unwrapped)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _reference_sequence_logps(self, model, input_ids, attention_mask, labels):
        """Summed completion log-probs (N,) of `model` as the reference (no grad, fp32)."""
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
        ):
            logps, _ = sequence_logps(model, input_ids, attention_mask, labels, padding_free=self.padding_free)
        return logps.float()

    def _reference_grid(self, inputs, flat=None) -> torch.Tensor:
        """(G, n_max) float32 reference log-probs of a collated batch: its `ref_logps`, or a reference forward.

        `flat` is `flatten_groups(inputs)` when the caller already has it.
        """
        if "ref_logps" in inputs:
            return inputs["ref_logps"].float()
        if self.precompute_ref_logps:
            raise ValueError(
                "The batch has no `ref_logps` although `precompute_ref_log_probs=True`: the dataset was not prepared "
                "by this trainer. Pass it to the trainer (train/eval dataset) or to `evaluate()` so that it gets them."
            )
        group_mask = inputs["group_mask"].bool()
        input_ids, attention_mask, labels = flat if flat is not None else flatten_groups(inputs)
        model = self.ref_model if self.ref_model is not None else self.model
        values = self._reference_sequence_logps(model, input_ids, attention_mask, labels)
        return values.new_zeros(group_mask.shape).masked_scatter(group_mask.to(values.device), values)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Add a `ref_logps` column (one list per row) computed on every process, sharded, gathered on all ranks.

        TRL's own precompute writes its cache with rank 0 only, which fails for in-memory datasets on several
        processes; `compute_rowwise_distributed` returns the full column on every rank instead.
        """
        if REF_LOGPS in _column_names(dataset):
            return dataset  # the dataset carries them (also a stream): nothing to compute
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model if self.ref_model is not None else self.model
        lengths = [len(r) for r in dataset[COMPLETION_REWARDS]]
        n_max = max(lengths)
        columns = dataset.select_columns([PROMPT_IDS, COMPLETION_IDS, COMPLETION_REWARDS])
        collator = self._vcb_collator()  # called from `DPOTrainer.__init__`, before `self.data_collator` is VCB's
        device = self.accelerator.device

        def compute_fn(indices):
            batch = collator([columns[int(i)] for i in indices])
            group_mask = batch["group_mask"].to(device)
            input_ids, attention_mask, labels = (t.to(device) for t in flatten_groups(batch))
            with self.accelerator.autocast():
                flat = self._reference_sequence_logps(model, input_ids, attention_mask, labels)
            grid = torch.full(group_mask.shape, float("nan"), device=device).masked_scatter(group_mask, flat)
            return torch.nn.functional.pad(grid, (0, n_max - grid.shape[1]), value=float("nan"))

        values = compute_rowwise_distributed(
            self.accelerator, len(dataset), batch_size, compute_fn, desc=f"Computing reference log probs for {name}"
        )
        column = [values[i, :n].tolist() for i, n in enumerate(lengths)]
        return dataset.add_column(REF_LOGPS, column)

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _valid_group_mask(batch) -> torch.Tensor:
        """(G,) True on the groups of a collated batch with at least 2 completions whose reward (and reference
        log-prob) is finite."""
        valid = batch["group_mask"].bool() & torch.isfinite(batch["rewards"])
        if "ref_logps" in batch:
            valid &= torch.isfinite(batch["ref_logps"])
        return valid.sum(dim=1) >= 2

    def _group_weights(self, batch) -> torch.Tensor:
        """(G,) float32 sample weights of a collated batch's groups (all 1 without a weight column)."""
        if GROUP_WEIGHTS in batch:
            return batch[GROUP_WEIGHTS].float()
        if self.sample_weighted:
            raise ValueError(
                f"The data collator returned no `{GROUP_WEIGHTS}` although the train dataset has the sample weight "
                f"column `{self.args.sample_weight_column}`: a custom collator must return them (see "
                "`DataCollatorForVCB(sample_weight_column=...)`), or drop the column."
            )
        return torch.ones(batch["group_mask"].shape[0])

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their valid groups over all processes.

        The count (with sample weights: the sum of the weights of the valid groups) is returned as
        `num_items_in_batch`: `_compute_vcb_loss` divides the (weighted) sum of the group losses of each micro-batch
        by it (times the number of processes, since DDP averages gradients), so the step's loss is the (weighted) mean
        over all its valid groups whatever the micro-batch / process layout.

        With an `IterableDataset` (not checked at init), a first optimizer step without any valid group raises on
        every process at once (the count is the same everywhere): the reward column is most likely unusable.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        sums = torch.zeros(2, dtype=torch.float64)  # valid groups, their summed weights
        for batch in batch_samples:
            valid = self._valid_group_mask(batch)
            sums += torch.stack([valid.sum(), (self._group_weights(batch) * valid).sum()]).double().cpu()
        sums = sums.to(device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.gather(sums.reshape(1, 2)).sum(dim=0)
        count, total = sums[0], sums[1]
        if (
            self.state.global_step == 0
            and isinstance(self.train_dataset, IterableDataset)
            and batch_samples
            and count.item() == 0
        ):
            rewards_column = self.args.rewards_column
            raise ValueError(
                f"The first optimizer step of the train dataset (an IterableDataset) has no prompt group with 2 finite "
                f"rewards in `{rewards_column}`: every reward is NaN/inf/None or at most one per row is finite, so "
                "VCB would train on a zero loss. Fix the reward column, or filter out the rows with fewer than 2 "
                "finite rewards."
            )
        return batch_samples, total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, grid = self._compute_vcb_loss(model, inputs, num_items_in_batch)
        return (loss, {"policy_logps": grid}) if return_outputs else loss

    def _vcb_kwargs(self) -> dict:
        """The config fields shared by `vcb_loss` and `vcb_pair_stats`."""
        args = self.args
        return dict(
            gamma=args.gamma,
            pair_mode=args.pair_mode,
            sigma_eps_abs=args.sigma_eps_abs,
            sigma_eps_rel=args.sigma_eps_rel,
        )

    def _compute_vcb_loss(self, model, inputs, num_items_in_batch):
        mode = "train" if self.model.training else "eval"
        group_mask = inputs["group_mask"].bool()
        flat = flatten_groups(inputs)  # (N, T) input_ids, attention_mask, labels
        input_ids, attention_mask, labels = flat

        # (N,) float32, with a graph
        values, _ = sequence_logps(model, input_ids, attention_mask, labels, padding_free=self.padding_free)
        policy = values.new_zeros(group_mask.shape).masked_scatter(group_mask, values)  # (G, n_max)
        ref = self._reference_grid(inputs, flat).to(policy.device)
        rewards = inputs["rewards"].float()
        args = self.args
        # (G,), 0 (with a graph) for groups with < 2 valid completions
        per_group = vcb_loss(
            policy, ref, rewards, lam=args.lam, mask=group_mask, reduction="none", **self._vcb_kwargs()
        )
        valid = group_mask & torch.isfinite(rewards) & torch.isfinite(ref) & torch.isfinite(policy.detach())
        weights = self._group_weights(inputs).to(per_group.device)
        local_weight = float((weights * (valid.sum(dim=1) >= 2)).sum())
        per_group = per_group * weights  # the sample weights (all 1 without a weight column)

        if mode == "train" and num_items_in_batch is not None:
            # (Weighted) mean over the valid groups of the whole optimizer step (all micro-batches, all processes).
            denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=per_group.device)
            loss = per_group.sum() * self.accelerator.num_processes / denom if denom > 0 else per_group.sum() * 0.0
        else:
            loss = per_group.sum() / local_weight if local_weight > 0 else per_group.sum() * 0.0
            if mode == "train":
                # Not called through `get_batch_samples` (e.g. a custom loop): per-micro-batch mean, scaled for GA.
                if not self._warned_fallback:
                    logger.warning(
                        "VCBTrainer.compute_loss got no step-wide group count; using the per-micro-batch mean."
                    )
                    self._warned_fallback = True
                loss = loss / getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)

        self._record_metrics(
            mode, policy.detach(), ref, rewards, group_mask, valid, attention_mask, per_group.detach(), local_weight
        )
        return loss, policy.detach()

    # ------------------------------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_metrics(self, mode, policy, ref, rewards, group_mask, valid, attention_mask, per_group, weight_sum):
        stats = vcb_pair_stats(policy, ref, rewards, mask=group_mask, **self._vcb_kwargs())
        logratio = torch.where(valid, policy - ref, torch.zeros_like(policy))
        real_groups = group_mask.any(dim=1)
        values = {
            **stats,
            "logratio_sum": logratio.sum(),
            "num_valid": valid.sum(),
            "groups_skipped": (real_groups & (valid.sum(dim=1) < 2)).sum(),
            "masked_completions": (group_mask & ~valid).sum(),
            "num_tokens": attention_mask.sum(),
            "loss_sum": per_group.sum(),
            "weight_sum": torch.tensor(weight_sum),
        }
        vec = torch.stack([values[k].float().to(policy.device) for k in _STAT_KEYS])
        if self.accelerator.num_processes > 1:
            vec = self.accelerator.gather(vec).reshape(-1, len(_STAT_KEYS)).sum(dim=0)
        self._vcb_sums[mode] += vec.double().cpu()

    def _vcb_logs(self, mode: str) -> dict[str, float]:
        s = dict(zip(_STAT_KEYS, self._vcb_sums[mode].tolist(), strict=True))
        logs = {}
        if s["num_pairs"] > 0:
            logs["calibration_error"] = s["calib_abs_sum"] / s["num_pairs"]
        if s["agree_count"] > 0:
            logs["pair_agreement"] = s["agree_sum"] / s["agree_count"]
        if s["num_groups"] > 0:
            logs["sigma"] = s["sigma_sum"] / s["num_groups"]
        if s["num_valid"] > 0:
            logs["logratio"] = s["logratio_sum"] / s["num_valid"]
        if mode == "train":
            for key in _CUMULATIVE_KEYS:
                self._vcb_cumulative[key] += s[key]
                logs[key] = self._vcb_cumulative[key]
        else:
            logs["groups_skipped"] = s["groups_skipped"]
            logs["masked_completions"] = s["masked_completions"]
            if s["weight_sum"] > 0:
                # The (weighted) mean over every valid group of the evaluation, gathered over processes. It replaces
                # the Trainer's, which averages per-batch means: each batch counts as `per_device_eval_batch_size`
                # groups (the last one too, unless the dataset has a length), so it depends on the batching.
                logs["loss"] = s["loss_sum"] / s["weight_sum"]
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if self._vcb_sums[mode].any():
            extra = self._vcb_logs(mode)
            if mode == "eval":
                # `evaluate()` names its keys `{metric_key_prefix}_runtime` (e.g. `eval_<name>_` for a dict of
                # eval datasets): reuse that prefix so the VCB metrics of each split stay apart.
                prefix = next((k[: -len("runtime")] for k in logs if k.endswith("_runtime")), "eval_")
                extra = {f"{prefix}{key}": value for key, value in extra.items()}
            logs.update(extra)  # in place: `evaluate()` returns this dict
            self._vcb_sums[mode].zero_()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------------------------------
    # Checkpoints: the cumulative training metrics continue after `resume_from_checkpoint`
    # ------------------------------------------------------------------------------------------------------------------

    def _cumulative_counters(self) -> dict[str, float]:
        # Totals up to this step: the logged ones plus the window not logged yet.
        pending = dict(zip(_STAT_KEYS, self._vcb_sums["train"].tolist(), strict=True))
        return {key: self._vcb_cumulative[key] + pending[key] for key in _CUMULATIVE_KEYS}

    def _restore_cumulative_counters(self, counters: dict[str, float]) -> None:
        self._vcb_cumulative = {key: float(counters.get(key, 0.0)) for key in _CUMULATIVE_KEYS}
        self._vcb_sums["train"].zero_()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def _first_row(dataset, name: str, args) -> dict:
    return first_row(
        dataset,
        f"{name} dataset",
        f"VCB needs at least one prompt group: a row with a `prompt`, its `{args.completions_column}` (at least 2) and "
        f"their `{args.rewards_column}`.",
    )


def _column_names(dataset, first_example=None) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names:
        return list(names)
    if first_example is None:
        first_example = next(iter(dataset))
    return list(first_example.keys())


def _tokenize_group(example, idx, processing_class, completions_column, rewards_column, has_ref):
    prompt = example["prompt"]
    completions = example[completions_column]
    rewards = example[rewards_column]
    if not isinstance(completions, (list, tuple)):
        raise ValueError(
            f"Row {idx}: `{completions_column}` must be a list of completions, got {type(completions).__name__}."
        )
    if not isinstance(rewards, (list, tuple)):
        raise ValueError(
            f"Row {idx}: `{rewards_column}` must be a list with one reward per completion, got {rewards!r:.80} "
            f"({type(rewards).__name__})."
        )
    if len(completions) != len(rewards):
        raise ValueError(
            f"Row {idx}: `{completions_column}` has {len(completions)} entries but `{rewards_column}` has "
            f"{len(rewards)}. Give exactly one reward per completion, in the same order."
        )
    where = f"Row {idx}: `{rewards_column}`"
    values = [to_float(v, where) for v in rewards]
    ref = None
    if has_ref:
        ref = example[REF_LOGPS]
        if not isinstance(ref, (list, tuple)) or len(ref) != len(completions):
            got = len(ref) if isinstance(ref, (list, tuple)) else type(ref).__name__
            raise ValueError(
                f"Row {idx}: `{REF_LOGPS}` must hold one reference log-prob per completion: `{completions_column}` "
                f"has {len(completions)} entries but `{REF_LOGPS}` has {got}."
            )

    tools = example.get("tools")
    if isinstance(tools, str):
        import json

        tools = json.loads(tools)
    template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    prompt_ids, completion_ids = tokenize_prompt_completions(
        processing_class, prompt, completions, row=idx, **template_kwargs
    )
    output = {
        PROMPT_IDS: prompt_ids,
        COMPLETION_IDS: completion_ids,
        COMPLETION_REWARDS: values,
    }
    if has_ref:
        output[REF_LOGPS] = [to_float(v, f"Row {idx}: `{REF_LOGPS}`", "reference log-prob") for v in ref]
    return output
