"""`flower-supernode`, with a shorter wait between its pulls from the SuperLink.

Flower 1.42's SuperNode sleeps a fixed 3 s after every pull that brings no message, and 0.5 s
between checks for the ClientApp's reply (`flwr/supernode/start_client_internal.py`, no option
for either). A message therefore waits 1.5 s on average before its client sees it: twice a round,
about 5% of a one-minute round. This entry point runs Flower's own `flower-supernode`, unchanged,
with those waits capped at `--pull-interval` seconds. Each idle SuperNode then asks its SuperLink
for work every `--pull-interval` seconds instead of every 3 s, a small request; keep Flower's 3 s
for federations of thousands of nodes.

Usage: `python -m hf_flower.launch.supernode --pull-interval 0.5 <flower-supernode arguments>`.
"""

from __future__ import annotations

import sys
import time
import types

from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

PULL_INTERVAL_FLAG = "--pull-interval"


def cap_sleeps(seconds: float) -> None:
    """Make the SuperNode's loop sleep at most `seconds` at a time (it only sleeps to poll)."""
    if seconds <= 0:
        raise ValueError(f"{PULL_INTERVAL_FLAG} must be positive, got {seconds}")
    if start_client_internal.time is not time:
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer polls through the `time` module; this "
            "flwr release is not the one hf-flower supports (see pyproject.toml)"
        )
    capped = types.ModuleType("time", "The `time` module, with `sleep` capped for polling.")
    capped.__dict__.update(time.__dict__)
    capped.sleep = lambda wait: time.sleep(min(wait, seconds))
    start_client_internal.time = capped


def main(argv: list[str]) -> int | None:
    """Cap the polling waits, then run `flower-supernode` with the remaining arguments."""
    if len(argv) < 2 or argv[0] != PULL_INTERVAL_FLAG:
        raise SystemExit(
            f"usage: python -m hf_flower.launch.supernode {PULL_INTERVAL_FLAG} S [flower-supernode args]"
        )
    cap_sleeps(float(argv[1]))
    sys.argv = ["flower-supernode", *argv[2:]]
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
