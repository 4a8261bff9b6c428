"""`ManagedProcess.stop` stops every process it started, orphans in other sessions included."""

import sys
import time

import psutil
from conftest import processes_of

from hf_flower.launch.processes import ManagedProcess


def test_stop_kills_a_descendant_whose_parent_already_left(tmp_path, no_leftover_processes):
    """The CI failure of issue 21's last run: Ray's agents, started by a raylet while it was being
    stopped, were re-parented to init, out of the process tree, and outlived the launcher; they ran
    in the session of Flower's SuperExec, which starts one of its own. What a process starts
    inherits its environment, wherever it goes, and `stop` ends what carries its marker."""
    marker = tmp_path / "orphan"
    # As Flower's SuperExec does, the middle process leads a new session (out of reach of a killpg
    # of the child's group), starts a sleep and exits: the sleep is an orphan in another session.
    middle = (
        "import os, subprocess; os.setsid(); "
        f"subprocess.Popen(['bash', '-c', 'exec -a {marker} sleep 300']); os._exit(0)"
    )
    script = f'{sys.executable} -c "{middle}"; exec sleep 300'
    with ManagedProcess(["bash", "-c", script], tmp_path / "log", cwd=str(tmp_path)) as managed:
        deadline = time.monotonic() + 10
        while not (orphans := [p for p in processes_of(tmp_path) if p.cmdline()[:1] == [str(marker)]]):
            assert time.monotonic() < deadline, "the orphan never started"
            time.sleep(0.05)
        (orphan,) = orphans
        assert orphan not in psutil.Process(managed.process.pid).children(recursive=True)
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
