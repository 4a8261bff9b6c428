"""The `Trainer` a client runs each round, made to mean the whole federated training.

A client builds a fresh `Trainer` for every round (new weights arrive each time), and a fresh
`Trainer` on its own would restart everything a Hugging Face user expects to run once across
training: the learning-rate schedule would warm up and decay inside every round, every round
would see the data in the same order, and the optimizer's moments would start from zero. Here:

- `RoundSchedule`: round r continues the schedule where round r-1 left it. The schedule spans
  `num_rounds * local_steps` steps and round r starts at global step `(r - 1) * local_steps`, so
  warm-up happens once and a linear or cosine schedule ends at the last round
  (`--schedule_scope round` restarts it every round instead).
- `round_seed`: each round gets its own seed (from `--seed` and the round), so the data order and
  dropout differ between rounds and are the same in every run with that seed.
- `OptimizerStateStore`: with `--keep_optimizer_state`, the optimizer's state (AdamW's moments)
  is kept between rounds on the client side, never in a message to the server.
- `TaskDeadline`: training stops when the message it answers expires (the server makes each
  message expire when its round's `--round_timeout` ends): a reply after that is dropped anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, get_scheduler

OPTIMIZER_STATE_KEY = "optimizer-state"


def round_seed(seed: int, server_round: int) -> int:
    """The seed of one round's local training: distinct per round, the same in every run."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class RoundSchedule:
    """Where one round sits in the learning-rate schedule of the whole federated training."""

    server_round: int
    num_rounds: int
    scope: str = "global"

    def span(self, local_steps: int) -> tuple[int, int]:
        """(global step at which this round starts, steps of the whole schedule)."""
        if self.scope == "round":
            return 0, local_steps
        return (self.server_round - 1) * local_steps, self.num_rounds * local_steps


def _at_global_step(lr_lambda, offset: int, step: int) -> float:
    return lr_lambda(step + offset)


def shifted_scheduler(scheduler: LambdaLR, offset: int) -> LambdaLR:
    """`scheduler` started `offset` steps in: local step k gets the factor of step `offset + k`."""
    lambdas = [functools.partial(_at_global_step, fn, offset) for fn in scheduler.lr_lambdas]
    # The first scheduler already recorded each group's `initial_lr`, which this one starts from.
    return LambdaLR(scheduler.optimizer, lambdas)


class OptimizerStateStore:
    """An optimizer's state kept in a client-side `RecordDict` between rounds.

    In simulation and on a SuperNode the store is the node's `Context.state`, which Flower keeps
    on the client side (a partition that lands in another worker finds it there) and never sends
    to the server. Only the per-parameter state travels into it: the learning rate and other
    hyperparameters of the groups stay those of the new round's optimizer.
    """

    def __init__(self, state: RecordDict):
        self.state = state

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        saved = optimizer.state_dict()
        tensors = {
            f"{param}.{name}": value if torch.is_tensor(value) else torch.tensor(value)
            for param, values in saved["state"].items()
            for name, value in values.items()
        }
        self.state[OPTIMIZER_STATE_KEY] = ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})

    def load(self, optimizer: torch.optim.Optimizer) -> bool:
        """Restore the saved state into `optimizer`; False when there is none yet."""
        if OPTIMIZER_STATE_KEY not in self.state.array_records:
            return False
        state: dict[int, dict] = {}
        for key, tensor in self.state[OPTIMIZER_STATE_KEY].to_torch_state_dict().items():
            param, name = key.split(".", 1)
            state.setdefault(int(param), {})[name] = tensor
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        return True


class FederatedTrainer(Trainer):
    """`Trainer` for one client round.

    Adds FedProx's proximal term `mu / 2 * ||w - w_global||^2` when mu > 0, a learning-rate
    schedule that spans rounds (`round_schedule`), and an optimizer that continues from the state
    of the previous round (`optimizer_store`).
    """

    def __init__(
        self,
        *args,
        proximal_mu: float = 0.0,
        round_schedule: RoundSchedule | None = None,
        optimizer_store: OptimizerStateStore | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # A sequence classifier's loss is a per-batch mean that ignores `num_items_in_batch`; left
        # True, Trainer multiplies it by the number of ranks (2x the loss under 2-rank DDP).
        self.model_accepts_loss_kwargs = False
        self.proximal_mu = proximal_mu
        self.round_schedule = round_schedule
        self.optimizer_store = optimizer_store
        self.global_params = (
            [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
            if proximal_mu > 0
            else []
        )

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.optimizer_store is not None:
            self.optimizer_store.load(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.round_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        offset, total = self.round_schedule.span(num_training_steps)
        scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=self.args.get_warmup_steps(total),
            num_training_steps=total,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"lr_scheduler_type={self.args.lr_scheduler_type!r} is not a schedule over steps, so it "
                "cannot span rounds. Use a step schedule (linear, cosine, ...) or --schedule_scope round."
            )
        self.lr_scheduler = shifted_scheduler(scheduler, offset) if offset else scheduler
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.optimizer_store is not None:
            self.optimizer_store.save(self.optimizer)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.proximal_mu <= 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        local_params = [p for p in model.parameters() if p.requires_grad]
        proximal = sum((p - g).pow(2).sum() for p, g in zip(local_params, self.global_params))
        loss = loss + self.proximal_mu / 2 * proximal
        return (loss, outputs) if return_outputs else loss


class TaskExpiredError(RuntimeError):
    """The message a client was training for expired: its round is over on the server."""


class TaskDeadline(TrainerCallback):
    """Stop training at `deadline` (a `time.time()` value: the message's `created_at + ttl`, as
    Flower itself reads it, so client and server clocks are assumed to agree as Flower assumes).

    Under `accelerate launch` every rank stops at the same step: the ranks agree on "expired" with
    one all-reduce per step, or a rank that stopped alone would leave the others waiting in the
    next gradient all-reduce. `expired` says whether it stopped training.
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False

    def on_step_end(self, args, state, control, **kwargs):
        expired = torch.tensor([float(time.time() > self.deadline)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                expired = expired.cuda()
            torch.distributed.all_reduce(expired, op=torch.distributed.ReduceOp.MAX)
        if expired.item() > 0:
            self.expired = control.should_training_stop = True
        return control
