"""Where and how the server's central evaluation runs, so that it costs the training clients little.

With `--evaluate_in_background` (the default) a worker thread evaluates and saves each round while
the next one trains. In a simulation those clients train on this machine, in Ray's workers at nice
15 (Ray's `worker_niceness`), and a worker at normal priority takes a whole core from them: greedy
generation of round 0 held one of two cores while both clients shared the other (issue 24). So the
worker:

- lowers its own CPU priority below theirs (`yield_cpu`): it runs on the CPU the clients leave;
- evaluates with the torch threads of the cores the round's clients do not use, at least one
  (`threads_beside_clients`); once the last round is handed over no client trains any more, and
  it evaluates with every thread.

The same on a GPU, to keep one rule: there the thread's CPU work is launching kernels and waiting
for them, and CUDA's default wait spins on a core while the process has fewer contexts than the
machine has cores: at normal priority that alone would hold a core the clients train on. On a
CPU the clients fill, its evaluation waits for the gaps between their work, or for the end of
training, when every round still waiting is evaluated.

Between rounds (`--evaluate_in_background false`) the evaluation runs on the strategy's thread with
every thread at normal priority: the clients wait for it anyway.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import torch

from ..arguments import FederationArguments

IDLE_PRIORITY = "idle priority"
LOWEST_NICE = "nice 19"
NORMAL_PRIORITY = "normal priority"


def yield_cpu() -> str:
    """Lower the calling thread's CPU priority to the lowest there is, so that it only runs on CPU
    every other thread leaves; returns the priority it ends at, in words.

    Linux's `SCHED_IDLE` first (weight 3 against a nice-15 client's 36: such a client keeps about
    92% of a core they share), else nice 19, else nothing. Threads the caller starts later (torch's
    OpenMP pool) inherit it. Only on Linux, where both calls take a thread's id: elsewhere
    `setpriority` would name a process, so the thread keeps its priority.
    """
    if not sys.platform.startswith("linux"):
        return NORMAL_PRIORITY
    # Per thread: the strategy's thread, and Flower's and Ray's threads in this process, keep
    # theirs. The worker may hold the GIL while the strategy's thread waits for it; at idle
    # priority it gives it up only once a core is free for it (measured on one core taken by a
    # nice-15 process: a hand-over cost 23 ms instead of 6 ms while the worker ran Python code,
    # nothing more while it ran torch kernels, which release the GIL). That happens only while
    # the clients take every core, when the strategy is waiting for them anyway.
    thread_id = threading.get_native_id()
    try:
        os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
        return IDLE_PRIORITY
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, 19)
        return LOWEST_NICE
    except (AttributeError, OSError):
        return NORMAL_PRIORITY


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_beside_clients(federation: FederationArguments, cores: int, full_threads: int) -> int:
    """torch threads for an evaluation while clients train: the `cores` that the clients a round
    samples (`client_num_cpus` each) leave free, at least 1 and at most `full_threads`.

    The server cannot tell whether deployed clients share its machine; counting them as if they
    do costs a server that has it to itself a few threads. More threads than free cores would not
    take the clients' cores (the worker yields), but would leave the evaluation waiting for its
    slowest thread, the one on a core a client holds.
    """
    sampled = max(int(federation.num_clients * federation.fraction_train), federation.min_train_clients)
    client_cores = min(sampled, federation.num_clients) * federation.client_num_cpus
    return max(1, min(cores - client_cores, full_threads))


@dataclasses.dataclass(frozen=True)
class EvaluationPlan:
    """Where and how the server's central evaluation runs; `describe()` is the run log's line."""

    background: bool
    device: str
    threads: int  # torch threads while clients train
    full_threads: int  # torch threads with no client training
    priority: str

    @classmethod
    def of(cls, federation: FederationArguments, device: str, priority: str | None) -> EvaluationPlan:
        """The plan of a run; `priority`: what the background worker got from `yield_cpu`."""
        full_threads = torch.get_num_threads()
        if not federation.evaluate_in_background:
            return cls(False, device, full_threads, full_threads, NORMAL_PRIORITY)
        threads = threads_beside_clients(federation, usable_cores(), full_threads)
        return cls(True, device, threads, full_threads, priority)

    def describe(self) -> str:
        if not self.background:
            return (
                f"central evaluation: between rounds on {self.device}, {_threads(self.full_threads)}, "
                f"{self.priority} (the clients wait for it; --evaluate_in_background true runs it "
                "while they train)"
            )
        why = {
            IDLE_PRIORITY: "yields to training clients on a shared CPU",
            LOWEST_NICE: "below training clients at nice 15",
            NORMAL_PRIORITY: "this platform cannot lower one thread's priority",
        }[self.priority]
        return (
            f"central evaluation: background thread on {self.device}, {_threads(self.threads)} while "
            f"clients train ({self.full_threads} after the last round), {self.priority} ({why})"
        )


def _threads(count: int) -> str:
    return f"{count} torch thread{'s' if count != 1 else ''}"
