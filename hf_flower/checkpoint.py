"""Round checkpoints on disk: `round-N` folders written atomically, `history.json`, the latest round.

The server saves every aggregated round as a folder that `from_pretrained` loads directly. This
module owns that layout; nothing else reads or writes it by hand:

```
<output_dir>/
  round-0/  round-1/ ...   config.json, model.safetensors (or adapter_config.json,
                           adapter_model.safetensors [, merged/]), tokenizer files, metrics.json
                           (aggregates only), README.md (model card) + metrics.png,
                           strategy_state.safetensors (the strategy's own state, for --resume),
                           checksums.json (size and sha256 of every other file)
  history.json             {"status": "running"|"completed"|"failed"|"interrupted", "error": str|null,
                            "rounds": [<record of each round, per-client details included>], ...}
  runs/                    TensorBoard event files of the server's per-round metrics
  set-aside-<time>/        rounds a resumed run moved out of its way (never deleted)
```

A round is written into a hidden temporary folder (`.round-N.tmp-<pid>-<random>`) and renamed to
`round-N` only once every file is on disk, so a crash never leaves a `round-N` that fails to load:
a reader either sees the complete round or no round. `history.json` is replaced atomically too.
Leftovers of a crashed run are hidden names that `list_rounds` ignores and `prepare_output_dir`
removes, unless the process named in them still runs. A round damaged later (a copy cut short,
a full disk, a bad sector) is found by `verify_round` against its checksums.json before anything
loads it. One run writes to an output folder at a time (`run_lock` sees to that).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

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
_ROUND_RE = re.compile(rf"^{re.escape(ROUND_PREFIX)}(0|[1-9][0-9]*)$")
_LEFTOVER_ROUND_RE = re.compile(
    rf"^\.{re.escape(ROUND_PREFIX)}(0|[1-9][0-9]*)"
    rf"({re.escape(TMP_ROUND_MARKER)}|{re.escape(OLD_ROUND_MARKER)}).+$"
)


class OutputDirError(ValueError):
    """The output folder cannot be used as it is; the message says what to change."""


class DamagedRoundError(OutputDirError):
    """A round folder's file is not what was saved; the message names the file."""


def round_dir(output_dir: str | os.PathLike, round_num: int) -> Path:
    """Path of the folder of round `round_num` (whether or not it exists)."""
    return Path(output_dir) / f"{ROUND_PREFIX}{_check_round_num(round_num)}"


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
        _remove(entry)
    if ours:
        _fsync_dir(path)
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
        probe = path / f"{WRITE_PROBE_PREFIX}{_unique_suffix()}"
        with open(probe, "x") as f:
            f.write("probe")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"output_dir {path} is not writable ({e.strerror or e}); choose another --output_dir"
        ) from e
    return path


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
    _dumps(metrics, what=f"metrics of round {round_num}")
    metrics_text = _dumps(aggregate_metrics(metrics), what=f"metrics of round {round_num}")
    output_dir.mkdir(parents=True, exist_ok=True)

    tmp = output_dir / f".{final.name}{TMP_ROUND_MARKER}{_unique_suffix()}"
    tmp.mkdir()
    try:
        write_files(tmp)
        if not _has_round_files(tmp):
            raise OutputDirError(
                f"write_files saved {sorted(p.name for p in tmp.iterdir()) or 'nothing'} for round "
                f"{round_num}, without {CONFIG_FILE} and {WEIGHTS_FILE} (or {ADAPTER_CONFIG_FILE} and "
                f"{ADAPTER_WEIGHTS_FILE}); it must save the model into "
                "the folder it is given, e.g. `lambda d: model.save_pretrained(d)`"
            )
        (tmp / METRICS_FILE).write_text(metrics_text, encoding="utf-8")
        _write_checksums(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # A non-empty folder cannot be renamed over another one: move the old round aside first. The
    # hidden name keeps it out of `list_rounds`; a crash in between is repaired by
    # `prepare_output_dir`, which puts it back.
    aside = None
    if final.exists() or final.is_symlink():
        aside = output_dir / f".{final.name}{OLD_ROUND_MARKER}{_unique_suffix()}"
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(output_dir)
    if aside is not None:
        _remove(aside)
    return final


def aggregate_metrics(record: Mapping[str, Any]) -> dict:
    """The `AGGREGATE_KEYS` of `record` (a round's metrics): what may leave this machine
    (metrics.json, the Hub). The full record stays in history.json."""
    return {key: record[key] for key in AGGREGATE_KEYS if key in record}


def verify_round(folder: str | os.PathLike) -> None:
    """Check that the files of a round folder are the ones `save_round` wrote, before loading it.

    With checksums.json, every file it lists must exist with its recorded size and sha256.
    Rounds saved before checksums existed are checked for what can be checked without them:
    each safetensors file's header and length, and that each JSON file parses. Raises
    `DamagedRoundError` naming the first damaged file. A folder verified before in this process
    whose files kept their sizes and times is not read again (the ServerApp's pre-flight and its
    loading of the resumed round check the same folder).
    """
    folder = Path(folder)
    signature = _files_signature(folder)
    if _VERIFIED.get(folder.resolve()) == signature:
        return
    _verify_files(folder)
    _VERIFIED[folder.resolve()] = signature


def _verify_files(folder: Path) -> None:
    """`verify_round`'s checks, reading every file."""
    if not _has_round_files(folder) or not (folder / METRICS_FILE).is_file():
        raise DamagedRoundError(
            f"{folder} is incomplete: it needs {CONFIG_FILE} and {WEIGHTS_FILE} (or {ADAPTER_CONFIG_FILE} "
            f"and {ADAPTER_WEIGHTS_FILE}) and {METRICS_FILE}"
        )
    checksums = folder / CHECKSUMS_FILE
    if not checksums.is_file():
        for path in sorted(folder.rglob("*.safetensors")):
            _check_safetensors(path)
        for path in sorted(folder.rglob("*.json")):
            _check_json(path)
        return
    recorded = _load_json_object(checksums).get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise DamagedRoundError(f"{checksums} lists no files; it was edited or damaged")
    for name, expected in sorted(recorded.items()):
        path, expected = folder / name, expected if isinstance(expected, dict) else {}
        if not path.is_file():
            raise DamagedRoundError(f"{path} is missing (listed in {CHECKSUMS_FILE})")
        size, saved_size = path.stat().st_size, expected.get("size")
        if size != saved_size:
            cut = " (cut short)" if isinstance(saved_size, int) and size < saved_size else ""
            raise DamagedRoundError(f"{path} is damaged: {size} bytes where {saved_size} were saved{cut}")
        if _sha256(path) != expected.get("sha256"):
            raise DamagedRoundError(f"{path} is damaged: its sha256 differs from the one saved with it")


# Round folders `verify_round` found intact in this process, with the signature of their files.
_VERIFIED: dict[Path, tuple] = {}


def _files_signature(folder: Path) -> tuple:
    """Each file's path, size and modification time: what changes when a file is written."""
    stats = ((path, path.stat()) for path in folder.rglob("*") if path.is_file())
    return tuple(sorted((str(path), st.st_size, st.st_mtime_ns) for path, st in stats))


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
        if (match := _ROUND_RE.match(entry.name)) and int(match.group(1)) > _check_round_num(round_num)
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
    _fsync_dir(output_dir)
    try:
        history = read_history(output_dir)
    except (FileNotFoundError, OutputDirError):
        history = None
    if history is not None and history.get("status") in HISTORY_STATUSES:
        rounds = history.get("rounds") if isinstance(history.get("rounds"), list) else []
        kept = [r for r in rounds if isinstance(r, dict) and _round_of(r) <= round_num]
        write_history(output_dir, {**history, "rounds": kept})
    return [num for num, _ in later], target


def is_complete_round(path: str | os.PathLike) -> bool:
    """Whether `path` is a `round-N` folder with a config, weights and metrics.json.

    Weights are config.json with model.safetensors or its sharded index, or an adapter's
    adapter_config.json with adapter_model.safetensors. Only names `round-N` count, so
    temporary and set-aside folders never do.
    """
    path = Path(path)
    return bool(_ROUND_RE.match(path.name)) and _has_round_files(path) and (path / METRICS_FILE).is_file()


def list_rounds(output_dir: str | os.PathLike) -> list[int]:
    """Numbers of the complete rounds in `output_dir`, ascending; [] if it does not exist."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    return sorted(
        int(_ROUND_RE.match(entry.name).group(1))
        for entry in path.iterdir()
        if _ROUND_RE.match(entry.name) and is_complete_round(entry)
    )


def latest_round(output_dir: str | os.PathLike) -> int | None:
    """Number of the newest complete round in `output_dir`, or None when there is none."""
    rounds = list_rounds(output_dir)
    return rounds[-1] if rounds else None


def read_round_metrics(output_dir: str | os.PathLike, round_num: int) -> dict:
    """The metrics dict saved with round `round_num` (non-finite numbers read back as None)."""
    path = round_dir(output_dir, round_num) / METRICS_FILE
    if not path.is_file():
        found = list_rounds(output_dir)
        raise FileNotFoundError(
            f"no metrics for round {round_num}: {path} does not exist; "
            f"complete rounds in {output_dir}: {found or 'none'}"
        )
    return _load_json_object(path)


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
    text = _dumps(full, what="history")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f"{TMP_HISTORY_PREFIX}{_unique_suffix()}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output_dir / HISTORY_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(output_dir)


def write_strategy_state(folder: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping) -> Path:
    """Save a strategy's state into a round folder: arrays as safetensors, the rest as JSON metadata.

    `tensors` maps names to numpy arrays; `metadata` is any JSON-able dict (strategy name, scalar
    state). Safetensors holds only plain arrays, so loading it can never run code.
    """
    path = Path(folder) / STRATEGY_STATE_FILE
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    save_file(arrays, path, metadata={STRATEGY_STATE_METADATA_KEY: _dumps(metadata, what="strategy state")})
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


def read_history(output_dir: str | os.PathLike) -> dict:
    """The dict in `output_dir`/history.json; FileNotFoundError or OutputDirError when unusable."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {HISTORY_FILE} in {output_dir}: it is written when a run starts; "
            "check --output_dir points at the folder of a run"
        )
    return _load_json_object(path)


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
        value = _get_dotted(round_metrics, metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        better = best_value is None or (value > best_value if greater_is_better else value < best_value)
        if better:
            best_value, best_num = value, round_metrics.get("round", position)
    return best_num


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_round_num(round_num: int) -> int:
    """`round_num` if it is a non-negative int; a clear ValueError otherwise."""
    if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 0:
        raise ValueError(f"round_num must be a non-negative int, got {round_num!r}")
    return round_num


def _round_of(record: dict) -> float:
    """The round number of a history record; infinite (after every round) when it has none."""
    num = record.get("round")
    return num if isinstance(num, int) and not isinstance(num, bool) else math.inf


def _unique_suffix() -> str:
    """`<pid>-<random>`: unique per process and call, so concurrent writers never collide."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _has_round_files(path: Path) -> bool:
    """Whether `path` holds a config and weights that `from_pretrained` can load.

    A full model (config.json + model.safetensors or its shard index) or a PEFT adapter
    (adapter_config.json + adapter_model.safetensors).
    """
    if (path / ADAPTER_CONFIG_FILE).is_file() and (path / ADAPTER_WEIGHTS_FILE).is_file():
        return True
    weights = (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)
    return (path / CONFIG_FILE).is_file() and any((path / name).is_file() for name in weights)


def _write_checksums(folder: Path) -> None:
    """checksums.json: the size and sha256 of every file under `folder` (paths relative to it)."""
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS_FILE
    }
    (folder / CHECKSUMS_FILE).write_text(_dumps({"files": files}, what="checksums"), encoding="utf-8")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors end exactly at the end of the file
    (safetensors' own check: a file cut short fails it)."""
    try:
        with safe_open(path, "np"):
            pass
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise DamagedRoundError(f"{path} is damaged: {type(err).__name__}: {err}") from None


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedRoundError(f"{path} is damaged: not valid JSON ({err})") from None


def _own_entries(path: Path) -> list[Path]:
    """Round folders and history.json in `path`: what an earlier run left, in round order."""
    rounds = sorted(
        (entry for entry in path.iterdir() if _ROUND_RE.match(entry.name)),
        key=lambda entry: int(_ROUND_RE.match(entry.name).group(1)),
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
        match = _LEFTOVER_ROUND_RE.match(entry.name)
        if match:
            final = path / f"{ROUND_PREFIX}{match.group(1)}"
            set_aside = match.group(2) == OLD_ROUND_MARKER
            if set_aside and not is_complete_round(final) and _has_round_files(entry):
                if final.exists() or final.is_symlink():
                    _remove(final)
                os.rename(entry, final)
            else:
                _remove(entry)
        elif entry.name.startswith((TMP_HISTORY_PREFIX, WRITE_PROBE_PREFIX)):
            _remove(entry)


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


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree (a link is removed, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to disk before it is renamed into place."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable enough for us.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_safe(value: Any, where: str) -> Any:
    """`value` with non-finite floats as None, tuples as lists and numpy/torch scalars as Python."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _json_safe(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy and 0-d torch scalars
        try:
            return _json_safe(value.item(), where)
        except (TypeError, ValueError):
            pass
    raise TypeError(
        f"{where} is a {type(value).__name__}, which cannot be saved as JSON; pass a number or string"
    )


def _dumps(value: Any, what: str) -> str:
    """JSON text of `value`: sorted keys, indent 2, non-finite floats as null."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return json.dumps(_json_safe(value, what), sort_keys=True, indent=2, allow_nan=False) + "\n"


def _load_json_object(path: Path) -> dict:
    """The JSON object in `path`, or OutputDirError saying the file is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputDirError(
            f"{path} is not valid JSON ({e}); it was edited or damaged: restore or delete it"
        ) from e
    if not isinstance(data, dict):
        raise OutputDirError(f"{path} holds a {type(data).__name__}, not a JSON object; restore or delete it")
    return data


def _get_dotted(data: Any, dotted: str) -> Any:
    """`data[a][b]` for `dotted` "a.b", or None when any step is missing."""
    for key in dotted.split("."):
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data
