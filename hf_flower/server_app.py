"""The Flower ServerApp: a strategy from `flwr.serverapp.strategy`, central evaluation, round checkpoints.

Flower's `strategy.start` drives the rounds. We add two things around it without touching the
strategy: a `TrackingGrid` that sees every message of a round (clients, failures, bytes) and
checks replies before aggregation, and an `evaluate_fn` that, at the end of every round (after any
differential-privacy noise), evaluates the aggregate on the server's test split and saves it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from transformers import DataCollatorWithPadding, Trainer, set_seed

from . import adapters, checkpoint, progress
from . import data as data_lib
from .arguments import RunArguments, from_run_config, to_run_config
from .constants import (
    ARRAYS_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from .metrics import make_compute_metrics
from .modeling import load_model, load_tokenizer
from .preflight import check_run
from .strategies import build_strategy
from .weights import (
    arrays_nbytes,
    cast_arrays,
    get_weights,
    set_weights,
    to_float32_arrays,
    trainable_state_dict,
    validate_arrays,
)

app = ServerApp()
# How often the server asks the SuperLink for replies while a round runs.
REPLY_POLL_SECONDS = 0.2


class RoundFailedError(RuntimeError):
    """Too few clients succeeded in a round to continue."""


@dataclasses.dataclass
class RoundStats:
    """What the grid saw of one round: who was asked, who answered, what failed, bytes moved."""

    sampled: dict[str, int] = dataclasses.field(default_factory=dict)
    succeeded: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
    clients: dict[str, list] = dataclasses.field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


class TrackingGrid(Grid):
    """A `Grid` that records each round's replies and refuses rounds with too few good replies.

    It is also where weights cross the wire: outgoing weights are cast to `transfer_dtype`, and
    training replies are checked against the model's trainable part (names, shapes, finite
    values), then upcast to float32, before the strategy sees them, so strategies always average
    float32. A bad reply counts as that client's failure.
    """

    def __init__(
        self, grid: Grid, reference_state_dict: dict, min_train_clients: int, transfer_dtype: str = "float32"
    ):
        self._grid = grid
        self._reference = reference_state_dict
        self._min_train_clients = min_train_clients
        self._transfer_dtype = transfer_dtype
        self.rounds: dict[int, RoundStats] = {}

    # Plain delegation of the Grid interface.
    def set_run(self, run):
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        kind = messages[0].metadata.message_type
        server_round = int(messages[0].content[CONFIG_KEY][SERVER_ROUND_KEY])
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.sampled[kind] = len(messages)
        self._cast_outgoing(messages)
        stats.bytes_sent += sum(_message_nbytes(m) for m in messages)
        replies = self._push_and_pull(messages, timeout)
        stats.bytes_received += sum(_message_nbytes(r) for r in replies if r.has_content())
        good = self._check_replies(kind, server_round, messages, replies, stats)
        stats.succeeded[kind] = len(good)
        if good:
            stats.metrics[kind] = dict(aggregate_metricrecords([r.content for r in good], NUM_EXAMPLES_KEY))
        stats.clients[kind] = [_client_summary(r) for r in good]
        if kind == MessageType.TRAIN and len(good) < self._min_train_clients:
            raise RoundFailedError(
                f"Round {server_round}: {len(good)} of {len(messages)} clients trained successfully, fewer "
                f"than min_train_clients={self._min_train_clients}.\n" + "\n".join(stats.failures)
            )
        return good

    def _cast_outgoing(self, messages: list[Message]) -> None:
        """Weights in `transfer_dtype` for the wire; messages sharing one record share its cast."""
        if self._transfer_dtype == "float32":
            return
        cast: dict[int, ArrayRecord] = {}
        for message in messages:
            arrays = message.content.array_records.get(ARRAYS_KEY)
            if arrays is not None:
                if id(arrays) not in cast:
                    cast[id(arrays)] = cast_arrays(arrays, self._transfer_dtype)
                message.content[ARRAYS_KEY] = cast[id(arrays)]

    def _push_and_pull(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Flower's `send_and_receive`, polling for replies every `REPLY_POLL_SECONDS`.

        Flower's own loop sleeps 3 s between pulls: on average 1.5 s lost twice a round.
        """
        pending = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            pulled = list(self._grid.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if pending:
                time.sleep(REPLY_POLL_SECONDS)
        return replies

    def _check_replies(self, kind, server_round, messages, replies, stats) -> list[Message]:
        # An error the SuperLink makes for an unreachable node is not sent by that node: name the
        # node through the instruction it answers (the grid set each instruction's message_id).
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        good = []
        answered = set()
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                failure = f"node {node}: {reply.error.reason}"
            elif kind == MessageType.TRAIN:
                try:
                    validate_arrays(reply.content[ARRAYS_KEY], self._reference)
                    reply.content[ARRAYS_KEY] = to_float32_arrays(reply.content[ARRAYS_KEY])
                    good.append(reply)
                    continue
                except (KeyError, ValueError) as err:
                    failure = f"node {node} ({_partition(reply)}): its update was rejected: {err}"
            else:
                good.append(reply)
                continue
            stats.failures.append(f"round {server_round} {kind}: {failure}")
            log(WARNING, "Round %s %s: %s", server_round, kind, failure)
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                failure = f"node {message.metadata.dst_node_id}: no reply within the round timeout"
                stats.failures.append(f"round {server_round} {kind}: {failure}")
                log(WARNING, "Round %s %s: %s", server_round, kind, failure)
        return good


def _message_nbytes(message: Message) -> int:
    return sum(arrays_nbytes(record) for record in message.content.array_records.values())


def _partition(reply: Message) -> str:
    client = reply.content.config_records.get(CLIENT_KEY)
    return f"partition {client[PARTITION_ID_KEY]}" if client else "partition unknown"


def _client_summary(reply: Message) -> dict:
    client = reply.content.config_records.get(CLIENT_KEY, ConfigRecord())
    metrics = next(iter(reply.content.metric_records.values()))
    return {"node_id": reply.metadata.src_node_id, **dict(client), **dict(metrics)}


class RoundCheckpointer:
    """`evaluate_fn` of `strategy.start`: central evaluation, then the round saved on disk."""

    def __init__(self, run_args: RunArguments, model, tokenizer, label_names, test_set, grid: TrackingGrid):
        self.run_args = run_args
        self.model = model
        self.tokenizer = tokenizer
        self.grid = grid
        self.history = {
            "status": "running",
            "error": None,
            "num_rounds": run_args.federation.num_rounds,
            "run_config": to_run_config(run_args),
            "rounds": [],
        }
        eval_args = dataclasses.replace(
            run_args.training, output_dir=tempfile.mkdtemp(prefix="hf-flower-server-"), report_to="none"
        )
        self.trainer = Trainer(
            model=model,
            args=eval_args,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=make_compute_metrics(len(label_names)),
            eval_dataset=test_set,
        )
        self.output_dir = run_args.training.output_dir
        self.round_started = time.time()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(self.model, arrays)
        central = {k: float(v) for k, v in self.trainer.evaluate().items() if isinstance(v, (int, float))}
        stats = self.grid.rounds.get(server_round, RoundStats())
        record = {
            "round": server_round,
            "seconds": round(time.time() - self.round_started, 2),
            "clients": {
                "train_sampled": stats.sampled.get(MessageType.TRAIN, 0),
                "train_succeeded": stats.succeeded.get(MessageType.TRAIN, 0),
                "evaluate_sampled": stats.sampled.get(MessageType.EVALUATE, 0),
                "evaluate_succeeded": stats.succeeded.get(MessageType.EVALUATE, 0),
            },
            "train": stats.metrics.get(MessageType.TRAIN, {}),
            "evaluate": stats.metrics.get(MessageType.EVALUATE, {}),
            "central": central,
            "client_results": stats.clients,
            "failures": stats.failures,
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
        }
        checkpoint.save_round(self.output_dir, server_round, self._write_model, record)
        self.history["rounds"].append(record)
        checkpoint.write_history(self.output_dir, self.history)
        log(INFO, "%s", progress.format_round(record, self.run_args.federation.num_rounds))
        self.round_started = time.time()
        return MetricRecord({k: v for k, v in central.items() if k.startswith("eval_")})

    def _write_model(self, folder) -> None:
        adapters.save_model(self.model, self.tokenizer, folder, self.run_args.peft.save_merged)

    def finish(self, error: BaseException | None) -> None:
        """Record how the run ended, and the best round, in history.json."""
        self.history["status"] = "failed" if error else "completed"
        self.history["error"] = f"{type(error).__name__}: {error}" if error else None
        self.history["best_round"] = checkpoint.best_round(self.history)
        checkpoint.write_history(self.output_dir, self.history)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num_rounds` of the configured strategy and save every aggregated round."""
    run_args = from_run_config(context.run_config)
    label_names = check_run(run_args, prepare_output=True)
    set_seed(run_args.training.seed)
    tokenizer = load_tokenizer(run_args.model)
    model = load_model(run_args.model, label_names, run_args.peft)
    test_set = data_lib.central_test_set(run_args.data, tokenizer, run_args.training.seed)
    federation = run_args.federation
    strategy = build_strategy(federation)
    # The trainable part only, in float32: what the strategy averages (the frozen rest never moves).
    initial_arrays = get_weights(model, "float32")
    tracking_grid = TrackingGrid(
        grid, trainable_state_dict(model), federation.min_train_clients, federation.transfer_dtype
    )
    checkpointer = RoundCheckpointer(run_args, model, tokenizer, label_names, test_set, tracking_grid)
    error = None
    try:
        strategy.start(
            grid=tracking_grid,
            initial_arrays=initial_arrays,
            num_rounds=federation.num_rounds,
            timeout=federation.round_timeout,
            evaluate_fn=checkpointer,
        )
    except BaseException as err:
        error = err
        raise
    finally:
        checkpointer.finish(error)
