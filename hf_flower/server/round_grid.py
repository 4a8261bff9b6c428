"""The Grid the strategy runs on: every message of a round sent, and every reply taken through one
pipeline before the strategy sees it.

`TrackingGrid` wraps the ServerApp's `Grid` without touching the strategy. For each exchange it
casts the outgoing weights to `--transfer_dtype`, sends the messages through `transport.exchange`
(weights by id, packed, polled, expiring with the round) or Flower's own `send_and_receive`, and
hands each reply to `replies.RoundReplies` (receive -> validate -> cap -> clip -> average ->
record). It also bounds the strategy's wait for clients (`ClientsMissingError`). What it records of a round
(`replies.RoundStats`) is what `rounds.py` writes into the run's history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from ..constants import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND_KEY
from ..progress.live import ReplyBoard
from ..transport.exchange import Exchange
from ..transport.wire import cast_arrays
from .replies import RoundReplies, RoundRules, RoundStats


class ClientsMissingError(RuntimeError):
    """Too few clients connected within `--wait_for_clients_timeout` for the strategy to sample a round."""


class TrackingGrid(Grid):
    """A `Grid` that sends a round's messages and hands the strategy only what `RoundReplies` let through.

    Every reply is checked as it arrives; one that fails, or cannot even be read, counts as that
    client's failure, named in the round's record, and the strategy never sees it (`replies.py`).
    Outgoing weights are cast to the run's `--transfer_dtype`.

    The strategy waits for clients by polling `get_node_ids` (Flower's `sample_nodes`, once a
    second, without end): here that wait ends after `wait_for_clients_timeout` seconds with a
    `ClientsMissingError`. Each wait has its own deadline, from its first poll.

    Messages travel through `transport.exchange.Exchange`: weights a node already holds are sent
    by id only, the rest packed for long-lived clients, replies polled for often, and every
    message expires with its round. Without `fast_transport` they take Flower's own public path
    instead (`Grid.send_and_receive` of the grid wrapped), the fallback when a Flower release
    breaks the fast one; replies go through the same pipeline.
    """

    def __init__(
        self,
        grid: Grid,
        rules: RoundRules,
        wait_for_clients_timeout: float = 600.0,
        clients_wanted: int = 0,
        fast_transport: bool = True,
    ):
        self._grid = grid
        self.rules = rules
        self._fast_transport = fast_transport
        self._wait_for_clients_timeout = wait_for_clients_timeout
        self._clients_wanted = clients_wanted
        # When the strategy's current wait for clients began (its first `get_node_ids` since the
        # last `send_and_receive`); None between waits.
        self._waiting_since: float | None = None
        self.rounds: dict[int, RoundStats] = {}
        # How messages travel: weights by id or packed, polling, the round's deadline.
        self._exchange = Exchange(grid)
        # Who was asked and who answered, for a launcher on this machine (`progress.live`).
        self.reply_board = ReplyBoard.from_env()

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
        replies = RoundReplies(messages, self.rules, stats, self._exchange, self.reply_board)
        deadline = self._exchange.round_deadline(server_round, timeout)
        if self._fast_transport:
            sent, received = self._exchange.push_and_pull(messages, deadline, replies.receive)
        else:
            sent, received = messages, self._send_and_receive_plainly(messages, deadline, replies.receive)
        return replies.finish(server_round, sent, received)

    def _send_and_receive_plainly(self, messages: list[Message], deadline: float, receive) -> list[Message]:
        """Flower's own `send_and_receive` until `deadline`; `receive(reply)` sees each reply."""
        remaining = None if math.isinf(deadline) else max(deadline - time.monotonic(), 0.0)
        replies = list(self._grid.send_and_receive(messages, timeout=remaining))
        for reply in replies:
            receive(reply)
        return replies

    def _cast_outgoing(self, messages: list[Message]) -> None:
        """Weights in `--transfer_dtype` for the wire; messages sharing one record share its cast."""
        dtype = self.rules.expected.transfer_dtype
        if dtype == "float32":
            return
        cast: dict[int, ArrayRecord] = {}
        for message in messages:
            arrays = message.content.array_records.get(ARRAYS_KEY)
            if arrays is not None:
                if id(arrays) not in cast:
                    cast[id(arrays)] = cast_arrays(arrays, dtype)
                message.content[ARRAYS_KEY] = cast[id(arrays)]
