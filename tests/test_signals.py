"""A launcher stopped by a signal stops every process it started (issue 11, point 5)."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_run_flags

from hf_flower import checkpoint
from hf_flower.launch.processes import ManagedProcess

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM])
def test_signal_to_the_simulation_launcher_stops_every_flower_process(
    tmp_path, tiny_model_dir, reviews_csv, no_leftover_processes, stop_signal
):
    """A scheduler's SIGTERM reaches the launcher alone (Flower's processes run in their own
    sessions): it must stop the SuperLink, the simulation and Ray, keep the rounds saved so far,
    and exit with the signal's code. `no_leftover_processes` fails the test on any survivor."""
    output_dir = tmp_path / "run"
    flags = tiny_run_flags(
        output_dir, tiny_model_dir, reviews_csv, "--num_rounds", "20", "--max_steps", "200"
    )
    command = [sys.executable, str(ROOT / "scripts" / "simulate.py"), *flags]
    with ManagedProcess(command, tmp_path / "simulate.log", cwd=str(tmp_path)) as launcher:
        deadline = time.monotonic() + 180
        while checkpoint.latest_round(output_dir) is None and time.monotonic() < deadline:
            assert launcher.running(), launcher.tail(40)
            time.sleep(0.2)
        assert checkpoint.latest_round(output_dir) == 0, launcher.tail(40)
        os.kill(launcher.process.pid, stop_signal)  # the launcher only, not its session
        assert launcher.process.wait(timeout=60) == 128 + stop_signal, launcher.tail(40)
    log = (tmp_path / "simulate.log").read_text()
    assert f"Stopped by {signal.Signals(stop_signal).name}" in log
    assert checkpoint.list_rounds(output_dir)[0] == 0  # what was saved is kept
