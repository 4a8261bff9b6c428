"""Which Trainer a client process trains for a message, built once and kept for the next rounds.

The factory comes from, in this order:

1. the client's own process: the script that called `hf_flower.main(make_trainer)`, or
   `hf-flower client --trainer script.py:make_trainer` (`use_factory`), with the client's own
   `--trainer_config`. Whatever the server's run config names, this client runs its own code;
2. a built-in task (`--task`) the run config names: hf-flower's own code, whose settings the
   client's policy checks (`arguments.policy`), and whose Hub downloads send no token unless the
   client's operator allowed it (`ClientPolicy.hub_downloads`);
3. the factory the run config names, only where the client's policy lets a run config name one
   (a simulation: its operator is every client's operator).

The Trainer is built on the first message of a run and reused while the messages are for the same
run and data; one process keeps one (a simulation worker that serves another partition builds
that partition's), so its memory stays one model's. Before the first round it is checked against
what the server says of its model: a client that built another architecture or label set is
refused with the difference, before it trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
from typing import Any

from flwr.app import Context

from ..arguments import FederationArguments
from ..arguments.policy import ClientPolicy, RunRefused
from ..arguments.run_config import group_from_run_config
from ..constants import (
    CONFIG_KEY,
    DATA_PATH_KEY,
    LABEL_NAMES_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from ..context import CLIENT, TrainerContext
from ..factory import TrainerFactory, build_trainer, check_same_model, load_factory, server_model
from ..tasks import is_builtin_ref, trainer_ref
from .round_driver import RoundDriver


@dataclasses.dataclass(frozen=True)
class LocalFactory:
    """The Trainer factory this client process was started with, and its own settings."""

    ref: str
    factory: TrainerFactory
    config: dict[str, Any]


_local: LocalFactory | None = None


def use_factory(ref: str, factory: TrainerFactory, config: dict[str, Any] | None = None) -> None:
    """Make `factory` this process's Trainer factory, whatever a run config names."""
    global _local
    _local = LocalFactory(ref, factory, dict(config or {}))


@dataclasses.dataclass
class Session:
    """What a client process holds for one run and its data: the Trainer, in its round driver, and
    the context it was built with."""

    key: str
    driver: RoundDriver
    context: TrainerContext


_session: Session | None = None


def partition_of(context: Context) -> tuple[int | None, int | None, str | None]:
    """The data this node serves, from its node config: a partition of the run's data set, or a
    data file of its own."""
    node_config = context.node_config
    if DATA_PATH_KEY in node_config:
        return None, None, str(node_config[DATA_PATH_KEY])
    if PARTITION_ID_KEY not in node_config or NUM_PARTITIONS_KEY not in node_config:
        raise ValueError(
            "This SuperNode has no data: start it with --node-config 'partition-id=<i> num-partitions=<n>' "
            "or 'data-path=\"<file>\"'."
        )
    return int(node_config[PARTITION_ID_KEY]), int(node_config[NUM_PARTITIONS_KEY]), None


def factory_for(federation: FederationArguments, run_config: dict) -> tuple[str, TrainerFactory, dict]:
    """(reference, factory, its config) this process trains the run with (see the module docstring)."""
    if _local is not None:
        return _local.ref, _local.factory, _local.config
    ref = trainer_ref(federation, run_config)
    operators_own = ClientPolicy.from_env().operators_run
    if not is_builtin_ref(ref) and not operators_own:
        raise RunRefused(
            f"This client refuses the run config: it names the Trainer factory {ref!r}, and a server may "
            "not make a client import code. Start the client with the script that defines it "
            "(`python my_script.py client ...`, `accelerate launch my_script.py client ...`) or "
            "`hf-flower client --trainer path/to/script.py:make_trainer`."
        )
    # `context.config` is never the server's: a built-in task then reads the run config, which the
    # client's policy checks.
    return ref, load_factory(ref), federation.trainer_config if operators_own else {}


def session_for(message, context: Context) -> Session:
    """The Trainer (in its round driver) of this message's run and this node's data."""
    global _session
    run_config = dict(context.run_config)
    federation = group_from_run_config(FederationArguments, run_config)
    ref, factory, config = factory_for(federation, run_config)
    partition_id, num_partitions, data_path = partition_of(context)
    key = json.dumps(
        [context.run_id, run_config, ref, config, partition_id, num_partitions, data_path], sort_keys=True
    )
    if _session is not None and _session.key == key:
        return _session
    # One Trainer per process: the previous one goes before the next is built.
    _session = None
    gc.collect()
    config_record = message.content[CONFIG_KEY]
    server = server_model(config_record)
    trainer_context = TrainerContext(
        role=CLIENT,
        config=config,
        num_rounds=federation.num_rounds,
        server_round=int(config_record.get(SERVER_ROUND_KEY, 0)),
        partition_id=partition_id,
        num_partitions=num_partitions,
        data_path=data_path,
        label_names=server.get(LABEL_NAMES_KEY),
        run_config=run_config,
    )
    # A factory the run config chose downloads what the run config names: without this client's
    # Hub token, unless its operator allowed it. The client's own factory is its operator's code.
    downloads = ClientPolicy.from_env().hub_downloads() if _local is None else contextlib.nullcontext()
    with downloads:
        trainer = build_trainer(factory, trainer_context, ref)
    check_same_model(trainer.model, server, ref)
    _session = Session(key, RoundDriver(trainer, federation), trainer_context)
    return _session
