"""Reward-augmented DPO (Zhang et al., "Reward-Augmented Data Enhances Direct Preference Alignment of LLMs",
arXiv 2410.08067, ICML 2025).

The training pairs are relabeled once, before tokenisation, with goal-conditioned prompts
(:func:`trl_rewardweighted.data.relabel.reward_augment_dataset`), then trained with TRL's ``DPOTrainer`` unchanged:
the loss, the reference model (which sees the same goal-conditioned prompt), PEFT, DeepSpeed and precompute all come
from DPO. At inference, condition on the top score with :func:`build_goal_prompt` / :func:`generate_with_goal`.
See ``docs/reward_augmented_dpo.md``.
"""

from __future__ import annotations

import logging
import textwrap

from datasets import Dataset, IterableDataset
from trl import DPOTrainer

from ..data.relabel import _reward_augment, build_goal_prompt, condition_dataset_on_goal, to_explicit_prompt
from ..model_utils import resolve_reference_model
from .ra_dpo_config import RewardAugmentedDPOConfig

__all__ = ["RewardAugmentedDPOTrainer"]

logger = logging.getLogger(__name__)


class RewardAugmentedDPOTrainer(DPOTrainer):
    """DPO on reward-augmented pairs (arXiv 2410.08067).

    Identical to [`~trl.DPOTrainer`] except that the training dataset is relabeled once, before tokenisation, with
    [`reward_augment_dataset`] (options in [`RewardAugmentedDPOConfig`]). Evaluation datasets (at init and those passed
    to `evaluate()` later) stay as given unless `augment_eval=True` (or are conditioned on `eval_goal_score`). The
    relabeling is idempotent: an already augmented dataset (with a `goal_text` column) is used as is. The reference
    model sees the same goal-conditioned prompts as the policy. The counts (pairs in, dropped, rows out) are in
    `trainer.augmentation_stats`, logged at INFO, and added to the first training log entry (`augment/*`).

    Example::

        from datasets import Dataset
        from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer

        data = Dataset.from_dict({
            "prompt": [[{"role": "user", "content": "Name a colour."}]],
            "chosen": [[{"role": "assistant", "content": "Blue."}]],
            "rejected": [[{"role": "assistant", "content": "A car."}]],
            "score_chosen": [9.0],
            "score_rejected": [3.0],
        })
        trainer = RewardAugmentedDPOTrainer(
            model="path/to/sft-model", args=RewardAugmentedDPOConfig("out"), train_dataset=data
        )
        trainer.train()  # trains on 2 goal-conditioned pairs
        # inference: generate_with_goal(trainer.model, trainer.processing_class, prompts, score=10)
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

    def __init__(
        self,
        model,
        ref_model=None,
        args: RewardAugmentedDPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            from trl.trainer.utils import get_config_model_id

            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = RewardAugmentedDPOConfig(f"{str(model_name).split('/')[-1]}-RA-DPO")
        elif not isinstance(args, RewardAugmentedDPOConfig):
            raise TypeError(
                f"`args` must be a RewardAugmentedDPOConfig (a DPOConfig plus the relabeling options), got "
                f"{type(args).__name__}. Build one with the same fields: RewardAugmentedDPOConfig(output_dir=..., ...)."
            )
        if train_dataset is not None:
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                raise NotImplementedError(
                    "RewardAugmentedDPOTrainer does not support vision datasets: TRL prepares them on the fly, so the "
                    "prompts cannot be relabeled before tokenisation."
                )
        ref_model = resolve_reference_model(model, ref_model, args, peft_config, quantization_config)
        self._ra_train_seen = False
        self._ra_pending_log: dict[str, float] = {}
        self.augmentation_stats: dict[str, dict] = {}
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

    # DPOTrainer calls this for the training dataset first (name "train"), then for each evaluation dataset (name
    # "eval" or the key of the eval dict), and again from `evaluate()` for datasets passed there. The first "train"
    # call is the training set; every later call is evaluation data (even an eval-dict key named "train").
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        is_train = dataset_name == "train" and not self._ra_train_seen
        if is_train:
            self._ra_train_seen = True
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
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _augment(self, dataset, processing_class, args, dataset_name, is_train):
        if isinstance(dataset, Dataset) and "prompt_ids" in dataset.column_names:
            return dataset  # already tokenized by this trainer: leave it (and its augmentation state) alone
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"RewardAugmentedDPOTrainer needs a map-style `datasets.Dataset` for the {dataset_name} dataset "
                "(rescaling, `augment_fraction` and the drop counts read the whole dataset). Load it without "
                "`streaming=True`, or augment it yourself with `reward_augment_dataset` and pass the result."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset, stats = _reward_augment(dataset, tokenizer, **args.relabel_kwargs(), num_proc=args.dataset_num_proc)
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._ra_pending_log and self.model.training:
            logs.update(self._ra_pending_log)  # once, in the first training log entry
            self._ra_pending_log = {}
        super().log(logs, start_time)

    def build_goal_prompt(self, prompt, score: float = 10):
        """The goal-conditioned inference prompt for ``prompt`` with this trainer's tokenizer and relabel options."""
        return build_goal_prompt(
            prompt,
            score=score,
            tokenizer=self._tokenizer,
            system_role=self.args.system_role,
            template=self.args.goal_template,
            attributes=self.args.attribute_columns,
        )
