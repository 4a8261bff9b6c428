"""The server's round checkpointer: rounds finished on a background worker, in order, failures kept."""

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run_config_of, tiny_run_flags, trainer_for

from hf_flower import checkpoint
from hf_flower.arguments import FederationArguments, HubArguments
from hf_flower.arguments.run_config import group_from_run_config
from hf_flower.server import round_grid, rounds
from hf_flower.server.preflight import check_run
from hf_flower.server.replies import RoundRules
from hf_flower.server.validation import ExampleCap, ExpectedReply
from hf_flower.weights import get_weights


def make_checkpointer(tmp_path, tiny_model_dir, reviews_csv, in_background: bool):
    flags = ["--evaluate_in_background", str(in_background).lower()]
    run_config = run_config_of(tiny_run_flags(tmp_path / "run", tiny_model_dir, reviews_csv, *flags))
    check_run(run_config, prepare_output=True)
    federation = group_from_run_config(FederationArguments, run_config)
    hub_args = group_from_run_config(HubArguments, run_config)
    grid = round_grid.TrackingGrid(None, RoundRules(ExpectedReply({}), 2, ExampleCap(), False))
    return rounds.RoundCheckpointer(trainer_for(run_config), federation, hub_args, run_config, grid)


@pytest.fixture
def checkpointer(tmp_path, tiny_model_dir, reviews_csv):
    return make_checkpointer(tmp_path, tiny_model_dir, reviews_csv, in_background=True)


def test_between_rounds_the_round_is_saved_before_the_strategy_goes_on(tmp_path, tiny_model_dir, reviews_csv):
    checkpointer = make_checkpointer(tmp_path, tiny_model_dir, reviews_csv, in_background=False)
    result = checkpointer(0, get_weights(checkpointer.trainer.model))
    assert 0 <= result["eval_accuracy"] <= 1  # Flower's result history gets the central metrics
    assert checkpoint.list_rounds(checkpointer.output_dir) == [0]
    assert checkpointer.finish(None) is None


def test_rounds_are_evaluated_and_saved_off_the_strategy_thread_in_order(checkpointer):
    arrays = get_weights(checkpointer.trainer.model)
    worker_threads = []
    finish_round = checkpointer._finish_round

    def recording(*args, **kwargs):
        worker_threads.append(threading.current_thread().name)
        return finish_round(*args, **kwargs)

    checkpointer._finish_round = recording
    for server_round in (0, 1, 2):
        assert checkpointer(server_round, arrays) is None  # returns before the round is evaluated
    assert checkpointer.finish(None) is None

    history = checkpoint.read_history(checkpointer.output_dir)
    assert history["status"] == "completed"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    assert all(0 <= r["central"]["eval_accuracy"] <= 1 for r in history["rounds"])
    assert checkpoint.list_rounds(checkpointer.output_dir) == [0, 1, 2]
    assert worker_threads and all(name.startswith("round-checkpointer") for name in worker_threads)


def test_a_round_the_worker_cannot_save_fails_the_run(checkpointer, monkeypatch):
    arrays = get_weights(checkpointer.trainer.model)
    save_round = checkpoint.save_round

    def full_disk(output_dir, round_num, *args, **kwargs):
        if round_num == 1:
            raise OSError("No space left on device")
        return save_round(output_dir, round_num, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_round", full_disk)
    checkpointer(0, arrays)
    checkpointer(1, arrays)
    error = checkpointer.finish(None)

    assert isinstance(error, OSError)  # raised by the ServerApp, so Flower marks the run failed
    history = checkpoint.read_history(checkpointer.output_dir)
    assert history["status"] == "failed"
    assert "No space left on device" in history["error"]
    assert checkpoint.list_rounds(checkpointer.output_dir) == [0]  # no half-written round 1


def test_rounds_still_waiting_after_the_last_one_evaluate_with_every_thread(checkpointer, monkeypatch):
    threads = {}

    def counting_threads(trainer, server_round):
        threads[server_round] = torch.get_num_threads()
        return {"eval_loss": 0.0}

    monkeypatch.setattr(rounds, "central_metrics", counting_threads)
    release = threading.Event()
    checkpointer.worker.submit(release.wait)  # the worker is busy while rounds 1 and 2 (the last) end
    arrays = get_weights(checkpointer.trainer.model)
    checkpointer(1, arrays)
    checkpointer(2, arrays)
    release.set()
    assert checkpointer.finish(None) is None

    assert threads == {1: torch.get_num_threads(), 2: torch.get_num_threads()}  # no client trains any more


def test_the_run_log_says_where_and_how_central_evaluation_runs(
    tmp_path, tiny_model_dir, reviews_csv, caplog
):
    with caplog.at_level(logging.INFO):
        make_checkpointer(tmp_path / "bg", tiny_model_dir, reviews_csv, in_background=True).finish(None)
        make_checkpointer(tmp_path / "between", tiny_model_dir, reviews_csv, in_background=False).finish(None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("central evaluation:")]

    assert len(lines) == 2
    assert lines[0].startswith("central evaluation: background thread on ")
    assert "torch thread" in lines[0] and "while clients train" in lines[0]
    if sys.platform.startswith("linux"):
        assert lines[0].endswith("idle priority (yields to training clients on a shared CPU)")
    assert lines[1].startswith("central evaluation: between rounds on ")


@pytest.mark.parametrize(
    "cores, clients, client_cpus, threads",
    [(2, 2, 1, 1), (4, 2, 1, 2), (16, 2, 1, 8), (16, 4, 4, 1), (8, 8, 1, 1)],
)
def test_the_background_evaluation_takes_the_threads_of_the_cores_clients_leave(
    cores, clients, client_cpus, threads
):
    from hf_flower.server.evaluation_placement import threads_beside_clients

    federation = FederationArguments(
        num_clients=clients, client_num_cpus=client_cpus, min_available_clients=1
    )
    assert threads_beside_clients(federation, cores, full_threads=8) == threads


BUSY_CLIENT = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
os.setpriority(os.PRIO_PROCESS, 0, max(15, os.getpriority(os.PRIO_PROCESS, 0)))  # Ray's worker_niceness
while True:
    pass
"""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU priority is Linux's")
def test_the_background_evaluation_yields_the_cpu_to_a_training_client(checkpointer, monkeypatch):
    """A training client (a busy process at Ray's nice 15) and the worker's evaluation (a busy
    stand-in, run by the real worker) on one core: the client keeps at least 80% of it (~92% at
    SCHED_IDLE; ~3% at the normal priority the worker had before).

    Measured as the shares of the CPU time both got over the same window: another load on that
    core takes from both in proportion to their priorities, so it cannot turn the result.
    """
    cpu = max(os.sched_getaffinity(0))
    client = subprocess.Popen([sys.executable, "-c", BUSY_CLIENT, str(cpu)])
    used = {}

    def busy_evaluation(trainer, server_round):
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})  # 0: this thread, the worker
        client_start, own_start, started = cpu_seconds(client.pid), time.thread_time(), time.monotonic()
        # Until the client had 0.5 s of the core, at most 3 s.
        while cpu_seconds(client.pid) - client_start < 0.5 and time.monotonic() - started < 3:
            sum(range(10_000))
        used["client"] = cpu_seconds(client.pid) - client_start
        used["worker"] = time.thread_time() - own_start
        client.kill()  # the round is then saved without a client beside it
        os.sched_setaffinity(0, affinity)
        return {"eval_loss": 0.0}

    monkeypatch.setattr(rounds, "central_metrics", busy_evaluation)
    try:
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, client.pid) < 15 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the client trains at nice 15
        checkpointer(1, get_weights(checkpointer.trainer.model))  # round 1 of 2: clients train beside it
        assert checkpointer.finish(None) is None
    finally:
        client.kill()
        client.wait()
    assert used["client"] / (used["client"] + used["worker"]) >= 0.8, used
