"""The seeded cut of a source that every other step starts from: the server's central test rows
and the clients' training pool.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from datasets import Dataset

from ..arguments import DataArguments
from .columns import ColumnCheck, DataError, source_name
from .labels import label_ids, label_names
from .sources import load_raw_splits
from .tokenization import tokenize


@dataclasses.dataclass
class Splits:
    """The untokenised, seeded cut of a source that every other step starts from.

    Attributes:
        pool: The clients' training pool: the train split shuffled, central test rows removed, capped.
        test: The server's central test rows, shuffled and capped.
        names: Class names in label-id order, from the whole train split (see `label_names`).
    """

    pool: Dataset
    test: Dataset
    names: list[str]


def prepare_splits(data_args: DataArguments, seed: int, check: ColumnCheck | None = None) -> Splits:
    """Load the source and cut it into the clients' pool and the server's test rows, by `seed`.

    Without a source test split, `test_size` rows come off the front of the shuffled train split
    before `max_train_samples` caps the rest, so clients never see them and changing
    `max_test_samples` never changes the clients' data. With a task's own column `check` the rows
    are not labelled: `names` is empty.
    """
    labelled = check is None
    train, test = load_raw_splits(data_args, check)
    names = label_names(train, data_args.label_column) if labelled else []
    order = np.random.default_rng(seed).permutation(len(train))
    if test is None:
        held_out = holdout_count(len(train), data_args.test_size, "--test_size")
        if held_out >= len(train):
            raise DataError(
                f"--test_size {data_args.test_size} holds out {held_out} of the {len(train)} examples of "
                f"{source_name(data_args)}, leaving none for the clients. Lower --test_size."
            )
        test = train.select(order[:held_out][: data_args.max_test_samples])
        order = order[held_out:]
    else:
        test_order = np.random.default_rng(seed).permutation(len(test))
        test = test.select(test_order[: data_args.max_test_samples])
    pool = train.select(order[: data_args.max_train_samples])
    if labelled:  # labels of the test rows must be classes of the train split (catches -1 "unlabelled")
        label_ids(test, data_args.label_column, names)
    return Splits(pool=pool, test=test, names=names)


def holdout_count(total: int, size: float, flag: str) -> int:
    """Rows held out of `total`: a fraction below 1 (rounded up, so at least one row) or a count."""
    if size < 1:
        return max(1, math.ceil(size * total))
    if size != int(size):
        raise DataError(f"{flag} must be a fraction in (0, 1) or a whole count, got {size}.")
    return int(size)


def central_test_set(data_args: DataArguments, tokenizer, seed: int) -> Dataset:
    """The server's tokenized test set: the source's test split, or rows held out of the train split."""
    splits = prepare_splits(data_args, seed)
    return tokenize(splits.test, tokenizer, data_args, splits.names)
