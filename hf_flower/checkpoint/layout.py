"""The on-disk layout of a run's output folder: file names, `round-N` folder names, and which
folders are complete rounds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROUND_PREFIX = "round-"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"
# `save_pretrained` writes an index plus shards instead of WEIGHTS_FILE for models above its
# `max_shard_size`; PEFT writes ADAPTER_WEIGHTS_FILE for adapter-only rounds.
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
PLOT_FILE = "metrics.png"
# Size and sha256 of every other file of a round, written last, checked by `verify_round`.
CHECKSUMS_FILE = "checksums.json"
# The strategy's state after the round (e.g. FedAdam's moments): tensors + JSON metadata, no pickle.
STRATEGY_STATE_FILE = "strategy_state.safetensors"
STRATEGY_STATE_METADATA_KEY = "hf_flower.strategy_state"
TENSORBOARD_DIR = "runs"
# An adapter round holds no config.json: with one, `from_pretrained` would look for full weights
# in the folder instead of loading the base model that adapter_config.json names.
ADAPTER_CONFIG_FILE = "adapter_config.json"

HISTORY_STATUSES = ("running", "completed", "failed", "interrupted")
# The parts of a round's record that describe the round as a whole (aggregate metrics, client
# counts, time, bytes): all that metrics.json holds, as it goes to the Hub with the round. The
# rest (each client's results, failure reasons, notes naming nodes and partitions) stays in the
# local history.json, and so does any part a later version adds until it is listed here.
AGGREGATE_KEYS = (
    "round",
    "seconds",
    "clients",
    "train",
    "evaluate",
    "central",
    "bytes_sent",
    "bytes_received",
)
# Where `set_aside_rounds_after` moves the rounds a resumed run will train again.
SET_ASIDE_PREFIX = "set-aside-"

# Hidden names of work in progress; a leading dot keeps them from ever looking like a round.
TMP_ROUND_MARKER = ".tmp-"  # `.round-3.tmp-<pid>-<random>`: a round being written
OLD_ROUND_MARKER = ".old-"  # `.round-3.old-<pid>-<random>`: a round being replaced
TMP_HISTORY_PREFIX = f".{HISTORY_FILE}{TMP_ROUND_MARKER}"  # `.history.json.tmp-<pid>-<random>`
WRITE_PROBE_PREFIX = ".hf-flower-write-probe-"

# `round-0`, `round-12`; not `round-01`, so each round number has exactly one folder name.
ROUND_RE = re.compile(rf"^{re.escape(ROUND_PREFIX)}(0|[1-9][0-9]*)$")
LEFTOVER_ROUND_RE = re.compile(
    rf"^\.{re.escape(ROUND_PREFIX)}(0|[1-9][0-9]*)"
    rf"({re.escape(TMP_ROUND_MARKER)}|{re.escape(OLD_ROUND_MARKER)}).+$"
)


class OutputDirError(ValueError):
    """The output folder cannot be used as it is; the message says what to change."""


class DamagedRoundError(OutputDirError):
    """A round folder's file is not what was saved; the message names the file."""


def round_dir(output_dir: str | os.PathLike, round_num: int) -> Path:
    """Path of the folder of round `round_num` (whether or not it exists)."""
    return Path(output_dir) / f"{ROUND_PREFIX}{check_round_num(round_num)}"


def is_complete_round(path: str | os.PathLike) -> bool:
    """Whether `path` is a `round-N` folder with a config, weights and metrics.json.

    Weights are config.json with model.safetensors or its sharded index, or an adapter's
    adapter_config.json with adapter_model.safetensors. Only names `round-N` count, so
    temporary and set-aside folders never do.
    """
    path = Path(path)
    return bool(ROUND_RE.match(path.name)) and has_round_files(path) and (path / METRICS_FILE).is_file()


def list_rounds(output_dir: str | os.PathLike) -> list[int]:
    """Numbers of the complete rounds in `output_dir`, ascending; [] if it does not exist."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    return sorted(
        int(ROUND_RE.match(entry.name).group(1))
        for entry in path.iterdir()
        if ROUND_RE.match(entry.name) and is_complete_round(entry)
    )


def latest_round(output_dir: str | os.PathLike) -> int | None:
    """Number of the newest complete round in `output_dir`, or None when there is none."""
    rounds = list_rounds(output_dir)
    return rounds[-1] if rounds else None


def check_round_num(round_num: int) -> int:
    """`round_num` if it is a non-negative int; a clear ValueError otherwise."""
    if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 0:
        raise ValueError(f"round_num must be a non-negative int, got {round_num!r}")
    return round_num


def has_round_files(path: Path) -> bool:
    """Whether `path` holds a config and weights that `from_pretrained` can load.

    A full model (config.json + model.safetensors or its shard index) or a PEFT adapter
    (adapter_config.json + adapter_model.safetensors).
    """
    if (path / ADAPTER_CONFIG_FILE).is_file() and (path / ADAPTER_WEIGHTS_FILE).is_file():
        return True
    weights = (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)
    return (path / CONFIG_FILE).is_file() and any((path / name).is_file() for name in weights)
