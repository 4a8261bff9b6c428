"""What one round adds to the user's Trainer, as `TrainerCallback`s: no subclass is needed.

A client trains every round with the same Trainer instance, and `trainer.train()` on its own would
restart everything a Hugging Face user expects to run once across training. The round driver
(`round_driver.py`) adds, for one `train()` call:

- `GlobalSchedule`: round r continues the learning-rate schedule where round r-1 left it. The
  schedule spans `num_rounds * local_steps` steps and round r starts at global step
  `(r - 1) * local_steps`, so warm-up happens once and a linear or cosine schedule ends at the last
  round (`--schedule_scope round` keeps Trainer's own schedule, restarted every round).
- `KeptOptimizerState`: with `--keep_optimizer_state`, the optimizer's state (AdamW's moments) is
  restored at the start of a round and saved at its end, on the client side, never in a message.
- `ProximalTerm`: FedProx's `mu / 2 * ||w - w_global||^2`, added as its gradient before each
  optimizer step.
- `TaskDeadline`: training stops when the message it answers expires.

Each works on what the Trainer hands its callbacks (`optimizer`, `lr_scheduler`, `model`), so the
user's class, `compute_loss` and `create_optimizer` stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
from flwr.app import ArrayRecord, RecordDict
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, get_scheduler

from .ranks import collective_device

OPTIMIZER_STATE_KEY = "optimizer-state"


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


class GlobalSchedule(TrainerCallback):
    """Turn the scheduler the Trainer made for one round into this round's part of one schedule over
    all rounds: `lr_scheduler_type`, `warmup_steps` and the learning rate of `TrainingArguments`,
    over `num_rounds` times the round's steps, entered at the round's first global step.

    The Trainer's scheduler object is changed in place (its step functions), so whatever holds it
    (the Trainer, accelerate) sees the same object. Only step schedules (`LambdaLR`, every
    `lr_scheduler_type` but `reduce_lr_on_plateau`) can span rounds.
    """

    def __init__(self, schedule: RoundSchedule):
        self.schedule = schedule

    def on_train_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        if self.schedule.scope == "round":
            return
        if not isinstance(lr_scheduler, LambdaLR):
            raise ValueError(
                f"The Trainer's learning-rate scheduler is a {type(lr_scheduler).__name__}, not a schedule "
                "over steps, so it cannot span rounds. Use a step schedule (lr_scheduler_type linear, "
                "cosine, ...), or --schedule_scope round to restart it every round."
            )
        offset, total = self.schedule.span(state.max_steps)
        # The schedule's shape, built on a throwaway optimizer: its step functions are what we keep.
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        shape = get_scheduler(
            args.lr_scheduler_type,
            optimizer=probe,
            num_warmup_steps=args.get_warmup_steps(total),
            num_training_steps=total,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
        if not isinstance(shape, LambdaLR):
            raise ValueError(
                f"lr_scheduler_type={args.lr_scheduler_type!r} is not a schedule over steps, so it cannot "
                "span rounds. Use a step schedule (linear, cosine, ...) or --schedule_scope round."
            )
        step_of = functools.partial(_at_global_step, shape.lr_lambdas[0], offset)
        lr_scheduler.lr_lambdas = [step_of] * len(lr_scheduler.lr_lambdas)
        groups = lr_scheduler.optimizer.param_groups
        for group, base_lr in zip(groups, lr_scheduler.base_lrs):
            group["lr"] = base_lr * step_of(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [group["lr"] for group in groups]


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


class KeptOptimizerState(TrainerCallback):
    """The optimizer continues from the state of this client's previous round (`store`)."""

    def __init__(self, store: OptimizerStateStore):
        self.store = store

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.store.load(optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.store.save(optimizer)


class ProximalTerm(TrainerCallback):
    """FedProx: the gradient of `mu / 2 * ||w - w_global||^2`, `mu * (w - w_global)`, added to each
    trainable weight's gradient before every optimizer step (after gradient clipping), with
    `w_global` the weights this round started from."""

    def __init__(self, mu: float, model: torch.nn.Module):
        self.mu = mu
        self.start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.grad is not None and name in self.start:
                    param.grad.add_(param.detach() - self.start[name].to(param.device), alpha=self.mu)


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
            expired = expired.to(collective_device())
            torch.distributed.all_reduce(expired, op=torch.distributed.ReduceOp.MAX)
        if expired.item() > 0:
            self.expired = control.should_training_stop = True
        return control
