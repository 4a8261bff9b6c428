"""A launcher stopped by a signal stops every process it started (issue 11, point 5). SIGKILL to a
client launcher is checked in test_deployment.py's killed-client test."""

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import processes_of, tiny_run_flags

from hf_flower import checkpoint
from hf_flower.launch.processes import ManagedProcess, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM])
def test_signal_to_the_simulation_launcher_stops_every_flower_process(
    tmp_path, tiny_model_dir, reviews_csv, no_leftover_processes, stop_signal
):
    """A scheduler's SIGTERM reaches the launcher alone (Flower's processes run in their own
    sessions) during round 1: within 10 s it must stop the SuperLink, the simulation and Ray, keep
    the rounds saved so far, and exit with the signal's code."""
    output_dir = tmp_path / "run"
    # 200 steps a round (--max_steps is the whole training's): round 1 is still training at the signal.
    flags = tiny_run_flags(
        output_dir, tiny_model_dir, reviews_csv, "--num_rounds", "20", "--max_steps", "4000"
    )
    command = [sys.executable, str(ROOT / "scripts" / "simulate.py"), *flags]
    with ManagedProcess(command, tmp_path / "simulate.log", cwd=str(tmp_path)) as launcher:
        deadline = time.monotonic() + 180
        while checkpoint.latest_round(output_dir) is None and time.monotonic() < deadline:
            assert launcher.running(), launcher.tail(40)
            time.sleep(0.2)
        assert checkpoint.latest_round(output_dir) == 0, launcher.tail(40)
        started = [p for p in processes_of(tmp_path) if p.pid != launcher.process.pid]
        os.kill(launcher.process.pid, stop_signal)  # the launcher only, not its session
        assert launcher.process.wait(timeout=10) == 128 + stop_signal, launcher.tail(40)
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    log = (tmp_path / "simulate.log").read_text()
    assert f"Stopped by {signal.Signals(stop_signal).name}" in log
    assert checkpoint.list_rounds(output_dir)[0] == 0  # what was saved is kept
    history = checkpoint.read_history(output_dir)
    assert history["status"] == "interrupted"
    assert history["error"].startswith(f"Stopped by {signal.Signals(stop_signal).name}")


def test_sigterm_to_the_server_launcher_stops_its_superlink_and_serverapp(
    tmp_path, tiny_model_dir, reviews_csv, no_leftover_processes
):
    """`scripts/server.py` waiting for its clients: SIGTERM stops it and everything it started (the
    SuperLink, the SuperExec and the ServerApp) within 10 s."""
    output_dir = tmp_path / "run"
    port = free_port()
    command = [
        sys.executable, str(ROOT / "scripts" / "server.py"),
        *tiny_run_flags(output_dir, tiny_model_dir, reviews_csv), "--port", str(port), "--insecure",
    ]  # fmt: skip
    with ManagedProcess(command, tmp_path / "server.log", cwd=str(tmp_path)) as launcher:
        deadline = time.monotonic() + 120
        # The ServerApp runs once the SuperLink has started it: it writes the run's history.
        while not (output_dir / checkpoint.HISTORY_FILE).exists() and time.monotonic() < deadline:
            assert launcher.running(), launcher.tail(40)
            time.sleep(0.2)
        started = [p for p in processes_of(tmp_path) if p.pid != launcher.process.pid]
        assert any("flwr-serverapp" in " ".join(p.cmdline()) for p in started), launcher.tail(40)
        os.kill(launcher.process.pid, signal.SIGTERM)
        assert launcher.process.wait(timeout=10) == 128 + signal.SIGTERM, launcher.tail(40)
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    assert "Stopped by SIGTERM" in (tmp_path / "server.log").read_text()
