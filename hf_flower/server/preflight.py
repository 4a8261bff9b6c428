"""Checks of a run's configuration that fail in seconds, before any Flower process or training starts."""

from __future__ import annotations

import json

from .. import checkpoint, hub
from ..arguments import RunArguments
from ..arguments.policy import unsettable_training_fields
from ..arguments.run_config import to_run_config, training_overrides
from ..constants import LABEL_NAMES_KEY
from ..modeling import load_model_config
from ..tasks import RunFacts, get_task
from . import resume
from .strategies import build_strategy, strategy_class


def check_federation(run_args: RunArguments) -> None:
    """Minimums that the number of clients can never satisfy would make the server wait forever."""
    federation = run_args.federation
    for name in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
        if getattr(federation, name) > federation.num_clients:
            raise ValueError(
                f"{name}={getattr(federation, name)} exceeds num_clients={federation.num_clients}: "
                f"the server would wait forever. Lower --{name} or raise --num_clients."
            )


def check_transfer(run_args: RunArguments) -> None:
    """Client-side clipping (Flower's DP mods) reads the weights with numpy, which has no bfloat16."""
    federation = run_args.federation
    client_side_dp = strategy_class(federation.strategy).__name__.startswith("DifferentialPrivacyClientSide")
    if client_side_dp and federation.transfer_dtype == "bfloat16":
        raise ValueError(
            f"{federation.strategy} clips updates on the client with numpy, which has no bfloat16: "
            "use --transfer_dtype float16 or float32 with it."
        )


def check_client_policy(run_args: RunArguments) -> None:
    """Training settings that every client refuses from a server (`client_policy`) stop the run
    here, at once, rather than as every client's failure in round 1."""
    refusals = unsettable_training_fields(training_overrides(run_args.training))
    if refusals:
        raise ValueError(
            "Clients do not follow these training settings from a server: " + "; ".join(refusals) + ". "
            "Remove them from the config or command line."
        )


def check_run(run_args: RunArguments, prepare_output: bool = False) -> RunFacts:
    """Validate task, model, data, partitions, strategy, Hub access and output folder; return the
    run's facts (`Task.run_facts`, e.g. its classes), which every client will share.

    With `prepare_output`, also create `output_dir` (refusing one that already holds rounds unless
    `overwrite_output_dir`; with `resume`, checking the round it continues from against its
    checksums and that it belongs to this model and labels before anything in it is touched,
    then moving later rounds aside). The caller holds the folder's `run_lock`.
    """
    task = get_task(run_args.model.task)
    task.check_args(run_args)
    check_federation(run_args)
    build_strategy(run_args.federation)
    check_transfer(run_args)
    check_client_policy(run_args)
    if run_args.hub.push_to_hub:
        hub.check_push_access(run_args.hub.hub_model_id)
    output_dir, federation = run_args.training.output_dir, run_args.federation
    if prepare_output and not federation.resume:
        checkpoint.prepare_output_dir(output_dir, federation.overwrite_output_dir)
    model_config = load_model_config(run_args.model)
    facts = task.run_facts(run_args)
    task.check_run(run_args, facts)
    if prepare_output and federation.resume:
        resumed_round = resume.check_resumable(output_dir, run_args, model_config, facts.get(LABEL_NAMES_KEY))
        checkpoint.prepare_output_dir(output_dir, overwrite=False, resume=True)
        resume.set_aside_later_rounds(output_dir, resumed_round)
    partition_sizes(run_args)
    return facts


# `partition_sizes` results of this process, by run configuration.
_PARTITION_SIZES: dict[str, list[int]] = {}


def partition_sizes(run_args: RunArguments) -> list[int]:
    """Examples in each client's partition (`Task.partition_sizes`), computed once per run
    configuration in a process: `check_run` computes them as a check, and the ServerApp reads
    them again to cap the example counts clients report (`validation.ExampleCap`)."""
    key = json.dumps(to_run_config(run_args), sort_keys=True)
    if key not in _PARTITION_SIZES:
        _PARTITION_SIZES[key] = get_task(run_args.model.task).partition_sizes(run_args)
    return list(_PARTITION_SIZES[key])
