"""The Flower ClientApp: local training and evaluation of the global model with `transformers.Trainer`.

A client process keeps its model, tokenizer and tokenised partition between messages (the
`functools.cache`s below), so a round costs one weight copy plus the training itself.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import traceback

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.common.constant import ErrorCode
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from . import data as data_lib
from .arguments import RunArguments, from_run_config, join_launched_processes
from .constants import (
    ARRAYS_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    DATA_PATH_KEY,
    LABEL_NAMES_KEY,
    MAX_LABELS,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from .metrics import make_compute_metrics
from .modeling import load_model, load_tokenizer
from .progress_callback import report_training
from .strategies import strategy_class
from .trainer import FederatedTrainer, OptimizerStateStore, RoundSchedule, round_seed
from .weights import get_weights, set_weights

# Client-side halves of Flower's differential-privacy wrappers, by strategy name.
CLIENT_SIDE_DP_MODS = {
    "DifferentialPrivacyClientSideFixedClipping": fixedclipping_mod,
    "DifferentialPrivacyClientSideAdaptiveClipping": adaptiveclipping_mod,
}
STRATEGY_RUN_CONFIG_KEY = "federation.strategy"


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
class ClientTask:
    """What one client process builds once and reuses every round."""

    run_args: RunArguments
    tokenizer: object
    model: torch.nn.Module
    label_names: list[str]


def _frozen(config) -> tuple:
    return tuple(sorted(config.items()))


@functools.cache
def load_task(run_config: tuple, label_names: tuple[str, ...]) -> ClientTask:
    """Model and tokenizer of this run, built once per process (all partitions share them).

    `label_names` are the run's classes as the server sends them: a client never reads them from
    a data set of its own, which may hold only some of them.
    """
    run_args = from_run_config(dict(run_config))
    set_seed(run_args.training.seed)
    tokenizer = load_tokenizer(run_args.model)
    model = load_model(run_args.model, list(label_names), run_args.peft)
    return ClientTask(run_args, tokenizer, model, list(label_names))


@functools.cache
def load_partition(
    run_config: tuple,
    label_names: tuple[str, ...],
    partition_id: int,
    num_partitions: int,
    data_path: str = "",
) -> data_lib.ClientData:
    """This client's tokenised train and eval splits, built once per process and partition.

    With `data_path` (the deployment case), the client's own file is all its data, its labels
    mapped by name onto the run's; otherwise partition `partition_id` of the run's data set.
    """
    task = load_task(run_config, label_names)
    data_args, seed = task.run_args.data, task.run_args.training.seed
    if data_path:
        return data_lib.own_data(data_path, data_args, task.tokenizer, task.label_names, seed)
    return data_lib.client_data(data_args, task.tokenizer, partition_id, num_partitions, seed)


def run_label_names(msg: Message) -> tuple[str, ...]:
    """The run's classes from the server's message, checked: they shape this client's model."""
    names = msg.content[CONFIG_KEY].get(LABEL_NAMES_KEY)
    if names is None:
        raise ValueError(
            f"The server's message carries no {LABEL_NAMES_KEY!r}: it runs another version of "
            "hf-flower. Run one version on the server and the clients."
        )
    if (
        not isinstance(names, list)
        or not 2 <= len(names) <= MAX_LABELS
        or not all(isinstance(name, str) and name for name in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError(
            f"The server sent {LABEL_NAMES_KEY!r} = {str(names)[:200]}: expected 2 to {MAX_LABELS} "
            "distinct, non-empty class names."
        )
    return tuple(names)


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
    task: ClientTask,
    proximal_mu: float = 0.0,
    server_round: int | None = None,
    optimizer_store: OptimizerStateStore | None = None,
    **datasets,
) -> FederatedTrainer:
    """A fresh Trainer for one round, with no checkpoints on disk.

    For training (`server_round` given), the round places the Trainer in the whole federated
    training: its seed (data order, dropout) and its part of the learning-rate schedule.
    """
    training, federation = task.run_args.training, task.run_args.federation
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
        model=task.model,
        args=args,
        data_collator=DataCollatorWithPadding(task.tokenizer),
        processing_class=task.tokenizer,
        compute_metrics=make_compute_metrics(len(task.label_names)),
        proximal_mu=proximal_mu,
        round_schedule=round_schedule,
        optimizer_store=optimizer_store,
        **datasets,
    )


# Optimizer state of each node, per rank, for multi-rank clients: `Context.state` reaches rank 0
# only, and every rank must continue from the same moments.
_RANK_LOCAL_STATE: dict[int, RecordDict] = {}


def optimizer_store(task: ClientTask, context: Context) -> OptimizerStateStore | None:
    """Where this node keeps its optimizer state between rounds (`--keep_optimizer_state`)."""
    if not task.run_args.federation.keep_optimizer_state:
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


def receive_global_model(msg: Message, context: Context) -> tuple[ClientTask, data_lib.ClientData]:
    """This process's model, now holding the server's weights, and this node's data.

    The message's copy of the weights is dropped once they are in the model: training would
    otherwise carry a second copy of the model (91 MB for MiniLM) through its peak.
    """
    run_config, label_names = _frozen(context.run_config), run_label_names(msg)
    task = load_task(run_config, label_names)
    client = load_partition(run_config, label_names, *partition_of(context))
    set_weights(task.model, msg.content[ARRAYS_KEY])
    del msg.content[ARRAYS_KEY]
    return task, client


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train locally, reply with the new weights and train metrics."""
    try:
        task, client = receive_global_model(msg, context)
        config = msg.content[CONFIG_KEY]
        trainer = build_trainer(
            task,
            float(config.get("proximal-mu", 0.0)),
            server_round=int(config[SERVER_ROUND_KEY]),
            optimizer_store=optimizer_store(task, context),
            train_dataset=client.train,
        )
        report_training(trainer, context, int(config[SERVER_ROUND_KEY]))
        output = trainer.train()
        metrics = {
            "train_loss": mean_over_ranks(trainer, output.training_loss),
            "train_runtime": float(output.metrics["train_runtime"]),
            "train_steps": int(output.global_step),
            NUM_EXAMPLES_KEY: len(client.train),
        }
        arrays = get_weights(task.model, task.run_args.federation.transfer_dtype)
        return _reply(msg, context, arrays, metrics)
    except Exception as err:  # noqa: BLE001 - every failure goes back to the server, named
        return _error_reply(msg, context, "training", err)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on this client's held-out split."""
    try:
        task, client = receive_global_model(msg, context)
        results = build_trainer(task).evaluate(client.eval)
        metrics = {
            "eval_loss": float(results["eval_loss"]),
            "eval_accuracy": float(results["eval_accuracy"]),
            "eval_f1": float(results["eval_f1"]),
            "eval_runtime": float(results["eval_runtime"]),
            NUM_EXAMPLES_KEY: len(client.eval),
        }
        return _reply(msg, context, None, metrics)
    except Exception as err:  # noqa: BLE001
        return _error_reply(msg, context, "evaluation", err)
