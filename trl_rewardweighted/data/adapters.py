"""Adapters from public datasets to the shapes the trainers read, and dataset mixtures. Pure data: no models.

Each adapter is a function `datasets.Dataset -> datasets.Dataset`, registered by name in [`ADAPTERS`] and applied by
[`apply_adapter`] (from a recipe's `dataset_adapter` / `dataset_adapter_kwargs`, or `trl-rw convert --adapter`):

| adapter | source | output (shape, trainer) |
|---|---|---|
| `ultrafeedback_groups` | `openbmb/UltraFeedback` | `prompt, completions, rewards` (groups, VCB) |
| `ultrafeedback_rows` | `openbmb/UltraFeedback` | `prompt, completion, reward` (rows, VAR) |
| `ultrafeedback_pairs` | `openbmb/UltraFeedback` | `prompt, chosen, rejected, score_*` (pairs, RA-DPO) |
| `ultrafeedback_binarized_pairs` | `HuggingFaceH4/ultrafeedback_binarized` | pairs (RA-DPO) |
| `ultrafeedback_binarized_rows` | `HuggingFaceH4/ultrafeedback_binarized` | rows (VAR) |
| `hh_rlhf_prompts` | `Anthropic/hh-rlhf` | `prompt` (for `trl-rw sample`) |
| `hh_rlhf_sft` | `Anthropic/hh-rlhf` | `prompt, completion` (SFT) |

Bad input follows one rule: a row whose structure is wrong (a missing column, a completion that is not a dict, a
rating that is not a number) raises `ValueError` naming the row and the column; a row that is well formed but unusable
(an `"N/A"` rating, a missing score, an empty response, a transcript without `Human:` / `Assistant:` markers) is
skipped and counted, with one warning per reason naming the first rows. Pass `stats={}` to get the counts back.
A `sample_weight` column of the input (see `docs/weights.md`) is carried to every row built from an input row.
The schemas each adapter expects are described in `docs/datasets.md`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .convert import PAIR_SELECTORS, TIE_OPTIONS, load_dataset_any
from .utils import is_messages, to_float
from .weights import SAMPLE_WEIGHT_COLUMN

__all__ = [
    "ADAPTERS",
    "UF_ASPECTS",
    "UF_SCORES",
    "apply_adapter",
    "hh_rlhf_prompts",
    "hh_rlhf_sft",
    "load_mixture",
    "load_source",
    "parse_adapter_kwargs",
    "parse_hh_transcript",
    "ultrafeedback_binarized_pairs",
    "ultrafeedback_binarized_rows",
    "ultrafeedback_groups",
    "ultrafeedback_pairs",
    "ultrafeedback_rows",
]

ADAPTERS: dict[str, Callable] = {}

UF_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
UF_SCORES = {"overall": "overall_score", "fine_grained": "fine-grained_score", "mean_aspects": None}
UF_PAIR_STRATEGIES = ("best_random", "best_worst", "best_vs_rest", "all_pairs")

_UF_SCHEMA = (
    "openbmb/UltraFeedback: `instruction` (str), `completions` (list of dicts with `model`, `response`, "
    "`annotations` {aspect: {`Rating`, `Rationale`, ...}}, `overall_score`, `fine-grained_score`), plus `source`, "
    "`models`, `correct_answers`, `incorrect_answers`"
)
_UFB_SCHEMA = (
    "HuggingFaceH4/ultrafeedback_binarized (splits train_prefs / test_prefs): `prompt` (str), `prompt_id`, "
    "`chosen` / `rejected` (message lists [user, assistant]), `messages`, `score_chosen`, `score_rejected` (float)"
)
_HH_SCHEMA = 'Anthropic/hh-rlhf: `chosen` / `rejected` (str transcripts "\\n\\nHuman: ... \\n\\nAssistant: ...")'
_SHOWN_ROWS = 10


def _register(fn: Callable) -> Callable:
    ADAPTERS[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------------


class _Skips:
    """Counted skips, reported as one warning per reason naming the first rows (and copied into `stats`)."""

    def __init__(self, adapter: str, rows_in: int):
        self.adapter, self.rows_in = adapter, rows_in
        self.rows: dict[str, list[str]] = {}  # reason -> where ("row 3", "row 3 completion 1")
        self.dropped: dict[str, list[str]] = {}  # completions dropped from a row that is kept or skipped

    def skip(self, reason: str, where: str) -> None:
        self.rows.setdefault(reason, []).append(where)

    def drop(self, reason: str, where: str) -> None:
        self.dropped.setdefault(reason, []).append(where)

    def report(self, rows_out: int, stats: dict | None) -> None:
        for kind, table in (("row(s) skipped", self.rows), ("completion(s) dropped", self.dropped)):
            for reason, where in table.items():
                shown = ", ".join(where[:_SHOWN_ROWS]) + (", ..." if len(where) > _SHOWN_ROWS else "")
                warnings.warn(f"{self.adapter}: {len(where)} {kind}: {reason} ({shown}).", stacklevel=3)
        if stats is not None:
            stats.update(
                rows_in=self.rows_in,
                rows_out=rows_out,
                skipped={reason: len(where) for reason, where in self.rows.items()},
                dropped_completions={reason: len(where) for reason, where in self.dropped.items()},
            )
        if rows_out == 0:
            counts = {reason: len(where) for reason, where in self.rows.items()}
            raise ValueError(
                f"{self.adapter}: no row left out of {self.rows_in} (skipped: {counts or 'none'}); check that the "
                "input is the dataset this adapter is for and that it is not empty."
            )


def _require(ds, columns: Sequence[str], adapter: str, schema: str) -> None:
    from datasets import Dataset

    if not isinstance(ds, Dataset):
        raise ValueError(
            f"{adapter} needs a map-style datasets.Dataset (one split), got {type(ds).__name__}; select a split "
            "first, and do not stream (`dataset_streaming: false`)."
        )
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{adapter}: the dataset has no column(s) {missing} (columns found: {ds.column_names}). This adapter "
            f"reads {schema}."
        )


def _from_columns(out: dict[str, list]):
    from datasets import Dataset

    return Dataset.from_dict(out)


class _Columns:
    """The output columns of an adapter, filled one output row at a time. Every output row is built from an input row,
    whose `carried` columns (those the input has) and `sample_weight` column are copied to it."""

    def __init__(self, ds, names: Sequence[str], carried: Sequence[str] = ()):
        carried = [c for c in (*carried, SAMPLE_WEIGHT_COLUMN) if c in ds.column_names]
        self.carried = {c: list(ds[c]) for c in carried}
        self.out: dict[str, list] = {name: [] for name in (*names, *carried)}

    def add(self, i: int, **values) -> None:
        """Append one output row built from input row `i`: `values` holds one value per column name."""
        for name, value in values.items():
            self.out[name].append(value)
        for name, column in self.carried.items():
            self.out[name].append(column[i])

    def __len__(self) -> int:
        return len(next(iter(self.out.values())))

    def dataset(self):
        return _from_columns(self.out)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _check_choice(value, choices, name: str, adapter: str) -> None:
    if value not in choices:
        raise ValueError(f"{adapter}: unknown {name} {value!r}; choose one of {tuple(choices)}.")


def _check_bool(value, name: str, adapter: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{adapter}: `{name}` must be true or false, got {value!r} ({type(value).__name__}).")


# ----------------------------------------------------------------------------------------------------------------------
# openbmb/UltraFeedback
# ----------------------------------------------------------------------------------------------------------------------


def _uf_rating(completion: dict, aspect: str, where: str) -> float | None:
    """The rating of one aspect as a float, or None for "N/A"."""
    annotations = completion.get("annotations")
    if not isinstance(annotations, Mapping):
        raise ValueError(
            f"{where}: `annotations` must be a dict of aspects {UF_ASPECTS}, got {type(annotations).__name__}."
        )
    block = annotations.get(aspect)
    if not isinstance(block, Mapping) or "Rating" not in block:
        raise ValueError(
            f"{where}: `annotations.{aspect}` must be a dict with a `Rating`, got {block!r:.80}. Give only the "
            f"aspects the data has with `aspects=[...]` (default: {list(UF_ASPECTS)})."
        )
    rating = block["Rating"]
    if rating is None or (isinstance(rating, str) and rating.strip().upper() == "N/A"):
        return None
    if isinstance(rating, str):
        try:
            return float(rating)
        except ValueError:
            raise ValueError(
                f"{where}: `annotations.{aspect}.Rating` is {rating!r}; expected a number (as text) or 'N/A'."
            ) from None
    return to_float(rating, where, f"`annotations.{aspect}.Rating`")


def _uf_completion(completion: Any, where: str, score: str, aspects: Sequence[str]) -> tuple[str, float | None, str]:
    """`(response, score or None, reason)` for one completion; a structural problem raises ValueError."""
    if not isinstance(completion, Mapping):
        raise ValueError(f"{where}: a completion must be a dict (model, response, annotations, ...), got "
                         f"{type(completion).__name__} ({completion!r:.80}).")  # fmt: skip
    if "response" not in completion:
        raise ValueError(f"{where}: the completion has no `response` key (keys: {sorted(completion)}).")
    response = completion["response"]
    if not isinstance(response, str):
        raise ValueError(f"{where}: `response` must be a string, got {type(response).__name__}.")
    if score == "mean_aspects":
        ratings = [_uf_rating(completion, aspect, where) for aspect in aspects]
        if any(r is None for r in ratings):
            return response, None, "a rating is 'N/A'"
        value = sum(ratings) / len(ratings)
    else:
        key = UF_SCORES[score]
        if key not in completion:
            raise ValueError(
                f"{where}: the completion has no `{key}` key (keys: {sorted(completion)}); choose another `score` "
                f"({tuple(UF_SCORES)})."
            )
        value = to_float(completion[key], where, f"`{key}`")
        if math.isnan(value):
            return response, None, f"`{key}` is missing (null / NaN)"
    if not math.isfinite(value):
        return response, None, "the score is not finite"
    if not response.strip():
        return response, None, "the response is empty"
    return response, value, ""


def _uf_groups(ds, adapter: str, score: str, aspects, min_completions: int):
    """Per row: `(index, prompt text, [(response, score, model)])` for the valid completions; skips counted."""
    _require(ds, ["instruction", "completions"], adapter, _UF_SCHEMA)
    _check_choice(score, UF_SCORES, "score", adapter)
    aspects = tuple(aspects)
    unknown = [a for a in aspects if a not in UF_ASPECTS]
    if not aspects or unknown:
        raise ValueError(f"{adapter}: `aspects` must be a non-empty subset of {UF_ASPECTS}; got {list(aspects)}.")
    if isinstance(min_completions, bool) or not isinstance(min_completions, int) or min_completions < 1:
        raise ValueError(f"{adapter}: `min_completions` must be a positive integer, got {min_completions!r}.")
    skips = _Skips(adapter, len(ds))
    groups = []
    for i, row in enumerate(ds):
        instruction, completions = row["instruction"], row["completions"]
        if not isinstance(instruction, str):
            raise ValueError(f"Row {i}: `instruction` must be a string, got {type(instruction).__name__}.")
        if not isinstance(completions, (list, tuple)):
            raise ValueError(f"Row {i}: `completions` must be a list of dicts, got {type(completions).__name__}.")
        if not instruction.strip():
            skips.skip("the instruction is empty", f"row {i}")
            continue
        kept = []
        for j, completion in enumerate(completions):
            response, value, reason = _uf_completion(completion, f"Row {i}, `completions`[{j}]", score, aspects)
            if value is None:
                skips.drop(reason, f"row {i} completion {j}")
                continue
            model = completion.get("model")
            kept.append((response, value, model if isinstance(model, str) else None))
        if len(kept) < min_completions:
            skips.skip(f"fewer than {min_completions} scored completion(s) left", f"row {i}")
            continue
        groups.append((i, instruction, kept))
    return groups, skips


def _uf_prompt(instruction: str, conversational: bool):
    return _user(instruction) if conversational else instruction


@_register
def ultrafeedback_groups(
    ds,
    score: str = "overall",
    aspects: Sequence[str] = UF_ASPECTS,
    conversational: bool = True,
    completions_as: str = "text",
    min_completions: int = 2,
    stats: dict | None = None,
):
    """VCB groups from `openbmb/UltraFeedback`: one row per instruction, `prompt, completions, rewards, source, models`.

    Args:
        ds (`datasets.Dataset`):
            One split of `openbmb/UltraFeedback` (`instruction`, `completions`, ...).
        score (`str`, *optional*, defaults to `"overall"`):
            The reward of a completion: `"overall"` (its `overall_score`), `"fine_grained"` (its
            `fine-grained_score`) or `"mean_aspects"` (the mean of the `Rating` of `aspects`; a completion with an
            `"N/A"` rating is dropped and counted).
        aspects (`Sequence[str]`, *optional*, defaults to the four aspects):
            The aspects averaged by `score="mean_aspects"`.
        conversational (`bool`, *optional*, defaults to `True`):
            `prompt` as `[{"role": "user", "content": instruction}]`; `False` gives the instruction as a string.
        completions_as (`str`, *optional*, defaults to `"text"`):
            `"text"` (strings, like `trl-rw sample`) or `"messages"` (one assistant message list per completion).
        min_completions (`int`, *optional*, defaults to `2`):
            Instructions left with fewer scored completions are skipped and counted (VCB needs two per group).
        stats (`dict`, *optional*):
            Filled with `rows_in`, `rows_out`, `skipped` and `dropped_completions` counts by reason.

    Completions with a missing score (null / NaN), an empty response or an `"N/A"` rating (with
    `score="mean_aspects"`) are dropped and counted; `models` lists the model of each kept completion.

    ```python
    from datasets import load_dataset
    from trl_rewardweighted.data.adapters import ultrafeedback_groups

    groups = ultrafeedback_groups(load_dataset("openbmb/UltraFeedback", split="train"), score="mean_aspects")
    ```
    """
    adapter = "ultrafeedback_groups"
    _check_choice(completions_as, ("text", "messages"), "completions_as", adapter)
    _check_bool(conversational, "conversational", adapter)
    groups, skips = _uf_groups(ds, adapter, score, aspects, min_completions)
    out = _Columns(ds, ["prompt", "completions", "rewards", "models"], carried=["source"])
    for i, instruction, kept in groups:
        out.add(
            i,
            prompt=_uf_prompt(instruction, conversational),
            completions=[r if completions_as == "text" else _assistant(r) for r, _, _ in kept],
            rewards=[v for _, v, _ in kept],
            models=[m for _, _, m in kept],
        )
    skips.report(len(out), stats)
    return out.dataset()


@_register
def ultrafeedback_rows(
    ds,
    score: str = "overall",
    aspects: Sequence[str] = UF_ASPECTS,
    best_only: bool = False,
    conversational: bool = True,
    seed: int = 0,
    stats: dict | None = None,
):
    """VAR rows from `openbmb/UltraFeedback`: `prompt, completion, reward, model` (and `source`), one per completion.

    Args:
        ds, score, aspects:
            As in [`ultrafeedback_groups`]: one split of `openbmb/UltraFeedback`, the score read as the reward
            (`"overall"`, `"fine_grained"` or `"mean_aspects"`) and the aspects averaged by `score="mean_aspects"`.
        best_only (`bool`, *optional*, defaults to `False`):
            Keep only the best-scored completion of each instruction (ties broken at random with `seed`).
        conversational (`bool`, *optional*, defaults to `True`):
            `prompt` / `completion` as user / assistant message lists; `False` gives strings.
        seed (`int`, *optional*, defaults to `0`):
            Breaks ties for `best_only`, reproducibly.
        stats (`dict`, *optional*):
            Filled with the counts, as in [`ultrafeedback_groups`].

    Completions are dropped and counted as in [`ultrafeedback_groups`]; an instruction with one scored completion
    still gives its row.
    """
    adapter = "ultrafeedback_rows"
    _check_bool(best_only, "best_only", adapter)
    _check_bool(conversational, "conversational", adapter)
    groups, skips = _uf_groups(ds, adapter, score, aspects, min_completions=1)
    rng = random.Random(seed)
    out = _Columns(ds, ["prompt", "completion", "reward", "model"], carried=["source"])
    for i, instruction, kept in groups:
        if best_only:
            top = max(v for _, v, _ in kept)
            kept = [rng.choice([k for k in kept if k[1] == top])]
        for response, value, model in kept:
            prompt = _uf_prompt(instruction, conversational)
            completion = _assistant(response) if conversational else response
            out.add(i, prompt=prompt, completion=completion, reward=value, model=model)
    skips.report(len(out), stats)
    return out.dataset()


def _best_random(valid: list[tuple[int, float]], ties: str, rng: random.Random) -> list[tuple[int, int]]:
    top = max(r for _, r in valid)
    chosen = rng.choice([j for j, r in valid if r == top])
    others = [j for j, r in valid if j != chosen and (r < top or ties == "keep")]
    return [(chosen, rng.choice(others))] if others else []


@_register
def ultrafeedback_pairs(
    ds,
    score: str = "overall",
    aspects: Sequence[str] = UF_ASPECTS,
    strategy: str = "best_random",
    ties: str = "drop",
    conversational: bool = True,
    seed: int = 0,
    stats: dict | None = None,
):
    """Reward-augmented DPO pairs from `openbmb/UltraFeedback`:
    `prompt, chosen, rejected, score_chosen, score_rejected, chosen_model, rejected_model` (and `source`).

    Args:
        ds, score, aspects:
            As in [`ultrafeedback_groups`]: one split of `openbmb/UltraFeedback`, the score read as the reward
            (`"overall"`, `"fine_grained"` or `"mean_aspects"`) and the aspects averaged by `score="mean_aspects"`.
        strategy (`str`, *optional*, defaults to `"best_random"`):
            `"best_random"`: the best completion against one other drawn at random (how
            `HuggingFaceH4/ultrafeedback_binarized` was built); `"best_worst"`, `"best_vs_rest"`, `"all_pairs"`: as
            in `trl_rewardweighted.data.convert.groups_to_pairs`.
        ties (`str`, *optional*, defaults to `"drop"`):
            `"drop"`: never pair two completions with equal scores (an instruction whose scores all tie gives no
            pair); `"keep"`: allow them. Same rule as `groups_to_pairs`.
        conversational (`bool`, *optional*, defaults to `True`):
            `prompt` / `chosen` / `rejected` as message lists; `False` gives strings.
        seed (`int`, *optional*, defaults to `0`):
            Draws the random completion and breaks ties, reproducibly.
        stats (`dict`, *optional*):
            Filled with the counts, as in [`ultrafeedback_groups`] (plus `skipped["all scores tie"]`).
    """
    adapter = "ultrafeedback_pairs"
    _check_choice(strategy, UF_PAIR_STRATEGIES, "strategy", adapter)
    _check_choice(ties, TIE_OPTIONS, "ties", adapter)
    _check_bool(conversational, "conversational", adapter)
    groups, skips = _uf_groups(ds, adapter, score, aspects, min_completions=2)
    pick = _best_random if strategy == "best_random" else PAIR_SELECTORS[strategy]
    rng = random.Random(seed)
    names = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "chosen_model", "rejected_model"]
    out = _Columns(ds, names, carried=["source"])
    for i, instruction, kept in groups:
        pairs = pick([(j, v) for j, (_, v, _) in enumerate(kept)], ties, rng)
        if not pairs:
            skips.skip("all scores tie (ties='drop')", f"row {i}")
            continue
        for a, b in pairs:
            (chosen, score_chosen, chosen_model), (rejected, score_rejected, rejected_model) = kept[a], kept[b]
            out.add(
                i,
                prompt=_uf_prompt(instruction, conversational),
                chosen=_assistant(chosen) if conversational else chosen,
                rejected=_assistant(rejected) if conversational else rejected,
                score_chosen=score_chosen,
                score_rejected=score_rejected,
                chosen_model=chosen_model,
                rejected_model=rejected_model,
            )
    skips.report(len(out), stats)
    return out.dataset()


# ----------------------------------------------------------------------------------------------------------------------
# HuggingFaceH4/ultrafeedback_binarized
# ----------------------------------------------------------------------------------------------------------------------


def _ufb_response(value: Any, i: int, column: str) -> str:
    """The assistant text at the end of a `chosen` / `rejected` message list (structural problems raise)."""
    if not is_messages(value):
        raise ValueError(
            f"Row {i}: `{column}` must be a list of messages [user, assistant], got {type(value).__name__} "
            f"({value!r:.80})."
        )
    last = value[-1]
    if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise ValueError(
            f"Row {i}: the last message of `{column}` must be an assistant message with a string content, got "
            f"{last!r:.80}."
        )
    return last["content"]


def _ufb_pairs(ds, adapter: str):
    """Per valid row: `(i, prompt, chosen text, rejected text, score_chosen, score_rejected)`."""
    _require(ds, ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"], adapter, _UFB_SCHEMA)
    skips = _Skips(adapter, len(ds))
    kept = []
    for i, row in enumerate(ds):
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"Row {i}: `prompt` must be a string, got {type(prompt).__name__} ({prompt!r:.80}).")
        chosen = _ufb_response(row["chosen"], i, "chosen")
        rejected = _ufb_response(row["rejected"], i, "rejected")
        sc = to_float(row["score_chosen"], f"Row {i}", "`score_chosen`")
        sr = to_float(row["score_rejected"], f"Row {i}", "`score_rejected`")
        if not prompt.strip():
            skips.skip("the prompt is empty", f"row {i}")
        elif not chosen.strip() or not rejected.strip():
            skips.skip("an empty chosen / rejected response", f"row {i}")
        elif not (math.isfinite(sc) and math.isfinite(sr)):
            skips.skip("a missing or non-finite score", f"row {i}")
        else:
            kept.append((i, prompt, chosen, rejected, sc, sr))
    return kept, skips


@_register
def ultrafeedback_binarized_pairs(ds, ties: str = "keep", conversational: bool = True, stats: dict | None = None):
    """Reward-augmented DPO pairs from `HuggingFaceH4/ultrafeedback_binarized` (`train_prefs` / `test_prefs`):
    `prompt, chosen, rejected, score_chosen, score_rejected` (and `prompt_id`).

    Args:
        ds (`datasets.Dataset`):
            One split of `HuggingFaceH4/ultrafeedback_binarized`.
        ties (`str`, *optional*, defaults to `"keep"`):
            `"keep"` keeps pairs whose two scores are equal, as published; `"drop"` skips and counts them.
        conversational (`bool`, *optional*, defaults to `True`):
            `prompt` as `[{"role": "user", "content": prompt}]` (the explicit prompt column) and `chosen` /
            `rejected` as the final assistant message of each list; `False` gives strings.
        stats (`dict`, *optional*):
            Filled with `rows_in`, `rows_out` and `skipped` counts by reason.

    Rows with an empty prompt or response, or a missing score, are skipped and counted.
    """
    adapter = "ultrafeedback_binarized_pairs"
    _check_choice(ties, TIE_OPTIONS, "ties", adapter)
    _check_bool(conversational, "conversational", adapter)
    kept, skips = _ufb_pairs(ds, adapter)
    out = _Columns(ds, ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"], carried=["prompt_id"])
    for i, prompt, chosen, rejected, sc, sr in kept:
        if ties == "drop" and sc == sr:
            skips.skip("score_chosen equals score_rejected (ties='drop')", f"row {i}")
            continue
        out.add(
            i,
            prompt=_user(prompt) if conversational else prompt,
            chosen=_assistant(chosen) if conversational else chosen,
            rejected=_assistant(rejected) if conversational else rejected,
            score_chosen=sc,
            score_rejected=sr,
        )
    skips.report(len(out), stats)
    return out.dataset()


@_register
def ultrafeedback_binarized_rows(ds, conversational: bool = True, stats: dict | None = None):
    """VAR rows from `HuggingFaceH4/ultrafeedback_binarized`: both responses of each pair with their scores,
    `prompt, completion, reward` (and `prompt_id`), the chosen row first.

    Args:
        ds (`datasets.Dataset`):
            One split of `HuggingFaceH4/ultrafeedback_binarized`.
        conversational (`bool`, *optional*, defaults to `True`):
            `prompt` / `completion` as user / assistant message lists; `False` gives strings.
        stats (`dict`, *optional*):
            Filled with `rows_in`, `rows_out` (output rows, two per kept pair) and `skipped` counts by reason.
    """
    adapter = "ultrafeedback_binarized_rows"
    _check_bool(conversational, "conversational", adapter)
    kept, skips = _ufb_pairs(ds, adapter)
    out = _Columns(ds, ["prompt", "completion", "reward"], carried=["prompt_id"])
    for i, prompt, chosen, rejected, sc, sr in kept:
        for text, value in ((chosen, sc), (rejected, sr)):
            completion = _assistant(text) if conversational else text
            out.add(i, prompt=_user(prompt) if conversational else prompt, completion=completion, reward=value)
    skips.report(len(out), stats)
    return out.dataset()


# ----------------------------------------------------------------------------------------------------------------------
# Anthropic/hh-rlhf
# ----------------------------------------------------------------------------------------------------------------------

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str, allow_empty_last: bool = False) -> tuple[list[dict] | None, str]:
    """Split an `Anthropic/hh-rlhf` transcript into messages; returns `(messages, "")` or `(None, reason)`.

    The transcript is `"\\n\\nHuman: ...\\n\\nAssistant: ..."`: turns must alternate, start with `Human:`, end with
    `Assistant:`, and hold text (the last assistant turn may be empty with `allow_empty_last`). Contents are stripped
    of surrounding whitespace.
    """
    if not isinstance(text, str):
        raise TypeError(f"a transcript must be a string, got {type(text).__name__}")
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    pieces = _HH_MARKER.split(text)
    if len(pieces) < 3:
        return None, "no 'Human:' / 'Assistant:' markers"
    if pieces[0].strip():
        return None, "text before the first 'Human:'"
    messages = [
        {"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(pieces[1::2], pieces[2::2])
    ]
    if messages[0]["role"] != "user":
        return None, "the first turn is not 'Human:'"
    if messages[-1]["role"] != "assistant":
        return None, "the last turn is not 'Assistant:'"
    if any(a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
        return None, "the turns do not alternate Human / Assistant"
    body = messages[:-1] if allow_empty_last else messages
    if any(not m["content"] for m in body):
        return None, "an empty turn"
    return messages, ""


def _hh_render(messages: list[dict]) -> str:
    """A prompt message list back as HH text, ending with the `Assistant:` cue."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def _hh_parsed(ds, adapter: str, column: str, allow_empty_last: bool):
    _check_choice(column, ("chosen", "rejected"), "column", adapter)
    _require(ds, [column], adapter, _HH_SCHEMA)
    skips = _Skips(adapter, len(ds))
    parsed = []
    for i, text in enumerate(ds[column]):
        if not isinstance(text, str):
            raise ValueError(f"Row {i}: `{column}` must be a transcript string, got {type(text).__name__}.")
        messages, reason = parse_hh_transcript(text, allow_empty_last=allow_empty_last)
        if messages is None:
            skips.skip(f"malformed `{column}` transcript: {reason}", f"row {i}")
            continue
        parsed.append((i, messages))
    return parsed, skips


@_register
def hh_rlhf_prompts(
    ds, column: str = "chosen", conversational: bool = True, dedupe: bool = True, stats: dict | None = None
):
    """Prompts from `Anthropic/hh-rlhf` for `trl-rw sample`: the conversation up to its last `Assistant:`.

    Args:
        ds (`datasets.Dataset`):
            One split of `Anthropic/hh-rlhf` (`chosen`, `rejected`).
        column (`str`, *optional*, defaults to `"chosen"`):
            The transcript the history is read from (`chosen` and `rejected` share it).
        conversational (`bool`, *optional*, defaults to `True`):
            `prompt` as a message list ending with the last user turn; `False` gives the HH text ending with
            `"\\n\\nAssistant:"`.
        dedupe (`bool`, *optional*, defaults to `True`):
            Keep the first row of each distinct prompt (HH repeats histories across rows); duplicates are counted.
        stats (`dict`, *optional*):
            Filled with `rows_in`, `rows_out` and `skipped` counts by reason.

    Malformed transcripts (see [`parse_hh_transcript`]) are skipped and counted; the final assistant turn is not
    needed and may be empty.
    """
    adapter = "hh_rlhf_prompts"
    _check_bool(conversational, "conversational", adapter)
    _check_bool(dedupe, "dedupe", adapter)
    parsed, skips = _hh_parsed(ds, adapter, column, allow_empty_last=True)
    seen: set[str] = set()
    prompts = []
    for i, messages in parsed:
        prompt = messages[:-1]
        key = json.dumps(prompt, ensure_ascii=False)
        if dedupe and key in seen:
            skips.skip("duplicate prompt (dedupe=True)", f"row {i}")
            continue
        seen.add(key)
        prompts.append(prompt if conversational else _hh_render(prompt))
    skips.report(len(prompts), stats)
    return _from_columns({"prompt": prompts})


@_register
def hh_rlhf_sft(ds, conversational: bool = True, stats: dict | None = None):
    """SFT rows `prompt, completion` from the `chosen` transcripts of `Anthropic/hh-rlhf`: the history up to the last
    `Assistant:` and that last assistant turn.

    Args:
        ds (`datasets.Dataset`):
            One split of `Anthropic/hh-rlhf`.
        conversational (`bool`, *optional*, defaults to `True`):
            Message lists (TRL's conversational prompt-completion format); `False` gives the HH prompt text ending
            with `"\\n\\nAssistant:"` and the completion as `" " + text`.
        stats (`dict`, *optional*):
            Filled with `rows_in`, `rows_out` and `skipped` counts by reason.

    Malformed transcripts, including an empty last assistant turn, are skipped and counted.
    """
    adapter = "hh_rlhf_sft"
    _check_bool(conversational, "conversational", adapter)
    parsed, skips = _hh_parsed(ds, adapter, "chosen", allow_empty_last=False)
    out = _Columns(ds, ["prompt", "completion"])
    for i, messages in parsed:
        prompt, last = messages[:-1], messages[-1]["content"]
        completion = _assistant(last) if conversational else " " + last
        out.add(i, prompt=prompt if conversational else _hh_render(prompt), completion=completion)
    skips.report(len(out), stats)
    return out.dataset()


# ----------------------------------------------------------------------------------------------------------------------
# Applying an adapter by name
# ----------------------------------------------------------------------------------------------------------------------


def parse_adapter_kwargs(value: Any, where: str = "dataset_adapter_kwargs") -> dict:
    """Adapter options as a dict: `None` -> `{}`, a dict as is, or a JSON object string (from the command line)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(
                f'{where}: not valid JSON ({err}); give an object such as \'{{"score": "overall"}}\'.'
            ) from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of option -> value (a JSON object), got {value!r:.80}.")
    return dict(value)


def apply_adapter(ds, name: str, kwargs: Mapping | str | None = None):
    """Apply the adapter registered as `name` in [`ADAPTERS`] to `ds` with the options `kwargs`.

    `kwargs` is a dict or a JSON object string. An unknown adapter or option raises `ValueError` listing the
    choices; a `DatasetDict` gets the adapter on each split.
    """
    from datasets import DatasetDict

    if name not in ADAPTERS:
        raise ValueError(f"Unknown dataset adapter {name!r}; choose one of {sorted(ADAPTERS)}.")
    fn = ADAPTERS[name]
    options = parse_adapter_kwargs(kwargs)
    accepted = [p for p in inspect.signature(fn).parameters if p != "ds"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"Dataset adapter {name!r} has no option(s) {unknown}; its options are {accepted}.")
    if isinstance(ds, DatasetDict):
        return DatasetDict({split: fn(part, **options) for split, part in ds.items()})
    return fn(ds, **options)


# ----------------------------------------------------------------------------------------------------------------------
# Mixtures
# ----------------------------------------------------------------------------------------------------------------------

_TRL_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")
_HANDBOOK_KEYS = ("id", "config", "split", "columns", "weight")
_ADAPTER_KEYS = ("adapter", "adapter_kwargs")


def load_source(path: str, split: str | None = "train", name: str | None = None, **load_kwargs):
    """One split of a dataset: a local file / `save_to_disk` folder (through `load_dataset_any`), or a Hub id or
    loading script through `datasets.load_dataset(path, name, split=split, **load_kwargs)`.

    A local `DatasetDict` folder gives `split` (error naming the splits found when it is missing); a local file holds
    one split and is returned whatever `split` says.
    """
    from datasets import DatasetDict, load_dataset

    if Path(path).exists():
        data = load_dataset_any(path, keep_splits=True)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(f"{path} has no split {split!r} (splits: {list(data)}).")
            return data[split]
        return data
    return load_dataset(path, name, split=split, **load_kwargs)


def _entries(config) -> tuple[list[dict], dict]:
    """The mixture's entries as dicts, and its top-level options (seed, test_split_size, streaming)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):  # trl's DatasetMixtureConfig
        top = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        top = dict(config)
    else:
        raise ValueError(f"A dataset mixture must be a mapping with a `datasets` list, got {type(config).__name__}.")
    unknown = sorted(set(top) - {"datasets", "seed", "test_split_size", "streaming"})
    if unknown:
        raise ValueError(
            f"Dataset mixture: unknown key(s) {unknown}; a mixture takes `datasets` (a list), `seed` and "
            "`test_split_size`."
        )
    datasets = top.pop("datasets", None)
    if not isinstance(datasets, (list, tuple)) or not datasets:
        raise ValueError(f"Dataset mixture: `datasets` must be a non-empty list of entries, got {datasets!r:.80}.")
    entries = []
    for k, entry in enumerate(datasets):
        if dataclasses.is_dataclass(entry) and not isinstance(entry, type):
            entry = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
        if not isinstance(entry, Mapping):
            raise ValueError(f"Dataset mixture entry {k}: must be a mapping, got {entry!r:.80}.")
        entry = dict(entry)
        form = "trl" if "path" in entry else "handbook" if "id" in entry else None
        if form is None:
            raise ValueError(
                f"Dataset mixture entry {k}: give `path` (TRL's `datasets:` form) or `id` (the handbook's "
                f"`dataset_mixture:` form); keys found: {sorted(entry)}."
            )
        allowed = (_TRL_KEYS if form == "trl" else _HANDBOOK_KEYS) + _ADAPTER_KEYS
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise ValueError(f"Dataset mixture entry {k}: unknown key(s) {unknown}; allowed: {list(allowed)}.")
        entry["_form"] = form
        entries.append(entry)
    if len({e["_form"] for e in entries}) > 1:
        raise ValueError("Dataset mixture: use one form for every entry (all `path` + `fraction`, or all `id` + "
                         "`weight`).")  # fmt: skip
    return entries, top


def _fraction_of(value, what: str, k: int) -> float:
    v = to_float(value, f"Dataset mixture entry {k}", what)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"Dataset mixture entry {k}: {what} must be a finite number >= 0, got {value!r}.")
    return v


def load_mixture(config, default_adapter: str | None = None, default_adapter_kwargs: Mapping | str | None = None):
    """Load and combine the datasets of a mixture; returns `(train, test)` (`test` is `None` without
    `test_split_size`).

    Two forms are read (one per mixture):

    - TRL's `datasets:` list (`trl.scripts.utils.DatasetMixtureConfig`, or the same as a dict): entries with `path`,
      `name`, `data_dir`, `data_files`, `split` (default `"train"`), `columns` and `fraction`. Fractions are set for
      all entries or none; they are normalised to shares of the mixture and the mixture is the largest one that
      oversamples no dataset (the first `round(share * N)` rows of each, TRL's rule).
    - The alignment handbook's `dataset_mixture:` block: `datasets` entries with `id`, `config`, `split` (default
      `"train"`), `columns` and `weight` (default 1.0: the share of that dataset's rows kept, in (0, 1], after a
      shuffle with `seed`), plus `seed` (default 0).

    Both take `test_split_size` (a fraction of the combined rows split off as the test set, with `seed`), and each
    entry may set `adapter` / `adapter_kwargs` (default: `default_adapter` / `default_adapter_kwargs`), applied after
    loading and before `columns` are selected, so that entries from different sources can be given one schema. A
    `path` / `id` that exists locally is read with `load_dataset_any`, anything else with `datasets.load_dataset`.

    ```python
    train, test = load_mixture({
        "datasets": [
            {"id": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs", "weight": 0.5,
             "adapter": "ultrafeedback_binarized_pairs"},
            {"id": "pairs.jsonl", "weight": 1.0},
        ],
        "seed": 42,
        "test_split_size": 0.05,
    })
    ```
    """
    from datasets import concatenate_datasets

    entries, top = _entries(config)
    if top.get("streaming"):
        raise ValueError(
            "Dataset mixture: streaming is not supported with adapters / weights; set `streaming: false`."
        )
    seed = top.get("seed") or 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Dataset mixture: `seed` must be an integer, got {seed!r}.")
    parts = []
    for k, e in enumerate(entries):
        trl_form = e["_form"] == "trl"
        path = e["path"] if trl_form else e["id"]
        if not isinstance(path, str) or not path:
            raise ValueError(
                f"Dataset mixture entry {k}: `{'path' if trl_form else 'id'}` must be a non-empty string."
            )
        extra = {"data_dir": e.get("data_dir"), "data_files": e.get("data_files")} if trl_form else {}
        ds = load_source(path, e.get("split") or "train", e.get("name") if trl_form else e.get("config"), **extra)
        adapter = e.get("adapter", default_adapter)
        if adapter:
            kwargs = e.get("adapter_kwargs") if "adapter" in e else default_adapter_kwargs
            ds = apply_adapter(ds, adapter, kwargs)
        if e.get("columns") is not None:
            missing = [c for c in e["columns"] if c not in ds.column_names]
            if missing:
                raise ValueError(
                    f"Dataset mixture entry {k} ({path}): `columns` names {missing}, which the dataset does not have "
                    f"(columns: {ds.column_names})."
                )
            ds = ds.select_columns(list(e["columns"]))
        if not trl_form:
            weight = _fraction_of(e.get("weight", 1.0) if e.get("weight") is not None else 1.0, "`weight`", k)
            if not 0 < weight <= 1:
                raise ValueError(
                    f"Dataset mixture entry {k} ({path}): `weight` is the share of its rows kept and must be in "
                    f"(0, 1], got {weight}."
                )
            if weight < 1:
                ds = ds.shuffle(seed=seed).select(range(int(weight * len(ds))))
        parts.append((path, ds, e.get("fraction")))
    fractions = [f for _, _, f in parts]
    if any(f is not None for f in fractions):
        if any(f is None for f in fractions):
            raise ValueError("Dataset mixture: `fraction` must be set for every entry or for none.")
        values = [_fraction_of(f, "`fraction`", k) for k, f in enumerate(fractions)]
        if sum(values) <= 0:
            raise ValueError("Dataset mixture: the fractions sum to 0; give at least one positive fraction.")
        shares = [v / sum(values) for v in values]
        total = min(len(ds) / s for (_, ds, _), s in zip(parts, shares) if s > 0)
        parts = [(p, ds.select(range(round(s * total))), f) for (p, ds, f), s in zip(parts, shares)]
    schemas = "; ".join(f"{p}: {ds.column_names}" for p, ds, _ in parts)
    fix = "Give each entry an adapter and `columns` so that they match."
    if len({frozenset(ds.column_names) for _, ds, _ in parts}) > 1:  # concatenate would fill the gaps with nulls
        raise ValueError(f"Dataset mixture: the entries do not share one schema. Columns: {schemas}. {fix}")
    try:
        combined = concatenate_datasets([ds for _, ds, _ in parts])
    except ValueError as err:
        raise ValueError(
            f"Dataset mixture: the entries do not share one schema ({' '.join(str(err).split())}). Columns: {schemas}. "
            f"{fix}"
        ) from None
    if len(combined) == 0:
        raise ValueError("Dataset mixture: no rows (every entry is empty after weights / fractions).")
    test_size = top.get("test_split_size")
    if test_size is None:
        return combined, None
    split = combined.train_test_split(test_size=test_size, seed=seed)
    return split["train"], split["test"]
