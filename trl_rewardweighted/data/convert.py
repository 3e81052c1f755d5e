"""Conversions between the three dataset shapes, and saving / loading them. Pure data: no models.

- **groups** (VCB, the output of ``trl-rw sample``): ``prompt, completions: list[str], rewards: list[float]``
- **rows** (VAR): ``prompt, completion, reward``, one row per completion
- **pairs** (DPO, reward-augmented DPO): ``prompt, chosen, rejected, score_chosen, score_rejected``

With conversational prompts (message lists), ``completion`` / ``chosen`` / ``rejected`` are written as one assistant
message ``[{"role": "assistant", "content": text}]``, TRL's conversational prompt-completion and preference formats;
with string prompts they are plain strings. In groups, completions are always plain strings.
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .utils import completion_text, is_messages, to_float

__all__ = [
    "groups_to_rows",
    "rows_to_groups",
    "groups_to_pairs",
    "save_dataset",
    "load_dataset_any",
    "detect_shape",
    "PAIR_STRATEGIES",
    "TIE_OPTIONS",
]

logger = logging.getLogger(__name__)

PAIR_STRATEGIES = ("best_worst", "best_vs_rest", "all_pairs")
TIE_OPTIONS = ("drop", "keep")
SHAPES = {
    "groups": ("prompt", "completions", "rewards"),
    "rows": ("prompt", "completion", "reward"),
    "pairs": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
}
_FLOAT_COLUMNS = ("reward", "rewards", "score_chosen", "score_rejected")


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def _require_columns(ds, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{what} needs the columns {list(columns)}; missing {missing}; columns found: {ds.column_names}."
        )


def _columns(ds) -> dict[str, list]:
    return {name: list(ds[name]) for name in ds.column_names}


def _as_completion(text: str, conversational: bool):
    """A completion in the shape TRL expects next to this prompt: an assistant message list, or a string."""
    return [{"role": "assistant", "content": text}] if conversational else text


def _group(cols: dict[str, list], i: int, completions_column: str, rewards_column: str) -> tuple[list, list[float]]:
    completions, rewards = cols[completions_column][i], cols[rewards_column][i]
    if not isinstance(completions, (list, tuple)) or not isinstance(rewards, (list, tuple)):
        raise ValueError(
            f"Row {i}: `{completions_column}` and `{rewards_column}` must be lists (groups format); got "
            f"{type(completions).__name__} and {type(rewards).__name__}. Rows with one completion each use "
            "`completion` / `reward` (see rows_to_groups)."
        )
    if len(completions) != len(rewards):
        raise ValueError(
            f"Row {i}: {len(completions)} completions but {len(rewards)} rewards; they must be aligned one to one."
        )
    where = f"Row {i}"
    return [completion_text(c, where) for c in completions], [to_float(r, where) for r in rewards]


def _from_columns(out: dict[str, list]):
    from datasets import Dataset

    return Dataset.from_dict(out)


def detect_shape(ds) -> str:
    """``"groups"``, ``"rows"`` or ``"pairs"`` from the column names (raises ValueError naming the columns found)."""
    names = set(ds.column_names)
    if {"prompt", "completions"} <= names:
        return "groups"
    if {"prompt", "completion"} <= names:
        return "rows"
    if {"prompt", "chosen", "rejected"} <= names:
        return "pairs"
    raise ValueError(
        "Unrecognised dataset shape: expected groups (prompt, completions, rewards), rows (prompt, completion, "
        f"reward) or pairs (prompt, chosen, rejected, score_chosen, score_rejected); columns found: {ds.column_names}."
    )


# ----------------------------------------------------------------------------------------------------------------------
# groups <-> rows
# ----------------------------------------------------------------------------------------------------------------------


def groups_to_rows(ds, completions_column: str = "completions", rewards_column: str = "rewards"):
    """One row per completion: ``prompt, completion, reward`` plus every other column of the group, repeated.

    Groups with ``n`` completions give ``n`` rows, in order. Rewards are kept as they are (NaN stays NaN: the VAR
    trainer skips and counts those rows). With a conversational prompt the completion becomes
    ``[{"role": "assistant", "content": text}]``.
    """
    _require_columns(ds, ["prompt", completions_column, rewards_column], "groups_to_rows")
    extras = [c for c in ds.column_names if c not in ("prompt", completions_column, rewards_column)]
    clashes = [c for c in extras if c in ("completion", "reward")]
    if clashes:
        raise ValueError(f"groups_to_rows: the input already has column(s) {clashes}; rename or remove them first.")
    cols = _columns(ds)
    out: dict[str, list] = {"prompt": [], "completion": [], "reward": [], **{c: [] for c in extras}}
    for i, prompt in enumerate(cols["prompt"]):
        completions, rewards = _group(cols, i, completions_column, rewards_column)
        conversational = is_messages(prompt)
        for completion, reward in zip(completions, rewards):
            out["prompt"].append(prompt)
            out["completion"].append(_as_completion(completion, conversational))
            out["reward"].append(reward)
            for c in extras:
                out[c].append(cols[c][i])
    return _from_columns(out)


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


def rows_to_groups(ds):
    """Group ``prompt, completion, reward`` rows by identical prompt into ``prompt, completions, rewards``.

    Groups appear in the order of each prompt's first row; completions keep their row order and are stored as plain
    strings. Other columns take the value of the group's first row.
    """
    _require_columns(ds, ["prompt", "completion", "reward"], "rows_to_groups")
    extras = [c for c in ds.column_names if c not in ("prompt", "completion", "reward")]
    cols = _columns(ds)
    index: dict[str, int] = {}
    out: dict[str, list] = {"prompt": [], "completions": [], "rewards": [], **{c: [] for c in extras}}
    for i, prompt in enumerate(cols["prompt"]):
        key = _prompt_key(prompt)
        if key not in index:
            index[key] = len(out["prompt"])
            out["prompt"].append(prompt)
            out["completions"].append([])
            out["rewards"].append([])
            for c in extras:
                out[c].append(cols[c][i])
        g = index[key]
        out["completions"][g].append(completion_text(cols["completion"][i], f"Row {i}"))
        out["rewards"][g].append(to_float(cols["reward"][i], f"Row {i}"))
    return _from_columns(out)


# ----------------------------------------------------------------------------------------------------------------------
# groups -> pairs
# ----------------------------------------------------------------------------------------------------------------------


def _best_worst(valid: list[tuple[int, float]], ties: str, rng: random.Random) -> list[tuple[int, int]]:
    top = max(r for _, r in valid)
    bottom = min(r for _, r in valid)
    best = [j for j, r in valid if r == top]
    if top == bottom:  # every completion has the same reward
        if ties == "drop":
            return []
        chosen = rng.choice(best)
        return [(chosen, rng.choice([j for j in best if j != chosen]))]
    worst = [j for j, r in valid if r == bottom]
    return [(rng.choice(best), rng.choice(worst))]


def _best_vs_rest(valid: list[tuple[int, float]], ties: str, rng: random.Random) -> list[tuple[int, int]]:
    top = max(r for _, r in valid)
    chosen = rng.choice([j for j, r in valid if r == top])
    return [(chosen, j) for j, r in valid if j != chosen and (r < top or ties == "keep")]


def _all_pairs(valid: list[tuple[int, float]], ties: str, rng: random.Random) -> list[tuple[int, int]]:
    pairs = []
    for a, (ja, ra) in enumerate(valid):
        for jb, rb in valid[a + 1 :]:
            if ra > rb or (ra == rb and ties == "keep"):
                pairs.append((ja, jb))
            elif rb > ra:
                pairs.append((jb, ja))
    return pairs


_STRATEGY_FNS = {"best_worst": _best_worst, "best_vs_rest": _best_vs_rest, "all_pairs": _all_pairs}


def groups_to_pairs(
    ds,
    strategy: str = "best_worst",
    ties: str = "drop",
    seed: int = 0,
    completions_column: str = "completions",
    rewards_column: str = "rewards",
):
    """Preference pairs ``prompt, chosen, rejected, score_chosen, score_rejected`` from scored groups.

    Strategies (``chosen`` always has the higher reward):

    - ``"best_worst"``: one pair per group, the highest- against the lowest-reward completion.
    - ``"best_vs_rest"``: the best completion against every other one (``n - 1`` pairs per group).
    - ``"all_pairs"``: every pair of completions with different rewards (``n (n - 1) / 2`` at most).

    ``ties``: ``"drop"`` (default) skips pairs whose two rewards are equal (with ``best_worst``, a group whose rewards
    are all equal gives no pair); ``"keep"`` keeps them (the earlier completion is ``chosen`` in ``all_pairs``).
    When several completions share the best (or worst) reward, ``seed`` picks one at random, reproducibly.

    NaN rewards are excluded (a warning gives the count); groups left with fewer than 2 completions give no pair.
    Pairs come in group order, then completion order. Other columns are carried over. Conversational prompts give
    ``chosen`` / ``rejected`` as ``[{"role": "assistant", "content": text}]`` lists.
    """
    if strategy not in _STRATEGY_FNS:
        raise ValueError(f"Unknown pair strategy {strategy!r}; choose one of {PAIR_STRATEGIES}.")
    if ties not in TIE_OPTIONS:
        raise ValueError(f"Unknown ties option {ties!r}; choose one of {TIE_OPTIONS}.")
    _require_columns(ds, ["prompt", completions_column, rewards_column], "groups_to_pairs")
    extras = [c for c in ds.column_names if c not in ("prompt", completions_column, rewards_column)]
    clashes = [c for c in extras if c in SHAPES["pairs"]]
    if clashes:
        raise ValueError(f"groups_to_pairs: the input already has column(s) {clashes}; rename or remove them first.")
    cols = _columns(ds)
    rng = random.Random(seed)
    out: dict[str, list] = {name: [] for name in SHAPES["pairs"]}
    out.update({c: [] for c in extras})
    nan_count = too_small = no_pair = 0
    for i, prompt in enumerate(cols["prompt"]):
        completions, rewards = _group(cols, i, completions_column, rewards_column)
        valid = [(j, r) for j, r in enumerate(rewards) if not math.isnan(r)]
        nan_count += len(rewards) - len(valid)
        if len(valid) < 2:
            too_small += 1
            continue
        pairs = _STRATEGY_FNS[strategy](valid, ties, rng)
        no_pair += not pairs
        conversational = is_messages(prompt)
        for chosen, rejected in pairs:
            out["prompt"].append(prompt)
            out["chosen"].append(_as_completion(completions[chosen], conversational))
            out["rejected"].append(_as_completion(completions[rejected], conversational))
            out["score_chosen"].append(rewards[chosen])
            out["score_rejected"].append(rewards[rejected])
            for c in extras:
                out[c].append(cols[c][i])
    if nan_count or too_small:
        warnings.warn(
            f"groups_to_pairs: {nan_count} NaN reward(s) excluded; {too_small} group(s) with fewer than 2 finite "
            "rewards gave no pair."
        )
    if no_pair:
        logger.info("groups_to_pairs: %d group(s) gave no pair because all their rewards tie (ties='drop').", no_pair)
    if not out["prompt"]:
        warnings.warn("groups_to_pairs: no pair was produced (all groups tied, too small or NaN).")
    return _from_columns(out)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    return "disk"


def save_dataset(ds, path) -> str:
    """Write ``ds`` by the suffix of ``path``: ``.jsonl`` / ``.json`` → JSON lines, ``.parquet`` → Parquet, anything
    else → a ``save_to_disk`` folder. Parent folders are created. Returns ``str(path)``.

    JSON has no NaN: NaN rewards are written as ``null`` and :func:`load_dataset_any` turns them back into NaN.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = _format_of(path)
    if fmt == "json":
        ds.to_json(str(path), lines=True, force_ascii=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return str(path)


def _load_disk(path: Path, keep_splits: bool):
    from datasets import DatasetDict, load_from_disk

    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise ValueError(
            f"{path} is a folder but not one written by save_to_disk (no dataset_info.json / dataset_dict.json). "
            "Give a .jsonl, .json or .parquet file, or a save_to_disk folder."
        )
    ds = load_from_disk(str(path))
    if not isinstance(ds, DatasetDict) or keep_splits:
        return ds
    if "train" in ds:
        return ds["train"]
    if len(ds) == 1:
        return next(iter(ds.values()))
    raise ValueError(f"{path} holds several splits {list(ds)} and none is 'train'; save a single split.")


def _restore_nan(ds):
    """Turn nulls in reward columns (how JSON stores NaN) back into NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def has_nulls(name: str) -> bool:
        column = ds.data.column(name)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            column = pc.list_flatten(column)
        return column.null_count > 0

    names = [c for c in _FLOAT_COLUMNS if c in ds.column_names and has_nulls(c)]
    if not names:
        return ds

    def fix(batch):
        for name in names:
            values = batch[name]
            if name == "rewards":
                batch[name] = [[math.nan if v is None else v for v in (row or [])] for row in values]
            else:
                batch[name] = [math.nan if v is None else v for v in values]
        return batch

    return ds.map(fix, batched=True, desc="Restoring NaN rewards")


def load_dataset_any(path, keep_splits: bool = False):
    """Load a dataset written by :func:`save_dataset` (or any such file): a ``.jsonl`` / ``.json`` file, a
    ``.parquet`` file, or a ``save_to_disk`` folder. Reward columns read back with nulls get NaN.

    A ``save_to_disk`` folder holding a ``DatasetDict`` gives its ``train`` split (or its only split); with
    ``keep_splits=True`` the whole ``DatasetDict`` is returned instead.
    """
    from datasets import Dataset, DatasetDict

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file or folder: {path}")
    if path.is_dir():
        ds = _load_disk(path, keep_splits)
        if isinstance(ds, DatasetDict):
            return DatasetDict({name: _restore_nan(split) for name, split in ds.items()})
    else:
        fmt = _format_of(path)
        if fmt == "json":
            ds = Dataset.from_json(str(path))
        elif fmt == "parquet":
            ds = Dataset.from_parquet(str(path))
        else:
            raise ValueError(
                f"Unknown dataset format for {path}: use .jsonl, .json, .parquet or a save_to_disk folder."
            )
    return _restore_nan(ds)
