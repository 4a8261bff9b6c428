"""The columns a task reads: checked to exist and hold what it needs, and `DataError`, the one
error every data problem raises with a message naming the setting to change.
"""

from __future__ import annotations

from collections.abc import Callable

from datasets import Dataset, Value

from ..arguments import DataArguments


class DataError(ValueError):
    """A data set, column, label or split setting that cannot work; the message says what to change."""


# A task's check of the columns it reads: (dataset, data_args, split=None) -> None, or DataError.
ColumnCheck = Callable[..., None]


def check_columns(dataset: Dataset, data_args: DataArguments, split: str | None = None) -> None:
    """Check that the text, text-pair and label columns exist, hold text / labels and have no gaps."""
    source = source_name(data_args, split)
    columns = dataset.column_names
    wanted = [
        ("--text_column", data_args.text_column),
        ("--text_pair_column", data_args.text_pair_column),
        ("--label_column", data_args.label_column),
    ]
    for flag, column in wanted:
        if column is None:
            continue
        require_column(dataset, column, flag, source)
        if flag != "--label_column" and not is_string_feature(dataset.features[column]):
            raise DataError(
                f"Column {column!r} of {source} holds {dataset.features[column]}, not text. "
                f"Set {flag} to a text column of {columns}."
            )


def require_column(dataset: Dataset, column: str, flag: str, source: str) -> None:
    """`column` (named by `flag`) exists in `dataset` and has no empty values, or a `DataError`."""
    columns = dataset.column_names
    if column not in columns:
        raise DataError(
            f"Column {column!r} not found in {source}; its columns are {columns}. Set {flag} to one of them."
        )
    missing = dataset.data.column(column).null_count
    if missing:
        raise DataError(
            f"Column {column!r} of {source} has {missing} empty values; drop or fill those rows, "
            f"or set {flag} to another of {columns}."
        )


def is_string_feature(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def is_integer_feature(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype.startswith(("int", "uint", "bool"))


def source_name(data_args: DataArguments, split: str | None = None) -> str:
    return f"data set {data_args.dataset!r}" + (f" (split {split!r})" if split else "")
