"""The Flower ClientApp: local training and evaluation of the global model with `transformers.Trainer`.

A client process keeps its model, tokenizer and tokenised partition between messages (the
`functools.cache`s below), so a round costs one weight copy plus the training itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import traceback

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from transformers import Trainer, TrainingArguments, set_seed

from .. import data as data_lib
from ..arguments import RunArguments
from ..arguments.policy import ClientPolicy
from ..arguments.run_config import from_run_config
from ..constants import (
    ARRAYS_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    DATA_PATH_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from ..modeling import load_tokenizer
from ..progress.callback import report_training
from ..server.strategies import strategy_class
from ..tasks import (
    DEFAULT_TASK,
    RunFacts,
    Task,
    get_task,
)
from ..transport.flwr_compat import ErrorCode
from ..weights import get_weights, set_weights
from .ranks import join_launched_processes
from .round_driver import (
    FederatedTrainer,
    OptimizerStateStore,
    RoundSchedule,
    TaskDeadline,
    TaskExpiredError,
    round_seed,
)

# Client-side halves of Flower's differential-privacy wrappers, by strategy name.
CLIENT_SIDE_DP_MODS = {
    "DifferentialPrivacyClientSideFixedClipping": fixedclipping_mod,
    "DifferentialPrivacyClientSideAdaptiveClipping": adaptiveclipping_mod,
}
STRATEGY_RUN_CONFIG_KEY = "federation.strategy"
TASK_RUN_CONFIG_KEY = "model.task"


def differential_privacy_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping mod, when the run's strategy is a client-side DP wrapper.

    Those wrappers only add noise on the server; the clipping they rely on happens here, on the
    update this client sends. Other strategies pass straight through.
    """
    mod = CLIENT_SIDE_DP_MODS.get(strategy_class(str(context.run_config[STRATEGY_RUN_CONFIG_KEY])).__name__)
    if mod is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    return mod(msg, context, call_next)


app = ClientApp(mods=[differential_privacy_mod])


@dataclasses.dataclass
class ClientRun:
    """What one client process builds once for a run and reuses every round."""

    run_args: RunArguments
    task: Task
    facts: RunFacts
    tokenizer: object
    model: torch.nn.Module


def _frozen(config) -> tuple:
    return tuple(sorted(config.items()))


def facts_key(facts: RunFacts) -> str:
    """`facts` as a cache key."""
    return json.dumps(facts, sort_keys=True)


@functools.cache
def load_run(run_config: tuple, run_facts: str) -> ClientRun:
    """Model and tokenizer of this run, built once per process (all partitions share them).

    `run_facts` (`facts_key` of the facts the server sent) shape the model, e.g. the run's classes:
    a client never reads them from a data set of its own, which may hold only some of them.
    The run config is untrusted: this process's `ClientPolicy` checks it before anything is built.
    """
    run_args = from_run_config(dict(run_config), policy=ClientPolicy.from_env().check)
    task, facts = get_task(run_args.model.task), json.loads(run_facts)
    set_seed(run_args.training.seed)
    tokenizer = load_tokenizer(run_args.model)
    return ClientRun(run_args, task, facts, tokenizer, task.load_model(run_args, facts, on_client=True))


@functools.cache
def load_partition(
    run_config: tuple, run_facts: str, partition_id: int, num_partitions: int, data_path: str = ""
) -> data_lib.ClientData:
    """This client's tokenised train and eval splits, built once per process and partition.

    With `data_path` (the deployment case), the client's own file is all its data; otherwise
    partition `partition_id` of the run's data set.
    """
    run = load_run(run_config, run_facts)
    if data_path:
        return run.task.own_data(run.run_args, run.tokenizer, run.facts, data_path)
    return run.task.client_data(run.run_args, run.tokenizer, run.facts, partition_id, num_partitions)


def partition_of(context: Context) -> tuple[int, int, str]:
    """The data this node serves, from its node config: a partition id, or its own data file."""
    node_config = context.node_config
    if DATA_PATH_KEY in node_config:
        return 0, 1, str(node_config[DATA_PATH_KEY])
    if PARTITION_ID_KEY not in node_config or NUM_PARTITIONS_KEY not in node_config:
        raise ValueError(
            "This SuperNode has no data: start it with --node-config 'partition-id=<i> num-partitions=<n>' "
            "or 'data-path=\"<file>\"'."
        )
    return int(node_config[PARTITION_ID_KEY]), int(node_config[NUM_PARTITIONS_KEY]), ""


def build_trainer(
    run: ClientRun,
    proximal_mu: float = 0.0,
    server_round: int | None = None,
    optimizer_store: OptimizerStateStore | None = None,
    **datasets,
) -> FederatedTrainer:
    """A fresh Trainer for one round, with no checkpoints on disk.

    For training (`server_round` given), the round places the Trainer in the whole federated
    training: its seed (data order, dropout) and its part of the learning-rate schedule.
    """
    training, federation = run.run_args.training, run.run_args.federation
    overrides = {
        "output_dir": _scratch_dir(),
        "save_strategy": "no",
        "eval_strategy": "no",
        "load_best_model_at_end": False,
    }
    round_schedule = None
    if server_round is not None:
        overrides["seed"] = round_seed(training.seed, server_round)
        if training.data_seed is not None:
            overrides["data_seed"] = round_seed(training.data_seed, server_round)
        round_schedule = RoundSchedule(server_round, federation.num_rounds, federation.schedule_scope)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        overrides["accelerator_config"] = dataclasses.asdict(training.accelerator_config)
    args: TrainingArguments = dataclasses.replace(training, **join_launched_processes(overrides))
    return FederatedTrainer(
        model=run.model,
        args=args,
        data_collator=run.task.data_collator(run.tokenizer),
        processing_class=run.tokenizer,
        compute_metrics=run.task.compute_metrics(run.facts),
        proximal_mu=proximal_mu,
        round_schedule=round_schedule,
        optimizer_store=optimizer_store,
        **datasets,
    )


# Optimizer state of each node, per rank, for multi-rank clients: `Context.state` reaches rank 0
# only, and every rank must continue from the same moments.
_RANK_LOCAL_STATE: dict[int, RecordDict] = {}


def optimizer_store(run: ClientRun, context: Context) -> OptimizerStateStore | None:
    """Where this node keeps its optimizer state between rounds (`--keep_optimizer_state`)."""
    if not run.run_args.federation.keep_optimizer_state:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return OptimizerStateStore(_RANK_LOCAL_STATE.setdefault(context.node_id, RecordDict()))
    return OptimizerStateStore(context.state)


def mean_over_ranks(trainer: Trainer, value: float) -> float:
    """A per-rank average made global: each DDP rank only averages the loss of its own shard."""
    tensor = torch.tensor(float(value), device=trainer.accelerator.device)
    return float(trainer.accelerator.reduce(tensor, reduction="mean"))


@functools.cache
def _scratch_dir() -> str:
    # Trainer wants an output_dir; the server's output_dir is not this machine's to write.
    return tempfile.mkdtemp(prefix="hf-flower-client-")


def _reply(msg: Message, context: Context, arrays: ArrayRecord | None, metrics: dict) -> Message:
    partition_id, _, _ = partition_of(context)
    content = RecordDict(
        {METRICS_KEY: MetricRecord(metrics), CLIENT_KEY: ConfigRecord({PARTITION_ID_KEY: partition_id})}
    )
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    return Message(content=content, reply_to=msg)


def _error_reply(msg: Message, context: Context, stage: str, err: Exception) -> Message:
    """Report a failure to the server with the client's partition, the round and the cause."""
    server_round = msg.content[CONFIG_KEY].get(SERVER_ROUND_KEY, "?") if msg.has_content() else "?"
    partition = context.node_config.get(PARTITION_ID_KEY, "?")
    reason = (
        f"client partition {partition} failed during {stage} of round {server_round}: "
        f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
    )
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def receive_global_model(msg: Message, context: Context) -> tuple[ClientRun, data_lib.ClientData]:
    """This process's model, now holding the server's weights, and this node's data.

    The message's copy of the weights is dropped once they are in the model: training would
    otherwise carry a second copy of the model (91 MB for MiniLM) through its peak.
    """
    run_config = _frozen(context.run_config)
    task = get_task(str(context.run_config.get(TASK_RUN_CONFIG_KEY, DEFAULT_TASK)))
    run_facts = facts_key(task.facts_from_message(msg.content[CONFIG_KEY]))
    run = load_run(run_config, run_facts)
    client = load_partition(run_config, run_facts, *partition_of(context))
    set_weights(run.model, msg.content[ARRAYS_KEY])
    del msg.content[ARRAYS_KEY]
    return run, client


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train locally, reply with the new weights and train metrics."""
    try:
        run, client = receive_global_model(msg, context)
        config = msg.content[CONFIG_KEY]
        trainer = build_trainer(
            run,
            float(config.get("proximal-mu", 0.0)),
            server_round=int(config[SERVER_ROUND_KEY]),
            optimizer_store=optimizer_store(run, context),
            train_dataset=client.train,
        )
        report_training(trainer, context, int(config[SERVER_ROUND_KEY]))
        deadline = TaskDeadline(msg.metadata.created_at + msg.metadata.ttl)
        trainer.add_callback(deadline)
        output = trainer.train()
        if deadline.expired:
            raise TaskExpiredError(
                f"the server's message expired after {output.global_step} training steps: its round "
                "ended (--round_timeout) before this client finished; raise --round_timeout or lower "
                "the local work (--max_steps, --local_epochs)"
            )
        metrics = {
            "train_loss": mean_over_ranks(trainer, output.training_loss),
            "train_runtime": float(output.metrics["train_runtime"]),
            "train_steps": int(output.global_step),
            NUM_EXAMPLES_KEY: len(client.train),
        }
        arrays = get_weights(run.model, run.run_args.federation.transfer_dtype)
        return _reply(msg, context, arrays, metrics)
    except Exception as err:  # noqa: BLE001 - every failure goes back to the server, named
        return _error_reply(msg, context, "training", err)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on this client's held-out split."""
    try:
        run, client = receive_global_model(msg, context)
        results = run.task.evaluate(build_trainer(run), client.eval, run.run_args)
        metrics = {**run.task.client_eval_metrics(results), NUM_EXAMPLES_KEY: len(client.eval)}
        return _reply(msg, context, None, metrics)
    except Exception as err:  # noqa: BLE001
        return _error_reply(msg, context, "evaluation", err)
