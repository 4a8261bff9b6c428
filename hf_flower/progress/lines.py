"""How a run reports itself to a person: one line per round and a closing summary."""

from __future__ import annotations

import re

MEGABYTE = 1e6
# The longest text of a client's (an error reply's reason) that a run logs, shows or stores.
MAX_REASON_CHARS = 500


def _metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "  -   "


# The evaluation metric a round's line shows: the first of these that the run reports.
SUMMARY_METRICS = (("eval_accuracy", "acc"), ("eval_exact_match", "em"), ("eval_loss", "loss"))


def _summary_metric(record: dict) -> tuple[str, str]:
    for key, short in SUMMARY_METRICS:
        if any(key in record.get(group, {}) for group in ("central", "evaluate")):
            return key, short
    return SUMMARY_METRICS[0]


def format_round(record: dict, num_rounds: int) -> str:
    """`round 2/3 | clients 2/2 | train_loss ... | eval_acc ... | central_acc ... | 41.2 s | 182.4 MB`
    (`eval_em`/`central_em`, or the losses, for tasks without accuracy)."""
    clients = record.get("clients", {})
    megabytes = (record.get("bytes_sent", 0) + record.get("bytes_received", 0)) / MEGABYTE
    key, short = _summary_metric(record)
    return (
        f"round {record['round']}/{num_rounds}"
        f" | clients {clients.get('train_succeeded', 0)}/{clients.get('train_sampled', 0)}"
        f" | train_loss {_metric(record.get('train', {}).get('train_loss'))}"
        f" | eval_{short} {_metric(record.get('evaluate', {}).get(key))}"
        f" | central_{short} {_metric(record.get('central', {}).get(key))}"
        f" | {record.get('seconds', 0):.1f} s"
        f" | {megabytes:.1f} MB"
    )


def format_summary(history: dict, output_dir: str) -> str:
    """The closing lines: status, best and last round with their folders."""
    rounds = history.get("rounds", [])
    lines = [f"status: {history.get('status')}"]
    if history.get("error"):
        lines.append(f"error: {history['error']}")
    if rounds:
        last = rounds[-1]["round"]
        best = history.get("best_round")
        best_record = next((r for r in rounds if r["round"] == best), None)
        if best_record is not None:
            key, short = _summary_metric(best_record)
            value = _metric(best_record.get("central", {}).get(key))
            lines.append(f"best round: {best} (central_{short} {value}) -> {output_dir}/round-{best}")
        lines.append(f"last round: {last} -> {output_dir}/round-{last}")
    pushed = history.get("hub")
    if pushed:
        lines.append(f"hub: rounds {pushed['pushed']} pushed to {pushed['repo_id']}")
        if pushed.get("failed"):
            lines.append(
                f"hub: pushing rounds {sorted(int(k) for k in pushed['failed'])} FAILED (kept locally)"
            )
    return "\n".join(lines)


def printable(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A client's words (an error reply's reason), safe to log, show on a terminal and store: terminal
    escape sequences and other control characters removed (newlines become spaces), at most `limit`
    characters. A client chooses its reason; unbounded, 100 MB of it went into history.json, and its
    escape codes drove the server's terminal."""
    text = _ESCAPE_SEQUENCE.sub("", str(text)[: 4 * limit])
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ANSI escape sequences (CSI, OSC, and two-character ones), then any C0/C1 control character, DEL,
# or Unicode bidirectional override (which reorders what a terminal shows).
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]+")
