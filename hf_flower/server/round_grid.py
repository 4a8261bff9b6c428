"""The Grid the strategy runs on: each round's replies validated, accounted for and checked
against the round's minimum before the strategy sees them.

`TrackingGrid` wraps the ServerApp's `Grid` without touching the strategy: it sees every message
of a round (who was asked, who answered, what failed, bytes moved), passes each reply through
`validation.validate_reply`, caps example counts, keeps the evaluation metrics every client
reports, and raises `RoundFailedError` when too few clients trained. How messages travel (weights
by id, packed, polled, expiring with the round) is `transport.exchange`; averaging replies as they
arrive is `transport.averaging`. What it records of a round (`RoundStats`) is what `rounds.py`
writes into the run's history.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..constants import (
    ARRAYS_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from ..progress import live as live_progress
from ..transport.averaging import RunningMean
from ..transport.exchange import Exchange
from ..transport.flwr_compat import aggregate_metricrecords
from ..transport.wire import cast_arrays, to_float32_arrays
from ..weights import arrays_nbytes, arrays_to_state_dict
from .validation import ExampleCap, ExpectedReply, validate_reply


class RoundFailedError(RuntimeError):
    """Too few clients succeeded in a round to continue."""


class ClientsMissingError(RuntimeError):
    """Too few clients connected within `--wait_for_clients_timeout` for the strategy to sample a round."""


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

    Messages travel through `transport.exchange.Exchange`: weights a node already holds are sent
    by id only, the rest packed for long-lived clients, replies polled for often, and every
    message expires with its round. Without `fast_transport` they take Flower's own public path
    instead (`Grid.send_and_receive` of the grid wrapped), the fallback when a Flower release
    breaks the fast one; replies are checked and counted the same way.

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
        fast_transport: bool = True,
    ):
        self._grid = grid
        self._fast_transport = fast_transport
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
        # How messages travel: weights by id or packed, polling, the round's deadline.
        self._exchange = Exchange(grid)
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
        # What a training reply's rows sent alone complete (`wire.pack_arrays`): the weights as
        # sent, by id (evaluate replies carry no weights).
        sent_arrays = {
            m.content[ARRAYS_KEY].object_id: m.content[ARRAYS_KEY]
            for m in messages
            if kind == MessageType.TRAIN and ARRAYS_KEY in m.content.array_records
        }
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
                validate_reply(kind, reply.content, self._expected, sent_weights, sent_arrays)
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

        deadline = self._exchange.round_deadline(server_round, timeout)
        if self._fast_transport:
            sent, replies = self._exchange.push_and_pull(messages, deadline, receive)
        else:
            sent, replies = messages, self._send_and_receive_plainly(messages, deadline, receive)
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
            # One reply holding the mean aggregates like all of them (`averaging.averages_replies`).
            metrics = MetricRecord({**stats.metrics[kind], NUM_EXAMPLES_KEY: average.total_weight})
            mean = RecordDict({ARRAYS_KEY: average.mean(), METRICS_KEY: metrics})
            return [Message(mean, reply_to=sent[0])]
        return good

    def _send_and_receive_plainly(self, messages: list[Message], deadline: float, receive) -> list[Message]:
        """Flower's own `send_and_receive` until `deadline`; `receive(reply)` sees each reply."""
        remaining = None if math.isinf(deadline) else max(deadline - time.monotonic(), 0.0)
        replies = list(self._grid.send_and_receive(messages, timeout=remaining))
        for reply in replies:
            receive(reply)
        return replies

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

    def _check_replies(self, kind, server_round, messages, replies, rejected, stats) -> list[Message]:
        # An error the SuperLink makes for an unreachable node is not sent by that node: name the
        # node through the instruction it answers (the grid set each instruction's message_id).
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

        def fail(node: int, failure: str) -> None:
            self._exchange.forget(node)  # what a failed or refused reply says is not believed
            stats.failures.append(f"round {server_round} {kind}: {failure}")
            log(WARNING, "Round %s %s: %s", server_round, kind, failure)

        good = []
        answered = set()
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                fail(node, f"node {node}: {reply.error.reason}")
            elif reply.metadata.reply_to_message_id in rejected:
                fail(
                    node, f"node {node} ({_partition(reply)}): {rejected[reply.metadata.reply_to_message_id]}"
                )
            else:
                self._exchange.remember_held(node, reply)
                good.append(reply)
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in answered:
                fail(node, f"node {node}: no reply within the round timeout")
        return good


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
