"""One exchange's replies, from arrival to what the strategy gets: receive -> validate -> cap ->
clip -> average -> record.

`RoundReplies` is built for one `send_and_receive` of the round grid and sees each reply once, in
order:

1. `receive(reply)`, as it arrives: its bytes counted, the reply validated (`validation.validate_reply`;
   a reply that fails is that client's failure, named, and nothing else reads it), its update's norm
   measured, training weights upcast to float32 for the strategy or folded into a running mean
   (`transport.averaging`);
2. `finish(sent, replies)`, once the exchange is over: failures and silent nodes named (a client's
   own words only through `progress.lines.printable`), example counts capped (`validation.ExampleCap`),
   updates clipped (`validation.UpdateClip`), metrics kept to the names every reply reports, the
   round recorded (`RoundStats`), too few trainers refused (`RoundFailedError`), and, when replies
   were averaged on arrival, the one reply holding the mean handed to the strategy.

Caps and clipping depend on the whole round (its median count and median update norm), while
averaging on arrival folds a reply in and drops its weights. The two meet through bounds that only
rise: a reply is folded at once when no way the round can still end would cap its count or clip its
update (`ExampleCap.never_capped`, `UpdateClip.never_clipped`, from the least the round's medians
can become); the others wait for the round and are folded capped and clipped. The result is exactly
that of capping and clipping every reply once the round is in. What waits: every reply until about
half of the round's have arrived (before, any of the rest may set the medians), then only replies
above the bounds so far, so a round holds at most about half its replies' weights at once, not all.
"""

from __future__ import annotations

import dataclasses
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log

from ..constants import ARRAYS_KEY, CLIENT_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PARTITION_ID_KEY
from ..progress.lines import printable
from ..progress.live import ReplyBoard
from ..transport.averaging import RunningMean, scaled_update
from ..transport.exchange import Exchange
from ..transport.flwr_compat import aggregate_metricrecords
from ..transport.wire import to_float32_arrays
from ..weights import arrays_nbytes, arrays_to_state_dict, update_norm
from .validation import ExampleCap, ExpectedReply, UpdateClip, validate_reply


class RoundFailedError(RuntimeError):
    """Too few clients succeeded in a round to continue."""


@dataclasses.dataclass
class RoundStats:
    """What the grid saw of one round: who was asked, who answered, what failed, bytes moved, and
    `notes` on replies used with a change (a capped example count, a clipped update)."""

    sampled: dict[str, int] = dataclasses.field(default_factory=dict)
    succeeded: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
    clients: dict[str, list] = dataclasses.field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclasses.dataclass
class RoundRules:
    """What every exchange of a run checks its replies against."""

    expected: ExpectedReply
    min_train_clients: int = 1
    example_cap: ExampleCap = dataclasses.field(default_factory=ExampleCap)
    # Fold training replies into a running mean as they arrive (strategies that start from FedAvg's
    # weighted mean): the server's memory stays one model however many clients a round samples.
    average_on_arrival: bool = False


class RoundReplies:
    """The replies to one exchange's `messages` (all of one kind and round), on their one way
    through the server."""

    def __init__(
        self,
        messages: list[Message],
        rules: RoundRules,
        stats: RoundStats,
        exchange: Exchange,
        board: ReplyBoard,
    ):
        self.kind = messages[0].metadata.message_type
        self.rules = rules
        self.stats = stats
        self.exchange = exchange
        self.board = board
        self.training = self.kind == MessageType.TRAIN
        # What a training reply's update is measured from (`--max_update_norm`,
        # `--update_clip_factor`), and what its rows sent alone complete (`wire.pack_arrays`): the
        # weights as sent, by id.
        self.sent_weights = self._sent_weights(messages)
        self.sent_arrays = {
            m.content[ARRAYS_KEY].object_id: m.content[ARRAYS_KEY]
            for m in messages
            if self.training and ARRAYS_KEY in m.content.array_records
        }
        self.mean = RunningMean() if self.training and rules.average_on_arrival else None
        self.clip = UpdateClip(rules.expected.update_clip_factor if self.sent_weights is not None else 0.0)
        self.rejected: dict[str, str] = {}  # reply_to message id -> why its reply was refused
        self.pending = len(messages)  # replies still to come
        # Of every valid reply, by the id of the message it answers: its (partition, count) claim
        # and, for training with clipping, its update's norm.
        self.claims: dict[str, tuple[int, int]] = {}
        self.norms: dict[str, float] = {}
        self.held: list[Message] = []  # valid training replies waiting for the round to fold

    def _sent_weights(self, messages: list[Message]) -> dict | None:
        """The weights this round's training messages carry, as clients decode them, when
        `--max_update_norm` or `--update_clip_factor` measure updates from them (Flower's
        strategies send every node the same weights)."""
        expected = self.rules.expected
        arrays = messages[0].content.array_records.get(ARRAYS_KEY)
        if not self.training or not expected.measures_updates or arrays is None:
            return None
        return arrays_to_state_dict(arrays, expected.reference)

    def receive(self, reply: Message) -> None:
        """A reply as it arrives: its bytes counted and validated, its update measured; training
        weights then folded into the running mean when neither the round's cap nor its clipping can
        change them (the reply keeps its metrics), held for the round otherwise, or upcast to
        float32 for the strategy."""
        self.board.reply(reply)
        self.pending -= 1
        if reply.has_error():
            return
        key = reply.metadata.reply_to_message_id
        try:
            self.stats.bytes_received += message_nbytes(reply)
            validate_reply(self.kind, reply.content, self.rules.expected, self.sent_weights, self.sent_arrays)
            if self.clip.factor:
                self.norms[key] = update_norm(reply.content[ARRAYS_KEY], self.sent_weights)
        except Exception as err:  # noqa: BLE001 - whatever a reply raises is its client's failure
            self.rejected[key] = f"its reply was rejected: {printable(str(err))}"
            return
        self.claims[key] = (reply.content[CLIENT_KEY][PARTITION_ID_KEY], examples(reply))
        if not self.training:
            return
        if self.mean is None:
            reply.content[ARRAYS_KEY] = to_float32_arrays(reply.content[ARRAYS_KEY])
        else:
            self.held.append(reply)
            self._fold_unchangeable()

    def _fold_unchangeable(self) -> None:
        """Fold every held reply that no way the round can still end would cap or clip."""
        cap, counts, norms = (
            self.rules.example_cap,
            [c for _, c in self.claims.values()],
            list(self.norms.values()),
        )
        still_held = []
        for reply in self.held:
            key = reply.metadata.reply_to_message_id
            if cap.never_capped(self.kind, self.claims[key], counts, self.pending) and (
                key not in self.norms or self.clip.never_clipped(self.norms[key], norms, self.pending)
            ):
                self._fold(reply)
            else:
                still_held.append(reply)
        self.held = still_held

    def _fold(self, reply: Message, scale: float = 1.0) -> None:
        self.mean.add(reply.content[ARRAYS_KEY], examples(reply), scale, self.sent_weights)
        del reply.content[ARRAYS_KEY]

    def finish(self, server_round: int, sent: list[Message], replies: list[Message]) -> list[Message]:
        """What the strategy gets of the exchange, once every reply arrived or the round timed out."""
        stats = self.stats
        stats.bytes_sent += sum(message_nbytes(m) for m in sent)
        good = self._accepted(server_round, sent, replies)
        self._cap_examples(server_round, good)
        scales = self._clip_updates(server_round, good) if self.training else {}
        if self.kind == MessageType.EVALUATE:
            keep_shared_metrics(server_round, good)
        stats.succeeded[self.kind] = len(good)
        self.board.finish(good, stats.failures)
        if good:
            stats.metrics[self.kind] = dict(
                aggregate_metricrecords([r.content for r in good], NUM_EXAMPLES_KEY)
            )
        stats.clients[self.kind] = [
            client_summary(r, self.norms.get(r.metadata.reply_to_message_id)) for r in good
        ]
        if self.training and len(good) < self.rules.min_train_clients:
            raise RoundFailedError(
                f"Round {server_round}: {len(good)} of {len(sent)} clients trained successfully, fewer "
                f"than min_train_clients={self.rules.min_train_clients}.\n" + "\n".join(stats.failures)
            )
        if self.mean is None or not good:
            return good
        for reply in good:  # the replies held back for the round, now capped and clipped
            if ARRAYS_KEY in reply.content.array_records:
                self._fold(reply, scales.get(reply.metadata.reply_to_message_id, 1.0))
        # One reply holding the mean aggregates like all of them (`averaging.averages_replies`).
        metrics = MetricRecord({**stats.metrics[self.kind], NUM_EXAMPLES_KEY: self.mean.total_weight})
        return [Message(RecordDict({ARRAYS_KEY: self.mean.mean(), METRICS_KEY: metrics}), reply_to=sent[0])]

    def _accepted(self, server_round: int, sent: list[Message], replies: list[Message]) -> list[Message]:
        """The replies that passed; every other reply, and every node that sent none, is a failure."""
        # An error the SuperLink makes for an unreachable node is not sent by that node: name the
        # node through the instruction it answers (the grid set each instruction's message_id).
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}

        def fail(node: int, failure: str) -> None:
            self.exchange.forget(node)  # what a failed or refused reply says is not believed
            self.stats.failures.append(f"round {server_round} {self.kind}: {failure}")
            log(WARNING, "Round %s %s: %s", server_round, self.kind, failure)

        good, answered = [], set()
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                fail(node, f"node {node}: {printable(reply.error.reason)}")
            elif reply.metadata.reply_to_message_id in self.rejected:
                fail(
                    node,
                    f"node {node} ({partition_of(reply)}): {self.rejected[reply.metadata.reply_to_message_id]}",
                )
            else:
                self.exchange.remember_held(node, reply)
                good.append(reply)
        for message in sent:
            node = message.metadata.dst_node_id
            if node not in answered:
                fail(node, f"node {node}: no reply within the round timeout")
        return good

    def _cap_examples(self, server_round: int, good: list[Message]) -> None:
        """Lower, in place, every kept reply's example count above the round's cap; log and note each."""
        if not good:
            return
        cap = self.rules.example_cap
        limits = cap.limits(self.kind, [self.claims[r.metadata.reply_to_message_id] for r in good])
        for reply, limit in zip(good, limits):
            count = examples(reply)
            if count <= limit:
                continue
            reply.content[METRICS_KEY][NUM_EXAMPLES_KEY] = limit
            note = (
                f"round {server_round} {self.kind}: node {reply.metadata.src_node_id} ({partition_of(reply)}): "
                f"{NUM_EXAMPLES_KEY} {count} capped to {limit} ({cap.describe(self.kind)})"
            )
            self.stats.notes.append(note)
            log(WARNING, "%s", note)

    def _clip_updates(self, server_round: int, good: list[Message]) -> dict[str, float]:
        """The share each kept training reply's update is shortened to (`UpdateClip`), by the id of
        the message it answers: only those above the round's limit, each logged and noted. Replies
        the strategy gets whole are clipped in place; held ones are folded clipped by `finish`."""
        if not self.clip.factor:
            return {}
        norms = {r.metadata.reply_to_message_id: self.norms[r.metadata.reply_to_message_id] for r in good}
        limit = self.clip.limit(list(norms.values()))
        if limit is None:
            return {}
        scales = {}
        for reply in good:
            key = reply.metadata.reply_to_message_id
            if norms[key] <= limit:
                continue
            scales[key] = limit / norms[key]
            if self.mean is None:
                reply.content[ARRAYS_KEY] = scaled_update(
                    reply.content[ARRAYS_KEY], self.sent_weights, scales[key]
                )
            note = (
                f"round {server_round} {self.kind}: node {reply.metadata.src_node_id} ({partition_of(reply)}): "
                f"update norm {norms[key]:.4g} clipped to {limit:.4g} ({self.clip.factor:g}x the round's median "
                "update norm; --update_clip_factor)"
            )
            self.stats.notes.append(note)
            log(WARNING, "%s", note)
        return scales


def message_nbytes(message: Message) -> int:
    return sum(arrays_nbytes(record) for record in message.content.array_records.values())


def partition_of(reply: Message) -> str:
    """The partition a reply says it comes from, for messages: any reply, valid or not."""
    client = reply.content.config_records.get(CLIENT_KEY)
    partition = client.get(PARTITION_ID_KEY) if client is not None else None
    return f"partition {partition}" if type(partition) is int else "partition unknown"


def examples(reply: Message) -> int:
    """A validated reply's example count."""
    return int(reply.content[METRICS_KEY][NUM_EXAMPLES_KEY])


def keep_shared_metrics(server_round: int, replies: list[Message]) -> None:
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


def client_summary(reply: Message, norm: float | None = None) -> dict:
    """What the round's record keeps of a kept reply: who sent it, its metrics and, for training
    with `--update_clip_factor`, the norm of its update as sent (before any clipping)."""
    client = reply.content.config_records.get(CLIENT_KEY, ConfigRecord())
    metrics = next(iter(reply.content.metric_records.values()))
    summary = {"node_id": reply.metadata.src_node_id, **dict(client), **dict(metrics)}
    if norm is not None:
        summary["update_norm"] = norm
    return summary
