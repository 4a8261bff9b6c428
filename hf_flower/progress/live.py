"""Progress inside a round: small JSON files that Flower's processes write and a launcher reads.

A launcher sets `HF_FLOWER_PROGRESS_DIR` for the Flower processes it starts
(`launch.flower.flower_env`); without it nothing here writes anything. With it:

- every client's Trainer (`progress/callback.py`) writes `client-<node>-round-<r>.json`: its
  partition, step, total steps, latest logged loss and whether it is done; at most every
  `min_interval` seconds and at the last step, from the main process of a multi-rank client only.
  Only clients on the launcher's machine (simulation) share the folder.
- the ServerApp (`TrackingGrid`) writes `server-round-<r>.json`: for the train and the evaluate
  phase, the nodes asked, each reply as it arrives (partition, metrics or error) and, once the
  phase is over, which replies were rejected and which nodes never answered.

Writes are atomic (temporary file, then `os.replace`) and keyed by round; each writer deletes its
own files older than the round before. This module imports no torch: the launcher reads with
`read_rounds`, which treats every file as untrusted and skips what is missing, partial or malformed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..constants import CLIENT_KEY, PARTITION_ID_KEY
from .lines import printable

PROGRESS_DIR_ENV = "HF_FLOWER_PROGRESS_DIR"
CLIENT_FILE = "client-{node}-round-{round}.json"
SERVER_FILE = "server-round-{round}.json"
_CLIENT_NAME = re.compile(r"^client-(\d+)-round-(\d+)\.json$")
_SERVER_NAME = re.compile(r"^server-round-(\d+)\.json$")
# Phases of a round, in order, as Flower's message types name them.
PHASES = ("train", "evaluate")
# Reply states: arrived and kept, arrived as an error, arrived but refused, never arrived.
OK, ERROR, REJECTED, MISSING = "ok", "error", "rejected", "missing"
MAX_FILE_BYTES = 4_000_000
MAX_REASON_CHARS = 300
MAX_METRICS = 20

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def progress_dir() -> Path | None:
    """The folder a launcher asked this process to report to, if any."""
    value = os.environ.get(PROGRESS_DIR_ENV)
    return Path(value) if value else None


def prepare_dir(directory: Path) -> None:
    """Create `directory` and remove the progress files of an earlier run in it."""
    directory.mkdir(parents=True, exist_ok=True)
    for pattern in ("client-*.json", "server-*.json", ".*.tmp"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` so that a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _write_quietly(path: Path, data: dict) -> None:
    """Progress is a courtesy: a failed write is logged once and never stops training."""
    try:
        write_json_atomic(path, data)
    except (OSError, TypeError, ValueError) as err:
        if str(path.parent) not in _warned:
            _warned.add(str(path.parent))
            logger.warning("Cannot write progress to %s (%s); continuing without it.", path, err)


def _prune(directory: Path, pattern: re.Pattern, keep_from: int, node: int | None = None) -> None:
    """Delete this writer's files of rounds before `keep_from`."""
    try:
        paths = list(directory.iterdir())
    except OSError:
        return
    for path in paths:
        match = pattern.match(path.name)
        if match is None:
            continue
        *owner, file_round = (int(group) for group in match.groups())
        if owner and owner[0] != node:
            continue
        if file_round < keep_from:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _never_raises(method):
    """Reporting progress must never fail training or a round: an error is logged once."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001
            if method.__qualname__ not in _warned:
                _warned.add(method.__qualname__)
                logger.warning("Progress reporting failed (%s: %s); continuing.", type(err).__name__, err)

    return wrapper


class TrainingProgress:
    """One client's training in one round, written to `client-<node>-round-<r>.json`."""

    def __init__(
        self,
        directory: Path,
        node_id: int,
        partition_id: int | None,
        server_round: int,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.directory = Path(directory)
        self.path = self.directory / CLIENT_FILE.format(node=int(node_id), round=int(server_round))
        self.record = {
            "node_id": int(node_id),
            "partition_id": _partition(partition_id),
            "round": int(server_round),
            "step": 0,
            "max_steps": 0,
            "loss": None,
            "done": False,
        }
        self.min_interval = min_interval
        self.clock = clock
        self._written_at: float | None = None

    @_never_raises
    def begin(self, max_steps: int) -> None:
        """Training starts: drop this node's files of older rounds, write step 0."""
        _prune(self.directory, _CLIENT_NAME, self.record["round"] - 1, node=self.record["node_id"])
        self.update(0, max_steps, force=True)

    @_never_raises
    def update(
        self, step: int, max_steps: int, loss: float | None = None, done: bool = False, force: bool = False
    ) -> None:
        """Record the latest state; write it if `min_interval` has passed, at the last step, or
        when done."""
        record = self.record
        record["step"], record["max_steps"] = int(step), int(max_steps)
        if loss is not None:
            record["loss"] = float(loss)
        record["done"] = record["done"] or done
        now = self.clock()
        last_step = record["max_steps"] > 0 and record["step"] >= record["max_steps"]
        due = self._written_at is None or now - self._written_at >= self.min_interval
        if force or done or last_step or due:
            self._written_at = now
            _write_quietly(self.path, {**record, "time": time.time()})


class ReplyBoard:
    """The ServerApp's side: which nodes were asked in this round's phase, and who answered.

    `TrackingGrid` calls `start` when it sends a phase's messages, `reply` for each reply as it
    arrives, and `finish` with the replies it kept. Without a folder (no launcher asked for
    progress) every call returns at once.
    """

    def __init__(
        self, directory: Path | None, min_interval: float = 0.5, clock: Callable[[], float] = time.monotonic
    ):
        self.directory = None if directory is None else Path(directory)
        self.min_interval = min_interval
        self.clock = clock
        self.round: int | None = None
        self.phases: dict[str, dict] = {}
        self._phase: dict | None = None
        self._kind = ""
        self._written_at = 0.0

    @classmethod
    def from_env(cls) -> ReplyBoard:
        return cls(progress_dir())

    @_never_raises
    def start(self, server_round: int, kind: str, messages: Iterable) -> None:
        if self.directory is None:
            return
        if server_round != self.round:
            self.round, self.phases = server_round, {}
            _prune(self.directory, _SERVER_NAME, server_round - 1)
        self._phase = {
            "sampled": [int(m.metadata.dst_node_id) for m in messages],
            "replies": [],
            "finished": False,
        }
        self._kind = str(kind)
        self.phases[self._kind] = self._phase
        self._write(force=True)

    @_never_raises
    def reply(self, reply) -> None:
        """A reply as it arrives: its node, partition and scalar metrics, or its error."""
        if self.directory is None or self._phase is None:
            return
        entry = {"node_id": int(reply.metadata.src_node_id), "partition_id": None, "status": OK}
        if reply.has_error():
            entry.update(status=ERROR, error=_first_line(reply.error.reason))
        else:
            client = reply.content.config_records.get(CLIENT_KEY)
            if client is not None and PARTITION_ID_KEY in client:
                entry["partition_id"] = _partition(client[PARTITION_ID_KEY])
            entry["metrics"] = {
                key: value
                for record in reply.content.metric_records.values()
                for key, value in list(record.items())[:MAX_METRICS]
                if isinstance(value, (int, float))
            }
        self._phase["replies"].append(entry)
        self._write()

    @_never_raises
    def finish(self, good: Iterable, failures: Iterable[str]) -> None:
        """The phase is over: replies not among `good` were rejected; silent nodes are missing.
        `failures` are `TrackingGrid`'s (`round <r> <kind>: node <id>...`), for the reasons."""
        if self.directory is None or self._phase is None:
            return
        kept = {int(r.metadata.src_node_id) for r in good}
        failures = [f for f in failures if f.startswith(f"round {self.round} {self._kind}:")]
        arrived = set()
        for entry in self._phase["replies"]:
            arrived.add(entry["node_id"])
            if entry["status"] == OK and entry["node_id"] not in kept:
                entry.update(status=REJECTED, error=_failure_of(entry["node_id"], failures))
        for node in self._phase["sampled"]:
            if node not in arrived:
                error = _failure_of(node, failures) or "no reply"
                self._phase["replies"].append(
                    {"node_id": node, "partition_id": None, "status": MISSING, "error": error}
                )
        self._phase["finished"] = True
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._written_at >= self.min_interval:
            self._written_at = now
            data = {"round": self.round, "phases": self.phases, "time": time.time()}
            _write_quietly(self.directory / SERVER_FILE.format(round=self.round), data)


def _partition(value) -> int | None:
    """A partition id worth showing (a node serving its own file has none)."""
    return value if type(value) is int and value >= 0 else None


def _first_line(text) -> str:
    """The first line of a reason, printable (a client chooses its error reply's reason)."""
    lines = str(text)[: 4 * MAX_REASON_CHARS].strip().splitlines()
    return printable(lines[0], MAX_REASON_CHARS) if lines else ""


def _failure_of(node: int, failures: list[str]) -> str:
    """The reason `TrackingGrid` gave for `node`, without its `round N kind: node M` prefix."""
    for failure in failures:
        match = re.search(rf"node {node}(?!\d)[ :]*(.*)", _first_line(failure))
        if match:
            return match.group(1)
    return ""


# --- Reading, for the launcher ---------------------------------------------------------------


@dataclasses.dataclass
class ClientState:
    node_id: int
    partition_id: int | None
    round: int
    step: int
    max_steps: int
    loss: float | None
    done: bool


@dataclasses.dataclass
class Reply:
    node_id: int
    partition_id: int | None
    status: str
    metrics: dict[str, float]
    error: str


@dataclasses.dataclass
class Phase:
    kind: str
    sampled: int
    replies: list[Reply]
    finished: bool

    @property
    def arrived(self) -> int:
        return sum(r.status != MISSING for r in self.replies)

    @property
    def failed(self) -> int:
        return sum(r.status != OK for r in self.replies)


@dataclasses.dataclass
class RoundProgress:
    round: int
    clients: dict[int, ClientState] = dataclasses.field(default_factory=dict)
    phases: dict[str, Phase] = dataclasses.field(default_factory=dict)


def _int(value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"not an integer >= {minimum}: {value!r}")
    return value


def _optional_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def _read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is too large")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold an object")
    return data


def _parse_client(data: dict) -> ClientState:
    return ClientState(
        node_id=_int(data["node_id"]),
        partition_id=_partition(data.get("partition_id")),
        round=_int(data["round"]),
        step=_int(data.get("step", 0)),
        max_steps=_int(data.get("max_steps", 0)),
        loss=_optional_float(data.get("loss")),
        done=data.get("done") is True,
    )


def _parse_reply(data: dict) -> Reply:
    status = data.get("status")
    if status not in (OK, ERROR, REJECTED, MISSING):
        raise ValueError(f"unknown reply status {status!r}")
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ValueError("metrics is not an object")
    return Reply(
        node_id=_int(data["node_id"]),
        partition_id=_partition(data.get("partition_id")),
        status=status,
        metrics={
            str(k): float(v)
            for k, v in list(metrics.items())[:MAX_METRICS]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        },
        error=_first_line(data.get("error") or ""),
    )


def _parse_phase(kind: str, data: dict) -> Phase:
    sampled = data.get("sampled", [])
    replies = data.get("replies", [])
    if not isinstance(sampled, list) or not isinstance(replies, list):
        raise ValueError("sampled and replies must be lists")
    parsed = []
    for entry in replies:
        try:
            parsed.append(_parse_reply(entry))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # one bad entry does not hide the others
    return Phase(kind, len(sampled), parsed, data.get("finished") is True)


def read_rounds(directory: Path | None) -> dict[int, RoundProgress]:
    """Every round with progress files in `directory`, by round. Never raises: files that are
    missing, being replaced, malformed or not ours are skipped."""
    rounds: dict[int, RoundProgress] = {}
    if directory is None:
        return rounds
    try:
        paths = sorted(Path(directory).iterdir())
    except OSError:
        return rounds
    for path in paths:
        try:
            if _CLIENT_NAME.match(path.name):
                client = _parse_client(_read_json(path))
                rounds.setdefault(client.round, RoundProgress(client.round)).clients[client.node_id] = client
            elif _SERVER_NAME.match(path.name):
                data = _read_json(path)
                server_round = _int(data["round"])
                phases = data.get("phases", {})
                if not isinstance(phases, dict):
                    raise ValueError("phases is not an object")
                parsed = {k: _parse_phase(k, phases[k]) for k in PHASES if isinstance(phases.get(k), dict)}
                rounds.setdefault(server_round, RoundProgress(server_round)).phases.update(parsed)
        except (OSError, KeyError, TypeError, ValueError, AttributeError, RecursionError):
            continue
    return rounds
