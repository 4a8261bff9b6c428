"""The clients' examples: flwr-datasets partitions of the pool's row numbers (labels only, no
tokens, so the server's pre-flight check and the clients agree), each client's eval/train cut,
and a deployed client's own file.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset

from ..arguments import DataArguments
from .columns import ColumnCheck, DataError, require_column, source_name
from .labels import label_ids, run_label_ids
from .sources import load_raw_splits
from .splits import Splits, holdout_count, prepare_splits
from .tokenization import LABELS_COLUMN, tokenize

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


@dataclasses.dataclass
class ClientData:
    """One client's tokenized examples: `train` for local training, `eval` for its own evaluation."""

    train: Dataset
    eval: Dataset


def own_data(path: str, data_args: DataArguments, tokenizer, names: list[str], seed: int) -> ClientData:
    """A deployed client's own file or folder, all of it: `client_eval_size` of it for its own
    evaluation, the rest to train on.

    Its labels are mapped by name onto the run's classes `names` (decided by the server): the file
    may hold any subset of them, a single class included, in any order. No central hold-out and no
    `max_train_samples` cap apply: those describe the server's data set, not this client's.
    """
    rows, eval_rows, train_rows = own_rows(path, data_args, seed)
    ids = run_label_ids(rows, dataclasses.replace(data_args, dataset=path), names)
    rows = rows.remove_columns(data_args.label_column).add_column(data_args.label_column, ids.tolist())
    tokenized = tokenize(rows, tokenizer, data_args, names)
    return ClientData(train=tokenized.select(train_rows), eval=tokenized.select(eval_rows))


def own_rows(
    path: str, data_args: DataArguments, seed: int, check: ColumnCheck | None = None
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """A deployed client's own rows (columns checked by the task's `check`), and the row numbers
    of its eval and train examples."""
    own_args = dataclasses.replace(data_args, dataset=path, max_train_samples=None)
    rows, _ = load_raw_splits(own_args, check)
    _check_partition_size(len(rows), 0, 1, own_args, source=f"--data_path {path}")
    eval_rows, train_rows = _client_eval_split(np.arange(len(rows)), own_args.client_eval_size, 0, seed)
    return rows, eval_rows, train_rows


def partition_sizes(
    data_args: DataArguments, num_partitions: int, seed: int, check: ColumnCheck | None = None
) -> list[int]:
    """Examples in each client's partition, without tokenising: the server's pre-flight check.

    Raises `DataError` when the pool cannot give every client a train and an eval example.
    """
    splits = prepare_splits(data_args, seed, check)
    labels = _pool_labels(splits, data_args)
    return [len(rows) for rows in partition_rows(labels, data_args, num_partitions, seed)]


def client_rows(
    data_args: DataArguments,
    partition_id: int,
    num_partitions: int,
    seed: int,
    check: ColumnCheck | None = None,
) -> tuple[Splits, np.ndarray, np.ndarray]:
    """The splits, and the pool's row numbers of one client's eval and train examples.

    The rows come from the pool's labels alone (its size, for unlabelled rows), as in
    `partition_sizes`, so the server's check and every client agree.
    """
    _check_partition_id(partition_id, num_partitions)
    splits = prepare_splits(data_args, seed, check)
    labels = _pool_labels(splits, data_args)
    rows = partition_rows(labels, data_args, num_partitions, seed)[partition_id]
    eval_rows, train_rows = _client_eval_split(rows, data_args.client_eval_size, partition_id, seed)
    return splits, eval_rows, train_rows


def _pool_labels(splits: Splits, data_args: DataArguments) -> np.ndarray:
    """What the partitioners split the pool by, one id per row: the values of `--partition_column`
    (numbered in sorted order), else the label ids; all 0 for unlabelled rows, which only the IID
    partitioner splits."""
    if data_args.partition_column:
        return _partition_ids(splits.pool, data_args)
    if splits.names:
        return label_ids(splits.pool, data_args.label_column, splits.names)
    if data_args.partitioner != "iid":
        raise DataError(
            f"--partitioner {data_args.partitioner} splits by label, and this task's examples have "
            "none. Use --partitioner iid, or --partition_column to split by a column of the data."
        )
    return np.zeros(len(splits.pool), dtype=np.int64)


def _partition_ids(pool: Dataset, data_args: DataArguments) -> np.ndarray:
    """Each row's value of `--partition_column`, as its index among the column's sorted distinct values."""
    column = data_args.partition_column
    require_column(pool, column, "--partition_column", source_name(data_args))
    _, ids = np.unique(np.asarray(pool[column]), return_inverse=True)
    return ids.astype(np.int64)


def client_data(
    data_args: DataArguments, tokenizer, partition_id: int, num_partitions: int, seed: int
) -> ClientData:
    """One client's tokenized train and eval examples.

    Only the partition's rows are tokenised (cached, so later rounds and processes read them back):
    a client that tokenised the whole pool would do every other client's share before its first
    step, and in a simulation every client starting at once would do it too.
    """
    splits, eval_rows, train_rows = client_rows(data_args, partition_id, num_partitions, seed)
    rows = splits.pool.select(np.concatenate([eval_rows, train_rows]))
    tokenized = tokenize(rows, tokenizer, data_args, splits.names)
    held_out = len(eval_rows)
    return ClientData(
        train=tokenized.select(range(held_out, len(tokenized))), eval=tokenized.select(range(held_out))
    )


def partition_rows(
    labels: np.ndarray, data_args: DataArguments, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Row numbers of the pool in each partition, from the pool's label ids (one per row).

    Every partition is checked to hold at least one eval and one train example.
    """
    _check_partition_id(0, num_partitions)
    if len(labels) < num_partitions:
        raise DataError(
            f"{len(labels)} training examples cannot be split between {num_partitions} clients; "
            "lower --num_clients or raise --max_train_samples."
        )
    partitioner = _partitioner(data_args, num_partitions, seed)
    # The partitioner only sees labels and row numbers: no text, no tokens.
    partitioner.dataset = Dataset.from_dict({LABELS_COLUMN: labels, "row": np.arange(len(labels))})
    if data_args.partitioner == "natural":
        _check_natural_partitions(partitioner.num_partitions, num_partitions, data_args)
    rows = [
        np.asarray(_load_partition(partitioner, data_args, num_partitions, pid)["row"])
        for pid in range(num_partitions)
    ]
    for pid, part in enumerate(rows):
        _check_partition_size(len(part), pid, num_partitions, data_args)
    return rows


def _partitioner(data_args: DataArguments, num_partitions: int, seed: int) -> Partitioner:
    partitioners = import_partitioners()
    if data_args.partitioner == "iid":
        return partitioners.IidPartitioner(num_partitions)
    if data_args.partitioner == "natural":
        # Partition i holds the i-th of the sorted distinct values (`_pool_labels` numbers them so).
        return partitioners.NaturalIdPartitioner(partition_by=LABELS_COLUMN)
    return partitioners.DirichletPartitioner(
        num_partitions,
        partition_by=LABELS_COLUMN,
        alpha=float(data_args.dirichlet_alpha),
        seed=seed,
        min_partition_size=_min_partition_size(data_args.client_eval_size),
    )


class _ImportedOnFirstUse(types.ModuleType):
    """A module that stands in for a submodule until one of its names is used, then imports it.

    Not the standard library's `LazyLoader`: the import system reads a module's `__spec__` when it
    finds it in `sys.modules`, which would load a lazy module at once."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name != "__all__":  # the import system's and tools' probes
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:  # first use: the real module takes its place
            sys.modules.pop(self.__name__, None)
        module = importlib.import_module(self.__name__)  # also rebinds the package's attribute
        self.__dict__.update(module.__dict__)
        return getattr(module, name)


def import_partitioners() -> types.ModuleType:
    """`flwr_datasets.partitioner`, with its package's plotting left unloaded until it is used.

    `flwr_datasets/__init__.py` imports `flwr_datasets.visualization`, and with it seaborn,
    scipy.stats and matplotlib.pyplot: 0.8 s of CPU in every process that partitions (the
    launcher's check, the ServerApp, each client) before round 1, for plots hf-flower never draws
    (`benchmarks/startup_stages.py`). Until one of its names is used, that submodule is a stand-in
    that imports it then, so a user's own `plot_label_distributions(...)` still works.
    """
    name = "flwr_datasets.visualization"
    if "flwr_datasets" not in sys.modules and name not in sys.modules:
        package = importlib.util.find_spec("flwr_datasets")  # finds the package without importing it
        folder = Path(next(iter(package.submodule_search_locations))) / "visualization"
        if (folder / "__init__.py").is_file():
            stand_in = _ImportedOnFirstUse(name)
            stand_in.__file__ = str(folder / "__init__.py")
            stand_in.__path__ = [str(folder)]  # its own submodules import as usual
            sys.modules[name] = stand_in
    return importlib.import_module("flwr_datasets.partitioner")


def _load_partition(
    partitioner: Partitioner, data_args: DataArguments, num_partitions: int, partition_id: int
) -> Dataset:
    """`partitioner.load_partition`, with the Dirichlet partitioner's give-up turned into advice."""
    try:
        with warnings.catch_warnings():
            # It warns before each of its 10 retries; our error below says the same, once.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return partitioner.load_partition(partition_id)
    except ValueError as err:
        if "max number of attempts" not in str(err):
            raise
        raise DataError(
            f"The Dirichlet partitioner found no split of {partitioner.dataset.num_rows} training "
            f"examples between {num_partitions} clients that gives every client at least "
            f"{_min_partition_size(data_args.client_eval_size)} examples in 10 tries (--dirichlet_alpha "
            f"{data_args.dirichlet_alpha}). Raise --dirichlet_alpha, lower --num_clients, or raise "
            "--max_train_samples."
        ) from err


def _check_natural_partitions(num_values: int, num_partitions: int, data_args: DataArguments) -> None:
    """The natural split gives each client one value: as many clients as values, no more, no fewer."""
    if num_values == num_partitions:
        return
    column = data_args.partition_column or data_args.label_column
    raise DataError(
        f"--partitioner natural gives each client one value of column {column!r}, and the training pool "
        f"has {num_values} of them, not {num_partitions} (--num_clients). Set --num_clients {num_values}, "
        "or use --partitioner dirichlet (any number of clients, skewed by --dirichlet_alpha) or iid."
    )


def _check_partition_size(
    size: int, partition_id: int, num_partitions: int, data_args: DataArguments, source: str = ""
) -> None:
    if size >= _min_partition_size(data_args.client_eval_size):
        return
    if source:
        raise DataError(
            f"{source} has {size} examples: too few to hold out --client_eval_size "
            f"{data_args.client_eval_size} for evaluation and keep one to train on. Add rows or lower "
            "--client_eval_size."
        )
    advice = "raise --dirichlet_alpha, " if data_args.partitioner == "dirichlet" else ""
    raise DataError(
        f"Partition {partition_id} of {num_partitions} has {size} examples: too few to hold out "
        f"--client_eval_size {data_args.client_eval_size} for evaluation and keep one to train on. "
        f"Lower --num_clients, {advice}raise --max_train_samples, or lower --client_eval_size."
    )


def _min_partition_size(client_eval_size: float) -> int:
    """Fewest examples from which `client_eval_size` leaves at least one eval and one train example."""
    size = 2
    while holdout_count(size, client_eval_size, "--client_eval_size") >= size:
        size += 1
    return size


def client_split_sizes(partition_size: int, client_eval_size: float) -> tuple[int, int]:
    """(train, eval) examples of a client whose partition holds `partition_size`: the counts it reports."""
    held_out = holdout_count(partition_size, client_eval_size, "--client_eval_size")
    return partition_size - held_out, held_out


def _client_eval_split(rows: np.ndarray, client_eval_size: float, partition_id: int, seed: int):
    """(eval rows, train rows) of one partition, drawn with a seed of its own."""
    order = np.random.default_rng([seed, partition_id]).permutation(rows)
    held_out = holdout_count(len(rows), client_eval_size, "--client_eval_size")
    return order[:held_out], order[held_out:]


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise DataError(f"The number of clients must be at least 1, got {num_partitions}. Set --num_clients.")
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition_id {partition_id} is out of range: with {num_partitions} clients it must be "
            f"0..{num_partitions - 1}. Check the SuperNode's --node-config partition-id / num-partitions."
        )
