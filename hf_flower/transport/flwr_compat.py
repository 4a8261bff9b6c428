"""The one module that imports Flower's internal (non-public) modules, and the Flower versions it
is written for.

The fast round path reaches below Flower's public API in a few places: the SuperNode's runtime
API and its `run_clientapp` steps (the long-lived client loop), the SuperNode's polling loop and
heartbeat constants (`supernode.py`), how soon each process retries pulling an object that has
not arrived (`retry_object_pulls_sooner`) and when a SuperNode stores what it pulled
(`store_objects_as_they_arrive`), error codes and sub-statuses, and `strategy_utils`' metric
aggregation. Flower does not keep these stable between releases, so they are imported
here and nowhere else: upgrading Flower means reading this module and the names it re-exports.
Public Flower APIs (`flwr.app`, `flwr.serverapp`, `flwr.clientapp`) are imported where they are
used.

On import the installed Flower is checked against `SUPPORTED_FLWR`, the range pyproject.toml
requires, before any internal module is imported: another release fails here, naming the range,
instead of somewhere inside a round. The SuperNode and runtime-API names, which only the
long-lived client and its SuperNode use, are imported on first use (`_ON_FIRST_USE`).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

# The same range as the `flwr[simulation]` requirement in pyproject.toml: change both together.
FLWR_MIN, FLWR_BELOW = "1.42", "1.43"
SUPPORTED_FLWR = f">={FLWR_MIN},<{FLWR_BELOW}"


class UnsupportedFlowerError(ImportError):
    """The installed Flower is not a release whose internals this module was written for."""


def check_flwr_version(installed: str | None = None) -> None:
    """Raise `UnsupportedFlowerError` unless `installed` (default: the installed flwr) is in
    `SUPPORTED_FLWR`."""
    installed = installed or importlib.metadata.version("flwr")
    if not _release(FLWR_MIN) <= _release(installed) < _release(FLWR_BELOW):
        raise UnsupportedFlowerError(
            f"hf-flower supports flwr{SUPPORTED_FLWR} (it uses Flower internals that move between "
            f"releases); flwr {installed} is installed. Install a supported release: "
            f'pip install "flwr[simulation]{SUPPORTED_FLWR}".'
        )


def _release(version: str) -> tuple[int, ...]:
    """The release numbers a version starts with: "1.42.0rc1" -> (1, 42, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


check_flwr_version()

# Imported only once the version is known to be one they exist in.
from flwr.common.constant import (  # noqa: E402
    HEARTBEAT_MAX_INTERVAL,
    HEARTBEAT_MIN_INTERVAL,
    ErrorCode,
    SubStatus,
)
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: E402  # pylint: disable=no-name-in-module
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402

# Imported on first use (`__getattr__`): these take about a second to import, which only the
# long-lived client and its SuperNode need, not every ClientApp and ServerApp process.
# name -> (module, attribute; None for the module itself).
_ON_FIRST_USE = {
    "HeartbeatSender": ("flwr.supercore.heartbeat", "HeartbeatSender"),
    "make_task_heartbeat_fn_http": ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http"),
    "heartbeat": ("flwr.supercore.heartbeat", None),
    "RuntimeTokenHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    "RuntimeVersionHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    "make_simple_http_retry_invoker": ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    "RuntimeHttpClient": ("flwr.supercore.runtime", "RuntimeHttpClient"),
    "fleet_http_connection": ("flwr.supernode.fleet_http_connection", None),
    "start_client_internal": ("flwr.supernode.start_client_internal", None),
    "flower_supernode": ("flwr.supernode.cli", "flower_supernode"),
    "pull_task_input": ("flwr.supernode.runtime.run_clientapp", "pull_task_input"),
    "push_message": ("flwr.supernode.runtime.run_clientapp", "push_message"),
    "push_task_output": ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
}


# Where each process's Flower code pulls objects: the long-lived client from its SuperNode (through
# `pull_and_inflate_object_from_tree`), the SuperNode from the SuperLink, the ServerApp its replies.
_OBJECT_PULLERS = {
    "clientapp": "flwr.supercore.inflatable.inflatable_utils",
    "supernode": "flwr.supernode.start_client_internal",
    "serverapp": "flwr.superlink.grid.http_grid",
}
# How soon a pull of an object that has not arrived yet is retried, doubling up to the cap.
PULL_RETRY_SECONDS = 0.05
PULL_RETRY_CAP_SECONDS = 0.25


def retry_object_pulls_sooner(process: str) -> None:
    """Make `process`'s Flower code retry a pull of a missing object after `PULL_RETRY_SECONDS`,
    doubling up to `PULL_RETRY_CAP_SECONDS`, instead of Flower's 1 s doubling up to 10 s.

    A message is announced before its objects have arrived (the SuperNode stores it, then
    pulls its objects; a reply is listed before its sender has pushed them), so the next hop's
    first pulls of a 91 MB message miss and wait 1 s, 2 s, ...: about 2 s per hop and message in
    `benchmarks/round_overhead.py`. Flower's overall pull time limit (`max_time`) is kept; the
    count of tries is not bounded, as shorter waits mean more of them.
    """
    if process == "serverapp" and _OBJECT_PULLERS[process] not in sys.modules:
        return  # a simulation's grid, which pulls no objects
    module = importlib.import_module(_OBJECT_PULLERS[process])
    pull_objects = module.pull_objects
    if getattr(pull_objects, "retries_sooner", False):
        return

    def pull_sooner(*args, **kwargs):
        kwargs.update(
            initial_backoff=PULL_RETRY_SECONDS, backoff_cap=PULL_RETRY_CAP_SECONDS, max_tries_per_object=None
        )
        return pull_objects(*args, **kwargs)

    pull_sooner.retries_sooner = True
    module.pull_objects = pull_sooner


def store_objects_as_they_arrive() -> None:
    """Make this process's SuperNode store each object of a message as soon as it has pulled it
    from the SuperLink, instead of once it has pulled them all.

    The long-lived client pulls the same objects from its SuperNode, and may start as soon as the
    SuperNode has announced the task: with objects stored as they arrive, its pulls overlap the
    SuperNode's download instead of following it (about 0.9 s per 91 MB message in
    `benchmarks/round_overhead.py`). Flower's own store of all objects at the end skips them: by
    then the client may have taken them all and the SuperNode deleted them. A message whose
    download fails is deleted with its objects, as before.
    """
    module = importlib.import_module("flwr.supernode.start_client_internal")
    pull_and_store_message = module._pull_and_store_message
    if getattr(pull_and_store_message, "stores_as_they_arrive", False):
        return

    def pull_and_store_as_they_arrive(*, object_store, pull_object, **kwargs):
        store = _StoredOnArrival(object_store)

        def pull_and_store(run_id: int, object_id: str) -> bytes:
            content = pull_object(run_id, object_id)
            store.put_now(object_id, content)
            return content

        return pull_and_store_message(object_store=store, pull_object=pull_and_store, **kwargs)

    pull_and_store_as_they_arrive.stores_as_they_arrive = True
    module._pull_and_store_message = pull_and_store_as_they_arrive


class _StoredOnArrival:
    """A SuperNode's object store whose `put` skips the objects `put_now` stored on arrival."""

    def __init__(self, store):
        self._store = store
        self._stored: set[str] = set()

    def put_now(self, object_id: str, content: bytes) -> None:
        self._store.put(object_id, content)
        self._stored.add(object_id)

    def put(self, object_id: str, content: bytes) -> None:
        if object_id not in self._stored:
            self._store.put(object_id, content)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def __getattr__(name: str):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _ON_FIRST_USE[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later uses skip `__getattr__`
    return value


__all__ = [
    "HEARTBEAT_MAX_INTERVAL",
    "HEARTBEAT_MIN_INTERVAL",
    "FLWR_BELOW",
    "FLWR_MIN",
    "SUPPORTED_FLWR",
    "AcquireTaskRequest",
    "ErrorCode",
    "SubStatus",
    "TaskType",
    "UnsupportedFlowerError",
    "aggregate_metricrecords",
    "check_flwr_version",
    "retry_object_pulls_sooner",
    "store_objects_as_they_arrive",
    *_ON_FIRST_USE,
]
