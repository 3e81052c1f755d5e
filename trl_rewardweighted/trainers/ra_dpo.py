"""Reward-augmented DPO (Zhang et al., "Reward-Augmented Data Enhances Direct Preference Alignment of LLMs",
arXiv 2410.08067, ICML 2025).

The training pairs are relabeled once, before tokenisation, with goal-conditioned prompts
(:func:`trl_rewardweighted.data.relabel.reward_augment_dataset`), then trained with TRL's ``DPOTrainer`` unchanged:
the loss, the reference model (which sees the same goal-conditioned prompt), PEFT, DeepSpeed and precompute all come
from DPO. At inference, condition on the top score with :func:`build_goal_prompt` / :func:`generate_with_goal`.
See ``docs/reward_augmented_dpo.md``.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer

from ..data.relabel import _reward_augment, build_goal_prompt, condition_dataset_on_goal, to_explicit_prompt

__all__ = ["RewardAugmentedDPOConfig", "RewardAugmentedDPOTrainer", "generate_with_goal"]

logger = logging.getLogger(__name__)


@dataclass
class RewardAugmentedDPOConfig(DPOConfig):
    r"""
    Configuration for [`RewardAugmentedDPOTrainer`]: every [`~trl.DPOConfig`] field plus the relabeling options below
    (the arguments of `reward_augment_dataset`).

    Data: preference pairs with one numeric score per response (`prompt`, `chosen`, `rejected`, `score_chosen`,
    `score_rejected`, the columns of `HuggingFaceH4/ultrafeedback_binarized`), standard or conversational, explicit or
    implicit prompt. Without judge scores, relabel with implicit rewards first
    (`trl_rewardweighted.data.ira.implicit_reward_relabel`).

    Hyperparameters: the paper trains with β = 0.01, learning rate 5e-7, cosine schedule, warmup ratio 0.1, one epoch,
    effective batch 128, seed 42 (and `label_smoothing=0.3` for Qwen2-7B-It / Gemma-2-9B-It). This config keeps
    DPOConfig's defaults (β = 0.1, lr 1e-6), which are tuned for TRL's examples; the paper's values are in
    `recipes/reward_augmented_dpo/`. Note that `augment_mode="both"` doubles the number of rows, so an epoch has twice
    the steps; ratio-based warmup adapts, a fixed `max_steps` does not.

    Parameters:
        augment_mode (`str`, *optional*, defaults to `"both"`):
            `"both"` (RA: one copy conditioned on each response's score, 2 rows per pair) or `"chosen_only"` (RA+:
            only the chosen response's goal; same size as the input).
        augment_fraction (`float`, *optional*, defaults to `1.0`):
            Half-RA: keep and augment only the first `floor(fraction × N)` training pairs (input order).
            `0.5` with `augment_mode="both"` gives a training set of the original size.
        ties (`str`, *optional*, defaults to `"drop"`):
            Pairs whose goal scores are equal (after rescaling and rounding) carry no preference under the paper's
            indicator reward: `"drop"` removes them, `"keep"` follows the released code (contradictory twin pairs).
        score_chosen_column (`str`, *optional*, defaults to `"score_chosen"`):
            Column with the chosen response's score.
        score_rejected_column (`str`, *optional*, defaults to `"score_rejected"`):
            Column with the rejected response's score.
        score_range (`str`, `tuple` or `None`, *optional*, defaults to `None`):
            `None`: scores are goals on the 1-10 scale as they are (they must lie in [1, 10], as UltraFeedback's).
            `(lo, hi)` or `"lo,hi"`: linear map `1 + 9 (s - lo) / (hi - lo)` (scores outside raise). `"auto"`: the
            same map with the training set's min/max (reward-model scores).
        round_digits (`int` or `None`, *optional*, defaults to `2`):
            Decimals the goals are rounded to after rescaling (`None`: no rounding).
        goal_template (`str` or `None`, *optional*, defaults to `None`):
            `None` uses the released code's text ("You are an assistant that generates responses for the instruction
            while implicitly achieving the following target scores (on a scale of 1-10, where 1 is lowest and 10 is
            highest):\nOverall score: {score}."). A custom template is a `str.format` string with `{scores}` and/or
            `{score}`; use the same one at inference.
        system_role (`str`, *optional*, defaults to `"auto"`):
            Where the goal goes in conversational prompts: `"system"` (a system message, merged into an existing one),
            `"prefix"` (before the first user turn, then a blank line), or `"auto"` (system if the tokenizer's chat
            template renders a system role, prefix otherwise). String prompts always get the prefix.
        attribute_columns (`dict` or `None`, *optional*, defaults to `None`):
            Multi-attribute goals: `{name: [chosen column, rejected column]}` (a JSON string on the command line),
            one `"<name>: <value>."` line per attribute. Replaces the single overall score.
        augment_eval (`bool`, *optional*, defaults to `False`):
            Augment evaluation datasets too (also those passed to `evaluate()` later). By default they stay as given,
            like the released code, which evaluates on the original pairs.
        eval_goal_score (`float` or `None`, *optional*, defaults to `None`):
            When evaluation data is not augmented, condition every evaluation prompt on this goal (e.g. `10`, the
            inference goal) without doubling or swapping. `None` leaves evaluation prompts untouched.
    """

    _VALID_MODES = ("both", "chosen_only")
    _VALID_TIES = ("drop", "keep")
    _VALID_SYSTEM_ROLES = ("auto", "system", "prefix")

    augment_mode: str = field(
        default="both",
        metadata={"help": "'both' (RA: both goals, 2N rows) or 'chosen_only' (RA+: the chosen goal only, N rows)."},
    )
    augment_fraction: float = field(
        default=1.0,
        metadata={"help": "Half-RA: augment only the first floor(fraction*N) training pairs (0.5 keeps the size)."},
    )
    ties: str = field(
        default="drop",
        metadata={
            "help": "Pairs with equal goal scores: 'drop' (paper's indicator reward) or 'keep' (released code)."
        },
    )
    score_chosen_column: str = field(default="score_chosen", metadata={"help": "Score column of the chosen response."})
    score_rejected_column: str = field(
        default="score_rejected", metadata={"help": "Score column of the rejected response."}
    )
    score_range: str | None = field(
        default=None,
        metadata={
            "help": "None (scores already on 1-10), 'lo,hi' (linear map to 1-10) or 'auto' (training-set min/max)."
        },
    )
    round_digits: int | None = field(
        default=2, metadata={"help": "Decimals the goal scores are rounded to after rescaling (None: no rounding)."}
    )
    goal_template: str | None = field(
        default=None,
        metadata={"help": "Goal text template with {scores} and/or {score}; None = the released code's wording."},
    )
    system_role: str = field(
        default="auto",
        metadata={"help": "Goal placement for conversational prompts: 'auto', 'system' or 'prefix'."},
    )
    attribute_columns: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": 'Multi-attribute goals as JSON: {"Helpfulness": ["help_chosen", "help_rejected"], ...}.'},
    )
    augment_eval: bool = field(
        default=False, metadata={"help": "Augment evaluation datasets too (default: evaluate on the original pairs)."}
    )
    eval_goal_score: float | None = field(
        default=None,
        metadata={"help": "Condition un-augmented evaluation prompts on this goal (e.g. 10); None leaves them as is."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.augment_mode not in self._VALID_MODES:
            raise ValueError(f"augment_mode must be one of {self._VALID_MODES}, got {self.augment_mode!r}.")
        if self.ties not in self._VALID_TIES:
            raise ValueError(f"ties must be one of {self._VALID_TIES}, got {self.ties!r}.")
        if self.system_role not in self._VALID_SYSTEM_ROLES:
            raise ValueError(f"system_role must be one of {self._VALID_SYSTEM_ROLES}, got {self.system_role!r}.")
        if not 0.0 < float(self.augment_fraction) <= 1.0:
            raise ValueError(f"augment_fraction must be in (0, 1] (0.5 = Half-RA), got {self.augment_fraction!r}.")
        if isinstance(self.score_range, str):
            value = self.score_range.strip()
            if value.lower() in ("", "none", "null"):
                self.score_range = None
            elif value.lower() == "auto":
                self.score_range = "auto"
            else:
                parts = value.strip("()[]").split(",")
                try:
                    lo, hi = (float(p) for p in parts)
                except ValueError as exc:
                    raise ValueError(
                        f"score_range must be None, 'auto' or 'lo,hi', got {self.score_range!r}."
                    ) from exc
                self.score_range = (lo, hi)
        elif isinstance(self.score_range, (list, tuple)):
            if len(self.score_range) != 2:
                raise ValueError(f"score_range must have two values (lo, hi), got {self.score_range!r}.")
            self.score_range = tuple(float(v) for v in self.score_range)
        if isinstance(self.attribute_columns, str):
            value = self.attribute_columns.strip()
            self.attribute_columns = None if value.lower() in ("", "none", "null") else json.loads(value)
        if self.attribute_columns is not None:
            if not isinstance(self.attribute_columns, Mapping) or not self.attribute_columns:
                raise ValueError(
                    "attribute_columns must be a non-empty dict {name: [chosen column, rejected column]}, got "
                    f"{self.attribute_columns!r}."
                )
            self.attribute_columns = {str(k): tuple(v) for k, v in self.attribute_columns.items()}

    def relabel_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``reward_augment_dataset`` these options stand for."""
        return dict(
            mode=self.augment_mode,
            fraction=float(self.augment_fraction),
            ties=self.ties,
            score_columns=(self.score_chosen_column, self.score_rejected_column),
            score_range=self.score_range,
            round_digits=self.round_digits,
            goal_template=self.goal_template,
            system_role=self.system_role,
            attributes=self.attribute_columns,
        )


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


def generate_with_goal(
    model,
    tokenizer,
    prompts,
    score: float = 10,
    system_role: str = "auto",
    template: str | None = None,
    attributes=None,
    **generate_kwargs,
) -> list[str]:
    """Generate completions for ``prompts`` conditioned on the goal ``score`` (10 = the paper's inference goal).

    ``prompts`` is one prompt or a list (strings or message lists). The goal prompt comes from
    :func:`build_goal_prompt` (the training code path; pass the training ``system_role``/``template``/``attributes``).
    Conversational prompts are rendered with the chat template and ``add_generation_prompt=True``. Returns the decoded
    new text of each prompt (special tokens skipped). ``generate_kwargs`` go to ``model.generate`` (default
    ``max_new_tokens=64``).
    """
    import torch

    single = isinstance(prompts, str) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0]
    )
    batch = [prompts] if single else list(prompts)
    texts = []
    for prompt in batch:
        goal_prompt = build_goal_prompt(prompt, score, tokenizer, system_role, template, attributes)
        if isinstance(goal_prompt, str):
            texts.append(goal_prompt)
        else:
            texts.append(tokenizer.apply_chat_template(goal_prompt, tokenize=False, add_generation_prompt=True))
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        # The chat template already wrote any special tokens it wants.
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    generate_kwargs.setdefault("max_new_tokens", 64)
    if tokenizer.pad_token_id is not None:
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**enc, **generate_kwargs)
    finally:
        model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
