"""history.json: the run's status and every round's record, replaced atomically; the best round."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import (
    dotted_get,
    dumps_json,
    fsync_dir,
    load_json_object,
    unique_suffix,
)
from .layout import (
    AGGREGATE_KEYS,
    HISTORY_FILE,
    HISTORY_STATUSES,
    METRICS_FILE,
    TMP_HISTORY_PREFIX,
    OutputDirError,
    list_rounds,
    round_dir,
)


def aggregate_metrics(record: Mapping[str, Any]) -> dict:
    """The `AGGREGATE_KEYS` of `record` (a round's metrics): what may leave this machine
    (metrics.json, the Hub). The full record stays in history.json."""
    return {key: record[key] for key in AGGREGATE_KEYS if key in record}


def read_round_metrics(output_dir: str | os.PathLike, round_num: int) -> dict:
    """The metrics dict saved with round `round_num` (non-finite numbers read back as None)."""
    path = round_dir(output_dir, round_num) / METRICS_FILE
    if not path.is_file():
        found = list_rounds(output_dir)
        raise FileNotFoundError(
            f"no metrics for round {round_num}: {path} does not exist; "
            f"complete rounds in {output_dir}: {found or 'none'}"
        )
    return load_json_object(path)


def write_history(output_dir: str | os.PathLike, history: Mapping[str, Any]) -> None:
    """Atomically replace `output_dir`/history.json with `history`.

    `history` needs a `status` (one of `HISTORY_STATUSES`); `error` defaults to None and
    `rounds` to []; any other keys are kept. Non-finite floats are written as null. The file is
    written next to its final place, fsynced and renamed over it, so readers never see half of it.
    """
    if not isinstance(history, Mapping):
        raise TypeError(f"history must be a dict, got {type(history).__name__}")
    if history.get("status") not in HISTORY_STATUSES:
        raise ValueError(
            f"history['status'] must be one of {HISTORY_STATUSES}, got {history.get('status')!r}"
        )
    rounds = history.get("rounds", [])
    if not isinstance(rounds, (list, tuple)):
        raise ValueError(f"history['rounds'] must be a list of per-round dicts, got {type(rounds).__name__}")
    full = {"error": None, "rounds": [], **history}
    text = dumps_json(full, what="history")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f"{TMP_HISTORY_PREFIX}{unique_suffix()}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output_dir / HISTORY_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(output_dir)


def read_history(output_dir: str | os.PathLike) -> dict:
    """The dict in `output_dir`/history.json; FileNotFoundError or OutputDirError when unusable."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {HISTORY_FILE} in {output_dir}: it is written when a run starts; "
            "check --output_dir points at the folder of a run"
        )
    return load_json_object(path)


def mark_interrupted(output_dir: str | os.PathLike, reason: str) -> bool:
    """Record in history.json that a run still marked running was stopped from outside (a signal
    to its launcher, Ctrl-C): its ServerApp was stopped before it could say so itself. Returns
    whether the history changed; a folder without a usable history is left alone."""
    try:
        history = read_history(output_dir)
    except (OSError, OutputDirError):
        return False
    if history.get("status") != "running":
        return False
    write_history(output_dir, {**history, "status": "interrupted", "error": reason})
    return True


def best_round(
    history: Mapping[str, Any], metric: str = "central.eval_accuracy", greater_is_better: bool = True
) -> int | None:
    """Round number with the best value of `metric` in `history`, or None if no round has it.

    `metric` is a dotted path into each round's dict ("central.eval_accuracy" reads
    `round["central"]["eval_accuracy"]`). Rounds without it, or with a non-numeric or non-finite
    value, are skipped. The round number is the dict's "round" key, else its position. Ties go to
    the earliest round.
    """
    best_num, best_value = None, None
    for position, round_metrics in enumerate(history.get("rounds") or []):
        value = dotted_get(round_metrics, metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        better = best_value is None or (value > best_value if greater_is_better else value < best_value)
        if better:
            best_value, best_num = value, round_metrics.get("round", position)
    return best_num
