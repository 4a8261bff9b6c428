"""What happens inside a round, shown while the launcher waits for it.

`ProgressView.poll` reads the files of `live_progress` (written by the ServerApp, and by the
clients where they run on this machine) and shows the newest round:

- on a terminal, tqdm bars: one for the replies of the current phase (train, then evaluate) and
  one per local client (steps, latest loss), cleared when the next round starts or the run ends;
- anywhere else (CI, a file), plain lines: one per client at most every 10% of its steps (or
  every 30 s), one at its last step, and one per reply as it arrives; no carriage returns or
  escape codes.

Failures (an error reply, a rejected update, a node that never answered) are always printed as
lines. The launcher's own lines (`RoundPrinter`) go through `write`, above any bars.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from . import live as live_progress
from .lines import SUMMARY_METRICS
from .live import (
    ERROR,
    MISSING,
    OK,
    REJECTED,
    ClientState,
    Phase,
    Reply,
    RoundProgress,
)

INDENT = "  "
CLIENT_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
REPLIES_BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} |{bar}| [{elapsed}{postfix}]"


def is_terminal(stream) -> bool:
    """Whether bars can be drawn on `stream`: a terminal with a width (a pseudo-terminal without
    one, as `script` opens when its own input is not a terminal, would show nothing; plain lines do)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError, OSError):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # terminal-like, without a descriptor (IDE consoles)
        return True


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _reply_detail(kind: str, reply: Reply) -> str:
    """The metrics worth a glance: the training loss and steps, or the run's evaluation metric
    (accuracy, exact match or loss: the one the round line shows)."""
    metrics = reply.metrics
    if kind == "train":
        parts = [f"train_loss {_loss(metrics.get('train_loss'))}"]
        if "train_steps" in metrics:
            parts.append(f"{int(metrics['train_steps'])} steps")
    else:
        key = next((key for key, _ in SUMMARY_METRICS if key in metrics), SUMMARY_METRICS[0][0])
        parts = [f"{key} {_loss(metrics.get(key))}"]
    return ", ".join(parts)


def _by_partition(progress: RoundProgress) -> list[ClientState]:
    return sorted(
        progress.clients.values(), key=lambda c: (c.partition_id is None, c.partition_id or 0, c.node_id)
    )


class ProgressView:
    """Clients' and server's progress inside the newest round, on `stream` (default stdout)."""

    def __init__(
        self,
        directory: Path | None,
        num_rounds: int,
        stream=None,
        plain_fraction: float = 0.1,
        plain_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.directory = directory
        self.num_rounds = num_rounds
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = is_terminal(self.stream)
        self.plain_fraction = plain_fraction
        self.plain_seconds = plain_seconds
        self.clock = clock
        self.bars: dict[object, tqdm] = {}
        self.bars_round: int | None = None
        self.printed: set[tuple] = set()  # reply lines already printed
        self.client_lines: dict[tuple[int, int], tuple[int, float, bool]] = {}  # step, time, done
        self.partitions: dict[int, int] = {}  # node id -> partition id, as clients and replies said
        self.shared: set[int] = set()  # partition ids more than one node gave (own-data clients: 0)

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, line: str) -> None:
        """A line that stays (a round's summary), printed above any bars."""
        if self.bars:
            tqdm.write(line, file=self.stream)
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)

    def poll(self) -> None:
        """Read the progress files once and show what changed."""
        rounds = live_progress.read_rounds(self.directory)
        if not rounds:
            return
        self._learn_partitions(rounds)
        if self.terminal:
            self._draw(rounds[max(rounds)])
            for progress in rounds.values():
                self._print_replies(progress, failures_only=True)
        else:
            for server_round in sorted(rounds):
                self._print_lines(rounds[server_round])

    def close(self) -> None:
        """Clear the bars (the lines printed stay)."""
        for bar in reversed(list(self.bars.values())):
            bar.close()
        self.bars.clear()
        self.stream.flush()

    def _learn_partitions(self, rounds: dict[int, RoundProgress]) -> None:
        """Error replies carry no partition: name their node by what it said in other messages."""
        for progress in rounds.values():
            for client in progress.clients.values():
                if client.partition_id is not None:
                    self.partitions[client.node_id] = client.partition_id
            for phase in progress.phases.values():
                for reply in phase.replies:
                    if reply.partition_id is not None:
                        self.partitions[reply.node_id] = reply.partition_id
        seen: set[int] = set()
        for partition_id in self.partitions.values():
            (self.shared if partition_id in seen else seen).add(partition_id)

    def _label(self, node_id: int) -> str:
        partition_id = self.partitions.get(node_id)
        if partition_id is None or partition_id in self.shared:
            return f"node {node_id}"
        return f"client {partition_id}"

    # Plain lines --------------------------------------------------------------------------

    def _head(self, progress: RoundProgress, node_id: int) -> str:
        return f"{INDENT}round {progress.round}/{self.num_rounds} {self._label(node_id)}"

    def _print_lines(self, progress: RoundProgress) -> None:
        for client in _by_partition(progress):
            if self._client_line_due(client):
                percent = f" ({100 * client.step // client.max_steps}%)" if client.max_steps else ""
                loss = f", loss {client.loss:.4f}" if client.loss is not None else ""
                self.write(
                    f"{self._head(progress, client.node_id)}: step {client.step}/{client.max_steps}{percent}{loss}"
                )
        self._print_replies(progress, failures_only=False)

    def _client_line_due(self, client: ClientState) -> bool:
        """Every `plain_fraction` of the steps or `plain_seconds`, and once at the end."""
        key = (client.round, client.node_id)
        step, at, done = self.client_lines.get(key, (0, float("-inf"), False))
        now = self.clock()
        finished = client.done or (client.max_steps > 0 and client.step >= client.max_steps)
        if client.step <= 0 or done or (client.step == step and not finished):
            return False
        if client.max_steps > 0:
            width = max(1, int(client.max_steps * self.plain_fraction))
            due = finished or client.step // width > step // width or now - at >= self.plain_seconds
        else:
            due = now - at >= self.plain_seconds
        if due:
            self.client_lines[key] = (client.step, now, finished)
        return due

    def _print_replies(self, progress: RoundProgress, failures_only: bool) -> None:
        for kind in live_progress.PHASES:
            phase = progress.phases.get(kind)
            if phase is None:
                continue
            arrived = 0
            for reply in phase.replies:
                arrived += reply.status != MISSING
                key = (progress.round, kind, reply.node_id, reply.status)
                if key in self.printed or (failures_only and reply.status == OK):
                    continue
                self.printed.add(key)
                self.write(self._reply_line(progress, phase, reply, arrived))

    def _reply_line(self, progress: RoundProgress, phase: Phase, reply: Reply, arrived: int) -> str:
        head = self._head(progress, reply.node_id)
        count = f"({arrived}/{phase.sampled})"
        if reply.status == OK:
            return f"{head}: replied to {phase.kind} {count}, {_reply_detail(phase.kind, reply)}"
        if reply.status == ERROR:
            return f"{head}: FAILED in {phase.kind} {count}: {reply.error}"
        if reply.status == REJECTED:
            return f"{head}: {phase.kind} update REJECTED: {reply.error or 'see logs/run.log'}"
        return f"{head}: no {phase.kind} reply ({reply.error or 'no reply'})"

    # Bars -----------------------------------------------------------------------------------

    def _bar(self, key, total: int | None, desc: str, bar_format: str) -> tqdm:
        bar = self.bars.get(key)
        if bar is None:
            bar = tqdm(
                total=total or None,
                desc=desc,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                bar_format=bar_format,
                mininterval=0,
                disable=False,
            )
            self.bars[key] = bar
        elif bar.desc != desc or (total and bar.total != total):
            bar.reset(total=total or None)
            bar.set_description_str(desc, refresh=False)
        return bar

    @staticmethod
    def _advance(bar: tqdm, n: int, postfix: str) -> None:
        if n >= bar.n:
            bar.update(n - bar.n)
        else:
            bar.n = n
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def _draw(self, progress: RoundProgress) -> None:
        if progress.round != self.bars_round:
            self.close()
            self.bars_round = progress.round
        head = f"round {progress.round}/{self.num_rounds}"
        phase = progress.phases.get("evaluate") or progress.phases.get("train")
        if phase is not None:
            bar = self._bar("replies", phase.sampled, f"{head} {phase.kind} replies", REPLIES_BAR_FORMAT)
            self._advance(bar, phase.arrived, f"{phase.failed} failed" if phase.failed else "")
        train = progress.phases.get("train")
        replied = {r.node_id for r in train.replies if r.status == OK} if train else set()
        for client in _by_partition(progress):
            desc = f"{head} {self._label(client.node_id)}"
            bar = self._bar(("client", client.node_id), client.max_steps, desc, CLIENT_BAR_FORMAT)
            postfix = ", ".join(
                ([f"loss={client.loss:.4f}"] if client.loss is not None else [])
                + (["replied"] if client.node_id in replied else [])
            )
            self._advance(bar, client.step, postfix)
