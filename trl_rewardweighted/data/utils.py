"""Model-free helpers shared by the dataset transforms, the sampling code and the trainers (no torch import)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "check_float_column",
    "dumps_json",
    "json_safe",
    "write_json",
    "replace_atomically",
    "remove_path",
    "check_prompt_and_completion",
    "check_text_or_messages",
    "completion_text",
    "first_row",
    "is_messages",
    "messages_problem",
    "to_float",
]


def is_messages(value: Any) -> bool:
    """True when `value` is a non-empty list of `{"role": ..., "content": ...}` messages (TRL's conversational
    format)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a usable chat-message list (`None` when it is): a non-empty list of dicts, each with a
    string `role` and a `content` that is a string (or a list of parts); `content` may be missing only on a message
    that carries `tool_calls`."""
    if not isinstance(messages, (list, tuple)):
        return f"it is {type(messages).__name__}, not a list of messages"
    if len(messages) == 0:
        return "it is an empty message list"
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {k} is {type(message).__name__} ({message!r:.60}), not a dict with `role` and `content`"
        role = message.get("role")
        if not isinstance(role, str) or not role:
            return f"message {k} has no `role` (got {role!r}); each message needs a role such as 'user' or 'assistant'"
        content = message.get("content")
        if content is None:
            if message.get("tool_calls"):
                continue
            return f"message {k} ({role!r}) has no `content`"
        if not isinstance(content, (str, list)):
            return (
                f"message {k} ({role!r}) has content {content!r:.60} of type {type(content).__name__}; content must "
                "be a string"
            )
    return None


def check_text_or_messages(value: Any, where: str) -> bool:
    """Raise a `ValueError` starting with `where` (e.g. "Row 3: `prompt`") unless `value` is a string or a usable
    message list (see [`messages_problem`]); return `True` for a message list."""
    if isinstance(value, str):
        return False
    if isinstance(value, (list, tuple)):
        problem = messages_problem(value)
        if problem is None:
            return True
        raise ValueError(
            f"{where}: {problem}. Give a string, or a non-empty list of {{'role': ..., 'content': <string>}} messages."
        )
    raise ValueError(
        f"{where} is {value!r:.60} ({type(value).__name__}): it must be a string or a list of "
        "{'role': ..., 'content': <string>} messages. Fix or drop the row."
    )


def check_prompt_and_completion(
    prompt: Any, completion: Any, row: int, prompt_column: str = "prompt", completion_column: str = "completion"
) -> None:
    """Check one prompt/completion row before it is tokenised: both strings, or both message lists (TRL's standard and
    conversational formats), each well formed. The `ValueError` names the row, the column and the fix, instead of the
    tokenizer's or the chat template's error."""
    chat_prompt = check_text_or_messages(prompt, f"Row {row}: `{prompt_column}`")
    chat_completion = check_text_or_messages(completion, f"Row {row}: `{completion_column}`")
    if chat_prompt != chat_completion:
        kinds = {True: "a message list", False: "a string"}
        raise ValueError(
            f"Row {row}: `{prompt_column}` is {kinds[chat_prompt]} but `{completion_column}` is "
            f"{kinds[chat_completion]}; both must be strings (standard format) or both message lists (conversational "
            f"format, e.g. `{completion_column}=[{{'role': 'assistant', 'content': ...}}]`)."
        )


def completion_text(completion: Any, where: str = "A completion") -> str:
    """A completion as plain text: a string, or the concatenated contents of an assistant message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if is_messages(completion):
        return "".join(str(m.get("content") or "") for m in completion)
    raise ValueError(
        f"{where}: a completion must be a string or an assistant message list, got {type(completion).__name__} "
        f"({completion!r:.80})."
    )


def to_float(value: Any, where: str, what: str = "reward") -> float:
    """`value` as a float; `None` becomes NaN (a missing value the trainers skip and count).

    Booleans and strings are refused: `True` is not a reward of 1.0, and `"0.5"` is a formatting error upstream.
    """
    if value is None:
        return math.nan
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError(f"{where}: {what} {value!r} ({type(value).__name__}) is not a number; give a float.")
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {what} {value!r} ({type(value).__name__}) is not a number; give a float.") from err


def first_row(dataset, label: str, needs: str = "") -> dict:
    """The first row of `dataset` (map-style or streaming), or a `ValueError` saying the `label` (e.g. "train dataset")
    is empty, followed by `needs` (what a row must hold), instead of a bare `StopIteration` or an Arrow type error."""
    try:
        return next(iter(dataset))
    except StopIteration:
        raise ValueError(f"The {label} is empty (0 rows). {needs}".rstrip()) from None


def check_float_column(dataset, column: str, fix: str, list_valued: bool = False) -> None:
    """Raise a clear error when `column` is missing or not numeric (a float, or a list of floats if list_valued).

    Non-finite values (NaN/inf) are allowed here: the trainers skip and count them. Booleans are refused.
    """
    from datasets import Dataset

    names = getattr(dataset, "column_names", None)
    if names is None and not isinstance(dataset, Dataset):
        return  # an IterableDataset with unknown features: values are checked in the collator
    names = list(names or [])
    if column not in names:
        raise ValueError(f"The dataset has no `{column}` column (columns: {names}). {fix}")
    if not isinstance(dataset, Dataset):
        return  # IterableDataset: values are checked in the collator
    feature = dataset.features[column]
    dtype = getattr(feature, "dtype", None)
    inner = getattr(feature, "feature", None)
    if list_valued and inner is None and dtype is not None and dtype != "bool":
        # A scalar where a list is expected.
        for i, value in enumerate(dataset[column]):
            raise ValueError(
                f"Column `{column}` must hold a list of numbers per row (one per completion), but row {i} has the "
                f"scalar {value!r}. {fix}"
            )
    if list_valued:
        dtype = getattr(inner, "dtype", None)
    if dtype == "bool":
        raise ValueError(
            f"Column `{column}` holds booleans ({feature}); rewards must be numbers (a bool is not read as 1/0). "
            f"Cast it to float if that is what you mean. {fix}"
        )
    numeric = dtype is not None and (dtype.startswith("float") or dtype.startswith("int"))
    if numeric:
        return
    # Find the first offending row to name it.
    for i, value in enumerate(dataset[column]):
        if list_valued and not isinstance(value, (list, tuple)):
            raise ValueError(
                f"Column `{column}` must hold a list of numbers per row (one per completion), but row {i} has "
                f"{value!r} ({type(value).__name__}). {fix}"
            )
        values = value if list_valued else [value]
        for v in values:
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(
                    f"Column `{column}` must hold {'lists of ' if list_valued else ''}numbers, but row {i} has "
                    f"{value!r} ({type(v).__name__}). {fix}"
                )
    raise ValueError(f"Column `{column}` has type {feature} but must be numeric. {fix}")


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by `None`, so that it serialises as standard JSON.

    Python's `json` writes NaN as the bare token `NaN`, which is not JSON (jq, JavaScript and strict parsers refuse
    it). Every JSON file this package writes goes through this function: an undefined number is `null`. Numpy scalars
    and arrays, 0-d tensors, tuples and `pathlib.Path` values are converted on the way.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(value.tolist())
    if hasattr(value, "item"):
        return json_safe(value.item())
    raise TypeError(f"Cannot write {type(value).__name__} {value!r:.80} as JSON.")


def dumps_json(value: Any, indent: int | None = 1, **kwargs) -> str:
    """Standard JSON text of `value` (non-finite floats as `null`, see [`json_safe`]); never emits `NaN`."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 1, **kwargs) -> Path:
    """Write `value` as standard JSON to `path`, atomically (see [`replace_atomically`]: a reader sees the old file or
    the new one, never half of one). Returns the path. Non-finite floats are written as `null` (see [`json_safe`])."""
    path = Path(path)
    text = dumps_json(value, indent=indent, **kwargs) + "\n"
    with replace_atomically(path) as tmp:
        tmp.write_text(text)
    return path


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a folder (a link itself, not what it points to); nothing when `path` does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """The one way this package replaces a file or a folder: write the new content to the yielded path, a hidden,
    unique temporary next to `path` (same folder, so that moving it is a rename); when the `with` block ends without
    an error, the temporary replaces `path`.

    A file is replaced atomically (`os.replace`): a reader sees the old file or the new one. A folder cannot be
    renamed over a non-empty one, so the old folder is first renamed aside, the new one renamed into place (the old
    one is put back if that fails), then the old one removed. On any error (Ctrl-C included), in the block or while
    moving, the temporary is removed, `path` is left as it was, and the error propagates. Nesting several of these in
    one `contextlib.ExitStack` replaces several outputs all or nothing as far as the writes go: a failed write removes
    every temporary before any output is touched.

    Args:
        path (`str` or `os.PathLike`):
            The file or folder to write; its parent folder must exist.

    Example:

    ```python
    >>> with replace_atomically("out/rows.jsonl") as tmp:
    ...     dataset.to_json(tmp)
    ```
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    old = None
    try:
        yield tmp
        if tmp.is_dir() and (path.exists() or path.is_symlink()):
            old = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.old"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
    except BaseException:
        remove_path(tmp)
        raise
    if old is not None:
        remove_path(old)
