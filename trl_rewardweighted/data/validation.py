"""Column checks shared by the dataset transforms and the trainers (no torch import)."""

from __future__ import annotations

__all__ = ["check_float_column"]


def check_float_column(dataset, column: str, fix: str, list_valued: bool = False) -> None:
    """Raise a clear error when ``column`` is missing or not numeric (a float, or a list of floats if list_valued).

    Non-finite values (NaN/inf) are allowed here: the trainers skip and count them.
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
    if list_valued:
        inner = getattr(feature, "feature", None)
        dtype = getattr(inner, "dtype", None)
    numeric = dtype is not None and (dtype.startswith("float") or dtype.startswith("int") or dtype == "bool")
    if numeric:
        return
    # Find the first offending row to name it.
    for i, value in enumerate(dataset[column]):
        values = value if (list_valued and isinstance(value, (list, tuple))) else [value]
        for v in values:
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(
                    f"Column `{column}` must hold {'lists of ' if list_valued else ''}numbers, but row {i} has "
                    f"{value!r} ({type(v).__name__}). {fix}"
                )
    raise ValueError(f"Column `{column}` has type {feature} but must be numeric. {fix}")
