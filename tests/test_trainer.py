"""The round driver on a user's own Trainer across rounds: the learning-rate schedule, the round's
share of the training, the data order, the optimizer state, FedProx.

The Trainer here is a plain `transformers.Trainer` built as any user would (no hf-flower subclass),
driven round after round as a client does; a callback records the learning rate of every optimizer
step and the first examples drawn.
"""

import math

import pytest
import torch
from conftest import run_config_of, tiny_run_flags
from datasets import Dataset
from flwr.app import RecordDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)

from hf_flower.arguments import FederationArguments
from hf_flower.client.callbacks import OPTIMIZER_STATE_KEY, OptimizerStateStore, ProximalTerm
from hf_flower.client.round_driver import RoundDriver, round_seed, round_share
from hf_flower.weights import get_weights

NUM_ROUNDS = 3
BATCH_SIZE = 8
LEARNING_RATE = 1e-3


class Recorder(TrainerCallback):
    """The learning rate of each optimizer step, and the first batch's input ids."""

    def __init__(self):
        self.learning_rates: list[float] = []
        self.first_batch = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.learning_rates.append(optimizer.param_groups[0]["lr"])


class FirstBatch(TrainerCallback):
    def __init__(self):
        self.batches = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batches.append(next(iter(train_dataloader))["input_ids"].clone())


def user_trainer(tiny_model_dir, output_dir, **args) -> Trainer:
    """A user's plain Trainer: a tiny classifier on 64 short texts, `args` for its TrainingArguments."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    texts = [f"the movie was {'good great fun' if i % 2 else 'bad awful dull'} {i % 7}" for i in range(64)]
    data = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(64)]}).map(
        lambda batch: tokenizer(batch["text"], truncation=True), batched=True, remove_columns=["text"]
    )
    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "report_to": "none",
        "num_train_epochs": NUM_ROUNDS,
        **args,
    }
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=data,
        eval_dataset=data.select(range(16)),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )


def drive(trainer, rounds=range(1, NUM_ROUNDS + 1), federation=None, store=None, **train):
    """Train `trainer` for `rounds` as a client does; the recorder and metrics of each round."""
    federation = federation or FederationArguments(num_rounds=NUM_ROUNDS)
    driver = RoundDriver(trainer, federation)
    start = get_weights(trainer.model)
    recorded = []
    for server_round in rounds:
        recorder = Recorder()
        metrics = driver.train(start, server_round, optimizer_store=store, callbacks=(recorder,), **train)
        recorded.append((recorder, metrics))
    return recorded


def expected_rates(kind, warmup, total, learning_rate=LEARNING_RATE):
    """The schedule itself, evaluated at every step of `total`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind, warmup", [("linear", 4), ("cosine", 0)])
def test_learning_rate_follows_one_schedule_across_rounds(tmp_path, tiny_model_dir, kind, warmup):
    trainer = user_trainer(tiny_model_dir, tmp_path, lr_scheduler_type=kind, warmup_steps=warmup)
    recorded = drive(trainer)
    local_steps = len(recorded[0][0].learning_rates)
    assert local_steps == 64 // BATCH_SIZE  # num_train_epochs 3 over 3 rounds: one epoch a round
    schedule = expected_rates(kind, warmup, NUM_ROUNDS * local_steps)
    for server_round, (recorder, metrics) in enumerate(recorded, start=1):
        first_global_step = (server_round - 1) * local_steps
        assert recorder.learning_rates == pytest.approx(
            schedule[first_global_step : first_global_step + local_steps], rel=1e-6
        )
        assert metrics["train_steps"] == local_steps and metrics["num-examples"] == 64
    # The decay ends in the last round, not in the first.
    assert recorded[0][0].learning_rates[-1] > 0.5 * LEARNING_RATE
    assert recorded[-1][0].learning_rates[-1] < 0.2 * LEARNING_RATE


def test_schedule_scope_round_restarts_the_schedule_every_round(tmp_path, tiny_model_dir):
    trainer = user_trainer(tiny_model_dir, tmp_path, warmup_steps=2)
    recorded = drive(trainer, federation=FederationArguments(num_rounds=NUM_ROUNDS, schedule_scope="round"))
    local_steps = len(recorded[0][0].learning_rates)
    schedule = expected_rates("linear", 2, local_steps)
    for recorder, _ in recorded:
        assert recorder.learning_rates == pytest.approx(schedule, rel=1e-6)


@pytest.mark.parametrize(
    "whole_run, federation, share",
    [
        ({"max_steps": 10}, {"num_rounds": 3}, {"max_steps": 4}),
        ({"num_train_epochs": 3.0}, {"num_rounds": 2}, {"max_steps": -1, "num_train_epochs": 1.5}),
        ({"num_train_epochs": 3.0}, {"num_rounds": 2, "local_epochs": 1.0}, {"max_steps": -1, "num_train_epochs": 1.0}),
    ],
)  # fmt: skip
def test_each_round_trains_its_share_of_the_training_arguments(whole_run, federation, share):
    """As in Trainer, max_steps wins over epochs; --local_epochs says a round's epochs directly."""
    args = {"max_steps": -1, "num_train_epochs": 3.0, **whole_run}
    assert (
        round_share(args["max_steps"], args["num_train_epochs"], FederationArguments(**federation)) == share
    )


def test_data_order_differs_between_rounds_and_repeats_across_runs(tmp_path, tiny_model_dir):
    def first_batches(data_seed=None):
        trainer = user_trainer(tiny_model_dir, tmp_path, max_steps=NUM_ROUNDS, data_seed=data_seed)
        watcher = FirstBatch()
        trainer.add_callback(watcher)
        drive(trainer)
        assert [trainer.args.seed] == [round_seed(42, NUM_ROUNDS)]
        return watcher.batches

    for data_seed in (None, 7):  # the sampler follows the seed, or data_seed when the user set one
        batches, again = first_batches(data_seed), first_batches(data_seed)
        assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[1], batches[2])
        assert all(torch.equal(one, two) for one, two in zip(batches, again))


def test_optimizer_state_lives_on_the_client_and_never_travels(tmp_path, tiny_model_dir, reviews_csv):
    """Through the ClientApp: the state is in the node's Context, no reply carries it, and AdamW's
    step count goes on from round to round."""
    from conftest import trainer_for
    from test_client_app import context, instruction

    from hf_flower.client import client_app, session

    flags = tiny_run_flags(
        tmp_path / "run", tiny_model_dir, reviews_csv, "--max_steps", "6", "--num_rounds", "2"
    )
    run_config = run_config_of([*flags, "--keep_optimizer_state", "--per_device_train_batch_size", "8"])
    start = get_weights(trainer_for(run_config).model)
    node = context(run_config, run_id=11)
    steps = []
    for server_round in (1, 2):
        reply = client_app.train(instruction(start, server_round=server_round), node)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert set(reply.content.array_records) == {"arrays"}
        optimizer = session.session_for(instruction(start), node).driver.trainer.optimizer
        steps.append(max(float(s["step"]) for s in optimizer.state_dict()["state"].values()))
    assert OPTIMIZER_STATE_KEY in node.state.array_records
    assert steps == [3.0, 6.0]


def test_without_keep_optimizer_state_each_round_starts_fresh(tmp_path, tiny_model_dir):
    trainer = user_trainer(tiny_model_dir, tmp_path, max_steps=6)
    driver = RoundDriver(trainer, FederationArguments(num_rounds=NUM_ROUNDS))
    steps = []
    for server_round in (1, 2):
        driver.train(get_weights(trainer.model), server_round)
        steps.append(max(float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()))
    assert steps == [2.0, 2.0]  # max_steps 6 over 3 rounds, a new AdamW each round


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


def test_proximal_term_is_the_gradient_of_mu_half_the_squared_distance():
    model = torch.nn.Linear(3, 2)
    callback = ProximalTerm(mu=0.5, model=model)
    with torch.no_grad():
        model.weight.add_(1.0)
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    callback.on_pre_optimizer_step(None, None, None, model=model)
    assert torch.allclose(model.weight.grad, torch.full_like(model.weight, 0.5))  # mu * (w - w_global)
    assert torch.equal(model.bias.grad, torch.zeros_like(model.bias))


def test_a_scheduler_that_is_no_step_schedule_is_refused_with_the_fix(tmp_path, tiny_model_dir):
    """A Trainer subclass whose `create_scheduler` makes a scheduler that is no function of the step
    cannot have it span rounds: refused, naming --schedule_scope round, which keeps it."""

    class StepDecayTrainer(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            self.lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer or self.optimizer, step_size=1)
            self._created_lr_scheduler = True
            return self.lr_scheduler

    trainer = user_trainer(tiny_model_dir, tmp_path, max_steps=3)
    trainer.__class__ = StepDecayTrainer
    with pytest.raises(ValueError, match="cannot span rounds.*--schedule_scope round"):
        drive(trainer, rounds=(1,))
    trainer = user_trainer(tiny_model_dir, tmp_path, max_steps=3)
    trainer.__class__ = StepDecayTrainer
    rounds = drive(trainer, rounds=(1,), federation=FederationArguments(schedule_scope="round"))
    assert math.isfinite(rounds[0][1]["train_loss"])


def test_an_optimizer_and_scheduler_the_user_passes_go_on_across_rounds(tmp_path, tiny_model_dir):
    trainer = user_trainer(tiny_model_dir, tmp_path, max_steps=6)
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.optimizer, trainer.lr_scheduler = (
        optimizer,
        torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5),
    )
    recorded = drive(trainer, rounds=(1, 2))
    assert [r.learning_rates for r, _ in recorded] == [[0.1, 0.05], [0.025, 0.0125]]
