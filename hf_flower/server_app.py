"""The Flower ServerApp: a strategy from `flwr.serverapp.strategy`, central evaluation, round checkpoints.

Flower's `strategy.start` drives the rounds. We add two things around it without touching the
strategy: a `TrackingGrid` that sees every message of a round (clients, failures, bytes) and
checks replies before aggregation, and an `evaluate_fn` (`RoundCheckpointer`) that, at the end of
every round (after any differential-privacy noise), evaluates the aggregate on the server's test
split and saves it. `RoundCheckpointer` is the one place a round is written: the folder (weights,
tokenizer, strategy state, model card and plot), history.json, TensorBoard, and the Hub push.
With `--resume`, the strategy continues after the latest saved round (`ResumedStrategy`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from transformers import Trainer, set_seed

from . import adapters, checkpoint, data, hub, live_progress, model_card, progress, resume, run_lock, wire
from .arguments import RunArguments, from_run_config, to_run_config
from .constants import (
    ARRAYS_HELD_KEY,
    ARRAYS_ID_KEY,
    ARRAYS_KEY,
    ARRAYS_NOT_HELD_CODE,
    CLIENT_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from .modeling import load_tokenizer
from .preflight import check_run, partition_sizes
from .strategies import (
    ResumedStrategy,
    averages_replies,
    build_strategy,
    get_strategy_state,
    nodes_waited_for,
    set_strategy_state,
)
from .tasks import RunFacts, Task, get_task
from .tracking import RoundTracker
from .validation import ExampleCap, ExpectedReply, validate_reply
from .weights import (
    RunningMean,
    arrays_nbytes,
    arrays_to_state_dict,
    cast_arrays,
    get_weights,
    set_weights,
    to_float32_arrays,
    trainable_state_dict,
)

app = ServerApp()
# How often the server asks the SuperLink for replies while a round runs.
REPLY_POLL_SECONDS = 0.2
# The shortest life a message gets (Flower refuses a ttl of 0) when its round is already over.
MIN_TTL_SECONDS = 1.0


class RoundFailedError(RuntimeError):
    """Too few clients succeeded in a round to continue."""


class ClientsMissingError(RuntimeError):
    """Too few clients connected within `--wait_for_clients_timeout` for the strategy to sample a round."""


class HubPushError(RuntimeError):
    """Rounds were trained and saved, but pushing some of them to the Hub failed."""


@dataclasses.dataclass
class RoundStats:
    """What the grid saw of one round: who was asked, who answered, what failed, bytes moved, and
    `notes` on replies used with a change (a capped example count)."""

    sampled: dict[str, int] = dataclasses.field(default_factory=dict)
    succeeded: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
    clients: dict[str, list] = dataclasses.field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


class TrackingGrid(Grid):
    """A `Grid` that records each round's replies and refuses rounds with too few good replies.

    Every reply is checked as it arrives (`validation.validate_reply`: records, weights, metrics,
    example count); one that fails, or cannot even be read, counts as that client's failure, named
    in the round's record, and the strategy never sees it. The example counts of the replies kept
    are capped (`validation.ExampleCap`) before the strategy or the running mean weighs them, and
    training weights are upcast to float32, so strategies always average float32. Outgoing weights
    are cast to `expected.transfer_dtype`.

    The strategy waits for clients by polling `get_node_ids` (Flower's `sample_nodes`, once a
    second, without end): here that wait ends after `wait_for_clients_timeout` seconds with a
    `ClientsMissingError`. Each wait has its own deadline, from its first poll.

    Weights a node already holds do not travel again: a long-lived client (`scripts/client.py`)
    keeps the last weights it received and says so in its reply, and the next message to it that
    carries the same weights (the evaluate message of round N and the train message of round N+1
    both carry aggregate N) names them by id instead. A node that no longer holds them answers
    `ARRAYS_NOT_HELD_CODE` and gets the full message. Weights that do travel to such a client go
    as one flat array (`wire.pack`), far fewer objects for Flower to move.

    With `average_on_arrival` (strategies that start from FedAvg's weighted mean), training
    replies are folded into a running mean as they arrive and the strategy gets one reply holding
    it: the server's memory stays one model however many clients a round samples.
    """

    def __init__(
        self,
        grid: Grid,
        expected: ExpectedReply,
        min_train_clients: int,
        average_on_arrival: bool = False,
        example_cap: ExampleCap | None = None,
        wait_for_clients_timeout: float = 600.0,
        clients_wanted: int = 0,
    ):
        self._grid = grid
        self._average_on_arrival = average_on_arrival
        self._expected = expected
        self._min_train_clients = min_train_clients
        self._transfer_dtype = expected.transfer_dtype
        self._example_cap = example_cap or ExampleCap()
        self._wait_for_clients_timeout = wait_for_clients_timeout
        self._clients_wanted = clients_wanted
        # When the strategy's current wait for clients began (its first `get_node_ids` since the
        # last `send_and_receive`); None between waits.
        self._waiting_since: float | None = None
        self.rounds: dict[int, RoundStats] = {}
        # round -> when it ends (`_round_deadline`).
        self._round_deadlines: dict[int, float] = {}
        # node id -> object id of the weights that node said it holds.
        self._held: dict[int, str] = {}
        # object id -> the wire records of the weights packed last (`wire.packed_records`).
        self._packed: dict[str, dict | None] = {}
        # Who was asked and who answered, for a launcher on this machine (`live_progress`).
        self.reply_board = live_progress.ReplyBoard.from_env()

    # Plain delegation of the Grid interface.
    def set_run(self, run):
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes; raises `ClientsMissingError` when the strategy has been polling
        for more than `wait_for_clients_timeout` seconds without sending a message."""
        nodes = list(self._grid.get_node_ids())
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since > self._wait_for_clients_timeout:
            raise ClientsMissingError(
                f"Waited {self._wait_for_clients_timeout:g} s for clients: {len(nodes)} connected, the "
                f"strategy waits for {self._clients_wanted or 'more'} (--min_available_clients, "
                "--min_train_clients, --min_evaluate_clients). Start more clients (SuperNodes), check that "
                "they reach the SuperLink (address, TLS certificate, --authorized_keys), or lower those "
                "minimums; --wait_for_clients_timeout sets how long to wait."
            )
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._waiting_since = None  # the strategy stopped waiting for clients: it sends
        if not messages:
            return []
        kind = messages[0].metadata.message_type
        server_round = int(messages[0].content[CONFIG_KEY][SERVER_ROUND_KEY])
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.sampled[kind] = len(messages)
        self.reply_board.start(server_round, kind, messages)
        self._cast_outgoing(messages)
        sent_weights = self._sent_weights(kind, messages)
        average = RunningMean() if kind == MessageType.TRAIN and self._average_on_arrival else None
        floor = self._example_cap.floor(kind)
        rejected: dict[str, str] = {}

        def receive(reply: Message) -> None:
            """Each reply as it arrives: its bytes counted and the reply validated; training weights
            then folded into the running mean (the reply keeps its metrics; a count that the round's
            cap may lower waits for the round), or upcast to float32 for the strategy."""
            self.reply_board.reply(reply)
            if reply.has_error():
                return
            try:
                stats.bytes_received += _message_nbytes(reply)
                validate_reply(kind, reply.content, self._expected, sent_weights)
            except Exception as err:  # noqa: BLE001 - whatever a reply raises is its client's failure
                rejected[reply.metadata.reply_to_message_id] = f"its reply was rejected: {err}"
                return
            if kind != MessageType.TRAIN:
                return
            if average is None:
                reply.content[ARRAYS_KEY] = to_float32_arrays(reply.content[ARRAYS_KEY])
            elif floor is not None and _examples(reply) <= floor:
                average.add(reply.content[ARRAYS_KEY], _examples(reply))
                del reply.content[ARRAYS_KEY]

        deadline = self._round_deadline(server_round, timeout)
        sent, replies = self._push_and_pull(messages, deadline, receive)
        stats.bytes_sent += sum(_message_nbytes(m) for m in sent)
        good = self._check_replies(kind, server_round, sent, replies, rejected, stats)
        self._cap_examples(kind, server_round, good, stats)
        if kind == MessageType.EVALUATE:
            _keep_shared_metrics(server_round, good)
        stats.succeeded[kind] = len(good)
        self.reply_board.finish(good, stats.failures)
        if good:
            stats.metrics[kind] = dict(aggregate_metricrecords([r.content for r in good], NUM_EXAMPLES_KEY))
        stats.clients[kind] = [_client_summary(r) for r in good]
        if kind == MessageType.TRAIN and len(good) < self._min_train_clients:
            raise RoundFailedError(
                f"Round {server_round}: {len(good)} of {len(messages)} clients trained successfully, fewer "
                f"than min_train_clients={self._min_train_clients}.\n" + "\n".join(stats.failures)
            )
        if average is not None and good:
            for reply in good:  # the claims held back for the round's cap, now capped
                if ARRAYS_KEY in reply.content.array_records:
                    average.add(reply.content[ARRAYS_KEY], _examples(reply))
                    del reply.content[ARRAYS_KEY]
            # One reply holding the mean aggregates like all of them (`strategies.averages_replies`).
            metrics = MetricRecord({**stats.metrics[kind], NUM_EXAMPLES_KEY: average.total_weight})
            mean = RecordDict({ARRAYS_KEY: average.mean(), METRICS_KEY: metrics})
            return [Message(mean, reply_to=sent[0])]
        return good

    def _sent_weights(self, kind: str, messages: list[Message]) -> dict | None:
        """The weights this round's training messages carry, as clients decode them, when
        `--max_update_norm` measures updates from them (Flower's strategies send every node the
        same weights)."""
        arrays = messages[0].content.array_records.get(ARRAYS_KEY)
        if kind != MessageType.TRAIN or not self._expected.max_update_norm or arrays is None:
            return None
        return arrays_to_state_dict(arrays, self._expected.reference)

    def _cap_examples(self, kind: str, server_round: int, good: list[Message], stats: RoundStats) -> None:
        """Lower, in place, every kept reply's example count above the round's cap; log and note each."""
        if not good:
            return
        limit = self._example_cap.limit(kind, [_examples(reply) for reply in good])
        for reply in good:
            count = _examples(reply)
            if count <= limit:
                continue
            reply.content[METRICS_KEY][NUM_EXAMPLES_KEY] = limit
            note = (
                f"round {server_round} {kind}: node {reply.metadata.src_node_id} ({_partition(reply)}): "
                f"{NUM_EXAMPLES_KEY} {count} capped to {limit} ({self._example_cap.describe(kind)})"
            )
            stats.notes.append(note)
            log(WARNING, "%s", note)

    def _round_deadline(self, server_round: int, timeout: float | None) -> float:
        """The `time.monotonic()` by which round `server_round` ends: `timeout` (`--round_timeout`)
        after its first exchange, so training and federated evaluation share it."""
        if timeout is None:
            return math.inf
        return self._round_deadlines.setdefault(server_round, time.monotonic() + timeout)

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

    def _outgoing(self, message: Message, by_reference: bool) -> Message:
        """`message` with its weights named by id, and left out if its node holds them already.

        The strategy gives every node the same `RecordDict`, so each gets its own copy here.
        """
        arrays = message.content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            return message
        node = message.metadata.dst_node_id
        arrays_id = arrays.object_id  # Flower computes it once per record and caches it
        content = RecordDict(dict(message.content))
        content[CONFIG_KEY] = ConfigRecord({**message.content[CONFIG_KEY], ARRAYS_ID_KEY: arrays_id})
        if by_reference and self._held.get(node) == arrays_id:
            del content[ARRAYS_KEY]
        elif node in self._held:  # a long-lived client: it unpacks
            if arrays_id not in self._packed:  # pack each aggregate once, not once per client
                self._packed = {arrays_id: wire.packed_records(arrays)}
            if self._packed[arrays_id] is not None:
                wire.pack(content, self._packed[arrays_id])
        return Message(
            content=content,
            dst_node_id=node,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
            ttl=message.metadata.ttl,
            dst_task_id=message.metadata.dst_task_id,
        )

    def _push_and_pull(
        self, messages: list[Message], deadline: float, receive
    ) -> tuple[list[Message], list[Message]]:
        """Push `messages`, then pull their replies every `REPLY_POLL_SECONDS` until all are in.

        Returns the messages as sent and the replies; `receive(reply)` sees each as it arrives. A node that answers it no longer holds the
        weights it was sent by id gets them in full at once. (Flower's own `send_and_receive`
        sleeps 3 s between pulls: on average 1.5 s lost twice a round.)
        """
        sent: dict[str, Message] = {}
        originals: dict[str, Message] = {}

        def push(batch: list[Message], by_reference: bool) -> None:
            outgoing = [self._outgoing(m, by_reference) for m in batch]
            for message in outgoing:
                _expire_at(message, deadline)
            for message_id, message, original in zip(self._grid.push_messages(outgoing), outgoing, batch):
                if message_id:
                    sent[message_id], originals[message_id] = message, original

        push(messages, by_reference=True)
        pending = set(sent)
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            resend = []
            for reply in self._grid.pull_messages(pending):
                answered = reply.metadata.reply_to_message_id
                pending.discard(answered)
                if _is_not_held(reply):
                    del sent[answered]
                    resend.append(originals[answered])
                else:
                    receive(reply)
                    replies.append(reply)
            if resend:
                log(INFO, "Resending the weights to %s node(s) that no longer hold them", len(resend))
                known = set(sent)
                push(resend, by_reference=False)
                pending.update(set(sent) - known)
            if pending:
                time.sleep(REPLY_POLL_SECONDS)
        return list(sent.values()), replies

    def _check_replies(self, kind, server_round, messages, replies, rejected, stats) -> list[Message]:
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
            elif reply.metadata.reply_to_message_id in rejected:
                failure = f"node {node} ({_partition(reply)}): {rejected[reply.metadata.reply_to_message_id]}"
            else:
                self._remember_held(node, reply)
                good.append(reply)
                continue
            self._held.pop(node, None)  # what a failed or refused reply says is not believed
            stats.failures.append(f"round {server_round} {kind}: {failure}")
            log(WARNING, "Round %s %s: %s", server_round, kind, failure)
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                self._held.pop(message.metadata.dst_node_id, None)
                failure = f"node {message.metadata.dst_node_id}: no reply within the round timeout"
                stats.failures.append(f"round {server_round} {kind}: {failure}")
                log(WARNING, "Round %s %s: %s", server_round, kind, failure)
        return good

    def _remember_held(self, node: int, reply: Message) -> None:
        client = reply.content.config_records.get(CLIENT_KEY) if reply.has_content() else None
        if client is not None and ARRAYS_HELD_KEY in client:
            self._held[node] = str(client[ARRAYS_HELD_KEY])
        else:
            self._held.pop(node, None)


def _expire_at(message: Message, deadline: float) -> None:
    """Make `message` expire when its round ends (`deadline`, a `time.monotonic()` value): the
    SuperLink then drops it, and a client stops working on it (`client_app.TaskDeadline`)."""
    remaining = deadline - time.monotonic()
    if math.isfinite(remaining):
        age = time.time() - message.metadata.created_at
        message.metadata.ttl = min(message.metadata.ttl, age + max(remaining, MIN_TTL_SECONDS))


def _is_not_held(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == ARRAYS_NOT_HELD_CODE


def _message_nbytes(message: Message) -> int:
    return sum(arrays_nbytes(record) for record in message.content.array_records.values())


def _partition(reply: Message) -> str:
    """The partition a reply says it comes from, for messages: any reply, valid or not."""
    client = reply.content.config_records.get(CLIENT_KEY)
    partition = client.get(PARTITION_ID_KEY) if client is not None else None
    return f"partition {partition}" if type(partition) is int else "partition unknown"


def _examples(reply: Message) -> int:
    """A validated reply's example count."""
    return int(reply.content[METRICS_KEY][NUM_EXAMPLES_KEY])


def _keep_shared_metrics(server_round: int, replies: list[Message]) -> None:
    """Drop, in place, evaluation metrics that not every kept reply reports (e.g. `eval_label_accuracy`,
    which depends on a client's data): Flower's strategies aggregate only replies with one set of
    metric names, and a mean over some clients would pass for the round's."""
    shared = set.intersection(*(set(reply.content[METRICS_KEY]) for reply in replies)) if replies else set()
    dropped = set()
    for reply in replies:
        metrics = reply.content[METRICS_KEY]
        for name in [name for name in metrics if name not in shared]:
            dropped.add(name)
            del metrics[name]
    if dropped:
        log(INFO, "Round %s evaluate: %s not reported by every client", server_round, sorted(dropped))


def _client_summary(reply: Message) -> dict:
    client = reply.content.config_records.get(CLIENT_KEY, ConfigRecord())
    metrics = next(iter(reply.content.metric_records.values()))
    return {"node_id": reply.metadata.src_node_id, **dict(client), **dict(metrics)}


def partition_counts(run_args: RunArguments) -> list[tuple[int, int]]:
    """The (train, eval) example counts a client of each of the run's partitions reports."""
    eval_size = run_args.data.client_eval_size
    return [data.client_split_sizes(size, eval_size) for size in partition_sizes(run_args)]


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op threads set to `count` inside the block (None: left as they are)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RoundCheckpointer:
    """`evaluate_fn` of `strategy.start`: central evaluation, then the round saved, logged and pushed.

    With `--evaluate_in_background` (the default) that work runs on a background worker, one round
    after the other, while the strategy goes on with the next round: the clients never wait for
    the server's evaluation. Each round's record (clients, metrics, bytes) is taken when the round
    ends, so the history is the same either way.

    `resume_point` is the round a resumed run continues from: `strategy.start` counts from 0
    again, so its round `r` is round `resume_point.round + r`, and its round 0 (the weights of the
    resumed round, already saved) is not saved again.
    """

    def __init__(
        self,
        run_args: RunArguments,
        task: Task,
        facts: RunFacts,
        model,
        tokenizer,
        test_set,
        grid: TrackingGrid,
        strategy=None,
        resume_point: resume.ResumePoint | None = None,
        pusher: hub.RoundPusher | None = None,
    ):
        self.run_args = run_args
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.facts = facts
        self.test_set = test_set
        self.grid = grid
        self.strategy = strategy
        self.pusher = pusher
        self.first_round = resume_point.round if resume_point else 0
        self.history = {
            "status": "running",
            "error": None,
            "num_rounds": run_args.federation.num_rounds,
            "run_config": to_run_config(run_args),
            "facts": dict(facts),
            "rounds": list(resume_point.rounds) if resume_point else [],
        }
        if resume_point:
            self.history["resumed_after"] = resume_point.round
        eval_args = dataclasses.replace(
            run_args.training, output_dir=tempfile.mkdtemp(prefix="hf-flower-server-"), report_to="none"
        )
        self.trainer = Trainer(
            model=model,
            args=eval_args,
            data_collator=task.data_collator(tokenizer),
            processing_class=tokenizer,
            compute_metrics=task.compute_metrics(facts),
        )
        self.output_dir = run_args.training.output_dir
        self.tracker = RoundTracker(self.output_dir, run_args.training.report_to)
        self.round_started = time.time()
        # One worker, so rounds are evaluated and written in order.
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="round-checkpointer")
        self.pending: list[concurrent.futures.Future] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate and save the round, or with `--evaluate_in_background` hand it to the worker
        and return at once (an earlier round's failure on the worker is raised here)."""
        server_round += self.first_round
        if self.first_round and server_round == self.first_round:
            return None  # the resumed round: evaluated and saved by the interrupted run
        self._raise_failed()
        # What describes the round is read now, on the strategy's thread, before it moves on.
        stats = self.grid.rounds.get(server_round, RoundStats())
        record = {
            "round": server_round,
            # The federated part; when the server evaluates in between, its evaluation is added.
            "seconds": round(time.time() - self.round_started, 2),
            "clients": {
                "train_sampled": stats.sampled.get(MessageType.TRAIN, 0),
                "train_succeeded": stats.succeeded.get(MessageType.TRAIN, 0),
                "evaluate_sampled": stats.sampled.get(MessageType.EVALUATE, 0),
                "evaluate_succeeded": stats.succeeded.get(MessageType.EVALUATE, 0),
            },
            "train": stats.metrics.get(MessageType.TRAIN, {}),
            "evaluate": stats.metrics.get(MessageType.EVALUATE, {}),
            "central": {},
            "client_results": stats.clients,
            "failures": list(stats.failures),
            "notes": list(stats.notes),
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
        }
        strategy_state = get_strategy_state(self.strategy) if self.strategy is not None else None
        central = None
        if self.run_args.federation.evaluate_in_background:
            self.pending.append(
                self.worker.submit(self._finish_round, record, arrays, strategy_state, beside_clients=True)
            )
        else:
            central = self._finish_round(record, arrays, strategy_state)
        self.round_started = time.time()
        # Flower's own result history gets the central metrics when they exist by now.
        return MetricRecord({k: v for k, v in central.items() if k.startswith("eval_")}) if central else None

    def _finish_round(self, record: dict, arrays: ArrayRecord, strategy_state, beside_clients=False) -> dict:
        """Central evaluation, then the round saved, logged and pushed (`beside_clients`: on the
        worker, while the next round trains). Returns the central metrics."""
        set_weights(self.model, arrays)
        if record["round"] > 0 or self.run_args.federation.evaluate_initial_model:
            # Beside training clients, one thread: torch's default would take every core they
            # use (2 threads beside 2 clients on 2 cores made rounds 55-66 s instead of 49 s).
            last = record["round"] >= self.run_args.federation.num_rounds
            with torch_threads(1 if beside_clients and not last else None):
                record["central"] = self.task.evaluate(self.trainer, self.test_set, self.run_args)
            if not beside_clients:
                record["seconds"] = round(record["seconds"] + record["central"].get("eval_runtime", 0.0), 2)
        server_round = record["round"]
        rounds = [*self.history["rounds"], record]
        folder = checkpoint.save_round(
            self.output_dir,
            server_round,
            lambda folder: self._write_round(folder, rounds, strategy_state),
            record,
        )
        self.history["rounds"] = rounds
        checkpoint.write_history(self.output_dir, self.history)
        self.tracker.log_round(record)
        if self.pusher is not None and self.run_args.hub.hub_strategy == "every_round":
            self.pusher.submit(server_round, folder)
        log(INFO, "%s", progress.format_round(record, self.run_args.federation.num_rounds))
        return record["central"]

    def _raise_failed(self) -> None:
        """Re-raise, on the strategy's thread, the error of a round the worker could not finish."""
        for future in [f for f in self.pending if f.done()]:
            self.pending.remove(future)
            future.result()

    def _write_round(self, folder, rounds: list[dict], strategy_state) -> None:
        """Everything of a round but metrics.json, inside `save_round`'s atomic folder."""
        adapters.save_model(self.model, self.tokenizer, folder, self.run_args.peft.save_merged)
        if strategy_state is not None:
            checkpoint.write_strategy_state(folder, *strategy_state)
        model_card.write_card(folder, self.run_args, self.task, self.facts, rounds)

    def finish(self, error: BaseException | None) -> BaseException | None:
        """Wait for the last rounds and uploads; record how the run ended, and the best round, in
        history.json.

        Returns the error to raise that the strategy did not see: a round the worker could not
        finish, or pushes that failed when the user did not allow it.
        """
        worker_error = None
        for future in self.pending:  # the rounds still on the worker, in order
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - the first failure becomes the run's error
                worker_error = worker_error or err
        error = error or worker_error
        self.pending.clear()
        self.worker.shutdown()
        push_error = None
        rounds = self.history["rounds"]
        if self.pusher is not None:
            if self.run_args.hub.hub_strategy == "end" and error is None and rounds:
                last = rounds[-1]["round"]
                self.pusher.submit(last, checkpoint.round_dir(self.output_dir, last))
            failures = self.pusher.wait()
            self.history["hub"] = {
                "repo_id": self.pusher.repo_id,
                "pushed": sorted(self.pusher.pushed),
                "failed": {str(k): v for k, v in sorted(failures.items())},
            }
            if failures:
                push_error = HubPushError(
                    f"pushing round(s) {sorted(failures)} to {self.pusher.repo_id} failed (the rounds are "
                    f"kept in {self.output_dir}; push them with scripts/push.py): "
                    + "; ".join(f"round {k}: {v}" for k, v in sorted(failures.items()))
                )
                log(ERROR, "%s", push_error)
                if self.run_args.hub.hub_allow_push_failure:
                    push_error = None
        error = error or push_error
        self.history["status"] = "failed" if error else "completed"
        self.history["error"] = f"{type(error).__name__}: {error}" if error else None
        self.history["best_round"] = checkpoint.best_round(
            self.history, f"central.{self.task.best_metric}", self.task.greater_is_better
        )
        try:
            checkpoint.write_history(self.output_dir, self.history)
        except OSError as write_error:  # e.g. a full disk
            if error is None:
                raise
            # The run's own error is what the user must see: report it first, and let it propagate.
            log(ERROR, "The run failed: %s: %s", type(error).__name__, error)
            log(ERROR, "Recording that in %s failed too: %s", checkpoint.HISTORY_FILE, write_error)
        self.tracker.close()
        return worker_error or push_error


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num_rounds` of the configured strategy and save every aggregated round."""
    run_args = from_run_config(context.run_config)
    # Under a launcher its lock covers this run; started by `flwr run .`, the run locks the folder.
    run_lock.hold_for_process(run_args.training.output_dir)
    task = get_task(run_args.model.task)
    facts = check_run(run_args, prepare_output=True)
    set_seed(run_args.training.seed)
    tokenizer = load_tokenizer(run_args.model)
    model = task.load_model(run_args, facts)
    test_set = task.central_test_set(run_args, tokenizer, facts)
    federation = run_args.federation
    strategy = build_strategy(federation)
    # The trainable part only, in float32: what the strategy averages (the frozen rest never moves).
    initial_arrays = get_weights(model, "float32")
    tracking_grid = TrackingGrid(
        grid,
        ExpectedReply.for_run(run_args, task, trainable_state_dict(model)),
        federation.min_train_clients,
        average_on_arrival=averages_replies(strategy),
        example_cap=ExampleCap.for_run(federation.max_examples_per_client, partition_counts(run_args)),
        wait_for_clients_timeout=federation.wait_for_clients_timeout,
        clients_wanted=nodes_waited_for(strategy),
    )
    resume_point = None
    if federation.resume:
        resume_point = resume.find_resume_point(run_args.training.output_dir)
        initial_arrays = resume.load_round_arrays(resume_point.folder, model, task.auto_model_class())
        state = checkpoint.read_strategy_state(resume_point.folder)
        if state is not None:
            set_strategy_state(strategy, *state)
        log(INFO, "Resuming after round %s from %s", resume_point.round, resume_point.folder)
    pusher = None
    if run_args.hub.push_to_hub:
        repo_id = hub.check_push_access(run_args.hub.hub_model_id)
        hub.create_repo(repo_id, private=run_args.hub.hub_private)
        pusher = hub.RoundPusher(repo_id)
    checkpointer = RoundCheckpointer(
        run_args, task, facts, model, tokenizer, test_set, tracking_grid, strategy, resume_point, pusher
    )
    done = resume_point.round if resume_point else 0
    # Flower counts rounds from 1: a resumed run runs the remaining rounds, renumbered.
    runner = ResumedStrategy(strategy, done) if resume_point else strategy
    error = None
    try:
        runner.start(
            grid=tracking_grid,
            initial_arrays=initial_arrays,
            num_rounds=federation.num_rounds - done,
            timeout=federation.round_timeout,
            # The run's facts (e.g. its classes) travel with every message: clients build their
            # model from them.
            train_config=ConfigRecord(dict(facts)),
            evaluate_config=ConfigRecord(dict(facts)),
            evaluate_fn=checkpointer,
        )
    except BaseException as err:
        error = err
        raise
    finally:
        unseen_error = checkpointer.finish(error)
    if unseen_error is not None:
        raise unseen_error
