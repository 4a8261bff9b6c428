"""A client's Trainer across rounds: the learning-rate schedule, the data order, the optimizer state.

Each test drives the real ClientApp `train` handler round after round, as Flower would, and
reads what the Trainer did from a callback: the learning rate of every optimizer step and the
first examples it drew.
"""

import time

import pytest
import torch
from conftest import REVIEW_FACTS, REVIEW_LABELS
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from transformers import TrainerCallback, get_scheduler

from hf_flower.arguments import parse_args
from hf_flower.arguments.run_config import to_run_config
from hf_flower.client import client_app
from hf_flower.client.round_driver import OPTIMIZER_STATE_KEY, OptimizerStateStore, round_seed
from hf_flower.weights import get_weights

NUM_ROUNDS = 3
BATCH_SIZE = 8
BUILD_TRAINER = client_app.build_trainer


class Recorder(TrainerCallback):
    """The learning rate of each optimizer step."""

    def __init__(self):
        self.learning_rates: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.learning_rates.append(optimizer.param_groups[0]["lr"])


def run_config_for(tmp_path, tiny_model_dir, reviews_csv, *flags):
    run_args = parse_args(
        [
            "--model_name_or_path", str(tiny_model_dir), "--dataset", str(reviews_csv),
            "--max_length", "32", "--test_size", "40", "--per_device_train_batch_size", str(BATCH_SIZE),
            "--num_rounds", str(NUM_ROUNDS), "--output_dir", str(tmp_path / "run"), *flags,
        ]
    )  # fmt: skip
    return to_run_config(run_args)


def train_message(arrays, server_round):
    content = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord({"server-round": server_round, "label-names": list(REVIEW_LABELS)}),
        }
    )
    metadata = Metadata(
        run_id=1, message_id=f"m{server_round}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id=str(server_round), created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


def run_rounds(run_config, monkeypatch, rounds=range(1, NUM_ROUNDS + 1)):
    """Train one client for `rounds`; per round: learning rates, first batch, reply, trainer."""
    recorded = []

    def recording_build(*args, **kwargs):
        trainer = BUILD_TRAINER(*args, **kwargs)
        recorder = Recorder()
        trainer.add_callback(recorder)
        first = next(iter(trainer.get_train_dataloader()))["input_ids"]
        recorded.append({"recorder": recorder, "first_batch": first, "trainer": trainer})
        return trainer

    monkeypatch.setattr(client_app, "build_trainer", recording_build)
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    start = get_weights(task.model)
    node = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
        run_config=run_config,
    )  # fmt: skip
    for server_round in rounds:
        reply = client_app.train(train_message(start, server_round), node)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        recorded[-1]["reply"] = reply
    return recorded, node


def expected_rates(run_config, kind, warmup, total):
    """The schedule itself, evaluated at every step of `total`."""
    optimizer = torch.optim.SGD(
        [torch.nn.Parameter(torch.zeros(1))], lr=float(run_config["training.learning-rate"])
    )
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind, warmup", [("linear", 4), ("cosine", 0)])
def test_learning_rate_follows_one_schedule_across_rounds(
    tmp_path, tiny_model_dir, reviews_csv, monkeypatch, kind, warmup
):
    run_config = run_config_for(
        tmp_path, tiny_model_dir, reviews_csv, "--learning_rate", "1e-3", "--lr_scheduler_type", kind,
        "--warmup_steps", str(warmup),
    )  # fmt: skip
    recorded, _ = run_rounds(run_config, monkeypatch)
    local_steps = len(recorded[0]["recorder"].learning_rates)
    assert local_steps > 2
    schedule = expected_rates(run_config, kind, warmup, NUM_ROUNDS * local_steps)
    for server_round, rec in enumerate(recorded, start=1):
        rates = rec["recorder"].learning_rates
        assert len(rates) == local_steps
        first_global_step = (server_round - 1) * local_steps
        assert rates[0] == pytest.approx(schedule[first_global_step], rel=1e-6)
        assert rates[-1] == pytest.approx(schedule[first_global_step + local_steps - 1], rel=1e-6)
        assert rates == pytest.approx(schedule[first_global_step : first_global_step + local_steps], rel=1e-6)
    # The decay ends in the last round, not in the first.
    assert recorded[0]["recorder"].learning_rates[-1] > 0.5e-3
    assert recorded[-1]["recorder"].learning_rates[-1] < 0.2e-3


def test_schedule_scope_round_restarts_the_schedule_every_round(
    tmp_path, tiny_model_dir, reviews_csv, monkeypatch
):
    run_config = run_config_for(
        tmp_path, tiny_model_dir, reviews_csv, "--learning_rate", "1e-3", "--warmup_steps", "2",
        "--schedule_scope", "round",
    )  # fmt: skip
    recorded, _ = run_rounds(run_config, monkeypatch)
    local_steps = len(recorded[0]["recorder"].learning_rates)
    schedule = expected_rates(run_config, "linear", 2, local_steps)
    for rec in recorded:
        assert rec["recorder"].learning_rates == pytest.approx(schedule, rel=1e-6)


def test_data_order_differs_between_rounds_and_repeats_across_runs(
    tmp_path, tiny_model_dir, reviews_csv, monkeypatch
):
    run_config = run_config_for(tmp_path, tiny_model_dir, reviews_csv, "--max_steps", "1")
    first_run, _ = run_rounds(run_config, monkeypatch)
    second_run, _ = run_rounds(run_config, monkeypatch)
    batches = [rec["first_batch"] for rec in first_run]
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[1], batches[2])
    for one, two in zip(first_run, second_run):
        assert torch.equal(one["first_batch"], two["first_batch"])
    assert [rec["trainer"].args.seed for rec in first_run] == [round_seed(42, r) for r in (1, 2, 3)]


def test_optimizer_state_is_kept_on_the_client_and_never_sent(
    tmp_path, tiny_model_dir, reviews_csv, monkeypatch
):
    run_config = run_config_for(
        tmp_path, tiny_model_dir, reviews_csv, "--max_steps", "3", "--keep_optimizer_state"
    )
    recorded, node = run_rounds(run_config, monkeypatch, rounds=(1, 2))
    # The state lives in the node's Context (client side), and no reply carries it.
    assert OPTIMIZER_STATE_KEY in node.state.array_records
    for rec in recorded:
        assert set(rec["reply"].content.array_records) == {"arrays"}
        assert OPTIMIZER_STATE_KEY not in rec["reply"].content
    # Round 2's optimizer continued from round 1's: AdamW's step count went on.
    steps = [
        max(float(s["step"]) for s in rec["trainer"].optimizer.state_dict()["state"].values())
        for rec in recorded
    ]
    assert steps == [3.0, 6.0]


def test_without_keep_optimizer_state_each_round_starts_fresh(
    tmp_path, tiny_model_dir, reviews_csv, monkeypatch
):
    run_config = run_config_for(tmp_path, tiny_model_dir, reviews_csv, "--max_steps", "3")
    recorded, node = run_rounds(run_config, monkeypatch, rounds=(1, 2))
    assert OPTIMIZER_STATE_KEY not in node.state.array_records
    steps = [
        max(float(s["step"]) for s in rec["trainer"].optimizer.state_dict()["state"].values())
        for rec in recorded
    ]
    assert steps == [3.0, 3.0]


def test_optimizer_state_store_round_trips_adamw_moments():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
    store = OptimizerStateStore(RecordDict())
    store.save(optimizer)
    fresh = torch.optim.AdamW(params, lr=0.5)
    assert store.load(fresh)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        for index in range(2):
            assert torch.equal(
                fresh.state_dict()["state"][index][key], optimizer.state_dict()["state"][index][key]
            )
    assert fresh.param_groups[0]["lr"] == 0.5  # the new round's hyperparameters stay
