"""Reward-augmented DPO (Zhang et al., "Reward-Augmented Data Enhances Direct Preference Alignment of LLMs",
arXiv 2410.08067, ICML 2025).

The training pairs are relabeled once, before tokenisation, with goal-conditioned prompts
(`trl_rewardweighted.data.relabel.reward_augment_dataset`), then trained with TRL's `DPOTrainer`: the loss, the
reference model (which sees the same goal-conditioned prompt), PEFT and DeepSpeed all come from DPO. Two things are
changed: rows that the goal text pushes past `max_length` are counted and reported instead of silently filtered, and
the reference log-prob precompute runs on every process (sharded, gathered) so that it works on several processes
with an in-memory dataset. At inference, condition on the top score with `build_goal_prompt` / `generate_with_goal`.
See `docs/reward_augmented_dpo.md`.
"""

from __future__ import annotations

import copy
import logging
import textwrap

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from trl import DPOTrainer
from trl.models import prepare_deepspeed

from ..data.relabel import (
    AUGMENTED_MARKER_COLUMN,
    build_goal_prompt,
    condition_dataset_on_goal,
    reward_augment_dataset,
    to_explicit_prompt,
    twin_units,
)
from ..data.utils import first_row
from ..model_utils import CheckpointedCountersMixin, compute_rowwise_distributed
from .common import DPOTrainerInitMixin
from .ra_dpo_config import RewardAugmentedDPOConfig
from .weighted_dpo_config import check_pairwise_loss_types
from .weighted_dpo_trainer import SampleWeightedDPOMixin

__all__ = ["RewardAugmentedDPOTrainer", "TwinPairSampler"]

logger = logging.getLogger(__name__)

_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _dataset_label(dataset_name: str, is_train: bool) -> str:
    if is_train or dataset_name == "eval":
        return f"{dataset_name} dataset"
    return f"eval dataset {dataset_name!r}"


def _check_not_empty(dataset, label: str) -> None:
    first_row(dataset, label, "Pass a dataset with preference pairs.")


class TwinPairSampler(torch.utils.data.Sampler):
    """Sampler that shuffles units of rows (twin pairs, or single rows) and yields each unit's rows consecutively.

    Pairs come first, in a random order, then the single rows, in a random order; so with an even batch size every
    batch cut from the sequence (per device, per accumulation step, per process: accelerate gives each process whole
    consecutive batches) holds whole pairs. The order changes every epoch (`set_epoch`, called by the Trainer) and is
    the same on every process for a given seed and epoch.

    Args:
        units (`list[tuple[int, ...]]`):
            The row indices of each unit, see [`~data.relabel.twin_units`].
        seed (`int`):
            Base seed; epoch `e` uses `seed + e`.
    """

    def __init__(self, units: list[tuple[int, ...]], seed: int):
        self.pairs = [u for u in units if len(u) == 2]
        self.singles = [u for u in units if len(u) != 2]
        self.seed = seed
        self.epoch = 0
        self._num_rows = sum(len(u) for u in units)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_rows

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        for group in (self.pairs, self.singles):
            for k in torch.randperm(len(group), generator=generator).tolist():
                yield from group[k]


class RewardAugmentedDPOTrainer(DPOTrainerInitMixin, CheckpointedCountersMixin, SampleWeightedDPOMixin, DPOTrainer):
    """
    DPO on reward-augmented pairs (arXiv 2410.08067).

    Identical to [`~trl.DPOTrainer`] except that the training dataset is relabeled once, before tokenisation, with
    `reward_augment_dataset` (options in [`RewardAugmentedDPOConfig`]). Evaluation datasets (at init and those passed
    to `evaluate()` later) stay as given unless `augment_eval=True` (or are conditioned on `eval_goal_score`). The
    relabeling is idempotent: an already augmented dataset (with a `goal_text` column) is used as is. The reference
    model sees the same goal-conditioned prompts as the policy.

    The goal text is part of the prompt, so it counts against `max_length`. DPO drops rows whose tokenised prompt
    fills `max_length` (`truncation_mode="keep_start"`); this trainer counts them, warns with their row numbers and
    the `max_length` that would keep them, and raises a `ValueError` when no row is left. The counts (pairs in,
    dropped, rows out, `dropped_too_long`) are in `trainer.augmentation_stats`, logged at INFO, and added to the first
    training log entry (`augment/*`).

    With `precompute_ref_log_probs=True` the reference log-probs are computed on every process (rows sharded over
    processes, gathered on all) and added as the `ref_chosen_logps` / `ref_rejected_logps` columns DPO reads, so
    in-memory datasets work on several processes.

    With a `sample_weight` column (see `sample_weight_column`), each pair's weight is copied into both of its
    goal-conditioned twins and multiplies their DPO losses, and the loss is the weighted mean over the pairs of the
    whole optimizer step, as in [`WeightedDPOTrainer`]. Without the column the trainer is unchanged.

    Example:

    ```python
    from datasets import Dataset
    from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer, generate_with_goal

    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "Name a colour."}]],
            "chosen": [[{"role": "assistant", "content": "Blue."}]],
            "rejected": [[{"role": "assistant", "content": "A car."}]],
            "score_chosen": [9.0],
            "score_rejected": [3.0],
        }
    )
    trainer = RewardAugmentedDPOTrainer(
        model="path/to/sft-model", args=RewardAugmentedDPOConfig("out"), train_dataset=data
    )
    trainer.train()  # trains on 2 goal-conditioned pairs
    prompts = [[{"role": "user", "content": "Hi"}]]
    texts = generate_with_goal(trainer.model, trainer.processing_class, prompts, score=10)
    ```
    """

    _tag_names = ["trl", "dpo", "reward-augmented-dpo", "trl-rewardweighted"]
    _name = "Reward-Augmented DPO"
    _paper = {
        "title": "Reward-Augmented Data Enhances Direct Preference Alignment of LLMs",
        "id": "2410.08067",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhang2025rewardaugmented,
                title        = {{Reward-Augmented Data Enhances Direct Preference Alignment of LLMs}},
                author       = {Shenao Zhang and Zhihan Liu and Boyi Liu and Yufeng Zhang and Yingxiang Yang and Yongfei Liu and Liyu Chen and Tao Sun and Zhaoran Wang},
                year         = 2025,
                booktitle    = {Forty-second International Conference on Machine Learning, {ICML} 2025},
                eprint       = {arXiv:2410.08067},
            }"""),
    }

    _config_class = RewardAugmentedDPOConfig
    _default_output_suffix = "RA-DPO"
    _config_fix = (
        "It is a DPOConfig plus the relabeling options: build RewardAugmentedDPOConfig(output_dir=..., ...) with the "
        "same fields."
    )

    def _check_arguments(self, arguments):
        args, train_dataset, eval_dataset = arguments["args"], arguments["train_dataset"], arguments["eval_dataset"]
        _check_not_empty(train_dataset, "train dataset")
        sample = next(iter(train_dataset))
        if "image" in sample or "images" in sample:
            raise NotImplementedError(
                "RewardAugmentedDPOTrainer does not support vision datasets: TRL prepares them on the fly, so the "
                "prompts cannot be relabeled before tokenisation."
            )
        if isinstance(eval_dataset, dict):
            for key, dataset in eval_dataset.items():
                _check_not_empty(dataset, _dataset_label(key, False))
        elif eval_dataset is not None:
            _check_not_empty(eval_dataset, "eval dataset")
        self._init_sample_weights(arguments, required=False)
        if self._sample_weights_on:
            check_pairwise_loss_types(args.loss_type, "RewardAugmentedDPOTrainer")
        arguments["ref_model"] = self._resolved_ref_model(arguments)
        self._ra_train_seen = False
        self._ra_pending_log: dict[str, float] = {}
        self.augmentation_stats: dict[str, dict] = {}

    def _after_base_init(self, args):
        self._wrap_collator_with_weights()

    # DPOTrainer calls this for the training dataset first (name "train"), then for each evaluation dataset (name
    # "eval" or the key of the eval dict), and again from `evaluate()` for datasets passed there. The first "train"
    # call is the training set; every later call is evaluation data (even an eval-dict key named "train").
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        is_train = dataset_name == "train" and not self._ra_train_seen
        if is_train:
            self._ra_train_seen = True
        label = _dataset_label(dataset_name, is_train)
        _check_not_empty(dataset, label)
        if is_train or args.augment_eval:
            dataset = self._augment(dataset, processing_class, args, dataset_name, is_train)
        elif args.eval_goal_score is not None:  # raises a clear TypeError for a streaming dataset
            dataset = condition_dataset_on_goal(
                dataset,
                args.eval_goal_score,
                getattr(processing_class, "tokenizer", processing_class),
                system_role=args.system_role,
                goal_template=args.goal_template,
                attributes=args.attribute_columns,
                num_proc=args.dataset_num_proc,
            )
        else:
            # Un-augmented evaluation data keeps its prompts, but an ultrafeedback_binarized-style layout (string
            # `prompt` + full conversations) must be split here: DPOTrainer would fail on it.
            dataset = to_explicit_prompt(dataset, num_proc=args.dataset_num_proc)
        if isinstance(dataset, IterableDataset) or args.max_length is None or args.truncation_mode != "keep_start":
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        # DPO filters rows whose prompt fills `max_length` without a word: tokenise without its filter, then filter
        # here with counts, row numbers and a clear error when nothing is left.
        unfiltered_args = copy.copy(args)
        unfiltered_args.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, unfiltered_args, dataset_name)
        return self._drop_fully_truncated(dataset, args.max_length, dataset_name, label, is_train)

    def _drop_fully_truncated(self, dataset, max_length: int, dataset_name: str, label: str, is_train: bool):
        """DPO's "fully truncated" filter (keep rows with `len(prompt_ids) < max_length`), counted and reported."""
        import pyarrow.compute as pc

        table = dataset.with_format("arrow", columns=["prompt_ids"])[:]
        lengths = np.asarray(pc.list_value_length(table.column("prompt_ids")).to_numpy(zero_copy_only=False))
        too_long = np.flatnonzero(lengths >= max_length)
        stats = self.augmentation_stats.setdefault(dataset_name, {})
        stats["dropped_too_long"] = int(too_long.size)
        if is_train:
            self._ra_pending_log["augment/dropped_too_long"] = float(too_long.size)
        if too_long.size == 0:
            return dataset
        longest = int(lengths[too_long].max())
        stats["max_length_to_keep"] = longest + 1
        goal_note = (
            "The goal text is part of the prompt, so it counts against `max_length` (the default goal text is about "
            "45-50 tokens with common BPE tokenizers)."
        )
        if too_long.size == len(dataset):
            raise ValueError(
                f"Every row of the {label} ({len(dataset)}) has a tokenised prompt of at least "
                f"max_length={max_length} tokens (longest {longest}), so DPO's truncation would leave no completion "
                f"token and drop them all. {goal_note} Raise `max_length` above {longest} (plus room for the "
                "completions), or set max_length=None."
            )
        rows = too_long[:10].tolist()
        logger.warning(
            "%d of %d rows of the %s have a tokenised prompt of at least max_length=%d tokens and are dropped (no "
            "completion token would be left): rows %s%s, prompt lengths %s%s. max_length=%d would keep them (longest "
            "prompt %d tokens; add room for the completions). %s",
            too_long.size,
            len(dataset),
            label,
            max_length,
            rows,
            ", ..." if too_long.size > 10 else "",
            lengths[too_long[:10]].tolist(),
            ", ..." if too_long.size > 10 else "",
            longest + 1,
            longest,
            goal_note,
        )
        return dataset.select(np.flatnonzero(lengths < max_length))

    def _augment(self, dataset, processing_class, args, dataset_name, is_train):
        if isinstance(dataset, Dataset) and "prompt_ids" in dataset.column_names:
            return dataset  # already tokenized by this trainer: leave it (and its augmentation state) alone
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"RewardAugmentedDPOTrainer needs a map-style `datasets.Dataset` for the {dataset_name} dataset "
                "(rescaling, `augment_fraction` and the drop counts read the whole dataset). Load it without "
                "`streaming=True`, or augment it yourself with `reward_augment_dataset` and pass the result."
            )
        ref_columns = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names]
        if ref_columns and AUGMENTED_MARKER_COLUMN not in dataset.column_names:
            raise ValueError(
                f"The {dataset_name} dataset has {ref_columns} columns, but its pairs are about to be relabeled: the "
                "goal text changes every prompt (and the negative-goal copies swap chosen and rejected), so reference "
                "log-probs computed on the original pairs do not apply. Remove these columns and let the trainer "
                "compute them on the augmented pairs (`precompute_ref_log_probs=True` computes them once), or relabel "
                "first with `reward_augment_dataset` and compute them on its output."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset, stats = reward_augment_dataset(
            dataset, tokenizer, args.augment_options(), num_proc=args.dataset_num_proc, return_stats=True
        )
        self.augmentation_stats[dataset_name] = stats
        if stats.get("already_augmented"):
            logger.info("%s dataset is already reward-augmented (%d rows): used as is.", dataset_name, len(dataset))
        else:
            logger.info(
                "Reward-augmented %s dataset: %d pairs in, %d selected (fraction %s), %d dropped with a non-finite "
                "score, %d tied (%s), %d rows out (mode %s, goal as %s).",
                dataset_name,
                stats["pairs_in"],
                stats["pairs_selected"],
                args.augment_fraction,
                stats["dropped_nonfinite"],
                stats["ties"],
                "dropped" if args.ties == "drop" else "kept",
                stats["rows_out"],
                args.augment_mode,
                stats["placement"],
            )
        if is_train:
            self._ra_pending_log = {
                f"augment/{key}": float(stats[key])
                for key in ("pairs_in", "pairs_selected", "dropped_nonfinite", "dropped_ties", "rows_out")
                if key in stats
            }
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.keep_twins_together:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        columns = dataset.with_format(None).select_columns(["chosen_ids", "rejected_ids"])[:]
        units = twin_units(columns["chosen_ids"], columns["rejected_ids"])
        singles = sum(len(u) == 1 for u in units)
        self.augmentation_stats.setdefault("train", {})["twin_pairs"] = len(units) - singles
        if singles:
            logger.warning(
                "keep_twins_together: %d of %d training rows have no twin (it was dropped, e.g. by max_length); they "
                "are shuffled and placed after the %d pairs of each epoch.",
                singles,
                len(dataset),
                len(units) - singles,
            )
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return TwinPairSampler(units, seed)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Add the `ref_chosen_logps` / `ref_rejected_logps` columns, computed on every process.

        Same values as DPO's own precompute (its `compute_ref_log_probs` on batches of its collator: the reference
        model, or the policy with adapters disabled / the "ref" adapter, under ZeRO-3 through an inference engine
        that is destroyed afterwards), but the rows are sharded over the processes and gathered on all of them, and
        each process adds the columns to its own copy (DPO writes a cache file with rank 0 only, which the other
        ranks cannot read when the dataset lives in memory).
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        if all(column in dataset.column_names for column in _REF_COLUMNS):
            return dataset  # already computed (a prepared dataset passed to `evaluate()` again)
        engine = None
        if self.ref_model is None and self.is_deepspeed_enabled:
            engine = model = prepare_deepspeed(self.model, self.accelerator)
        else:
            model = self.ref_model if self.ref_model is not None else self.model
        device = self.accelerator.device

        def compute_fn(indices):
            batch = self.data_collator([dataset[int(i)] for i in indices])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            chosen, rejected = self.compute_ref_log_probs(model, batch)
            return torch.stack([chosen.float(), rejected.float()], dim=1)  # (B, 2)

        try:
            values = compute_rowwise_distributed(
                self.accelerator, len(dataset), batch_size, compute_fn, desc=f"Reference log-probs ({name})"
            )
        finally:
            # An inference engine around the policy leaves ZeRO-3 hooks on the shared modules: destroy it.
            if engine is not None and hasattr(engine, "destroy"):
                engine.destroy()
        dataset = dataset.add_column(_REF_COLUMNS[0], values[:, 0].tolist())
        return dataset.add_column(_REF_COLUMNS[1], values[:, 1].tolist())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._ra_pending_log and self.model.training:
            logs.update(self._ra_pending_log)  # once, in the first training log entry
            self._ra_pending_log = {}
        super().log(logs, start_time)

    def build_goal_prompt(self, prompt, score: float = 10):
        """The goal-conditioned inference prompt for `prompt` with this trainer's tokenizer and relabel options."""
        return build_goal_prompt(
            prompt,
            score=score,
            tokenizer=self._tokenizer,
            system_role=self.args.system_role,
            template=self.args.goal_template,
            attributes=self.args.attribute_columns,
        )

    def _cumulative_counters(self) -> dict[str, float]:
        return {"num_tokens": self._total_train_tokens}

    def _restore_cumulative_counters(self, counters: dict[str, float]) -> None:
        self._total_train_tokens = counters.get("num_tokens", 0)
