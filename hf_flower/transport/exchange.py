"""The server's half of the fast exchange: a round's messages pushed, their replies pulled.

What replaces Flower's `Grid.send_and_receive` for `round_grid.TrackingGrid`:

- weights a node already holds do not travel again: a long-lived client (`scripts/client.py`,
  `client_loop.HeldWeights`) keeps the last weights it received and says so in its reply, and
  the next message to it that carries the same weights (the evaluate message of round N and the
  train message of round N+1 both carry aggregate N) names them by id instead. A node that no
  longer holds them answers `ARRAYS_NOT_HELD_CODE` and gets the full message at once (once: the
  same answer to a full message is that node's failure);
- weights that do travel to such a client go as one flat array (`wire.pack`), far fewer objects
  for Flower to move, packed once per aggregate; rows of the new aggregate that equal the one the
  client holds stay out (`wire.pack_arrays`), and a client that does not hold it says so (below);
- replies are pulled every `REPLY_POLL_SECONDS` (Flower's own loop sleeps 3 s between pulls),
  and their weights as they arrive (`flwr_compat.retry_object_pulls_sooner`);
- a round has one deadline (`--round_timeout` after its first exchange), and every message
  expires with it, so the SuperLink drops it and a client stops working on it.
"""

from __future__ import annotations

import math
import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..constants import (
    ARRAYS_HELD_KEY,
    ARRAYS_ID_KEY,
    ARRAYS_KEY,
    ARRAYS_NOT_HELD_CODE,
    CLIENT_KEY,
    CONFIG_KEY,
)
from . import wire
from .flwr_compat import retry_object_pulls_sooner

# How often the server asks the SuperLink for replies while a round runs.
REPLY_POLL_SECONDS = 0.2
# The shortest life a message gets (Flower refuses a ttl of 0) when its round is already over.
MIN_TTL_SECONDS = 1.0


class Exchange:
    """Pushes a round's messages through `grid` and pulls their replies, sending each node's
    weights by id when it holds them and packed otherwise (see the module docstring)."""

    def __init__(self, grid: Grid):
        self._grid = grid
        # round -> when it ends (`round_deadline`).
        self._round_deadlines: dict[int, float] = {}
        # node id -> object id of the weights that node said it holds.
        self._held: dict[int, str] = {}
        # object id -> weights sent that some node may hold: what rows sent to it complete.
        self._sent: dict[str, ArrayRecord] = {}
        # (object id, id of the base its rows complete, or None) -> the wire records of the
        # weights packed last (`wire.packed_records`).
        self._packed: dict[tuple[str, str | None], dict | None] = {}

    def round_deadline(self, server_round: int, timeout: float | None) -> float:
        """The `time.monotonic()` by which round `server_round` ends: `timeout` (`--round_timeout`)
        after its first exchange, so training and federated evaluation share it."""
        if timeout is None:
            return math.inf
        return self._round_deadlines.setdefault(server_round, time.monotonic() + timeout)

    def push_and_pull(
        self, messages: list[Message], deadline: float, receive
    ) -> tuple[list[Message], list[Message]]:
        """Push `messages`, then pull their replies every `REPLY_POLL_SECONDS` until all are in.

        Returns the messages as sent and the replies; `receive(reply)` sees each as it arrives.
        A node that answers it no longer holds the weights it was sent by id gets them in full at
        once, and only once: the same answer to weights sent in full is that node's failure, not
        another resend (a node that always answered so got the full weights every 0.2 s until the
        deadline). (Flower's own `send_and_receive`
        sleeps 3 s between pulls: on average 1.5 s lost twice a round.)
        """
        # A reply is listed before its sender has pushed its weights: pull them as they arrive
        # (once per process; `--fast_transport false` leaves Flower's pulls as they are).
        retry_object_pulls_sooner("serverapp")
        sent: dict[str, Message] = {}
        originals: dict[str, Message] = {}
        in_full: set[str] = set()  # ids of messages resent with their weights in full

        def push(batch: list[Message], by_reference: bool) -> None:
            outgoing = [self._outgoing(m, by_reference) for m in batch]
            for message in outgoing:
                _expire_at(message, deadline)
            for message_id, message, original in zip(self._grid.push_messages(outgoing), outgoing, batch):
                if message_id:
                    sent[message_id], originals[message_id] = message, original
                    if not by_reference:
                        in_full.add(message_id)

        push(messages, by_reference=True)
        pending = set(sent)
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            resend = []
            for reply in self._grid.pull_messages(pending):
                answered = reply.metadata.reply_to_message_id
                pending.discard(answered)
                if _is_not_held(reply) and answered not in in_full:
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

    def _outgoing(self, message: Message, by_reference: bool) -> Message:
        """`message` with its weights named by id, and left out if its node holds them already.

        The strategy gives every node the same `RecordDict`, so each gets its own copy here.
        """
        arrays = message.content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            return message
        node = message.metadata.dst_node_id
        arrays_id = arrays.object_id  # Flower computes it once per record and caches it
        self._remember_sent(arrays_id, arrays)
        content = RecordDict(dict(message.content))
        content[CONFIG_KEY] = ConfigRecord({**message.content[CONFIG_KEY], ARRAYS_ID_KEY: arrays_id})
        held = self._held.get(node)
        if by_reference and held == arrays_id:
            del content[ARRAYS_KEY]
        elif held is not None:  # a long-lived client: it unpacks, and completes rows from `held`
            base_id = held if by_reference and held in self._sent else None
            key = (arrays_id, base_id)
            if key not in self._packed:  # pack each aggregate once per base, not once per client
                self._packed = {k: v for k, v in self._packed.items() if k[0] == arrays_id}
                self._packed[key] = wire.packed_records(arrays, base_id, self._sent.get(base_id))
            if self._packed[key] is not None:
                wire.pack(content, self._packed[key])
        return Message(
            content=content,
            dst_node_id=node,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
            ttl=message.metadata.ttl,
            dst_task_id=message.metadata.dst_task_id,
        )

    def _remember_sent(self, arrays_id: str, arrays: ArrayRecord) -> None:
        """Keep `arrays` as a base for rows, and only the weights some node may still hold."""
        self._sent[arrays_id] = arrays
        keep = {arrays_id, *self._held.values()}
        self._sent = {k: v for k, v in self._sent.items() if k in keep}

    def remember_held(self, node: int, reply: Message) -> None:
        """Note the weights `node` says, in an accepted reply, that it holds (or that it holds none)."""
        client = reply.content.config_records.get(CLIENT_KEY) if reply.has_content() else None
        if client is not None and ARRAYS_HELD_KEY in client:
            self._held[node] = str(client[ARRAYS_HELD_KEY])
        else:
            self._held.pop(node, None)

    def forget(self, node: int) -> None:
        """Send `node` its weights in full from now on: what a failed or refused reply says of
        the weights it holds is not believed."""
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
