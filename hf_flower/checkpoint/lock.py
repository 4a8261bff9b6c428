"""One run per output folder: an exclusive lock on `<output_dir>/.hf-flower.lock` for a run's life.

Two runs saving rounds into one folder overwrite each other's rounds and delete each other's
half-written ones. So a launcher (`hf-flower simulate`, `hf-flower server`) takes the lock before
its preparation touches the folder and holds it until every process it started has stopped. The
ServerApp it starts runs under it (launcher -> SuperLink -> SuperExec -> ServerApp) and is covered
by that lock; a ServerApp started any other way (`flwr run .`) takes the lock itself, for as
long as its process lives. A second run on a held folder is refused at once, naming the pid and
command that hold it.

The lock is `flock(2)`: it belongs to an open file, and the kernel releases it when its holder
exits however it exits (SIGKILL and crashes included), so a stale lock never outlives its run.
The file is opened close-on-exec, so the Flower processes a launcher starts never inherit it (a
process forked without exec shares it until it exits too). The file holds the holder's pid and
command line for the refusal message; the lock, not the file, decides.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import sys
import time
from pathlib import Path

import psutil

from . import OutputDirError, make_output_dir

LOCK_FILE = ".hf-flower.lock"
# How long a refused run waits for a holder that has just locked to write its pid.
HOLDER_WRITE_WAIT_SECONDS = 1.0
_MAX_COMMAND_CHARS = 300


class RunLockedError(OutputDirError):
    """Another live run holds the output folder; the message names it and the fix."""

    def __init__(self, output_dir: str | os.PathLike, holder_pid: int | None, holder_command: str):
        self.holder_pid = holder_pid
        holder = (
            f"pid {holder_pid}" if holder_pid is not None else "a process that has not written its pid yet"
        )
        command = f" ({holder_command})" if holder_command else ""
        stop = f"stop it first (kill {holder_pid})" if holder_pid is not None else "wait for it to end"
        super().__init__(
            f"output_dir {output_dir} is in use by another hf-flower run: {holder}{command}. Two runs "
            f"in one folder would overwrite each other's rounds. Choose another --output_dir, or {stop}."
        )


class RunLock:
    """The exclusive lock of an output folder, taken on creation (or `RunLockedError`).

    Release it with `release()` or by leaving a `with` block; the kernel releases it when the
    process exits.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = make_output_dir(self.output_dir) / LOCK_FILE
        # O_NOFOLLOW: a link planted at the lock's name must not make us write elsewhere.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as err:
            raise OutputDirError(
                f"cannot open {self.path} to lock output_dir ({err.strerror or err}); remove it if it is "
                "not a plain file, or choose another --output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, command = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(self.output_dir, pid, command) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{_command_line()}\n".encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the folder (emptying the file first, so it never names a finished run)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# Locks `hold_for_process` took: kept referenced (an unreferenced one would be closed) until exit.
_HELD_UNTIL_EXIT: list[RunLock] = []


def hold_for_process(output_dir: str | os.PathLike) -> None:
    """Lock `output_dir` until this process exits, unless this process or one it runs under holds
    it already (the ServerApp under a launcher). Raises `RunLockedError` if another run holds it."""
    lock = _lock_unless_ours(output_dir)
    if lock is not None:
        _HELD_UNTIL_EXIT.append(lock)


def ensure_not_in_use(output_dir: str | os.PathLike) -> None:
    """Raise `RunLockedError` if a run other than this process and those it runs under holds
    `output_dir`; take nothing (in-process preparation, where no launcher holds the lock)."""
    lock = _lock_unless_ours(output_dir)
    if lock is not None:
        lock.release()


def _lock_unless_ours(output_dir: str | os.PathLike) -> RunLock | None:
    """A new lock on `output_dir`, or None when this process or an ancestor already holds it."""
    try:
        return RunLock(output_dir)
    except RunLockedError as refused:
        if refused.holder_pid is not None and refused.holder_pid in _lineage():
            return None
        raise


def _lineage() -> set[int]:
    """This process's pid and its ancestors' (the launcher that started a ServerApp is one)."""
    me = psutil.Process()
    return {me.pid, *(parent.pid for parent in me.parents())}


def _read_holder(fd: int) -> tuple[int | None, str]:
    """The pid and command the holder wrote; waits briefly for a holder that has just locked."""
    deadline = time.monotonic() + HOLDER_WRITE_WAIT_SECONDS
    while True:
        first, _, rest = os.pread(fd, 4096, 0).decode(errors="replace").partition("\n")
        if first.strip().isdigit():
            return int(first), rest.strip()
        if time.monotonic() >= deadline:
            return None, ""
        time.sleep(0.05)


def _command_line() -> str:
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return command if len(command) <= _MAX_COMMAND_CHARS else command[: _MAX_COMMAND_CHARS - 3] + "..."
