"""One run per output folder: an exclusive lock on `<output_dir>/.hf-flower.lock` for a run's life.

Two runs saving rounds into one folder overwrite each other's rounds and delete each other's
half-written ones. So a launcher (`hf-flower simulate`, `hf-flower server`) takes the lock before
its preparation touches the folder and holds it until every process it started has stopped. A
ServerApp started any other way (`flwr run .`) takes the lock itself, for as long as its process
lives. A second run on a held folder is refused at once, naming the pid and command that hold it.

The ServerApp a launcher starts (launcher -> SuperLink -> SuperExec -> ServerApp) writes under the
launcher's lock, and it is identified exactly, not by being one of the holder's descendants: every
ServerApp a SuperLink runs descends from the launcher, a second run submitted to it (`flwr run`)
included. Each lock carries a lease, a random token the holder puts in its environment
(`LEASE_ENV`, inherited by the Flower processes it starts from then on) and whose sha256 it
records in the lock file. A ServerApp that presents the token claims the lease, once: the claim is
a lock of its own on `<output_dir>/.hf-flower.serverapp.lock`, recording the token's hash, so a
second ServerApp under the same launcher is refused while the first runs and after it ended.

The locks are `flock(2)`: each belongs to an open file, and the kernel releases it when its holder
exits however it exits (SIGKILL and crashes included), so a stale lock never outlives its run.
The files are opened close-on-exec, so the Flower processes a launcher starts never inherit them
(a process forked without exec shares them until it exits too). The lock file holds the holder's
pid, the lease's hash and the command line for the refusal message; the lock, not the file,
decides.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

from . import OutputDirError, make_output_dir

LOCK_FILE = ".hf-flower.lock"
# The lock of the one ServerApp that claimed a launcher's lease.
SERVERAPP_LOCK_FILE = ".hf-flower.serverapp.lock"
# The lease token of the lock this process holds, for the processes it starts.
LEASE_ENV = "HF_FLOWER_RUN_LOCK_LEASE"
# How long a refused run waits for a holder that has just locked to write its pid.
HOLDER_WRITE_WAIT_SECONDS = 1.0
_MAX_COMMAND_CHARS = 300


class RunLockedError(OutputDirError):
    """Another live run holds the output folder; the message names it and the fix."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        holder_pid: int | None,
        holder_command: str,
        lease_hash: str | None = None,
    ):
        self.holder_pid = holder_pid
        self.lease_hash = lease_hash
        holder = (
            f"pid {holder_pid}" if holder_pid is not None else "a process that has not written its pid yet"
        )
        command = f" ({holder_command})" if holder_command else ""
        stop = f"stop it first (kill {holder_pid})" if holder_pid is not None else "wait for it to end"
        super().__init__(
            f"output_dir {output_dir} is in use by another hf-flower run: {holder}{command}. Two runs "
            f"in one folder would overwrite each other's rounds. Choose another --output_dir, or {stop}."
        )


class LeaseClaimedError(OutputDirError):
    """A launcher's folder already has its ServerApp: a second ServerApp under it is refused."""

    def __init__(self, output_dir: str | os.PathLike, launcher_pid: int | None, serverapp_pid: int | None):
        self.holder_pid = serverapp_pid
        super().__init__(
            f"output_dir {output_dir} belongs to the run of the launcher with pid {launcher_pid}, whose "
            f"ServerApp (pid {serverapp_pid}) has claimed it already; this ServerApp is a second run "
            "submitted to the same SuperLink (`flwr run`), and two runs in one folder would overwrite "
            "each other's rounds. Start it with its own launcher and another --output_dir."
        )


class RunLock:
    """The exclusive lock of an output folder, taken on creation (or `RunLockedError`).

    Taking it puts a fresh lease in this process's environment (`LEASE_ENV`): the first ServerApp
    that claims it, of the processes started from then on, writes under this lock
    (`hold_for_process`). Release it with `release()` or by leaving a `with` block; the kernel
    releases it when the process exits.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = make_output_dir(self.output_dir) / LOCK_FILE
        self._fd: int | None = _lock_file(self.path, self.output_dir)
        self.lease = secrets.token_hex(16)
        _write_holder(self._fd, _sha256(self.lease))
        self._outer_lease = os.environ.get(LEASE_ENV)  # a lock taken while another is held
        os.environ[LEASE_ENV] = self.lease

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the folder (emptying the file first, so it never names a finished run); the lease
        leaves the environment with it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.environ.get(LEASE_ENV) == self.lease:
            if self._outer_lease is None:
                del os.environ[LEASE_ENV]
            else:
                os.environ[LEASE_ENV] = self._outer_lease
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# What `hold_for_process` took (a lock, or the descriptor of a claimed lease): kept referenced
# (an unreferenced lock would be closed) until this process exits.
_HELD_UNTIL_EXIT: list[RunLock | int] = []


def hold_for_process(output_dir: str | os.PathLike) -> None:
    """Lock `output_dir` until this process exits (a ServerApp started by `flwr run .`), or, when a
    launcher holds it, claim the launcher's lease with the token this process inherited (the
    ServerApp the launcher started). Raises `RunLockedError` if another run holds the folder and
    this process has not its lease's token, `LeaseClaimedError` if a ServerApp claimed the lease
    already (this one is a second run submitted to the launcher's SuperLink)."""
    try:
        _HELD_UNTIL_EXIT.append(RunLock(output_dir))
    except RunLockedError as refused:
        token = os.environ.get(LEASE_ENV)
        if not token or refused.lease_hash != _sha256(token):
            raise
        _HELD_UNTIL_EXIT.append(_claim_lease(output_dir, refused))


def _claim_lease(output_dir: str | os.PathLike, launcher: RunLockedError) -> int:
    """Claim the lease of the launcher that holds `output_dir` (`launcher`: its refusal), once: the
    descriptor of the claim's own lock, held by this process. Refused while another ServerApp holds
    the claim, and after it, when the claim file still records this lease."""
    path = Path(output_dir) / SERVERAPP_LOCK_FILE
    try:
        fd = _lock_file(path, Path(output_dir))
    except RunLockedError as taken:
        raise LeaseClaimedError(output_dir, launcher.holder_pid, taken.holder_pid) from None
    earlier = _read_holder(fd, wait=0)
    if earlier.lease_hash == launcher.lease_hash:
        os.close(fd)
        raise LeaseClaimedError(output_dir, launcher.holder_pid, earlier.pid)
    _write_holder(fd, launcher.lease_hash)
    return fd


def ensure_not_in_use(output_dir: str | os.PathLike) -> None:
    """Raise `RunLockedError` if a run other than this process holds `output_dir`; take nothing
    (in-process preparation, where no launcher holds the lock)."""
    try:
        RunLock(output_dir).release()
    except RunLockedError as refused:
        if refused.holder_pid != os.getpid():
            raise


def _lock_file(path: Path, output_dir: Path) -> int:
    """An open descriptor of `path`, exclusively flocked (or `RunLockedError` naming the holder)."""
    # O_NOFOLLOW: a link planted at the lock's name must not make us write elsewhere.
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        raise OutputDirError(
            f"cannot open {path} to lock output_dir ({err.strerror or err}); remove it if it is "
            "not a plain file, or choose another --output_dir"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunLockedError(output_dir, holder.pid, holder.command, holder.lease_hash) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Holder(NamedTuple):
    """What a lock file says of its holder: pid, the sha256 of its lease, command line."""

    pid: int | None
    lease_hash: str | None
    command: str


def _write_holder(fd: int, lease_hash: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{lease_hash}\n{_command_line()}\n".encode(), 0)


def _read_holder(fd: int, wait: float = HOLDER_WRITE_WAIT_SECONDS) -> _Holder:
    """What the holder wrote; waits up to `wait` seconds for a holder that has just locked."""
    deadline = time.monotonic() + wait
    while True:
        pid, lease_hash, command = [*os.pread(fd, 4096, 0).decode(errors="replace").split("\n", 2), "", ""][
            :3
        ]
        if pid.strip().isdigit():
            return _Holder(int(pid), lease_hash.strip() or None, command.strip())
        if time.monotonic() >= deadline:
            return _Holder(None, None, "")
        time.sleep(0.05)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _command_line() -> str:
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return command if len(command) <= _MAX_COMMAND_CHARS else command[: _MAX_COMMAND_CHARS - 3] + "..."
