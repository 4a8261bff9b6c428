"""One run per output folder: the lock, what it lets through, and what it protects.

A helper process plays the other run: it takes the lock and sleeps until the test kills it. Two
real launchers on one folder (the second refused, the first completing) are in tests/test_hub.py,
beside the run that pushes to the fake Hub.
"""

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NO_SUCH_PID, tiny_run_flags

from hf_flower import checkpoint
from hf_flower.checkpoint import lock as run_lock
from hf_flower.checkpoint.lock import RunLock, RunLockedError
from hf_flower.launch.plan import run_prepare
from hf_flower.launch.simulation import prepare_simulation

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from hf_flower.checkpoint import lock as run_lock\n"
    "run_lock.RunLock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


@contextlib.contextmanager
def other_run(output_dir: Path):
    """Another process holding the lock of `output_dir`, killed (SIGKILL) on exit."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def write_round_files(folder: Path) -> None:
    """The files that make a round folder complete (their content does not matter here)."""
    (folder / checkpoint.CONFIG_FILE).write_text("{}")
    (folder / checkpoint.WEIGHTS_FILE).write_bytes(b"weights")


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != run_lock.LOCK_FILE)


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    with other_run(tmp_path) as holder:
        fix = f"Choose another --output_dir, or stop it first (kill {holder.pid})."
        for attempt in (RunLock, run_lock.ensure_not_in_use, run_lock.hold_for_process):
            with pytest.raises(RunLockedError, match=re.escape(fix)) as err:
                attempt(tmp_path)
            assert err.value.holder_pid == holder.pid
            assert f"is in use by another hf-flower run: pid {holder.pid} (" in str(err.value)
    # Killed with SIGKILL, the holder still let go: the kernel releases the lock with the process.
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().splitlines()[0] == str(os.getpid())
    assert lock.path.read_text() == ""  # a released lock names no run


def test_the_lock_covers_the_processes_that_run_under_its_holder(tmp_path):
    covered = "import sys\nfrom hf_flower.checkpoint import lock as run_lock\nrun_lock.hold_for_process(sys.argv[1])\nprint('covered')"
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path)  # a second lock, even in the same process
        run_lock.ensure_not_in_use(tmp_path)  # this process holds it: preparing here may go on
        # A ServerApp started under the launcher (here: under this process) runs under its lock.
        child = subprocess.run(
            [sys.executable, "-c", covered, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert child.returncode == 0 and child.stdout.strip() == "covered", child.stderr[-2000:]


CLAIM = (
    "import sys, time\n"
    "from hf_flower.checkpoint import OutputDirError\n"
    "from hf_flower.checkpoint import lock as run_lock\n"
    "try:\n"
    "    run_lock.hold_for_process(sys.argv[1])\n"
    "except OutputDirError as err:\n"
    "    print('refused:', err, flush=True)\n"
    "    sys.exit(3)\n"
    "print('claimed', flush=True)\n"
    "time.sleep(600 if sys.argv[2:] == ['hold'] else 0)\n"
)


def claim(output_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A ServerApp's `hold_for_process` in a child of this process (the launcher)."""
    return subprocess.run(
        [sys.executable, "-c", CLAIM, str(output_dir)], capture_output=True, text=True, timeout=60, env=env
    )


def test_only_the_serverapp_that_claims_the_lease_writes_under_the_launcher(tmp_path):
    """Every ServerApp of the launcher's SuperLink descends from the launcher; only the first that
    presents its lease writes in its folder (a second `flwr run` to that SuperLink is refused)."""
    with RunLock(tmp_path):
        first = subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(tmp_path), "hold"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert first.stdout.readline().strip() == "claimed"
            second = claim(tmp_path)
            assert second.returncode == 3, second.stdout + second.stderr
            assert f"whose ServerApp (pid {first.pid}) has claimed it already" in second.stdout
        finally:
            first.kill()
            first.wait()
            first.stdout.close()
        # The lease is claimed once: also after its ServerApp ended.
        after = claim(tmp_path)
        assert after.returncode == 3 and f"ServerApp (pid {first.pid}) has claimed it" in after.stdout
        # A process under the launcher without its lease is any other run.
        env = {k: v for k, v in os.environ.items() if k != run_lock.LEASE_ENV}
        other = claim(tmp_path, env)
        assert other.returncode == 3 and f"in use by another hf-flower run: pid {os.getpid()}" in other.stdout
    assert run_lock.LEASE_ENV not in os.environ  # the lease left with the lock


def test_leftovers_of_dead_runs_are_cleaned_those_of_live_ones_never(tmp_path):
    output_dir = tmp_path / "run"
    with other_run(tmp_path / "elsewhere") as live:
        live_round = output_dir / f".round-3{checkpoint.TMP_ROUND_MARKER}{live.pid}-aaaa"
        live_round.mkdir(parents=True)
        (live_round / checkpoint.CONFIG_FILE).write_text("{}")
        live_history = output_dir / f"{checkpoint.TMP_HISTORY_PREFIX}{live.pid}-bbbb"
        live_history.write_text("{")
        (output_dir / f".round-2{checkpoint.TMP_ROUND_MARKER}{NO_SUCH_PID}-cccc").mkdir()
        (output_dir / f"{checkpoint.TMP_HISTORY_PREFIX}{NO_SUCH_PID}-dddd").write_text("{")

        checkpoint.prepare_output_dir(output_dir, overwrite=False)
        assert hidden_entries(output_dir) == sorted([live_history.name, live_round.name])
        assert (live_round / checkpoint.CONFIG_FILE).is_file()


def test_overwrite_never_deletes_a_folder_another_run_holds(tmp_path, tiny_model_dir, reviews_csv):
    output_dir = tmp_path / "run"
    checkpoint.save_round(output_dir, 0, write_round_files, {"round": 0})
    flags = tiny_run_flags(output_dir, tiny_model_dir, reviews_csv, "--overwrite_output_dir")
    with other_run(output_dir) as holder:
        prepared = run_prepare(prepare_simulation, flags)
    assert prepared.plan is None and prepared.exit_code == 2
    assert f"in use by another hf-flower run: pid {holder.pid}" in prepared.error
    assert checkpoint.list_rounds(output_dir) == [0]
