"""Memory of a process tree over a run, and the facts every result records, shared by the
benchmark scripts."""

from __future__ import annotations

import os
import platform
import threading
from datetime import datetime

import psutil

MB = 2**20


def short_name(proc: psutil.Process) -> str:
    """A process's command line cut to what tells it apart: `simulate.py`, `flwr run`, `raylet`, `ray::IDLE`."""
    try:
        args = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not args:
        return proc.name()
    if args[0].startswith("ray::"):  # Ray workers set their title as the whole command line
        return args[0].split()[0]
    program, rest = os.path.basename(args[0]), args[1:]
    if program.startswith("python"):
        while rest and rest[0].startswith("-") and rest[0] != "-m":  # interpreter flags (-u)
            rest = rest[1:]
        if rest[:1] == ["-m"] and len(rest) > 1:
            return rest[1]
        if rest:
            program, rest = os.path.basename(rest[0]), rest[1:]
    if program == "flwr" and rest:
        return f"flwr {rest[0]}"
    return program


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of processes and all their descendants until stopped.

    More roots can be added while it runs (a command started after the first one). At the peak of
    the summed PSS it also keeps each process's share (`peak_by_process`), to show where memory goes.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.roots = [psutil.Process(pid)]
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.peak_by_process: list[dict] = []
        self.stopped = threading.Event()

    def add_root(self, pid: int) -> None:
        self.roots.append(psutil.Process(pid))

    def processes(self) -> list[psutil.Process]:
        """The roots still alive and all their descendants."""
        procs = []
        for root in list(self.roots):
            try:
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return procs

    def run(self):
        while not self.stopped.is_set():
            procs = self.processes()
            if not procs:
                return
            sample = []
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                sample.append((proc, info.rss, getattr(info, "pss", info.rss)))
            rss = sum(s[1] for s in sample)
            pss = sum(s[2] for s in sample)
            self.peak_rss = max(self.peak_rss, rss)
            if pss > self.peak_pss:
                self.peak_pss = pss
                self.peak_by_process = [
                    {
                        "pid": proc.pid,
                        "name": short_name(proc),
                        "pss_mb": round(p / MB),
                        "rss_mb": round(r / MB),
                    }
                    for proc, r, p in sorted(sample, key=lambda s: -s[2])
                ]
            self.peak_processes = max(self.peak_processes, len(procs))
            self.stopped.wait(self.interval)


def run_measured(command: list[str], cwd) -> tuple[float, TreeMemory]:
    """Run `command` to its end while sampling its process tree's memory; return the wall seconds
    and the sampler (its peaks). A non-zero exit raises."""
    import subprocess
    import time

    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd)
    sampler = TreeMemory(proc.pid)
    sampler.start()
    code = proc.wait()
    sampler.stopped.set()
    sampler.join()
    seconds = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}")
    return seconds, sampler


def run_facts(script: str, argv: list[str]) -> dict:
    """What a result file records of the run that made it: the command, the machine, its load."""
    return {
        "command": " ".join([script, *argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_at_start": round(os.getloadavg()[0], 2),
        "date": datetime.now().isoformat(timespec="seconds"),
    }
