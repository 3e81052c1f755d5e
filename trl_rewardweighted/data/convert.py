"""Conversions between the three dataset shapes, and saving / loading them. Pure data: no models.

- **groups** (VCB, the output of `trl-rw sample`): `prompt, completions: list[str], rewards: list[float]`
- **rows** (VAR): `prompt, completion, reward`, one row per completion
- **pairs** (DPO, reward-augmented DPO): `prompt, chosen, rejected, score_chosen, score_rejected`

With conversational prompts (message lists), `completion` / `chosen` / `rejected` are written as one assistant
message `[{"role": "assistant", "content": text}]`, TRL's conversational prompt-completion and preference formats;
with string prompts they are plain strings. In groups, completions are always plain strings.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import random
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .utils import completion_text, is_messages, replace_atomically, to_float

__all__ = [
    "groups_to_rows",
    "rows_to_groups",
    "groups_to_pairs",
    "save_dataset",
    "save_datasets",
    "check_output_path",
    "load_dataset_any",
    "read_text_lines",
    "read_prompts",
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
    """`"groups"`, `"rows"` or `"pairs"` from the column names (raises ValueError naming the columns found)."""
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
    """One row per completion: `prompt, completion, reward` plus every other column of the group, repeated.

    Groups with `n` completions give `n` rows, in order. Rewards are kept as they are (NaN stays NaN: the VAR
    trainer skips and counts those rows). With a conversational prompt the completion becomes
    `[{"role": "assistant", "content": text}]`.
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
    """Group `prompt, completion, reward` rows by identical prompt into `prompt, completions, rewards`.

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


# How each pair strategy picks (chosen, rejected) indices from the valid (index, reward) items of a group.
PAIR_SELECTORS = {"best_worst": _best_worst, "best_vs_rest": _best_vs_rest, "all_pairs": _all_pairs}


def groups_to_pairs(
    ds,
    strategy: str = "best_worst",
    ties: str = "drop",
    seed: int = 0,
    completions_column: str = "completions",
    rewards_column: str = "rewards",
):
    """Preference pairs `prompt, chosen, rejected, score_chosen, score_rejected` from scored groups.

    Strategies (`chosen` always has the higher reward):

    - `"best_worst"`: one pair per group, the highest- against the lowest-reward completion.
    - `"best_vs_rest"`: the best completion against every other one (`n - 1` pairs per group).
    - `"all_pairs"`: every pair of completions with different rewards (`n (n - 1) / 2` at most).

    `ties`: `"drop"` (default) skips pairs whose two rewards are equal (with `best_worst`, a group whose rewards
    are all equal gives no pair); `"keep"` keeps them (the earlier completion is `chosen` in `all_pairs`).
    When several completions share the best (or worst) reward, `seed` picks one at random, reproducibly.

    NaN rewards are excluded (a warning gives the count); groups left with fewer than 2 completions give no pair.
    Pairs come in group order, then completion order. Other columns are carried over. Conversational prompts give
    `chosen` / `rejected` as `[{"role": "assistant", "content": text}]` lists.
    """
    if strategy not in PAIR_SELECTORS:
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
        pairs = PAIR_SELECTORS[strategy](valid, ties, rng)
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
# Save
# ----------------------------------------------------------------------------------------------------------------------

# Files that mark a folder written by `save_to_disk` (a Dataset or a DatasetDict).
_DATASET_FOLDER_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


# Data-file suffixes that `save_dataset` does not write: refused rather than silently made a folder of that name.
_UNWRITTEN_FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".xlsx", ".yaml", ".yml")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    return "disk"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_output_path(path, overwrite: bool = False, option: str = "overwrite=True") -> Path:
    """Check that `path` may be written by [`save_dataset`]; return it as a `Path`.

    An existing output raises `FileExistsError` naming `path` and `option` (the switch that allows replacing
    it) unless `overwrite`. Even with `overwrite`, an output is only replaced by one of its kind: a file by a file,
    and a folder only when it is empty or was written by `save_to_disk` (a folder of other files is never removed).
    """
    path = Path(path)
    if path.suffix.lower() in _UNWRITTEN_FILE_SUFFIXES:
        raise ValueError(
            f"{path}: {path.suffix} files are not written (a name with another suffix would become a save_to_disk "
            "folder). Give a .jsonl, .json or .parquet file, or a folder name without a file suffix."
        )
    if not _exists(path):
        return path
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass {option} to replace it.")
    if _format_of(path) == "disk":
        if not path.is_dir():
            raise ValueError(
                f"{path} is a file, but an output without a .jsonl / .json / .parquet suffix is written as a "
                "save_to_disk folder; give another output path."
            )
        if any(path.iterdir()) and not any((path / name).exists() for name in _DATASET_FOLDER_MARKERS):
            raise ValueError(
                f"{path} is a folder that was not written by save_to_disk; it is not replaced. Give another output "
                "path."
            )
    elif path.is_dir():
        raise ValueError(f"{path} is a folder, but a {path.suffix} output is a file; give another output path.")
    return path


def _write(ds, path: Path, fmt: str) -> None:
    if fmt == "json":
        ds.to_json(str(path), lines=True, force_ascii=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))


def save_datasets(items: Sequence[tuple[Any, Any]], overwrite: bool = True) -> list[str]:
    """Write several `(dataset, path)` pairs as [`save_dataset`] does, all or nothing.

    Every dataset is first written to a temporary next to its path; only when all writes succeeded are they moved
    into place (with [`~data.utils.replace_atomically`]). A failure (or Ctrl-C) while writing leaves every existing
    output as it was and no temporary behind. Returns the paths as strings.
    """
    paths = [Path(path) for _, path in items]
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise ValueError(f"The output path {path} is given twice; give each output its own path.")
        seen[key] = path
        check_output_path(path, overwrite)
    with contextlib.ExitStack() as outputs:  # every temporary is written before any output is replaced
        for (ds, _), path in zip(items, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(ds, outputs.enter_context(replace_atomically(path)), _format_of(path))
    return [str(path) for path in paths]


def save_dataset(ds, path, overwrite: bool = True) -> str:
    """Write `ds` by the suffix of `path`: `.jsonl` / `.json` → JSON lines, `.parquet` → Parquet, anything
    else → a `save_to_disk` folder (data-file suffixes it does not write, such as `.csv`, are refused). Parent folders
    are created. Returns `str(path)`.

    The data is written to a hidden temporary in the same folder and renamed to `path` only when complete, so an
    interrupted write never leaves a truncated file, and an existing output stays as it was until the new one is
    complete. With `overwrite=False` an existing `path` raises `FileExistsError`; with `overwrite=True`
    (default) it is replaced, but only by an output of its kind (see [`check_output_path`]).

    JSON has no NaN: NaN rewards are written as `null` and [`load_dataset_any`] turns them back into NaN.
    """
    return save_datasets([(ds, path)], overwrite=overwrite)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------------------

_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _not_utf8(path: Path, line: int) -> ValueError:
    return ValueError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8.")


def read_text_lines(path) -> Iterator[tuple[int, str]]:
    """`(line number, text)` for every line of a UTF-8 text file, blank lines included.

    Line numbers are 1-based, as an editor shows them; the text has no line end (`\\n` or `\\r\\n`). A leading
    byte-order mark is skipped. Bytes that are not UTF-8 raise `ValueError` naming `path:line`.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield lineno, raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(path, lineno) from None


def _json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _a(kind: str) -> str:
    """`kind` with its article: "a string", "an object" ("null" alone)."""
    if kind == "null":
        return kind
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _json_layout(path: Path) -> str:
    """How a JSON file holds its rows, from its first non-blank line: `"array"` (`[{...}, ...]`), `"columns"` (a
    pretty-printed `{"column": [...]}` object: its first line is not JSON on its own) or `"lines"` (one object per
    line, the format [`save_dataset`] writes)."""
    for _, text in read_text_lines(path):
        if text := text.lstrip():
            if text.startswith("["):
                return "array"
            try:
                json.loads(text)
            except json.JSONDecodeError:
                return "columns" if text.startswith("{") else "lines"
            return "lines"
    return "lines"


def _not_a_row(path: Path, line: int, value: Any) -> ValueError:
    return ValueError(f"{path}:{line}: expected a JSON object (one row), got {_a(_json_kind(value))}.")


def _read_json_document(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, data.count(b"\n", 0, err.start) + 1) from None


def _read_json_array(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a JSON document `[{...}, {...}, ...]`, each with the line it starts on."""
    text = _read_json_document(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        message = "Extra data after the closing ']'" if err.msg == "Extra data" else err.msg
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {message} (column {err.colno}).") from None
    decoder, lines = json.JSONDecoder(), []
    pos, counted, line = text.index("[") + 1, 0, 1
    for row in rows:  # the document is valid: step from one item to the next to count the lines before each
        pos = _JSON_WHITESPACE.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        if not isinstance(row, dict):
            raise _not_a_row(path, line, row)
        lines.append(line)
        pos = _JSON_WHITESPACE.match(text, decoder.raw_decode(text, pos)[1]).end() + 1  # past the ","
    return rows, lines


def _read_json_columns(path: Path) -> list[dict] | None:
    """Rows of a JSON document `{"column": [values...], ...}`; None when the file is not such a document."""
    try:
        doc = json.loads(_read_json_document(path))
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc or not all(isinstance(v, list) for v in doc.values()):
        return None
    lengths = {name: len(values) for name, values in doc.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: a JSON object of columns needs lists of one length; got lengths {lengths}.")
    return [dict(zip(doc, values)) for values in zip(*doc.values())]


def _read_json_rows(path: Path, layout: str) -> tuple[list[dict], list[int] | None]:
    """The rows of a JSON file of that [`_json_layout`] and the line each starts on (None for an object of columns;
    lines: blank lines skipped)."""
    if layout == "array":
        return _read_json_array(path)
    if layout == "columns" and (columns := _read_json_columns(path)) is not None:
        return columns, None
    rows, lines = [], []
    for lineno, text in read_text_lines(path):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno}).") from None
        if not isinstance(row, dict):
            raise _not_a_row(path, lineno, row)
        rows.append(row)
        lines.append(lineno)
    return rows, lines


def _check_prompt_kinds(prompts: list, where: Callable[[int], str]) -> None:
    """Every prompt is a string, or every prompt is a message list; name the first row that differs."""

    def kind(prompt) -> str | None:
        if isinstance(prompt, str):
            return "string"
        return "message list" if is_messages(prompt) else None

    first = kind(prompts[0])
    for i, prompt in enumerate(prompts):
        current = kind(prompt)
        if current is None:
            raise ValueError(
                f"{where(i)}: `prompt` is {_a(_json_kind(prompt))}; expected a string or a list of "
                "{'role': ..., 'content': ...} messages."
            )
        if current == "message list":
            bad = next((m for m in prompt if "role" not in m or "content" not in m), None)
            if bad is not None:
                raise ValueError(f"{where(i)}: `prompt` has a message without 'role' / 'content': {bad!r:.80}.")
        if current != first:
            raise ValueError(
                f"{where(i)}: `prompt` is a {current}, but the prompt at {where(0)} is a {first}; use one kind for "
                "the whole file (all strings, or all message lists)."
            )


def _json_float(value: Any, where: Callable[[int], str], i: int, what: str) -> float:
    if type(value) is float or type(value) is int:  # the common case, without formatting `where` (bool is refused)
        return float(value)
    return to_float(value, where(i), what)


def _json_floats(name: str, values: list, where: Callable[[int], str]) -> list:
    """A reward column as floats (null → NaN); anything else than a number (a string, a boolean) is refused."""
    if name != "rewards":
        return [_json_float(v, where, i, f"`{name}`") for i, v in enumerate(values)]
    out = []
    for i, group in enumerate(values):
        if not isinstance(group, list):
            raise ValueError(
                f"{where(i)}: `rewards` is {_a(_json_kind(group))}; it must be a list of numbers, one per completion "
                "(null for a missing one)."
            )
        out.append([_json_float(v, where, i, f"`rewards`[{j}]") for j, v in enumerate(group)])
    return out


def _mismatch(values: list) -> tuple[int, int] | None:
    """`(first, i)`: the first row holding a value, and the first later row whose value has another type."""
    import pyarrow as pa

    first = next((i for i, v in enumerate(values) if v is not None), None)
    if first is None:
        return None
    kind = _json_kind(values[first])
    for i in range(first + 1, len(values)):
        if values[i] is not None and _json_kind(values[i]) != kind:
            return first, i
    for i in range(first + 1, len(values)):  # same JSON kind, but nested types that do not fit together
        try:
            pa.array([values[first], values[i]])
        except (pa.ArrowException, OverflowError):
            return first, i
    return None


def _dataset_from_rows(path: Path, rows: list[dict], lines: list[int] | None):
    """A Dataset from parsed JSON rows, checked: one kind of prompt, numeric reward columns, one type per column."""
    import pyarrow as pa
    from datasets import Dataset

    def where(i: int) -> str:
        return f"{path}:{lines[i]}" if lines is not None else f"{path}, row {i}"

    if not rows:
        raise ValueError(f"{path}: no rows")
    names = dict.fromkeys(name for row in rows for name in row)  # in order of first appearance
    columns = {name: [row.get(name) for row in rows] for name in names}
    if "prompt" in columns:
        _check_prompt_kinds(columns["prompt"], where)
    for name in _FLOAT_COLUMNS:
        if name in columns:
            columns[name] = _json_floats(name, columns[name], where)
    try:
        return Dataset.from_dict(columns)
    except (pa.ArrowException, OverflowError) as err:
        for name, values in columns.items():
            try:
                Dataset.from_dict({name: values})
            except (pa.ArrowException, OverflowError):
                found = _mismatch(values)
                if found is None:
                    break
                first, i = found
                kind, first_kind = _json_kind(values[i]), _json_kind(values[first])
                what = (
                    f"is {_a(kind)}, but at {where(first)} it is {_a(first_kind)}"
                    if kind != first_kind
                    else f"has another structure than at {where(first)} (a field or item of another type)"
                )
                raise ValueError(f"{where(i)}: `{name}` {what}; a column must hold one type in every row.") from None
        raise ValueError(f"{path}: the rows do not fit one table ({err}); give each column one type.") from None


def _item(feature):
    """The item feature of a list feature (`List`, `Sequence` or `[feature]`); `None` for any other feature."""
    return feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)


def _plain_json(feature) -> bool:
    """Whether `feature` holds JSON values as they are: no timestamps inferred from strings, no mixed-type `Json`."""
    if isinstance(feature, dict):
        return all(_plain_json(f) for f in feature.values())
    if _item(feature) is not None:
        return _plain_json(_item(feature))
    return type(feature).__name__ == "Value" and feature.dtype in ("string", "int64", "float64", "bool", "null")


def _passes_checks(ds) -> bool:
    """Whether `ds` passes, by its Arrow types and null counts, the checks `_dataset_from_rows` makes row by row:
    valid UTF-8; prompts all strings or all non-empty lists of messages with `role` and `content`; reward columns
    numbers or null (`rewards`: a list of them per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table, features = ds.data.table, ds.features
    try:
        table.validate(full=True)  # Arrow's reader lets bytes that are not UTF-8 through
    except pa.ArrowInvalid:
        return False
    if not _plain_json(features):
        return False
    if "prompt" in features:
        prompt, message = table.column("prompt"), _item(features["prompt"])
        if prompt.null_count:
            return False
        if getattr(features["prompt"], "dtype", None) != "string" and not (
            isinstance(message, dict)
            and {"role", "content"} <= set(message)
            and pc.min(pc.list_value_length(prompt)).as_py() > 0
            and not any(pc.struct_field(pc.list_flatten(prompt), key).null_count for key in ("role", "content"))
        ):
            return False
    for name in set(_FLOAT_COLUMNS) & set(features):
        feature = features[name]
        if name == "rewards" and (table.column(name).null_count or _item(feature) is None):
            return False
        if getattr(_item(feature) if name == "rewards" else feature, "dtype", None) not in (
            "int64",
            "float64",
            "null",
        ):
            return False
    return True


def _load_json_lines(path: Path):
    """A JSON lines file read by `datasets` (Arrow's JSON reader), reward columns as floats; `None` when `datasets`
    cannot read it or its result does not pass the checks of `_dataset_from_rows` (which then names the line)."""
    import tempfile

    import datasets
    from datasets import Dataset
    from datasets.packaged_modules.json.json import JsonConfig

    quiet = logging.getLogger("datasets")  # its own error log is replaced by the file:line message
    level, bars = quiet.level, datasets.are_progress_bars_disabled()
    quiet.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        # A private cache, dropped after the rows are in memory: a cached copy could outlive an edit of the file.
        with tempfile.TemporaryDirectory() as cache:
            options = {"parse_agent_traces": False} if "parse_agent_traces" in JsonConfig.__dataclass_fields__ else {}
            ds = Dataset.from_json(str(path), cache_dir=cache, keep_in_memory=True, **options)
    except Exception:  # any failure: the Python reader names the line, or reads what Arrow could not
        return None
    finally:
        quiet.setLevel(level)
        if not bars:
            datasets.enable_progress_bars()
    if not _passes_checks(ds):
        return None
    table = ds.data.table
    for name in _FLOAT_COLUMNS:
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, _floats(table.column(name)))
    return Dataset(table)


def _floats(column):
    """A column of numbers or nulls (or lists of them) as float64, null -> NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_list(column.type):
        return pc.fill_null(column.cast(pa.float64()), math.nan)
    return pa.chunked_array(
        [pa.ListArray.from_arrays(chunk.offsets, _floats(chunk.values)) for chunk in column.chunks],
        pa.list_(pa.float64()),
    )


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


def _load_parquet(path: Path):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_parquet(str(path))
    except (pa.ArrowException, DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise ValueError(f"{path}: not a readable Parquet file ({cause}).") from None


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
    """Load a dataset written by [`save_dataset`] (or any such file): a `.jsonl` / `.json` file, a
    `.parquet` file, or a `save_to_disk` folder. Reward columns read back with nulls get NaN.

    A `save_to_disk` folder holding a `DatasetDict` gives its `train` split (or its only split); with
    `keep_splits=True` the whole `DatasetDict` is returned instead.

    JSON lines files are parsed by `datasets` (Arrow's JSON reader) into memory, then checked: each line (blank lines
    skipped) is one JSON object; all prompts are strings or all are message lists; the reward columns (`reward`,
    `rewards`, `score_chosen`, `score_rejected`) hold numbers or null (a string or a boolean is refused; they are
    read as floats); each column holds one type. When `datasets` fails or a check does, the file is read again line
    by line (see [`read_text_lines`]) so that the error names the file and line as an editor shows it
    (`data.jsonl:5001: invalid JSON: ...`). The same line-by-line reader reads what Arrow would change (strings that
    look like dates stay strings), a JSON file that is one array of row objects, and one object of equal-length
    columns. A file with no rows raises `ValueError("<path>: no rows")`.
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
            layout = _json_layout(path)
            ds = _load_json_lines(path) if layout == "lines" else None
            return ds if ds is not None else _dataset_from_rows(path, *_read_json_rows(path, layout))
        if fmt == "parquet":
            ds = _load_parquet(path)
        else:
            raise ValueError(
                f"Unknown dataset format for {path}: use .jsonl, .json, .parquet or a save_to_disk folder."
            )
    if isinstance(ds, Dataset) and len(ds) == 0:
        raise ValueError(f"{path}: no rows")
    return _restore_nan(ds)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------------------------


def read_prompts(path):
    """The prompts of a prompt file, as a `datasets.Dataset` with a `prompt` column: the one reader of every command
    that takes prompts (`trl-rw generate`, `sample`, `eval`, `compare`, `iterate`).

    - `.txt`: one prompt per line, as written (the line end removed). Blank lines and lines whose first non-blank
      character is `#` (comments) are skipped: a prompt that starts with `#` goes in a `.jsonl` file instead.
      Bytes that are not UTF-8 are refused naming `file:line`.
    - Anything else ([`load_dataset_any`]: `.jsonl`, `.json`, `.parquet`, a `save_to_disk` folder) needs a `prompt`
      column of strings or message lists; its other columns are kept.

    Args:
        path (`str` or `os.PathLike`):
            The prompt file or folder.

    Returns:
        `datasets.Dataset`: at least one row.
    """
    from datasets import Dataset

    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file not found: {path}")
        prompts = [line for _, line in read_text_lines(path) if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"{path}: no rows")
        return Dataset.from_dict({"prompt": prompts})
    ds = load_dataset_any(path)
    if "prompt" not in ds.column_names:
        raise ValueError(f"{path} has no `prompt` column; columns found: {ds.column_names}.")
    return ds
