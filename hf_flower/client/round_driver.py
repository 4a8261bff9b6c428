"""The round driver: one client's rounds, run on the Trainer the user's `make_trainer` built.

A client process builds its Trainer once and trains it every round. `TrainingArguments` keep the
meaning they have for one `trainer.train()`: they describe the whole federated training, and each
round trains its share of it. For every round the driver

- loads the server's weights into the model's trainable part (`weights.set_weights`);
- sets the round's share of the training: `max_steps / num_rounds` steps when `max_steps` is set,
  else `num_train_epochs / num_rounds` epochs (or `--local_epochs` per round);
- seeds the round (`round_seed`): a new data order and dropout every round, the same in every run;
- creates a fresh optimizer and adds the round's callbacks (`callbacks.py`): one learning-rate
  schedule across rounds, optionally the optimizer state of the previous round, FedProx's proximal
  term, the message's deadline. An optimizer and scheduler the user passed (`optimizers=`) are kept
  and simply go on from round to round;
- trains, and returns the trainable weights and the metrics the server validates.

Clients never write checkpoints, evaluate during training or push to the Hub: the federation
evaluates each round, and the server saves and pushes the aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback, enable_full_determinism, set_seed
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from ..arguments import FederationArguments
from ..constants import NUM_EXAMPLES_KEY
from ..weights import set_weights
from .callbacks import (
    GlobalSchedule,
    KeptOptimizerState,
    OptimizerStateStore,
    ProximalTerm,
    RoundSchedule,
    TaskDeadline,
    TaskExpiredError,
)

# Evaluation metrics a client does not report: throughput, which says more about the machine than
# the model.
UNREPORTED_EVAL_SUFFIXES = ("_per_second", "_model_preparation_time")


def round_seed(seed: int, server_round: int) -> int:
    """The seed of one round's local training: distinct per round, the same in every run."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])


def round_share(max_steps: int, num_train_epochs: float, federation: FederationArguments) -> dict:
    """The `TrainingArguments` of one round's training, from those of the whole training.

    As in `Trainer`, `max_steps > 0` takes precedence over epochs; `--local_epochs` sets the epochs
    of a round directly.
    """
    if max_steps > 0:
        return {"max_steps": math.ceil(max_steps / federation.num_rounds)}
    return {"max_steps": -1, "num_train_epochs": federation.epochs_per_round(num_train_epochs)}


class RoundDriver:
    """Runs a client's rounds on `trainer`, whatever its class (a `Trainer` subclass, a TRL trainer)."""

    def __init__(self, trainer: Trainer, federation: FederationArguments):
        args = trainer.args
        self.trainer = trainer
        self.federation = federation
        self.seed, self.data_seed = args.seed, args.data_seed
        self.share = round_share(args.max_steps, args.num_train_epochs, federation)
        # An optimizer and scheduler the user passed (`optimizers=`) are theirs: they go on from
        # round to round as they would in one long `train()`. Ours are made afresh each round.
        self.own_optimizer = trainer.optimizer is None
        self.own_scheduler = trainer.lr_scheduler is None

    def train(
        self,
        weights: Mapping,
        server_round: int,
        *,
        proximal_mu: float = 0.0,
        deadline: float | None = None,
        optimizer_store: OptimizerStateStore | None = None,
        callbacks: tuple[TrainerCallback, ...] = (),
    ) -> dict[str, float]:
        """Train round `server_round` from `weights`; the round's metrics (the weights stay in the model)."""
        trainer = self.trainer
        if trainer.train_dataset is None:
            raise ValueError(
                "make_trainer returned a Trainer without a train_dataset on a client: give it the "
                "client's training data (e.g. `train_dataset=context.partition(dataset['train'])`)."
            )
        set_weights(trainer.model, weights)
        self._prepare(server_round)
        schedule = RoundSchedule(server_round, self.federation.num_rounds, self.federation.schedule_scope)
        expiry = TaskDeadline(deadline) if deadline is not None else None
        added = [GlobalSchedule(schedule)] if self.own_scheduler else []
        added += callbacks
        if optimizer_store is not None:
            added.append(KeptOptimizerState(optimizer_store))
        if proximal_mu > 0:
            added.append(ProximalTerm(proximal_mu, trainer.model))
        if expiry is not None:
            added.append(expiry)
        for callback in added:
            trainer.add_callback(callback)
        try:
            output = trainer.train()
        finally:
            for callback in added:
                trainer.remove_callback(callback)
        if expiry is not None and expiry.expired:
            raise TaskExpiredError(
                f"the server's message expired after {output.global_step} training steps: its round "
                "ended (--round_timeout) before this client finished; raise --round_timeout or lower "
                "the local work (--max_steps, --local_epochs)"
            )
        return {
            "train_loss": mean_over_ranks(trainer, output.training_loss),
            "train_runtime": float(output.metrics["train_runtime"]),
            "train_steps": int(output.global_step),
            NUM_EXAMPLES_KEY: num_examples(trainer.train_dataset, output.global_step, trainer),
        }

    def _prepare(self, server_round: int) -> None:
        """The round's share, seed and fresh optimizer; no checkpoints, no evaluation inside it."""
        trainer, args = self.trainer, self.trainer.args
        for name, value in self.share.items():
            setattr(args, name, value)
        args.seed = round_seed(self.seed, server_round)
        if self.data_seed is not None:
            # Accelerate took the data seed when the Trainer was built: its sampler reads it there.
            args.data_seed = round_seed(self.data_seed, server_round)
            trainer.accelerator.dataloader_config.data_seed = args.data_seed
        # What Trainer.__init__ does with the seed; without a data_seed, accelerate's sampler draws
        # the order from this seed too.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        args.save_strategy = SaveStrategy.NO
        args.eval_strategy = IntervalStrategy.NO
        args.load_best_model_at_end = False
        args.eval_on_start = False
        args.push_to_hub = False
        if self.own_optimizer:
            trainer.optimizer = None
        elif isinstance(trainer.optimizer, AcceleratedOptimizer):
            trainer.optimizer = trainer.optimizer.optimizer  # the Trainer wraps it again each train()

    def evaluate(self, weights: Mapping) -> dict[str, float]:
        """The model with `weights`, evaluated on the client's `eval_dataset`: every numeric
        `eval_*` metric `trainer.evaluate()` returns (the user's `compute_metrics` included)."""
        trainer = self.trainer
        if trainer.eval_dataset is None:
            raise ValueError(
                "make_trainer returned a Trainer without an eval_dataset on a client: give it the "
                "client's own held-out examples, or set --fraction_evaluate 0 to skip federated evaluation."
            )
        set_weights(trainer.model, weights)
        metrics = reported_eval_metrics(trainer.evaluate())
        metrics[NUM_EXAMPLES_KEY] = num_examples(trainer.eval_dataset)
        return metrics


def reported_eval_metrics(metrics: Mapping) -> dict[str, float]:
    """The evaluation metrics worth reporting: every finite number named `eval_*` but throughput."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if name.startswith("eval_")
        and not name.endswith(UNREPORTED_EVAL_SUFFIXES)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def num_examples(dataset, steps: int = 0, trainer: Trainer | None = None) -> int:
    """Examples a client reports for a data set (FedAvg weighs it by them): its length, or for a
    streamed (`IterableDataset`) training set, the examples its `steps` drew."""
    if isinstance(dataset, Mapping):
        return sum(num_examples(part) for part in dataset.values())
    try:
        return len(dataset)
    except TypeError:
        if trainer is None:
            raise ValueError("a streamed eval_dataset has no length to report: give a Dataset") from None
        args = trainer.args
        return steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def mean_over_ranks(trainer: Trainer, value: float) -> float:
    """A per-rank average made global: each DDP rank only averages the loss of its own shard."""
    tensor = torch.tensor(float(value), device=trainer.accelerator.device)
    return float(trainer.accelerator.reduce(tensor, reduction="mean"))
