"""What a failing client tells the server: the kind of failure and a reference, never its data.

A client's errors can carry its data: a label check names the labels it found, a column check the
columns of its file, a traceback the paths of its machine. The server chooses the run config and
every message, so it could make a client fail on purpose and read its data back from the errors
(issue 22: a private column, 10 values per refusal). So the reply says only which kind of failure
it was (`Category`: one fixed text per kind), in which stage and round, and a reference; the full
error and its traceback go to the client's own log under that reference (`logger`, and the
`--work_dir` file `log_to` adds), where its operator finds them.

In a simulation the operator is every client (`ClientPolicy.operators_run`): there the reply is the
error itself and its traceback, as the operator's own.
"""

from __future__ import annotations

import enum
import logging
import traceback
import uuid
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, MessageType

from ..adapters import AdapterError
from ..arguments.policy import ClientPolicy, RunRefused
from ..constants import CONFIG_KEY, PARTITION_ID_KEY, SERVER_ROUND_KEY
from ..data.columns import DataError
from ..factory import FactoryError
from ..modeling import ModelError
from ..offline_models import OfflineModelError
from ..transport.client_loop import UnreadableWeightsError
from ..transport.flwr_compat import ErrorCode
from ..weights import NonFiniteWeightsError, WeightsMismatchError, WeightsOutOfRangeError
from .callbacks import TaskExpiredError

logger = logging.getLogger(__name__)

# What the ClientApp does with each kind of message it answers.
STAGES = {MessageType.TRAIN: "training", MessageType.EVALUATE: "evaluation"}


class UnsupportedMessageError(ValueError):
    """A message of a kind this client does not answer (a `query`, an action it has no handler for)."""


class Category(enum.Enum):
    """The kinds of failure a client reports, each with the one text the server gets for it."""

    REFUSED = "refused-by-policy", "the run asks for something this client's operator does not allow"
    DATA = "data-does-not-fit-the-run", "this client's data does not fit the run's data settings"
    MODEL = (
        "model-mismatch",
        "this client cannot build the run's model, or built another one than the server's",
    )
    WEIGHTS = "weights-do-not-fit", "the weights the server sent do not fit this client's model"
    OUT_OF_MEMORY = "out-of-memory", "this client ran out of memory"
    ROUND_ENDED = (
        "round-ended",
        "the round ended (its message expired) before this client finished: raise --round_timeout, or "
        "give clients less local work",
    )
    UNSUPPORTED = "unsupported-message", "this client answers only train and evaluate messages"
    MALFORMED = "malformed-message", "this client cannot read the message"
    INTERNAL = "internal-error", "an unexpected error on this client"

    def __init__(self, label: str, text: str):
        self.label, self.text = label, text


# Exception classes -> category, most specific first (`category_of`).
CATEGORIES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Category], ...] = (
    (RunRefused, Category.REFUSED),
    (DataError, Category.DATA),
    ((torch.OutOfMemoryError, MemoryError), Category.OUT_OF_MEMORY),
    (TaskExpiredError, Category.ROUND_ENDED),
    (UnsupportedMessageError, Category.UNSUPPORTED),
    (UnreadableWeightsError, Category.MALFORMED),
    ((WeightsMismatchError, NonFiniteWeightsError, WeightsOutOfRangeError), Category.WEIGHTS),
    ((FactoryError, ModelError, AdapterError, OfflineModelError), Category.MODEL),
)


def category_of(err: BaseException, message: Message | None = None) -> Category:
    """The kind of failure `err` is; any message but train and evaluate is unsupported."""
    if message is not None and message.metadata.message_type not in STAGES:
        return Category.UNSUPPORTED
    for kinds, category in CATEGORIES:
        if isinstance(err, kinds):
            return category
    return Category.INTERNAL


def failure_reply(message: Message, context: Context, err: BaseException) -> Message:
    """The reply to `message` that failed with `err`: the stage, the round, the category and a
    reference to the client's log, where `err` and its traceback are written (`log_failure`)."""
    stage = STAGES.get(
        message.metadata.message_type, f"a {str(message.metadata.message_type)[:40]!r} message"
    )
    where = f"client partition {context.node_config.get(PARTITION_ID_KEY, '?')} failed during {stage} of round {_round(message)}"
    category = category_of(err, message)
    reference = log_failure(where, category, err)
    if ClientPolicy.from_env().operators_run:  # a simulation: the server is this client's operator
        reason = f"{where}: {type(err).__name__}: {err}\n{''.join(traceback.format_exception(err, limit=8))}"
    else:
        reason = f"{where}: {category.label}: {category.text} (reference {reference} in this client's log)"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def log_failure(where: str, category: Category, err: BaseException) -> str:
    """Write `err` (with its traceback) to this client's log; return the reference the server gets."""
    reference = uuid.uuid4().hex[:12]
    logger.error(
        "%s: %s (reference %s): %s: %s\n%s",
        where,
        category.label,
        reference,
        type(err).__name__,
        err,
        "".join(traceback.format_exception(err)),
    )
    return reference


def log_to(path: Path) -> None:
    """Also write failures to `path` (a long-lived client's `--work_dir`), where its operator looks."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.addHandler(logging.StreamHandler())  # and to the client's terminal, as before
    logger.setLevel(logging.INFO)


def _round(message: Message) -> str:
    """The message's round as a number, or "?" (a failing message may carry anything)."""
    try:
        return str(int(message.content[CONFIG_KEY][SERVER_ROUND_KEY]))
    except Exception:  # noqa: BLE001 - no config, no round, not a number
        return "?"
