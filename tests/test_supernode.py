"""`hf_flower.launch.supernode`: Flower's SuperNode with its polling waits capped."""

import time

import pytest
from flwr.supernode import start_client_internal

from hf_flower.launch import supernode


@pytest.fixture
def restore_time(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", time)


def test_cap_sleeps_shortens_the_supernode_waits_only(restore_time):
    supernode.cap_sleeps(0.05)
    started = time.monotonic()
    start_client_internal.time.sleep(3)  # the SuperNode's wait after a pull that brought nothing
    assert time.monotonic() - started < 1.0
    assert time.sleep is not start_client_internal.time.sleep  # the rest of the process is untouched
    assert start_client_internal.time.time() == pytest.approx(time.time(), abs=1.0)


def test_cap_sleeps_refuses_a_non_positive_interval(restore_time):
    with pytest.raises(ValueError, match="--pull-interval must be positive"):
        supernode.cap_sleeps(0)


def test_cap_sleeps_notices_a_changed_flower(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", object())
    with pytest.raises(RuntimeError, match="not the one hf-flower supports"):
        supernode.cap_sleeps(0.5)
