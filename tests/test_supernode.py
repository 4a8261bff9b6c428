"""`hf_flower.transport.supernode`: Flower's SuperNode with its polling waits capped and its heartbeat set."""

import importlib
import time

import pytest
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection, start_client_internal

from hf_flower.transport import flwr_compat, supernode


@pytest.fixture
def restore_time(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", time)


def test_cap_sleeps_shortens_the_supernode_waits_only(restore_time):
    supernode.cap_sleeps(0.05)
    started = time.monotonic()
    start_client_internal.time.sleep(3)  # the SuperNode's wait after a pull that brought nothing
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    for _ in range(10):  # its waits on its own memory for the client's reply and each object
        start_client_internal.time.sleep(0.5)
    assert time.monotonic() - started < 10 * supernode.LOCAL_CHECK_SECONDS + 0.3
    assert time.sleep is not start_client_internal.time.sleep  # the rest of the process is untouched
    assert start_client_internal.time.time() == pytest.approx(time.time(), abs=1.0)


def test_cap_sleeps_refuses_a_non_positive_interval(restore_time):
    with pytest.raises(ValueError, match="--pull-interval must be positive"):
        supernode.cap_sleeps(0)


def test_cap_sleeps_notices_a_changed_flower(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", object())
    with pytest.raises(RuntimeError, match="not the one hf-flower supports"):
        supernode.cap_sleeps(0.5)


@pytest.fixture
def restore_heartbeat(monkeypatch):
    for module in (fleet_http_connection, heartbeat):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", HEARTBEAT_DEFAULT_INTERVAL)


def test_heartbeat_interval_is_what_the_node_announces_and_keeps(restore_heartbeat):
    supernode.set_heartbeat_interval(10)
    # Announced when the node activates and with each heartbeat; the sender waits by it.
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 10
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 10


@pytest.mark.parametrize("seconds", [0, 9.5, 1801])
def test_heartbeat_interval_outside_what_the_superlink_accepts_is_refused(restore_heartbeat, seconds):
    with pytest.raises(ValueError, match=r"must be in \[10, 1800\] seconds"):
        supernode.set_heartbeat_interval(seconds)
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_DEFAULT_INTERVAL


def test_client_passes_the_heartbeat_interval_to_its_supernode(tmp_path):
    from hf_flower.launch.client import ClientOptions, supernode_command

    options = ClientOptions(
        "127.0.0.1:9092", {"partition-id": 0}, tmp_path, insecure=True, heartbeat_interval=10
    )
    command = supernode_command(options, 9099)
    assert command[command.index(supernode.HEARTBEAT_INTERVAL_FLAG) + 1] == "10"
    assert supernode.HEARTBEAT_INTERVAL_FLAG not in supernode_command(
        ClientOptions("127.0.0.1:9092", {"partition-id": 0}, tmp_path, insecure=True), 9099
    )
    with pytest.raises(ValueError, match="heartbeat interval"):
        ClientOptions("127.0.0.1:9092", {}, tmp_path, insecure=True, heartbeat_interval=5)


def test_an_unsupported_flower_release_is_named_with_the_supported_range():
    flwr_compat.check_flwr_version("1.42.3")
    with pytest.raises(flwr_compat.UnsupportedFlowerError, match=r"supports flwr>=1\.42,<1\.43"):
        flwr_compat.check_flwr_version("1.43.0")


def test_the_supported_flower_range_is_the_one_pyproject_requires():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert f"flwr[simulation]{flwr_compat.SUPPORTED_FLWR}" in pyproject["project"]["dependencies"]


@pytest.mark.parametrize("process", ["clientapp", "supernode"])
def test_object_pulls_retry_within_a_fraction_of_a_second(monkeypatch, process):
    """An object that arrives 0.3 s after the first pull is pulled at once, not after Flower's 1 s
    back-off; Flower's overall time limit still holds."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    module = importlib.import_module(flwr_compat._OBJECT_PULLERS[process])
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)  # restored after the test
    flwr_compat.retry_object_pulls_sooner(process)
    flwr_compat.retry_object_pulls_sooner(process)  # a second call does not wrap twice
    arrives = time.monotonic() + 0.3

    def pull(object_id: str) -> bytes:
        if time.monotonic() < arrives:
            raise ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    assert module.pull_objects(["a", "b"], pull) == {"a": b"content", "b": b"content"}
    assert time.monotonic() - started < 0.7

    def never(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    with pytest.raises(ObjectPullError, match="timeout or retry limit"):
        module.pull_objects(["never"], never, max_time=0.3)


def test_a_message_objects_are_stored_for_the_client_as_they_arrive(monkeypatch):
    """Each object is in the SuperNode's store as soon as it is pulled, before the next pull; the
    client may take them all (and the SuperNode delete them) before Flower stores them itself."""
    seen_before_pull: list[list[str]] = []

    class Store:  # Flower's InMemoryObjectStore: `put` refuses an object no longer registered
        def __init__(self):
            self.registered, self.contents = {"a", "b", "c"}, {}

        def put(self, object_id: str, content: bytes) -> None:
            if object_id not in self.registered:
                raise KeyError(f"Object with ID '{object_id}' was not pre-registered.")
            self.contents[object_id] = content

        def delete_all(self) -> None:  # what the client's ConfirmMessageReceived leads to
            self.registered, self.contents = set(), {}

    def flower_pull_and_store(*, object_store, pull_object, **kwargs):
        # What Flower's `_pull_and_store_message` does: pull every object, then store them all.
        contents = {}
        for object_id in ("a", "b", "c"):
            seen_before_pull.append(sorted(object_store.contents))
            contents[object_id] = pull_object(kwargs["run_id"], object_id)
        object_store.delete_all()  # the client had them all first
        for object_id, content in contents.items():
            object_store.put(object_id, content)
        return kwargs["run_id"]

    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", flower_pull_and_store)
    flwr_compat.store_objects_as_they_arrive()
    flwr_compat.store_objects_as_they_arrive()  # a second call does not wrap twice
    pull = start_client_internal._pull_and_store_message
    assert pull(object_store=Store(), pull_object=lambda run_id, object_id: object_id.encode(), run_id=7) == 7
    assert seen_before_pull == [[], ["a"], ["a", "b"]]
