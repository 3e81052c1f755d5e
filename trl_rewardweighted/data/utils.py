"""Model-free helpers shared by the dataset transforms, the sampling code and the trainers (no torch import)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_float_column", "completion_text", "first_row", "is_messages", "to_float"]


def is_messages(value: Any) -> bool:
    """True when `value` is a non-empty list of `{"role": ..., "content": ...}` messages (TRL's conversational
    format)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


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
