"""Checks of a run that fail in seconds, before any Flower process or training starts.

`check_run` takes the run as Flower's run config, the one form every door shares (a launcher's
parsed flags, `simulate(...)` from Python, `flwr run .`), and checks the federation (minimums,
strategy, transfer), the Hub access, the Trainer factory (importable, callable with the context),
a built-in task's model and data, and the output folder. It returns the (train, eval) example
counts of the run's partitions where the server knows them (a built-in task's data set), from which
the server caps the counts clients claim (`validation.ExampleCap`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .. import checkpoint, hub
from ..arguments import FederationArguments, HubArguments, RunArguments
from ..arguments.policy import unsettable_training_fields
from ..arguments.run_config import from_run_config, group_from_run_config, training_overrides
from ..factory import check_signature, load_factory
from ..modeling import load_model_config
from ..tasks import get_task, resolve, trainer_ref
from . import resume
from .strategies import build_strategy, strategy_class


def check_federation(federation: FederationArguments) -> None:
    """Minimums that the number of clients can never satisfy would make the server wait forever."""
    for name in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
        if getattr(federation, name) > federation.num_clients:
            raise ValueError(
                f"{name}={getattr(federation, name)} exceeds num_clients={federation.num_clients}: "
                f"the server would wait forever. Lower --{name} or raise --num_clients."
            )


def check_transfer(federation: FederationArguments) -> None:
    """Client-side clipping (Flower's DP mods) reads the weights with numpy, which has no bfloat16."""
    client_side_dp = strategy_class(federation.strategy).__name__.startswith("DifferentialPrivacyClientSide")
    if client_side_dp and federation.transfer_dtype == "bfloat16":
        raise ValueError(
            f"{federation.strategy} clips updates on the client with numpy, which has no bfloat16: "
            "use --transfer_dtype float16 or float32 with it."
        )


def check_client_policy(run_args: RunArguments) -> None:
    """Training settings that every client refuses from a server (`arguments.policy`) stop the run
    here, at once, rather than as every client's failure in round 1."""
    refusals = unsettable_training_fields(training_overrides(run_args.training))
    if refusals:
        raise ValueError(
            "Clients do not follow these training settings from a server: " + "; ".join(refusals) + ". "
            "Remove them from the config or command line."
        )


def check_task(
    run_args: RunArguments, resume_point: resume.ResumePoint | None = None
) -> list[tuple[int, int]]:
    """A built-in task's settings, model and data (and the round a resumed run continues from,
    against the model's weightless skeleton); the (train, eval) counts of its partitions."""
    resolve(run_args)
    task = get_task(run_args.model.task)
    task.check_args(run_args)
    check_client_policy(run_args)
    load_model_config(run_args.model)
    label_names = task.label_names(run_args)
    task.check_run(run_args, label_names)
    if resume_point is not None:
        output_dir = run_args.federation.output_dir
        resume.check_resumable(resume_point, task.skeleton(run_args, label_names), output_dir)
        # Checked against the model: the rounds it trains again move out of the way now, and the
        # launcher says so on its terminal.
        resume.set_aside_later_rounds(output_dir, resume_point.round)
    return partition_counts(run_args)


def check_run(run_config: Mapping[str, Any], prepare_output: bool = False) -> list[tuple[int, int]]:
    """Validate federation, strategy, Hub access, Trainer factory, a built-in task's model and data,
    and the output folder; the (train, eval) counts of the run's partitions (empty where the server
    cannot know them: a user's own factory).

    With `prepare_output`, also create `output_dir` (refusing one that already holds rounds unless
    `overwrite_output_dir`; with `resume`, checking the round it continues from against its
    checksums and, for a built-in task, against the model first). The caller holds the folder's
    `checkpoint.lock`. A user's factory builds its model in the ServerApp, which checks the round
    against it there, before round 1 (`resume.check_resumable`).
    """
    run_config = dict(run_config)
    federation = group_from_run_config(FederationArguments, run_config)
    hub_args = group_from_run_config(HubArguments, run_config)
    check_federation(federation)
    build_strategy(federation)
    check_transfer(federation)
    if hub_args.push_to_hub:
        hub.check_push_access(hub_args.hub_model_id)
    resuming = prepare_output and federation.resume
    point = resume.check_round_to_resume(federation.output_dir, federation) if resuming else None
    ref = trainer_ref(federation, run_config)
    if federation.trainer:
        check_signature(load_factory(ref), ref)
        counts: list[tuple[int, int]] = []
    else:
        counts = check_task(from_run_config(run_config), point)
    if prepare_output:
        overwrite = federation.overwrite_output_dir and not resuming
        checkpoint.prepare_output_dir(federation.output_dir, overwrite, resume=resuming)
    return counts


# `partition_counts` results of this process, by run configuration.
_PARTITION_COUNTS: dict[str, list[tuple[int, int]]] = {}


def partition_counts(run_args: RunArguments) -> list[tuple[int, int]]:
    """The (train, eval) example counts a client of each of a built-in task's partitions reports,
    computed once per run configuration in a process (the launcher's check and the ServerApp's cap
    both need them)."""
    from ..arguments.run_config import to_run_config
    from ..data import client_split_sizes

    key = json.dumps(to_run_config(run_args), sort_keys=True)
    if key not in _PARTITION_COUNTS:
        sizes = get_task(run_args.model.task).partition_sizes(run_args)
        eval_size = run_args.data.client_eval_size
        _PARTITION_COUNTS[key] = [client_split_sizes(size, eval_size) for size in sizes]
    return list(_PARTITION_COUNTS[key])
