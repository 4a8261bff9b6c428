"""The Flower ClientApp: each round, the user's Trainer trains (or evaluates) the global model.

Every message goes the same way: the process's Trainer for the run and this node's data
(`session.session_for`: built once by the run's `make_trainer`, checked against the server's model),
then the round driver (`round_driver.RoundDriver`) with the message's weights, and a reply with
the new weights and the metrics. Whatever fails, in a handler or a mod, and any message but train
and evaluate, gets an error reply that names the kind of failure and a reference to this client's
log, never the error itself (`failures`): errors can carry the client's data.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from ..constants import (
    ARRAYS_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from ..modeling import release_freed_memory
from ..progress.callback import training_progress
from ..weights import get_weights
from .callbacks import OptimizerStateStore
from .failures import UnsupportedMessageError, failure_reply
from .session import Session, session_for

# Client-side halves of Flower's differential-privacy wrappers, by strategy name (any case, as
# `--strategy` takes it).
CLIENT_SIDE_DP_MODS = {
    "differentialprivacyclientsidefixedclipping": fixedclipping_mod,
    "differentialprivacyclientsideadaptiveclipping": adaptiveclipping_mod,
}
STRATEGY_RUN_CONFIG_KEY = "federation.strategy"
PROXIMAL_MU_KEY = "proximal-mu"  # what Flower's FedProx sends with each training message


def failures_as_replies(msg: Message, context: Context, call_next) -> Message:
    """Any failure of the mods and handlers inside, as this client's error reply (`failures`)."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every failure goes back to the server, by category
        return failure_reply(msg, context, err)


def replies_to_failures(handler):
    """`handler` with its failures as this client's error reply (`failures`), also where it runs
    without this ClientApp's mods (a ClientApp of its own that registers `train`)."""

    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        return failures_as_replies(msg, context, handler)

    return handle


def differential_privacy_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping mod, when the run's strategy is a client-side DP wrapper.

    Those wrappers only add noise on the server; the clipping they rely on happens here, on the
    update this client sends. Other strategies pass straight through.
    """
    mod = CLIENT_SIDE_DP_MODS.get(str(context.run_config.get(STRATEGY_RUN_CONFIG_KEY, "")).lower())
    if mod is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    return mod(msg, context, call_next)


def freed_memory_released(msg: Message, context: Context, call_next) -> Message:
    """Each message's handler, then the memory it freed given back to the system
    (`modeling.release_freed_memory`): a simulated client idles between its rounds, and what glibc
    would keep of a round's activations adds to the machine's peak while the others train."""
    try:
        return call_next(msg, context)
    finally:
        release_freed_memory()


# `failures_as_replies` first: it wraps the others.
app = ClientApp(mods=[failures_as_replies, freed_memory_released, differential_privacy_mod])

# Optimizer state of each node, per rank, for multi-rank clients: `Context.state` reaches rank 0
# only, and every rank must continue from the same moments.
_RANK_LOCAL_STATE: dict[int, RecordDict] = {}


def optimizer_store(session: Session, context: Context) -> OptimizerStateStore | None:
    """Where this node keeps its optimizer state between rounds (`--keep_optimizer_state`)."""
    if not session.driver.federation.keep_optimizer_state:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return OptimizerStateStore(_RANK_LOCAL_STATE.setdefault(context.node_id, RecordDict()))
    return OptimizerStateStore(context.state)


def received_weights(msg: Message) -> ArrayRecord:
    """The message's weights, taken out of it: once in the model, a second copy would only add to
    training's peak memory (91 MB for MiniLM)."""
    arrays = msg.content[ARRAYS_KEY]
    del msg.content[ARRAYS_KEY]
    return arrays


def _reply(msg: Message, context: Context, arrays: ArrayRecord | None, metrics: dict) -> Message:
    partition_id = context.node_config.get(PARTITION_ID_KEY, 0)
    content = RecordDict(
        {METRICS_KEY: MetricRecord(metrics), CLIENT_KEY: ConfigRecord({PARTITION_ID_KEY: int(partition_id)})}
    )
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
@replies_to_failures
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train locally, reply with the new weights and train metrics."""
    session = session_for(msg, context)
    config = msg.content[CONFIG_KEY]
    server_round = int(config[SERVER_ROUND_KEY])
    progress = training_progress(context, server_round)
    metrics = session.driver.train(
        received_weights(msg),
        server_round,
        proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
        deadline=msg.metadata.created_at + msg.metadata.ttl,
        optimizer_store=optimizer_store(session, context),
        callbacks=(progress,) if progress is not None else (),
    )
    arrays = get_weights(session.driver.trainer.model, session.driver.federation.transfer_dtype)
    return _reply(msg, context, arrays, metrics)


@app.evaluate()
@replies_to_failures
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on this client's held-out split."""
    session = session_for(msg, context)
    return _reply(msg, context, None, session.driver.evaluate(received_weights(msg)))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Query messages get an error reply: this client reports nothing outside train and evaluate."""
    raise UnsupportedMessageError(f"this client answers no {msg.metadata.message_type!r} messages")
