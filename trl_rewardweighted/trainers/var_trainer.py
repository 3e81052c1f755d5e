"""VAR: reward-weighted SFT from the variational view of RLHF (arXiv 2502.11026).

The loss is `-sum_i w_i log pi_theta(y_i|x_i)` with `w = softmax(r / beta + log pi_ref(y|x))` over the batch
(`ref_weighting=False`: `softmax(r / beta)`). See `docs/var.md`.
"""

from __future__ import annotations

import contextlib
import copy
import json
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
from ..losses import var_log_weights, var_prompt_weights, weighted_nll
from ..model_utils import (
    CheckpointedCountersMixin,
    KeepFloat32InputsMixin,
    adapters_disabled,
    compute_rowwise_distributed,
    ensure_fused_lm_head,
    sequence_logps,
    warn_if_padding_free_attention_is_dense,
)
from .common import TrainerInitMixin
from .var_config import DEFAULT_SAMPLE_WEIGHT_COLUMN, VARConfig

__all__ = [
    "VARTrainer",
    "DataCollatorForVAR",
    "PromptGroupSampler",
    "check_sample_weights",
    "even_batches_repeats",
    "group_slot_size",
    "prompt_group_ids",
    "unpack_examples",
]

REF_LOGPS_COLUMN = "ref_logps"
# z_scope="prompt": the trainer adds each row's prompt-group index and its row index to the prepared datasets.
GROUP_ID_COLUMN = "_var_group"
ROW_ID_COLUMN = "_var_row"
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

    With a sample-weight field (`sample_weight_column`) the batch also holds `sample_weights` (same dtype; a negative,
    NaN, infinite or missing value is refused naming the row of the batch), and with the prompt-group fields the
    trainer adds for `z_scope="prompt"`, `group_ids` and `row_ids` (int64).

    Args:
        base_collator (`Callable`):
            The language-modeling collator that builds `input_ids`, `attention_mask` and `labels`.
        reward_column (`str`, *optional*, defaults to `"reward"`):
            Name of the reward field of each example.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float64`):
            Dtype of the `rewards`, `ref_logps` and `sample_weights` tensors (float32 on devices without float64,
            such as MPS).
        sample_weight_column (`str` or `None`, *optional*, defaults to `None`):
            Name of the sample-weight field; `None` (or an example without it) gives no `sample_weights`.
    """

    def __init__(
        self,
        base_collator,
        reward_column: str = "reward",
        dtype: torch.dtype = torch.float64,
        sample_weight_column: str | None = None,
    ):
        self.base_collator = base_collator
        self.reward_column = reward_column
        self.dtype = dtype
        self.sample_weight_column = sample_weight_column

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
        weight_column = self.sample_weight_column
        pack_ids = None
        if "seq_lengths" in examples[0]:
            examples, pack_ids = unpack_examples(
                examples, [c for c in (self.reward_column, REF_LOGPS_COLUMN, weight_column) if c is not None]
            )
        batch = self.base_collator(examples)
        _check_one_row_per_example(batch, len(examples))
        if pack_ids is not None:
            batch["pack_ids"] = torch.tensor(pack_ids, dtype=torch.long)
        batch["rewards"] = self._floats([ex[self.reward_column] for ex in examples], self.reward_column, "reward")
        if REF_LOGPS_COLUMN in examples[0]:
            batch[REF_LOGPS_COLUMN] = self._floats(
                [ex[REF_LOGPS_COLUMN] for ex in examples], REF_LOGPS_COLUMN, "reference log-prob"
            )
        if weight_column is not None and weight_column in examples[0]:
            weights = self._floats([ex[weight_column] for ex in examples], weight_column, "sample weight")
            bad = (~torch.isfinite(weights) | (weights < 0)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"Column `{weight_column}`, rows {bad} of a batch: sample weights {weights[bad].tolist()}. "
                    "Sample weights must be finite numbers >= 0 (0 leaves a row out)."
                )
            batch["sample_weights"] = weights
        if GROUP_ID_COLUMN in examples[0]:
            batch["group_ids"] = torch.tensor([int(ex[GROUP_ID_COLUMN]) for ex in examples], dtype=torch.long)
            batch["row_ids"] = torch.tensor([int(ex[ROW_ID_COLUMN]) for ex in examples], dtype=torch.long)
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


def prompt_group_ids(keys: list[Any], column: str) -> list[int]:
    """Integer group ids (0, 1, ... in order of first appearance) for per-row group keys.

    Equal keys share an id: prompts (strings, or message lists compared by their JSON form) or the values of a group
    column. A missing key (`None`) is refused, naming the rows.

    Args:
        keys (`list`):
            One key per row.
        column (`str`):
            Name of the column the keys come from (for the error message).

    Returns:
        `list[int]`: One group id per row.

    Example:

    ```python
    >>> prompt_group_ids(["a", "b", "a", [{"role": "user", "content": "a"}]], "prompt")
    [0, 1, 0, 2]
    ```
    """
    missing = [i for i, key in enumerate(keys) if key is None]
    if missing:
        raise ValueError(
            f"Column `{column}` has no value in rows {_listed(missing)}: with z_scope='prompt' every row needs a "
            "prompt group. Fill it in, or drop those rows."
        )
    index: dict[Any, int] = {}
    ids = []
    for key in keys:
        if isinstance(key, (list, dict)):
            key = ("json", json.dumps(key, sort_keys=True, ensure_ascii=False, default=str))
        ids.append(index.setdefault(key, len(index)))
    return ids


def group_slot_size(max_group: int, step_rows: int) -> int:
    """Rows each prompt group takes in an optimizer step of `step_rows` rows: the smallest divisor of `step_rows`
    that holds the largest group (`max_group` rows), so that whole groups fill every step exactly.

    Example:

    ```python
    >>> group_slot_size(3, 8), group_slot_size(4, 8), group_slot_size(5, 12)
    (4, 4, 6)
    ```
    """
    if max_group > step_rows:
        raise ValueError(f"A group of {max_group} rows does not fit a step of {step_rows} rows.")
    return next(d for d in range(max(1, max_group), step_rows + 1) if step_rows % d == 0)


class PromptGroupSampler(torch.utils.data.Sampler):
    """Sampler that keeps the rows of each prompt group together in one optimizer step (VAR `z_scope="prompt"`).

    Each epoch the groups are shuffled (a generator seeded with `seed + epoch`, like accelerate's seedable sampler,
    so every process draws the same order and a resumed run the same epoch) and each group is laid out in a slot of
    `slot_size` consecutive indices: its rows, then repeats of its own rows up to `slot_size` (the trainer gives
    repeats weight 0). With `slot_size` a divisor of the rows of an optimizer step, the step (`per_device_batch x
    accumulation x processes` consecutive indices, in the order accelerate hands them out) holds whole groups only.
    The epoch is then padded with repeats of the last group's rows to a multiple of `round_size`
    (`per_device_batch x processes`), so that accelerate never completes the last batches with rows of other steps.

    Args:
        group_ids (`list[int]`):
            Group id of each dataset row.
        slot_size (`int`):
            Indices per group (at least the largest group), see [`group_slot_size`].
        round_size (`int`, *optional*, defaults to `1`):
            The epoch's length is a multiple of it.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffle.
        shuffle (`bool`, *optional*, defaults to `True`):
            Shuffle the groups each epoch (`False`: groups in order of first appearance).

    Example:

    ```python
    >>> list(PromptGroupSampler([0, 0, 1, 2, 2], slot_size=2, round_size=4, shuffle=False))
    [0, 1, 2, 2, 3, 4, 3, 4]
    ```
    """

    def __init__(self, group_ids: list[int], slot_size: int, round_size: int = 1, seed: int = 0, shuffle: bool = True):
        groups: dict[int, list[int]] = {}
        for row, group in enumerate(group_ids):
            groups.setdefault(int(group), []).append(row)
        self.groups = list(groups.values())
        largest = max((len(rows) for rows in self.groups), default=0)
        if slot_size < largest:
            raise ValueError(f"slot_size={slot_size} is smaller than the largest group ({largest} rows).")
        self.slot_size = slot_size
        self.round_size = round_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        length = len(self.groups) * self.slot_size
        return length + (-length % self.round_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.groups), generator=generator).tolist()
        else:
            order = list(range(len(self.groups)))
        for g in order:
            rows = self.groups[g]
            yield from rows
            for j in range(self.slot_size - len(rows)):
                yield rows[j % len(rows)]
        if order:
            last = self.groups[order[-1]]
            for j in range(len(self) - len(self.groups) * self.slot_size):
                yield last[j % len(last)]
        self.epoch += 1  # the next epoch differs even if `set_epoch` is not called


def check_sample_weights(values: list[Any], column: str, label: str) -> None:
    """Refuse sample weights that are missing, not finite, negative, or all zero, naming the rows.

    Args:
        values (`list`):
            The column's values, one per row.
        column (`str`):
            Name of the column (for the message).
        label (`str`):
            Which dataset, e.g. `"train"` (for the message).
    """
    weights = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    for rows, what in (
        (np.flatnonzero(~np.isfinite(weights)), "NaN, infinite or missing"),
        (np.flatnonzero(weights < 0), "negative"),
    ):
        if rows.size:
            raise ValueError(
                f"Column `{column}` of the {label} dataset has {what} sample weights in rows {_listed(rows.tolist())} "
                f"(values {weights[rows[:_MAX_LISTED_ROWS]].tolist()}). Sample weights must be finite numbers >= 0; "
                "a weight of 0 leaves a row out. Fix the column, or set `sample_weight_column=None`."
            )
    if weights.size and not (weights > 0).any():
        raise ValueError(
            f"Every value of column `{column}` of the {label} dataset is 0 ({weights.size} rows): no row would get a "
            "weight. Fix the column, or set `sample_weight_column=None`."
        )


_FLOAT32_KEYS = ("rewards", REF_LOGPS_COLUMN, "var_weights", "sample_weights")


class VARTrainer(TrainerInitMixin, CheckpointedCountersMixin, KeepFloat32InputsMixin, SFTTrainer):
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

    _config_class = VARConfig
    _default_output_suffix = "VAR"
    _refused_arguments = {
        name: f"VARTrainer does not support `{name}`: its forward runs TRL's fused LM head, which computes the "
        "completion log-probs without ever building the logits that `compute_metrics` and "
        "`preprocess_logits_for_metrics` receive. VAR logs `eval_loss`, `eval_nll`, `eval_mean_token_accuracy`, "
        "`eval_entropy` and the weight statistics `eval_var/ess`, `eval_var/max_weight` and `eval_var/weighted_reward` "
        "instead; compute other metrics from generations, e.g. in a `TrainerCallback`."
        for name in ("compute_metrics", "preprocess_logits_for_metrics")
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
        self._construct(locals())

    def _check_arguments(self, arguments):
        args, train_dataset, eval_dataset = arguments["args"], arguments["train_dataset"], arguments["eval_dataset"]
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
        self._var_sample_weight_column = self._check_sample_weight_columns(train_dataset, eval_dataset, args)
        if args.z_scope == "prompt":
            self._check_group_columns([("train", train_dataset), *self._as_dict(eval_dataset).items()], args)
        # z_scope="prompt": rows per group slot in the sampler, rows per sampler round, and each group's size.
        self._var_slot_size = 1
        self._var_round_size = 1
        self._var_group_sizes: torch.Tensor | None = None
        ref_model = arguments["ref_model"]
        if isinstance(ref_model, str):
            # Loaded like the DPO-based trainers load theirs: `model_init_kwargs`, `trust_remote_code`, no device map
            # when distributed.
            ref_model = self._resolved_ref_model(arguments)
        del arguments["ref_model"]  # kept here for the pre-pass: `SFTTrainer` takes no reference model
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

    def _hidden_from_base_init(self, args):
        # Padding-free forwards are run here (`sequence_logps(padding_free=True)`), on SFT's padded collator, and
        # packing is done here (after the reference pre-pass, keeping each row's reward): SFT must do neither.
        return {"padding_free": False, "packing": False, "eval_packing": False}

    def _after_base_init(self, args):
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
            self.data_collator = DataCollatorForVAR(
                self.data_collator, args.reward_column, dtype, self._var_sample_weight_column
            )
        if not args.packing and args.z_scope != "prompt":  # packs hold a varying number of rows
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
        if args.z_scope == "prompt":
            self.train_dataset = self._add_group_columns(self.train_dataset)
            self._plan_prompt_groups(self.train_dataset[GROUP_ID_COLUMN])
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._add_group_columns(v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._add_group_columns(self.eval_dataset)
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
    def _step_normalised(self) -> bool:
        """Whether the weights are normalised over the whole optimizer step ("step"; "prompt": each prompt's rows sum
        to 1 and the step's prompts are averaged), so that micro-batch losses add up to the step's loss."""
        return self.args.z_scope in ("step", "prompt")

    @property
    def loss_is_scaled_for_ga(self) -> bool:
        # "step" / "prompt": the micro-batch losses add up to the step's loss (no division by the number of
        # accumulation steps). "micro_batch": each micro-batch is a mean; the Trainer averages them over accumulation
        # steps.
        return self._step_normalised

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
                stacklevel=5,  # the caller of `__init__`
            )

    @staticmethod
    def _column_names(dataset, label: str) -> list[str]:
        names = getattr(dataset, "column_names", None)
        return list(names) if names is not None else list(first_row(dataset, f"{label} dataset"))

    def _check_sample_weight_columns(self, train_dataset, eval_dataset, args: VARConfig) -> str | None:
        """The sample-weight column to use (None: no weights) after checking its values in every dataset holding it.

        The train dataset decides: the column is used when it has it (evaluation datasets then use theirs when they
        have it, weight 1 otherwise). A name other than the default must exist in the train dataset.
        """
        name = args.sample_weight_column
        if name is None:
            return None
        columns = self._column_names(train_dataset, "train")
        if name not in columns:
            if name != DEFAULT_SAMPLE_WEIGHT_COLUMN:
                raise ValueError(
                    f"VARConfig.sample_weight_column={name!r}, but the train dataset has no such column (columns: "
                    f"{columns}). Add the column, or set `sample_weight_column=None` to train without sample weights."
                )
            return None
        fix = f"Sample weights (`sample_weight_column={name!r}`) must be numbers >= 0."
        for label, ds in [("train", train_dataset), *self._as_dict(eval_dataset).items()]:
            if name not in self._column_names(ds, label):
                continue
            check_float_column(ds, name, fix)
            if isinstance(ds, Dataset):  # streams are checked batch by batch by the collator
                check_sample_weights(ds[name], name, label)
        return name

    @staticmethod
    def _check_group_columns(datasets: list[tuple[str, Any]], args: VARConfig) -> None:
        """z_scope="prompt": map-style datasets only (`(label, dataset)` pairs), each with the column that names the
        prompt groups."""
        column = args.group_column or "prompt"
        for label, ds in datasets:
            if not isinstance(ds, Dataset):
                raise ValueError(
                    f"VARConfig.z_scope='prompt' needs map-style datasets, but the {label} dataset is an "
                    f"{type(ds).__name__}: the prompt groups are found, and kept together in one optimizer step, before "
                    "training. Load it as a `Dataset`, or use z_scope='step'."
                )
            if column not in ds.column_names:
                how = (
                    f"set `group_column` to the column that names each row's prompt, or add `{column}`"
                    if args.group_column is None
                    else "add it, or set `group_column=None` to group rows with identical prompts"
                )
                raise ValueError(
                    f"VARConfig.z_scope='prompt' groups rows by the `{column}` column, but the {label} dataset has none "
                    f"(columns: {ds.column_names}): {how}."
                )

    def _add_group_columns(self, dataset: Dataset) -> Dataset:
        """Add each row's prompt-group id and its row index (z_scope="prompt")."""
        column = self.args.group_column or "prompt"
        ids = prompt_group_ids(dataset[column], column)
        dataset = dataset.remove_columns([c for c in (GROUP_ID_COLUMN, ROW_ID_COLUMN) if c in dataset.column_names])
        return dataset.add_column(GROUP_ID_COLUMN, ids).add_column(ROW_ID_COLUMN, list(range(len(ids))))

    def _plan_prompt_groups(self, group_ids: list[int]) -> None:
        """Size the sampler's group slots for the step layout; refuse groups larger than a step, warn about lone rows
        and about the repeats that pad groups to their slot."""
        args = self.args
        processes = self.accelerator.num_processes
        step_rows = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        layout = (
            f"per_device_train_batch_size={args.per_device_train_batch_size} x gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} x {processes} process(es)"
        )
        sizes = np.bincount(np.asarray(group_ids, dtype=np.int64))
        column = args.group_column or "prompt"
        largest = int(sizes.max())
        if largest > step_rows:
            g = int(sizes.argmax())
            rows = [i for i, gid in enumerate(group_ids) if gid == g]
            raise ValueError(
                f"VAR z_scope='prompt': the prompt group of rows {_listed(rows)} (same `{column}`) has {largest} rows, "
                f"but an optimizer step holds {step_rows} rows ({layout}). A prompt's rows are normalised together "
                f"and must fit in one step: raise the step to at least {largest} rows, or split such groups."
            )
        self._var_slot_size = group_slot_size(largest, step_rows)
        self._var_round_size = args.per_device_train_batch_size * processes
        self._var_group_sizes = torch.as_tensor(sizes, dtype=torch.long)
        lone = int((sizes == 1).sum())
        if lone:
            warnings.warn(
                f"VAR z_scope='prompt': {lone} of {sizes.size} prompt groups have a single row: each such row gets "
                "weight 1 within its prompt (plain SFT on that reply, its reward has no effect). Per-prompt "
                "normalisation needs several scored replies per prompt.",
                UserWarning,
                stacklevel=5,  # the caller of `__init__`
            )
        slots = sizes.size * self._var_slot_size
        repeats = slots - len(group_ids)
        if repeats > 0:
            warnings.warn(
                f"VAR z_scope='prompt': prompt groups have {int(sizes.min())} to {largest} rows; each fills a slot of "
                f"{self._var_slot_size} rows (the smallest divisor of the {step_rows}-row step that holds the largest "
                f"group), padded with repeats of its own rows (weight 0): {repeats} repeated row(s) per epoch, "
                f"{repeats / slots:.0%} of the rows computed. Groups of one size that divides the step ({layout}) "
                "need none.",
                UserWarning,
                stacklevel=5,  # the caller of `__init__`
            )

    def _get_train_sampler(self, train_dataset=None):
        if self.args.z_scope != "prompt":
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PromptGroupSampler(dataset[GROUP_ID_COLUMN], self._var_slot_size, self._var_round_size, seed)

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
                stacklevel=5,  # the caller of `__init__`
            )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            wanted = [self.args.reward_column, REF_LOGPS_COLUMN, self._var_sample_weight_column]
            if self.args.z_scope == "prompt":
                wanted += [GROUP_ID_COLUMN, ROW_ID_COLUMN]
            extra = [c for c in wanted if c is not None and c not in self._signature_columns]
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
        kept = (self.args.reward_column, REF_LOGPS_COLUMN, self._var_sample_weight_column)
        columns = [c for c in kept if c is not None and c in dataset.column_names]
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
                label = "eval" if key == "eval" else f"eval {key!r}"
                self._check_not_empty(ds, label, self.args.reward_column)
                check_float_column(ds, self.args.reward_column, fix)
                weight_column = self._var_sample_weight_column
                if weight_column is not None and weight_column in self._column_names(ds, label):
                    check_float_column(ds, weight_column, "Sample weights must be numbers >= 0.")
                    if isinstance(ds, Dataset):
                        check_sample_weights(ds[weight_column], weight_column, label)
                if self.args.z_scope == "prompt":
                    self._check_group_columns([(label, ds)], self.args)
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
                if self.args.z_scope == "prompt":
                    ds = self._add_group_columns(ds)
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
        """A `(B, 7)` float64 table of a collated micro-batch: reward, reference term (0 when unused), whether the row
        has a completion token, whether it is left out of the normaliser (a repeat added by `even_batches` or by the
        prompt-group sampler), sample weight (1 when there is none), prompt-group id and row index (-1 when there are
        none)."""
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

        def column(key, fill):
            value = batch.get(key)
            return torch.full_like(rewards, fill) if value is None else value.to(rewards)

        columns = [
            rewards,
            ref,
            (num_tokens > 0).to(rewards),
            repeats.to(rewards),
            column("sample_weights", 1.0),
            column("group_ids", -1.0),
            column("row_ids", -1.0),
        ]
        return torch.stack(columns, dim=1)

    @staticmethod
    def _valid_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a row table that belong to the normaliser (`real`), and those of them that can be weighted
        (a completion token, a finite reward and reference term): `real & ~valid` rows are counted as skipped. A
        sample weight of 0 does not make a row invalid, it only gives it weight 0."""
        real = table[:, 3] == 0
        valid = real & (table[:, 2] > 0) & torch.isfinite(table[:, 0]) & torch.isfinite(table[:, 1])
        return real, valid

    def _log_weights(self, table: torch.Tensor) -> torch.Tensor:
        """Centred log-weights (float32, -inf on rows outside the normaliser or with sample weight 0) of a row table.
        A sample weight of 1 adds exactly 0, so data without sample weights give the same log-weights bit for bit."""
        real, _ = self._valid_rows(table)
        ref = table[:, 1] if self.args.ref_weighting else None
        return var_log_weights(
            table[:, 0], self.args.beta, ref, mask=(table[:, 2] > 0) & real, sample_weights=table[:, 4]
        )

    def _prompt_weights(self, table: torch.Tensor) -> tuple[torch.Tensor, list[tuple[float, float, float]]]:
        """z_scope="prompt": per-prompt softmax weights of a row table divided by the number of prompts that keep a
        weight (so the micro-batch losses add up to the mean over prompts), and each such prompt's statistics."""
        real, _ = self._valid_rows(table)
        ref = table[:, 1] if self.args.ref_weighting else None
        groups = table[:, 5].long()
        w = var_prompt_weights(
            table[:, 0], self.args.beta, groups, ref, mask=(table[:, 2] > 0) & real, sample_weights=table[:, 4]
        )
        kept = torch.unique(groups[w > 0])
        stats = [self._weight_stats(torch.log(w[groups == g]), table[groups == g, 0]) for g in kept.tolist()]
        return w / max(kept.numel(), 1), stats

    @staticmethod
    def _mark_sampler_repeats(table: torch.Tensor) -> torch.Tensor:
        """Mark the later occurrences of a row index within a step as repeats (the prompt-group sampler pads groups
        with their own rows); the first occurrence keeps the row's weight."""
        rows = table[:, 6]
        out = table[:, 3] == 0
        same = (rows[:, None] == rows[None, :]) & out[:, None] & out[None, :] & (rows[:, None] >= 0)
        later = torch.tril(same, diagonal=-1).any(dim=1)
        table = table.clone()
        table[later, 3] = 1.0
        return table

    def _check_whole_groups(self, table: torch.Tensor) -> None:
        """Refuse a step that holds only part of a prompt group's rows (z_scope="prompt" during training)."""
        if self._var_group_sizes is None:
            return
        real, _ = self._valid_rows(table)
        groups = table[real, 5].long()
        if (groups < 0).any():
            raise RuntimeError("z_scope='prompt' but a training batch carries no prompt-group ids (internal error).")
        sizes = self._var_group_sizes.to(groups.device)
        counts = torch.bincount(groups, minlength=sizes.numel())
        split = ((counts > 0) & (counts != sizes)).nonzero().flatten().tolist()
        if split:
            g = split[0]
            raise ValueError(
                f"VAR z_scope='prompt': an optimizer step holds {int(counts[g])} of the {int(sizes[g])} rows of prompt "
                f"group {g} ({len(split)} group(s) split): a prompt's rows must all be in one step to be normalised "
                "together. VARTrainer's own sampler keeps them together; a custom train dataloader or sampler, or a "
                "train dataset changed after the trainer was built, breaks that."
            )

    def _even_batches_repeats(self, num_local: int) -> torch.Tensor | None:
        """Repeats in this process's last micro-batch of the epoch (see [`even_batches_repeats`]); None if none.

        With z_scope="prompt" the sampler pads every epoch to whole rounds of batches, so accelerate repeats nothing
        (its remainder, computed from the dataset length, does not describe the sampler's epoch)."""
        acc = self.accelerator
        state = acc.gradient_state
        if self.args.z_scope == "prompt":
            return None
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
        scope = self.args.z_scope
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
        if self._step_normalised:
            all_rows, offset = self._gather_rows(torch.cat(tables))
            if scope == "prompt":
                all_rows = self._mark_sampler_repeats(all_rows)
                self._check_whole_groups(all_rows)
            groups = [all_rows]
        else:
            groups = tables
        real_valid = [self._valid_rows(t) for t in groups]
        # Decide on validity with the same information on every process, so all raise together (no hang).
        num_valid = torch.stack([valid.sum() for _, valid in real_valid])
        num_real = torch.stack([real.sum() for real, _ in real_valid])
        if scope == "micro_batch" and acc.num_processes > 1:
            num_valid = acc.gather(num_valid)
            num_real = acc.gather(num_real)
        if ((num_valid == 0) & (num_real > 0)).any():
            raise ValueError(
                f"A VAR normalisation batch (z_scope={scope!r}) has no valid row: every reward in it is "
                f"NaN/inf/None, every reference log-prob is non-finite, or every completion is empty. Drop such rows "
                f"from the dataset (column `{self.args.reward_column}`), or use a larger batch / z_scope='step'."
            )
        stats = []  # (ess, max weight, weighted reward) per normaliser; NaN for one without any weight
        weights = []
        if scope == "prompt":
            w, stats = self._prompt_weights(groups[0])
            weights.append(w)
            self._metrics["train"]["var/prompts"].append(float(len(stats)))
        else:
            for table in groups:
                lw = self._log_weights(table)
                if torch.isfinite(lw).any():
                    weights.append(torch.softmax(lw, dim=0))
                    stats.append(self._weight_stats(lw, table[:, 0]))
                else:  # only rows repeated by `even_batches`, or sample weights of 0: no weight
                    weights.append(torch.zeros_like(lw))
                    stats.append((math.nan, math.nan, math.nan))
        if self._step_normalised:
            local_w = weights[0][offset : offset + sum(sizes)]
            weights = list(torch.split(local_w, sizes))
        for batch, w in zip(batch_samples, weights):
            batch["var_weights"] = w.detach()
        self._var_rows_skipped += int((num_real - num_valid).sum().item())
        stats = torch.tensor(stats or [(math.nan,) * 3], dtype=torch.float64, device=acc.device)
        if scope == "micro_batch" and acc.num_processes > 1:
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
        """Weights normalised over one micro-batch (evaluation, or `compute_loss` called outside the training loop);
        with z_scope="prompt", per prompt within the micro-batch, divided by its number of prompts."""
        table = self._row_table(inputs)
        if self.args.z_scope == "prompt":
            if "group_ids" not in inputs:
                raise ValueError(
                    "z_scope='prompt' but this batch has no prompt-group ids: datasets given to VARTrainer (at init or "
                    "to `evaluate`) get them when they are prepared; a batch built by hand needs `group_ids` (int64)."
                )
            w, stats = self._prompt_weights(table)
        else:
            log_e = self._log_weights(table)
            if not torch.isfinite(log_e).any():
                return torch.zeros_like(log_e)
            w = torch.softmax(log_e, dim=0)
            stats = [self._weight_stats(log_e, inputs["rewards"])]
        if stats:
            ess, max_w, weighted_reward = np.mean(np.asarray(stats, dtype=np.float64), axis=0).tolist()
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
        for key in (REF_LOGPS_COLUMN, "pack_ids", "sample_weights", "group_ids", "row_ids"):
            inputs.pop(key, None)
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
        if mode == "train" and self._step_normalised:
            # The weights sum to 1 (per prompt, divided by the step's number of prompts with "prompt") over all
            # processes; DDP averages gradients across processes, so undo that average.
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
