"""Per-row sample weights: the column every trainer reads, and its checks. Pure data: no models.

A sample weight is a finite number >= 0 per row (per prompt group for VCB, per pair for DPO). The trainers use it as
a loss multiplier and normalise by the sum of the weights over the whole optimizer step (see `docs/weights.md`), so
only ratios between weights matter: multiplying every weight by the same constant changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .utils import to_float

__all__ = [
    "SAMPLE_WEIGHT_COLUMN",
    "check_sample_weights",
    "check_weight_column_name",
    "check_weight_columns",
    "eval_datasets_of",
    "example_weights",
    "sample_weight_column_of",
    "sample_weight_value",
]

SAMPLE_WEIGHT_COLUMN = "sample_weight"

# At most this many row numbers are named in an error.
_SHOWN = 10


def _rows(indices) -> str:
    indices = [int(i) for i in indices]
    more = f" and {len(indices) - _SHOWN} more" if len(indices) > _SHOWN else ""
    return f"{indices[:_SHOWN]}{more}"


def sample_weight_value(value: Any, where: str) -> float:
    """One sample weight as a float, or a `ValueError` naming `where` when it is missing, not a number, negative,
    NaN or infinite (used where rows are seen one batch at a time, e.g. a streamed dataset)."""
    if value is None:
        raise ValueError(f"{where}: the sample weight is missing (None); give a finite number >= 0.")
    weight = to_float(value, where, "sample weight")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}: sample weight {weight!r} is not a finite number >= 0.")
    return weight


def example_weights(examples, column: str, what: str = "row") -> list[float]:
    """The sample weight of each example of a batch being collated, checked by [`sample_weight_value`] (errors name
    the example as `what` and its index); an example without the `column` field weighs 1 (an evaluation dataset
    without the column)."""
    return [
        sample_weight_value(ex[column], f"Column `{column}`, {what} {i} of a batch") if column in ex else 1.0
        for i, ex in enumerate(examples)
    ]


def check_weight_column_name(name) -> None:
    """Refuse a `sample_weight_column` config value that is not a non-empty string."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`sample_weight_column` must be a non-empty column name, got {name!r}.")


def sample_weight_column_of(dataset, column: str, label: str, required: bool, default_name: bool = True) -> bool:
    """Whether `dataset` has the weight `column` (first row for a stream); missing and `required` (or named by the
    user, `default_name=False`) is an error naming the column, the columns found and the fix."""
    names = getattr(dataset, "column_names", None)
    if names is None:  # a stream with unknown features: read its first row
        try:
            names = list(next(iter(dataset)))
        except StopIteration:
            return False
    if column in names:
        return True
    if required or not default_name:
        raise ValueError(
            f"The {label} has no `{column}` column (columns: {list(names)}). Add one finite number >= 0 per row, or "
            "set `sample_weight_column` to the name of your weight column."
        )
    return False


def check_sample_weights(dataset, column: str, label: str) -> np.ndarray | None:
    """Check the weight `column` of a map-style `dataset` and return its values (float64), or None for a stream
    (whose rows are checked as they are collated, by [`sample_weight_value`]).

    Refused, naming the rows: a value that is missing, not a number, negative, NaN or infinite; and a column whose
    weights are all 0 (nothing would be trained).
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return None
    raw = dataset[column]
    fix = f"Sample weights must be finite numbers >= 0 (column `{column}` of the {label})."
    missing = [i for i, v in enumerate(raw) if v is None]
    if missing:
        raise ValueError(f"Rows {_rows(missing)} have no sample weight (None). {fix}")
    values = np.asarray([to_float(v, f"Row {i} of the {label}", "sample weight") for i, v in enumerate(raw)])
    if values.size == 0:
        return values
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"Rows {_rows(bad)} have a NaN or infinite sample weight ({values[bad[:_SHOWN]].tolist()}). {fix}"
        )
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise ValueError(
            f"Rows {_rows(negative)} have a negative sample weight ({values[negative[:_SHOWN]].tolist()}). {fix} "
            "A weight scales a row's loss; to train away from a response use a preference method instead."
        )
    if not (values > 0).any():
        raise ValueError(
            f"Every sample weight of the {label} is 0 ({values.size} rows in `{column}`): nothing would be trained. "
            "Give at least one row a weight > 0."
        )
    return values


def eval_datasets_of(eval_dataset) -> dict:
    """The evaluation datasets given to a trainer as a `{name: dataset}` dict (empty for None or a split name)."""
    if eval_dataset is None or isinstance(eval_dataset, str):
        return {}
    return dict(eval_dataset) if isinstance(eval_dataset, dict) else {"eval": eval_dataset}


def check_weight_columns(train_dataset, eval_dataset, column: str, train_required: bool) -> bool:
    """Check the sample-weight `column` of the training and evaluation datasets given to a trainer; returns whether the
    training dataset has it.

    The training dataset must have it when `train_required`, or when the column is not the default
    `SAMPLE_WEIGHT_COLUMN` (a name the user set); an evaluation dataset may leave it out (its rows then weigh 1).
    Values are checked with [`check_sample_weights`] (map-style datasets; streams are checked as they are collated).
    """
    has_column = train_dataset is not None and sample_weight_column_of(
        train_dataset, column, "train dataset", train_required, default_name=column == SAMPLE_WEIGHT_COLUMN
    )
    if has_column:
        check_sample_weights(train_dataset, column, "train dataset")
    for name, dataset in eval_datasets_of(eval_dataset).items():
        label = "eval dataset" if name == "eval" else f"eval dataset {name!r}"
        if sample_weight_column_of(dataset, column, label, required=False):
            check_sample_weights(dataset, column, label)
    return has_column
