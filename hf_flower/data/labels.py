"""Class labels: the run's class names, read from the whole train split so every process agrees,
and every row's label as an id into them (a deployed client's matched by name).
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset

from ..arguments import DataArguments
from .columns import (
    DataError,
    is_integer_feature,
    is_string_feature,
    source_name,
)
from .sources import load_raw_splits


def label_names(dataset: Dataset, label_column: str) -> list[str]:
    """The class names, in label-id order.

    From a `ClassLabel` feature when there is one; otherwise from the sorted unique values:
    integers must be 0..K-1 (named "0".."K-1"), strings become the sorted names and are encoded to
    their position everywhere (see `label_ids`).
    """
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = np.unique(_column_values(dataset, label_column))
        if is_string_feature(feature):
            names = [str(value) for value in values]
        elif is_integer_feature(feature):
            names = [str(int(value)) for value in values]
            if len(names) >= 2 and [int(v) for v in values] != list(range(len(values))):
                raise DataError(
                    f"Integer labels in column {label_column!r} must be 0..K-1; found "
                    f"{values.tolist()}. Renumber them from 0, or store the classes as strings."
                )
        else:
            raise DataError(
                f"Column {label_column!r} holds {feature}, which is not a class label: classification "
                "needs integer (0..K-1), string or ClassLabel labels. Set --label_column to another "
                "column."
            )
    if len(names) < 2:
        raise DataError(
            f"Column {label_column!r} has a single class {names}: classification needs at least 2. "
            "Check --label_column, or use a data set with more than one class."
        )
    return names


def load_label_names(data_args: DataArguments) -> list[str]:
    """The source's class names in label-id order (the model's id2label), from its whole train split."""
    train, _ = load_raw_splits(data_args)
    return label_names(train, data_args.label_column)


def label_ids(dataset: Dataset, label_column: str, names: list[str]) -> np.ndarray:
    """The label of every row as an id into `names`, checked: the labels of the split become `labels`."""
    return encode_labels(_column_values(dataset, label_column), names, label_column)


def encode_labels(values, names: list[str], label_column: str) -> np.ndarray:
    """Ids of `values` (ids already, or class-name strings) into `names`; unknown labels are an error."""
    values = np.asarray(values)
    if values.dtype.kind in "iub":
        ids = values.astype(np.int64)
        bad = ids[(ids < 0) | (ids >= len(names))]
        if bad.size:
            raise DataError(
                f"Labels {sorted(set(bad.tolist()))[:10]} in column {label_column!r} are not class ids "
                f"0..{len(names) - 1} of {names}. Unlabelled splits often use -1: set --test_split to "
                "a labelled split, or drop those rows."
            )
        return ids
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in values if str(v) not in index})
    if unknown:
        raise DataError(
            f"Labels {unknown[:10]} in column {label_column!r} are not among the training classes "
            f"{names}. Every split must use the classes of --train_split."
        )
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def _column_values(dataset: Dataset, column: str) -> np.ndarray:
    """One column as a NumPy array, in the dataset's row order (its indices mapping applied)."""
    table = dataset.select_columns([column]).with_format("arrow")[:]
    return table.column(column).to_numpy(zero_copy_only=False)


def run_label_ids(dataset: Dataset, data_args: DataArguments, names: list[str]) -> np.ndarray:
    """Ids into the run's classes `names` of a client's labels, matched by name.

    Class names (strings, or a `ClassLabel`'s names) must be among `names`. Integer labels are class
    ids of the run: the ids a run with classes "0".."K-1" names, checked to be in range.
    """
    column = data_args.label_column
    feature = dataset.features[column]
    values = _column_values(dataset, column)
    if isinstance(feature, ClassLabel):
        values = np.asarray(feature.int2str(values.astype(np.int64).tolist()), dtype=object)
    elif not (is_string_feature(feature) or is_integer_feature(feature)):
        raise DataError(
            f"Column {column!r} of {source_name(data_args)} holds {feature}, not class labels. "
            "Set --label_column to the column holding the labels."
        )
    if np.asarray(values).dtype.kind in "iub":
        return encode_labels(values, names, column)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise DataError(
            f"Label {unknown[0]!r} in column {column!r} of {source_name(data_args)} is not one of "
            f"the run's classes {names}"
            + (f" (nor are {unknown[1:10]})" if len(unknown) > 1 else "")
            + ". Drop those rows, or rename them to one of the run's classes."
        )
    return np.array([index[str(v)] for v in values], dtype=np.int64)
