"""Implicit-reward relabeling (IRA, arXiv 2410.08067 Sec. 5): scores for binarized preference data from a DPO model.

Pipeline of the paper's IRA ablation:

1. train DPO on the original pairs (`trl.DPOTrainer`);
2. [`implicit_reward_relabel`]: score every chosen and rejected response with the DPO implicit reward
   `r̂(x, y) = β (log π_DPO(y|x) − log π_ref(y|x))` and write `score_chosen` / `score_rejected` mapped onto the
   1–10 goal scale with the dataset's min/max;
3. train `RewardAugmentedDPOTrainer` on the result, from the *original* base model.

The original chosen response stays the chosen one (under its own goal it is the winner); the relabeling never
reorders pairs, whatever the implicit rewards say (the indicator reward does not depend on the original order).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from .data.relabel import explicit_pairs
from .model_utils import (
    LocalAccelerator,
    adapters_disabled,
    compute_rowwise_distributed,
    ensure_fused_lm_head,
    sequence_logps,
    tokenize_prompt_completions,
)

__all__ = ["implicit_reward_relabel"]

logger = logging.getLogger(__name__)


def _load(model_or_path, model_init_kwargs, device):
    if not isinstance(model_or_path, str):
        return model_or_path, False
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, **(model_init_kwargs or {})}
    model = AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs)
    if device is not None:
        model.to(device)
    return model, True


def _tokenize_pair(tokenizer, prompt, chosen, rejected) -> dict[str, list[int]]:
    """DPOTrainer's tokenisation of one pair (see `model_utils.tokenize_prompt_completions`)."""
    prompt_ids, (chosen_ids, rejected_ids) = tokenize_prompt_completions(tokenizer, prompt, [chosen, rejected])
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def implicit_reward_relabel(
    dataset,
    model,
    ref_model=None,
    tokenizer=None,
    *,
    beta: float = 0.1,
    batch_size: int = 8,
    score_range_out: tuple[float, float] = (1.0, 10.0),
    round_digits: int | None = 2,
    max_length: int | None = 1024,
    score_columns: Sequence[str] = ("score_chosen", "score_rejected"),
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    model_init_kwargs: dict | None = None,
    device: str | torch.device | None = None,
    accelerator=None,
):
    """Write DPO implicit rewards of both responses as 1–10 scores (IRA), ready for `reward_augment_dataset`.

    Models you pass in are patched in place with `trl.trainer.utils.add_fused_lm_head` (unless already patched);
    a patched model behaves as before when `fused_lm_head` is not passed.

    Args:
        dataset (`datasets.Dataset`):
            Preference pairs (any format `reward_augment_dataset` accepts, e.g. binarized data without scores).
        model (`str`, `PreTrainedModel` or `PeftModel`):
            The DPO-trained policy: a path, a `PreTrainedModel`, or a `PeftModel` (then `ref_model=None` means the
            reference is the same model with adapters disabled).
        ref_model (`str` or `PreTrainedModel`, *optional*):
            The reference π_ref the DPO run used (path or model). Required unless `model` is a PEFT model.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer; loaded from `model` when it is a path and this is `None` (required otherwise).
        beta (`float`, *optional*, defaults to `0.1`):
            The DPO β. It only scales the raw rewards; after the min/max map it drops out.
        batch_size (`int`, *optional*, defaults to `8`):
            Pairs per forward pass.
        score_range_out (`tuple[float, float]`, *optional*, defaults to `(1.0, 10.0)`):
            The goal scale the rewards are mapped to, linearly from the dataset's finite min/max
            (`lo + (hi - lo) (r - r_min) / (r_max - r_min)`, one map for both columns).
        round_digits (`int`, *optional*, defaults to `2`):
            Decimals of the written scores (`None`: no rounding).
        max_length (`int`, *optional*, defaults to `1024`):
            Truncation of prompt+completion, as in `DPOConfig.max_length` (`keep_start`). A response with no
            completion token left gets a NaN score (`reward_augment_dataset` then drops the pair).
        score_columns (`Sequence[str]`, *optional*, defaults to `("score_chosen", "score_rejected")`):
            The columns written (overwritten if present, with a warning).
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Input column name of the prompts.
        chosen_column (`str`, *optional*, defaults to `"chosen"`):
            Input column name of the chosen responses.
        rejected_column (`str`, *optional*, defaults to `"rejected"`):
            Input column name of the rejected responses.
        model_init_kwargs (`dict`, *optional*):
            `from_pretrained` kwargs for models given as paths (default `dtype=float32`).
        device (`str` or `torch.device`, *optional*):
            Where models loaded from paths go (default: the `accelerator`'s device when one is given, else CUDA if
            available, else CPU).
        accelerator (`accelerate.Accelerator`, *optional*):
            Shards the scoring over processes (rows are gathered back, every process gets the full columns); `None`
            scores everything in this process.

    Returns:
        `datasets.Dataset`: the dataset with `score_columns` (the mapped scores) and `implicit_reward_chosen` /
        `implicit_reward_rejected` (the raw `β log π/π_ref`) added; rows, order and other columns unchanged.
    """
    from accelerate.utils import is_peft_model
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    if not isinstance(dataset, Dataset):
        raise TypeError(f"implicit_reward_relabel needs a map-style `datasets.Dataset`, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be > 0 (the DPO β), got {beta!r}.")
    lo_out, hi_out = (float(v) for v in score_range_out)
    if not lo_out < hi_out:
        raise ValueError(f"score_range_out must be (lo, hi) with lo < hi, got {score_range_out!r}.")
    if isinstance(score_columns, str) or len(score_columns) != 2:
        raise ValueError(f"score_columns must be (chosen column, rejected column), got {score_columns!r}.")
    if device is None and accelerator is not None:
        device = accelerator.device
    if device is None and (isinstance(model, str) or isinstance(ref_model, str)):
        device = "cuda" if torch.cuda.is_available() else "cpu"

    if tokenizer is None:
        if not isinstance(model, str):
            raise ValueError("Pass `tokenizer=` (it is loaded from `model` only when `model` is a path).")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    model, _ = _load(model, model_init_kwargs, device)
    if ref_model is None and not is_peft_model(model):
        raise ValueError(
            "`ref_model` is required: the implicit reward is β log π_DPO/π_ref, and π_ref is the model the DPO run "
            "started from (pass its path or the model). With a PEFT model, `ref_model=None` disables the adapters."
        )
    ref_model, _ = _load(ref_model, model_init_kwargs, device) if ref_model is not None else (None, False)
    ensure_fused_lm_head(model)
    if ref_model is not None:
        ensure_fused_lm_head(ref_model)
    run_device = next(model.parameters()).device

    # Tokenize exactly like DPOTrainer does (on the prompts as they are: IRA scores the original pairs; implicit
    # prompts are split with TRL's `extract_prompt`, as DPOTrainer does).
    pairs = explicit_pairs(
        dataset, prompt_column=prompt_column, chosen_column=chosen_column, rejected_column=rejected_column
    )
    tokenized = [_tokenize_pair(tokenizer, prompt, chosen, rejected) for prompt, chosen, rejected in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length, truncation_mode="keep_start")

    def compute_fn(indices):
        batch = collator([tokenized[i] for i in indices])
        input_ids = batch["input_ids"].to(run_device)
        attention_mask = batch["attention_mask"].to(run_device)
        labels = input_ids.masked_fill(batch["completion_mask"].to(run_device) == 0, -100)
        logps, n_tokens = sequence_logps(model, input_ids, attention_mask, labels)
        if ref_model is not None:
            ref_logps, _ = sequence_logps(ref_model, input_ids, attention_mask, labels)
        else:
            with adapters_disabled(model):
                ref_logps, _ = sequence_logps(model, input_ids, attention_mask, labels)
        rewards = beta * (logps - ref_logps)
        rewards = rewards.masked_fill(n_tokens == 0, float("nan"))  # fully truncated: no reward
        chosen_r, rejected_r = rewards.chunk(2, dim=0)
        return torch.stack([chosen_r, rejected_r], dim=1)  # (B, 2)

    models = [m for m in (model, ref_model) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            values = compute_rowwise_distributed(
                accelerator or LocalAccelerator(run_device),
                len(tokenized),
                batch_size,
                compute_fn,
                desc="Implicit rewards",
            )
    finally:
        for m, flag in zip(models, was_training):
            m.train(flag)

    raw = values.double().numpy()  # (N, 2)
    finite = np.isfinite(raw)
    if not finite.any():
        raise ValueError("No finite implicit reward: every response was fully truncated (raise `max_length`).")
    r_min, r_max = float(raw[finite].min()), float(raw[finite].max())
    if not r_min < r_max:
        raise ValueError(
            f"Every implicit reward equals {r_min:g}: the DPO model does not differ from the reference on this data "
            "(train it first), so there is nothing to relabel."
        )
    scores = lo_out + (hi_out - lo_out) * (raw - r_min) / (r_max - r_min)
    if round_digits is not None:
        scores = np.round(scores, round_digits)
    n_nan = int((~finite).any(axis=1).sum())
    if n_nan:
        logger.warning(
            "IRA: %d pair(s) have a fully truncated response and get a NaN score (dropped by the relabeling).", n_nan
        )
    logger.info(
        "IRA: implicit rewards in [%.4g, %.4g] mapped to [%g, %g] for %d pairs.",
        r_min,
        r_max,
        lo_out,
        hi_out,
        len(raw),
    )
    out = dataset
    new_columns = {
        score_columns[0]: scores[:, 0],
        score_columns[1]: scores[:, 1],
        "implicit_reward_chosen": raw[:, 0],
        "implicit_reward_rejected": raw[:, 1],
    }
    existing = [c for c in new_columns if c in out.column_names]
    if existing:
        logger.warning("IRA: overwriting existing column(s) %s with implicit-reward scores.", existing)
        out = out.remove_columns(existing)
    for name, col in new_columns.items():
        out = out.add_column(name, [float(v) if math.isfinite(v) else float("nan") for v in col.tolist()])
    return out
