"""Writing round folders: the output folder prepared (leftovers of a crashed run removed), each
round written into a hidden folder and renamed into place, rounds set aside, the strategy state.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .files import (
    dumps_json,
    fsync_dir,
    fsync_tree,
    remove_entry,
    unique_suffix,
)
from .history import aggregate_metrics, read_history, write_history
from .layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    HISTORY_STATUSES,
    LEFTOVER_ROUND_RE,
    METRICS_FILE,
    OLD_ROUND_MARKER,
    ROUND_PREFIX,
    ROUND_RE,
    SET_ASIDE_PREFIX,
    STRATEGY_STATE_FILE,
    STRATEGY_STATE_METADATA_KEY,
    TMP_HISTORY_PREFIX,
    TMP_ROUND_MARKER,
    WEIGHTS_FILE,
    WRITE_PROBE_PREFIX,
    OutputDirError,
    check_round_num,
    has_round_files,
    is_complete_round,
    latest_round,
    round_dir,
)
from .verify import write_checksums


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool, resume: bool = False) -> Path:
    """Create `output_dir`, check it is writable and free of an earlier run, and return it.

    Leftovers of a crashed run (hidden temporary round folders and history files) are removed,
    those named after a process that still runs excepted. Rounds or a history.json of an earlier
    run make this refuse, so a new run never mixes its rounds with old ones; with `overwrite=True`
    they are deleted instead. With `resume=True` they are kept and continued: the folder must then
    hold at least one complete round, checked before anything is removed. Nothing else in the
    folder is touched, so a user's own files next to the rounds survive. The caller holds the
    folder's `run_lock`, so no other run is writing here.
    """
    path = Path(output_dir)
    if resume and overwrite:
        raise OutputDirError("--resume keeps the rounds in output_dir, --overwrite_output_dir deletes them")
    if resume and latest_round(path) is None:
        raise OutputDirError(
            f"--resume: output_dir {path} holds no complete round to continue from; check --output_dir, "
            "or drop --resume to start a new run there"
        )
    make_output_dir(path)
    _remove_leftovers(path)

    ours = _own_entries(path)
    if resume:
        return path
    if ours and not overwrite:
        raise OutputDirError(
            f"output_dir {path} already holds {', '.join(p.name for p in ours)} from an earlier run; "
            "pass --overwrite_output_dir to replace them or choose another --output_dir"
        )
    for entry in ours:
        remove_entry(entry)
    if ours:
        fsync_dir(path)
    return path


def make_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` (and its parents) and check that files can be written in it."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {path} exists and is not a folder; choose another --output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Really write: permission bits, read-only mounts and ACLs all show up here, and root
        # ignores the permission bits that `os.access` would look at.
        probe = path / f"{WRITE_PROBE_PREFIX}{unique_suffix()}"
        with open(probe, "x") as f:
            f.write("probe")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"output_dir {path} is not writable ({e.strerror or e}); choose another --output_dir"
        ) from e
    return path


def metrics_json(metrics: dict, what: str = "metrics") -> str:
    """The text of a round's metrics.json: the aggregates of its record (`aggregate_metrics`)."""
    return dumps_json(aggregate_metrics(metrics), what=what)


def save_round(
    output_dir: str | os.PathLike,
    round_num: int,
    write_files: Callable[[Path], Any],
    metrics: Mapping[str, Any],
) -> Path:
    """Write round `round_num` atomically and return its folder.

    `write_files(folder)` saves the model (and tokenizer) into a fresh hidden temporary folder,
    e.g. `lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d))`; `metrics` goes to
    metrics.json with its `AGGREGATE_KEYS` only (the round folder is what goes to the Hub), and
    checksums.json records every file. Every file is fsynced, then the folder is renamed to
    `round-N` in one step, so `round-N` is either absent or complete. An existing `round-N` is
    replaced. If anything fails the temporary folder is deleted, earlier rounds are untouched,
    and the error propagates.
    """
    output_dir = Path(output_dir)
    final = round_dir(output_dir, round_num)
    # Serialise first: a metric that is not JSON should fail before an expensive model save (all
    # of `metrics` is checked: the full record goes to history.json).
    dumps_json(metrics, what=f"metrics of round {round_num}")
    metrics_text = metrics_json(metrics, what=f"metrics of round {round_num}")
    output_dir.mkdir(parents=True, exist_ok=True)

    tmp = output_dir / f".{final.name}{TMP_ROUND_MARKER}{unique_suffix()}"
    tmp.mkdir()
    try:
        write_files(tmp)
        if not has_round_files(tmp):
            raise OutputDirError(
                f"write_files saved {sorted(p.name for p in tmp.iterdir()) or 'nothing'} for round "
                f"{round_num}, without {CONFIG_FILE} and {WEIGHTS_FILE} (or {ADAPTER_CONFIG_FILE} and "
                f"{ADAPTER_WEIGHTS_FILE}); it must save the model into "
                "the folder it is given, e.g. `lambda d: model.save_pretrained(d)`"
            )
        (tmp / METRICS_FILE).write_text(metrics_text, encoding="utf-8")
        write_checksums(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # A non-empty folder cannot be renamed over another one: move the old round aside first. The
    # hidden name keeps it out of `list_rounds`; a crash in between is repaired by
    # `prepare_output_dir`, which puts it back.
    aside = None
    if final.exists() or final.is_symlink():
        aside = output_dir / f".{final.name}{OLD_ROUND_MARKER}{unique_suffix()}"
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(output_dir)
    if aside is not None:
        remove_entry(aside)
    return final


def set_aside_rounds_after(output_dir: str | os.PathLike, round_num: int) -> tuple[list[int], Path | None]:
    """Move every `round-M` folder with M > `round_num` into a new `set-aside-<time>/` folder.

    A run that continues from round `round_num` trains those rounds again, and saving a round
    replaces its folder: moved aside, the old ones survive until the user deletes them.
    history.json keeps the records of rounds up to `round_num` only. Returns the rounds moved
    and where to (None when there were none).
    """
    output_dir = Path(output_dir)
    later = sorted(
        (int(match.group(1)), entry)
        for entry in output_dir.iterdir()
        if (match := ROUND_RE.match(entry.name)) and int(match.group(1)) > check_round_num(round_num)
    )
    if not later:
        return [], None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir / f"{SET_ASIDE_PREFIX}{stamp}"
    if target.exists():
        target = output_dir / f"{SET_ASIDE_PREFIX}{stamp}-{secrets.token_hex(2)}"
    target.mkdir()
    for _, entry in later:
        os.rename(entry, target / entry.name)
    fsync_dir(output_dir)
    try:
        history = read_history(output_dir)
    except (FileNotFoundError, OutputDirError):
        history = None
    if history is not None and history.get("status") in HISTORY_STATUSES:
        rounds = history.get("rounds") if isinstance(history.get("rounds"), list) else []
        kept = [r for r in rounds if isinstance(r, dict) and _round_of(r) <= round_num]
        write_history(output_dir, {**history, "rounds": kept})
    return [num for num, _ in later], target


def write_strategy_state(folder: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping) -> Path:
    """Save a strategy's state into a round folder: arrays as safetensors, the rest as JSON metadata.

    `tensors` maps names to numpy arrays; `metadata` is any JSON-able dict (strategy name, scalar
    state). Safetensors holds only plain arrays, so loading it can never run code.
    """
    path = Path(folder) / STRATEGY_STATE_FILE
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    save_file(
        arrays, path, metadata={STRATEGY_STATE_METADATA_KEY: dumps_json(metadata, what="strategy state")}
    )
    return path


def read_strategy_state(folder: str | os.PathLike) -> tuple[dict, dict] | None:
    """The `(tensors, metadata)` saved by `write_strategy_state`, or None when the round has none."""
    path = Path(folder) / STRATEGY_STATE_FILE
    if not path.is_file():
        return None
    with safe_open(path, "np") as f:
        metadata = json.loads((f.metadata() or {}).get(STRATEGY_STATE_METADATA_KEY, "{}"))
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, metadata


def _round_of(record: dict) -> float:
    """The round number of a history record; infinite (after every round) when it has none."""
    num = record.get("round")
    return num if isinstance(num, int) and not isinstance(num, bool) else math.inf


def _own_entries(path: Path) -> list[Path]:
    """Round folders and history.json in `path`: what an earlier run left, in round order."""
    rounds = sorted(
        (entry for entry in path.iterdir() if ROUND_RE.match(entry.name)),
        key=lambda entry: int(ROUND_RE.match(entry.name).group(1)),
    )
    history = path / HISTORY_FILE
    return rounds + ([history] if history.exists() or history.is_symlink() else [])


def _remove_leftovers(path: Path) -> None:
    """Delete what a crashed `save_round`/`write_history` left; put back a round set aside.

    A `.round-N.old-*` folder means the crash came while replacing round N: if `round-N` did
    not get its new content, the old round is restored rather than lost. Names hold the writer's
    pid: what a process that still runs is writing is left alone.
    """
    # Set-aside rounds first, so one is restored before its uncommitted replacement is deleted.
    for entry in sorted(path.iterdir(), key=lambda entry: OLD_ROUND_MARKER not in entry.name):
        if _writer_is_running(entry.name):
            continue
        match = LEFTOVER_ROUND_RE.match(entry.name)
        if match:
            final = path / f"{ROUND_PREFIX}{match.group(1)}"
            set_aside = match.group(2) == OLD_ROUND_MARKER
            if set_aside and not is_complete_round(final) and has_round_files(entry):
                if final.exists() or final.is_symlink():
                    remove_entry(final)
                os.rename(entry, final)
            else:
                remove_entry(entry)
        elif entry.name.startswith((TMP_HISTORY_PREFIX, WRITE_PROBE_PREFIX)):
            remove_entry(entry)


def _writer_is_running(name: str) -> bool:
    """Whether `name`, a hidden `...<marker><pid>-<random>` leftover, names a process that runs."""
    for marker in (TMP_ROUND_MARKER, OLD_ROUND_MARKER, WRITE_PROBE_PREFIX):
        _, found, suffix = name.rpartition(marker)
        pid = suffix.split("-", 1)[0]
        if found and pid.isdigit():
            return _pid_exists(int(pid))
    return False


def _pid_exists(pid: int) -> bool:
    """Whether a process `pid` exists (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # beyond any pid
        return False
    return True
