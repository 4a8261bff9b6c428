"""`flower-supernode`, with a shorter wait between its pulls from the SuperLink, a message's objects
passed on as they arrive, and, optionally, a shorter heartbeat.

Flower 1.42's SuperNode sleeps a fixed 3 s after every pull that brings no message, and 0.5 s
between checks for the ClientApp's reply and its objects
(`flwr/supernode/start_client_internal.py`, no option for either). A message therefore waits
1.5 s on average before its client sees it: twice a round, about 5% of a one-minute round. This
entry point runs Flower's own `flower-supernode`, unchanged, with the pull waits capped at
`--pull-interval` seconds and the checks of its own memory at `LOCAL_CHECK_SECONDS`
(`cap_sleeps`). A SuperNode asks for work only between messages (while its client works it
waits on it), so a short interval costs a small request every `--pull-interval` seconds between
messages; keep Flower's 3 s for federations of thousands of nodes.

A message's objects are pulled from the SuperLink with retries a fraction of a second apart
(`flwr_compat.retry_object_pulls_sooner`, not Flower's 1 s doubling up to 10 s) and stored for the
client as each arrives (`flwr_compat.store_objects_as_they_arrive`), so the client's own pulls
overlap the download.

The SuperLink declares a node dead after two missed heartbeats, and a SuperNode sends one every
`HEARTBEAT_DEFAULT_INTERVAL` seconds (30, a constant in Flower 1.42): a crashed client holds its
round for about a minute. `--heartbeat-interval` sets that interval (the SuperLink accepts 10 s
to 30 min), so a dead client is noticed sooner at the cost of more heartbeat requests.

Usage: `python -m hf_flower.transport.supernode --pull-interval 0.2 [--heartbeat-interval 30]
<flower-supernode arguments>`.
"""

from __future__ import annotations

import argparse
import sys
import time
import types

from .flwr_compat import (
    HEARTBEAT_MAX_INTERVAL,
    HEARTBEAT_MIN_INTERVAL,
    SUPPORTED_FLWR,
    fleet_http_connection,
    flower_supernode,
    heartbeat,
    retry_object_pulls_sooner,
    start_client_internal,
    store_objects_as_they_arrive,
)

PULL_INTERVAL_FLAG = "--pull-interval"
HEARTBEAT_INTERVAL_FLAG = "--heartbeat-interval"
# A message waits half of it on average before its node asks for it (see the module docstring).
DEFAULT_PULL_INTERVAL = 0.2
# Between checks of the SuperNode's own memory for the client's reply and its objects.
LOCAL_CHECK_SECONDS = 0.02


def cap_sleeps(seconds: float) -> None:
    """Make the SuperNode's loop wait at most `seconds` between pulls from the SuperLink, and at
    most `LOCAL_CHECK_SECONDS` between checks of its own memory.

    Flower's loop only sleeps to poll: 3 s between pulls that bring no message (a request to the
    SuperLink), and 0.5 s between checks of its own state for the ClientApp's reply and for each
    of the reply's objects, which it sends on as they come (an in-memory lookup). With 0.5 s, a
    reply of 20 objects that arrive 50 ms apart reached the SuperLink up to 2 s after the client
    had pushed it (`benchmarks/round_overhead.py`).
    """
    if seconds <= 0:
        raise ValueError(f"{PULL_INTERVAL_FLAG} must be positive, got {seconds}")
    if start_client_internal.time is not time:
        raise RuntimeError(
            "Flower's start_client_internal no longer polls through the `time` module; this flwr "
            f"release is not the one hf-flower supports (flwr{SUPPORTED_FLWR}, see pyproject.toml)"
        )
    capped = types.ModuleType("time", "The `time` module, with `sleep` capped for polling.")
    capped.__dict__.update(time.__dict__)
    capped.sleep = lambda wait: time.sleep(min(wait, seconds if wait >= 1 else LOCAL_CHECK_SECONDS))
    start_client_internal.time = capped


def check_heartbeat_interval(seconds: float) -> None:
    """Refuse an interval the SuperLink would refuse when the node connects."""
    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(
            f"the heartbeat interval must be in [{HEARTBEAT_MIN_INTERVAL}, {HEARTBEAT_MAX_INTERVAL}] "
            f"seconds (the SuperLink refuses others), got {seconds}"
        )


def set_heartbeat_interval(seconds: float) -> None:
    """Make the SuperNode announce, and keep, a heartbeat every `seconds` instead of Flower's 30."""
    check_heartbeat_interval(seconds)
    # The connection announces the interval to the SuperLink; the sender waits by it.
    for module in (fleet_http_connection, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(
                f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL; this flwr release is "
                f"not the one hf-flower supports (flwr{SUPPORTED_FLWR}, see pyproject.toml)"
            )
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def main(argv: list[str]) -> int | None:
    """Cap the polling waits, pass objects on as they arrive (and set the heartbeat), then run
    `flower-supernode` with the remaining arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_flower.transport.supernode",
        usage=f"%(prog)s {PULL_INTERVAL_FLAG} S [{HEARTBEAT_INTERVAL_FLAG} S] [flower-supernode args]",
    )
    parser.add_argument(PULL_INTERVAL_FLAG, type=float, required=True)
    parser.add_argument(HEARTBEAT_INTERVAL_FLAG, type=float)
    ours, flower_args = parser.parse_known_args(argv)
    cap_sleeps(ours.pull_interval)
    retry_object_pulls_sooner("supernode")
    store_objects_as_they_arrive()
    if ours.heartbeat_interval is not None:
        set_heartbeat_interval(ours.heartbeat_interval)
    sys.argv = ["flower-supernode", *flower_args]
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
