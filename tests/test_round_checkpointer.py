"""The server's round checkpointer: rounds finished on a background worker, in order, failures kept."""

import threading

import pytest
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
