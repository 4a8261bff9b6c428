"""Start a command in its own session and stop it, children included, whatever happens."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
# Signals a scheduler or a closed terminal sends to stop a launcher (Ctrl-C is KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# How long a stopped process tree may take to exit before it is killed. Flower's SuperLink and
# SuperExec leave within half a second of SIGTERM; `flwr-simulation` and Ray's monitor ignore it,
# and their state is not ours to keep (rounds are saved atomically by the ServerApp).
STOP_GRACE_SECONDS = 3.0


class Stopped(BaseException):
    """A stop signal turned into an exception, so every `with ManagedProcess` on the way out stops
    its process tree (Python's default SIGTERM/SIGHUP handling exits without unwinding)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's code for "killed by this signal"


@contextlib.contextmanager
def stop_signals_raise():
    """Inside the block, SIGTERM and SIGHUP raise `Stopped` (once: a repeat while the processes
    are being stopped is ignored, so the clean-up finishes)."""

    def handler(signum, _frame):
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {stop_signal: signal.signal(stop_signal, handler) for stop_signal in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop_signal, old in previous.items():
            signal.signal(stop_signal, old)


# Looked up here, not in the forked child: loading a library between fork and exec can deadlock
# when the launcher has threads (the progress view).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launcher dies, even by SIGKILL (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _marked(marker: str) -> list[psutil.Process]:
    """Every live (not zombie) process whose environment holds `marker`, wherever its parent went
    and whatever session or group it moved to."""
    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and marker in proc.environ():
                members.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return members


def _signal_all(processes: list[psutil.Process], signum: int) -> None:
    for proc in processes:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


class ManagedProcess:
    """A `subprocess.Popen` in a new session whose whole process tree is stopped on exit.

    Flower's SuperLink starts further processes (the simulation runtime, Ray's workers); stopping
    only the parent would leave them running, so the tree is collected before it is signalled.
    The child is also SIGTERMed by the kernel if the launcher dies without stopping it (SIGKILL).
    """

    def __init__(self, command: list[str], log_path: Path, env: dict | None = None, cwd: str | None = None):
        self.command = command
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        # In the environment of the child and everything it starts (inherited), so `stop` finds
        # them all; one name per tree, so the markers of nested trees add up.
        self.marker = f"HF_FLOWER_PROCESS_TREE_{secrets.token_hex(8)}"

    def __enter__(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**(os.environ if self.env is None else self.env), self.marker: "1"},
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for_port(self, port: int, timeout: float = 60.0, host: str = LOOPBACK) -> None:
        """Wait until the process listens on `port`; fail early, with its log, if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.command[0]} exited before listening on {port}:\n{self.tail()}")
            if port_is_open(host, port):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.command[0]} did not listen on {host}:{port} within {timeout:.0f} s.")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the process tree, wait up to `grace` seconds, then SIGKILL what is left.

        The tree is the child's descendants plus every process that inherited its environment
        marker: Flower's SuperLink starts its SuperExec in a session of its own, Ray's driver leads a
        process group of its own, and a process whose parent died is re-parented out of the tree
        (Ray's raylet may start its agents while it is being stopped; they then wait a minute for a
        dead GCS).
        """
        if self.process is None:
            return
        try:
            tree = [psutil.Process(self.process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        tree += [proc for proc in _marked(self.marker) if proc not in tree]
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _signal_all(tree, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        _signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        # Started meanwhile by a process that was being stopped: killed at once.
        late = _marked(self.marker)
        _signal_all(late, signal.SIGKILL)
        psutil.wait_procs(late, timeout=5)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        self.process = None
