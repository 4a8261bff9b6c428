"""Every reply checked before anything uses it: record layout, weights, metrics, example counts.

A client's reply is untrusted input. `validate_reply` is the one gate: `round_grid.TrackingGrid`
calls it on every train and evaluate reply as it arrives, and a reply it refuses is that client's
failure (named in history.json), never the run's. What passes is exactly what an honest client of
this run sends (`client_app._reply`), so Flower's own reply-consistency check
(`InconsistentMessageReplies`) never fires and no strategy sees a value it cannot aggregate:

- records: train, one ArrayRecord `arrays` (or its packed form, `wire.py`), one MetricRecord
  `metrics` and the ConfigRecord `client`; evaluate, `metrics` and `client` only. `client` holds
  an integer `partition-id` and, from a long-lived client, the id of the weights it holds;
- weights (train): the names and shapes of the model's trainable part, exactly the run's
  `--transfer_dtype`, finite, every value within `MAX_WEIGHT_MAGNITUDE`, and with
  `--max_update_norm`, an update no longer than that;
- metrics: training, exactly the names a client's round driver reports; evaluation, `eval_*` names
  as a Trainer's `evaluate()` makes them (at most `MAX_EVAL_METRICS`), each a finite number, within
  `METRIC_RANGES` where a range exists;
- `num-examples`: a whole number of at least 1. How much it may weigh is `ExampleCap`'s decision.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord, MessageType, RecordDict

from ..arguments import FederationArguments
from ..constants import (
    ARRAYS_HELD_KEY,
    ARRAYS_KEY,
    CLIENT_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PACKED_ARRAYS_KEY,
    PACKED_LAYOUT_KEY,
    PARTITION_ID_KEY,
)
from ..transport import wire
from ..weights import (
    NonFiniteWeightsError,
    WeightsMismatchError,
    WeightsOutOfRangeError,
    update_norm,
    validate_arrays,
)
from .strategies import strategy_class

# What a client's training reply reports besides `num-examples` (`client.round_driver.RoundDriver.train`).
TRAIN_METRICS = ("train_loss", "train_runtime", "train_steps")
# An evaluation reply's metrics: what `Trainer.evaluate()` names them (its prefix, then the names of
# the user's `compute_metrics`), a bounded number of bounded names.
EVAL_METRIC_NAME = re.compile(r"eval_[A-Za-z0-9_.\-/]{1,120}")
MAX_EVAL_METRICS = 256
# Flower's client-side adaptive clipping mod adds this 0/1 flag to training replies
# (`flwr.clientapp.mod.adaptiveclipping_mod`); only that strategy's replies may carry it.
NORM_BIT_KEY = "norm_bit"
ADAPTIVE_CLIPPING_STRATEGY = "DifferentialPrivacyClientSideAdaptiveClipping"

# Valid values of the metrics clients report, by the end of their name: (lowest, highest).
METRIC_RANGES = {
    "loss": (0.0, math.inf),
    "runtime": (0.0, math.inf),
    "steps": (0.0, math.inf),
    "perplexity": (1.0, math.inf),
    "accuracy": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    NORM_BIT_KEY: (0.0, 1.0),
}

# The largest weight magnitude a reply may hold: float16's largest value, which
# `--transfer_dtype float16` already requires of every weight. Fine-tuned transformer weights
# sit orders of magnitude below it, and bounded values keep every strategy's arithmetic finite
# in float32 (FedAvg's weighted sums, FedAdam's squared updates: 65504**2 is 4.3e9), where a
# crafted 3e38 would overflow to inf. It bounds values, not influence: `--max_update_norm` and
# robust strategies (FedMedian, FedTrimmedAvg, Krum) bound what one client can move.
MAX_WEIGHT_MAGNITUDE = 65504.0

# Automatic example cap of clients with their own data: a reply counts for at most this many
# times the round's typical (lower median) example count.
TYPICAL_COUNT_FACTOR = 2

# At most this many names are quoted when a reply holds unexpected ones.
_NAMES_SHOWN = 5


class InvalidReplyError(ValueError):
    """A reply no part of the server may use; the message says why."""


@dataclasses.dataclass(frozen=True)
class ExpectedReply:
    """What an honest client of this run sends back.

    Attributes:
        reference: The model's trainable part by name (`weights.trainable_state_dict`): names and
            shapes of the weights a training reply carries.
        transfer_dtype: `--transfer_dtype`, the dtype of every floating-point weight on the wire.
        train_metrics: The metrics of a training reply besides `num-examples`, all required.
        max_update_norm: `--max_update_norm` (0: no bound).
    """

    reference: Mapping[str, torch.Tensor]
    transfer_dtype: str = "float32"
    train_metrics: tuple[str, ...] = TRAIN_METRICS
    max_update_norm: float = 0.0

    @classmethod
    def for_run(cls, federation: FederationArguments, reference: Mapping[str, torch.Tensor]) -> ExpectedReply:
        """The replies of a run with these `FederationArguments`, whose trainable part is `reference`."""
        train_metrics = TRAIN_METRICS
        if strategy_class(federation.strategy).__name__ == ADAPTIVE_CLIPPING_STRATEGY:
            train_metrics += (NORM_BIT_KEY,)
        return cls(
            reference=reference,
            transfer_dtype=federation.transfer_dtype,
            train_metrics=train_metrics,
            max_update_norm=float(federation.max_update_norm),
        )


def validate_reply(
    kind: str,
    content: RecordDict,
    expected: ExpectedReply,
    sent: Mapping[str, torch.Tensor] | None = None,
    sent_arrays: Mapping[str, ArrayRecord] | None = None,
) -> None:
    """Check a train or evaluate reply's `content` completely; raise `InvalidReplyError` if it is
    not what an honest client of this run sends.

    A packed training reply (`wire.pack`) is unpacked in place first, its layout checked, and rows
    it sent alone completed from the one of `sent_arrays` (the weights this round's training
    messages carried, as sent, by Flower object id) it names. `sent`: those weights as tensors
    (`weights.arrays_to_state_dict`), for `expected.max_update_norm`. Any error while reading the
    reply becomes an `InvalidReplyError` naming it: nothing a client sends can raise anything else.
    """
    try:
        if kind == MessageType.TRAIN:
            _check_train(content, expected, sent, sent_arrays)
        elif kind == MessageType.EVALUATE:
            _check_records(content, arrays=set(), metrics={METRICS_KEY}, configs={CLIENT_KEY})
            _check_client(content[CLIENT_KEY])
            _check_eval_metric_names(content[METRICS_KEY])
            _check_metrics(content[METRICS_KEY], set(), set(content[METRICS_KEY]))
        else:
            raise InvalidReplyError(f"a reply to a {kind!r} message, where only train and evaluate are sent")
    except InvalidReplyError:
        raise
    except (WeightsMismatchError, NonFiniteWeightsError, WeightsOutOfRangeError) as err:
        raise InvalidReplyError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - whatever a malformed reply raises is that reply's fault
        raise InvalidReplyError(f"unreadable reply ({type(err).__name__}: {_shorten(str(err))})") from err


def _check_train(
    content: RecordDict,
    expected: ExpectedReply,
    sent: Mapping[str, torch.Tensor] | None,
    sent_arrays: Mapping[str, ArrayRecord] | None,
) -> None:
    packed = PACKED_ARRAYS_KEY in content.array_records
    if packed:
        _check_records(
            content,
            arrays={PACKED_ARRAYS_KEY},
            metrics={METRICS_KEY},
            configs={CLIENT_KEY, PACKED_LAYOUT_KEY},
        )
    else:
        _check_records(content, arrays={ARRAYS_KEY}, metrics={METRICS_KEY}, configs={CLIENT_KEY})
    _check_client(content[CLIENT_KEY])
    _check_metrics(content[METRICS_KEY], set(expected.train_metrics), set(expected.train_metrics))
    if packed:
        wire.unpack(content, sent_arrays)  # `wire.unpack_arrays` checks the layout before reading a value
    validate_arrays(
        content[ARRAYS_KEY],
        expected.reference,
        dtype=expected.transfer_dtype,
        max_magnitude=MAX_WEIGHT_MAGNITUDE,
    )
    if expected.max_update_norm and sent is not None:
        norm = update_norm(content[ARRAYS_KEY], sent)
        if norm > expected.max_update_norm:
            raise InvalidReplyError(
                f"its update has an L2 norm of {norm:.4g}, above --max_update_norm {expected.max_update_norm:g}"
            )


def _check_records(content: RecordDict, arrays: set[str], metrics: set[str], configs: set[str]) -> None:
    """Exactly the records named, by kind: Flower's strategies expect one ArrayRecord (train) and one
    MetricRecord per reply, and nothing else of a reply is read."""
    for kind, records, names in (
        ("ArrayRecord", content.array_records, arrays),
        ("MetricRecord", content.metric_records, metrics),
        ("ConfigRecord", content.config_records, configs),
    ):
        if set(records) != names:
            raise InvalidReplyError(
                f"it holds {kind}s {_names(records)}, expected {_names(sorted(names)) if names else 'none'}"
            )


def _check_client(client: Mapping) -> None:
    """Who sent the reply: an integer partition id and, optionally, the id of the weights it holds."""
    unexpected = [key for key in client if key not in (PARTITION_ID_KEY, ARRAYS_HELD_KEY)]
    if unexpected:
        raise InvalidReplyError(f"its {CLIENT_KEY!r} record holds unexpected keys {_names(unexpected)}")
    partition = client.get(PARTITION_ID_KEY)
    if type(partition) is not int or partition < 0:
        raise InvalidReplyError(
            f"its {PARTITION_ID_KEY!r} is {_shorten(repr(partition))}, not a partition number"
        )
    held = client.get(ARRAYS_HELD_KEY, "")
    if not isinstance(held, str) or len(held) > 128:
        raise InvalidReplyError(f"its {ARRAYS_HELD_KEY!r} is not a weights id")


def _check_metrics(metrics: Mapping, required: set[str], allowed: set[str]) -> None:
    """Only `allowed` names (all of `required`) and `num-examples`, each a finite number in range."""
    names = set(metrics)
    unexpected = sorted(names - allowed - {NUM_EXAMPLES_KEY})
    if unexpected:
        raise InvalidReplyError(f"its metrics hold unexpected names {_names(unexpected)}")
    missing = sorted((required | {NUM_EXAMPLES_KEY}) - names)
    if missing:
        raise InvalidReplyError(f"its metrics lack {missing}")
    for name in sorted(names):
        value = metrics[name]
        if type(value) not in (int, float) or not math.isfinite(value):
            raise InvalidReplyError(f"its metric {name!r} is {_shorten(repr(value))}, not a finite number")
        low, high = metric_range(name)
        if not low <= value <= high:
            raise InvalidReplyError(f"its metric {name!r} is {value!r}, outside [{low:g}, {high:g}]")
    count = metrics[NUM_EXAMPLES_KEY]
    if count != int(count) or count < 1:
        raise InvalidReplyError(f"its {NUM_EXAMPLES_KEY!r} is {count!r}, not a whole number of at least 1")


def _check_eval_metric_names(metrics: Mapping) -> None:
    """At most `MAX_EVAL_METRICS` metrics, each named as a Trainer's `evaluate()` names them."""
    names = [name for name in metrics if name != NUM_EXAMPLES_KEY]
    if len(names) > MAX_EVAL_METRICS:
        raise InvalidReplyError(
            f"its metrics hold {len(names)} names, more than the {MAX_EVAL_METRICS} accepted"
        )
    unexpected = [name for name in names if not EVAL_METRIC_NAME.fullmatch(name)]
    if unexpected:
        raise InvalidReplyError(f"its metrics hold names no Trainer's evaluate() makes: {_names(unexpected)}")


def metric_range(name: str) -> tuple[float, float]:
    """The valid values of a reported metric, by the end of its name (any finite number otherwise)."""
    for suffix, bounds in METRIC_RANGES.items():
        if name.endswith(suffix):
            return bounds
    return (-math.inf, math.inf)


@dataclasses.dataclass(frozen=True)
class ExampleCap:
    """How many examples a valid reply may count for (`num-examples`), which a client reports itself.

    FedAvg and its relatives weigh each reply by its count, so a client claiming 1e12 examples would
    make its weights the aggregate. A count above the cap is lowered to it (logged, and noted in
    the round's record) before the strategy or the running mean sees it:

    - `fixed` (`--max_examples_per_client`): that many, for every client;
    - automatic (`fixed` 0): when the round's typical client, its lower-median count, fits the run's
      partitions, the clients serve partitions of the run's data set (simulation, or deployed
      clients with `--partition_id`) and none honestly reports more than the largest, `known[kind]`
      (its train split for train replies, its eval split for evaluate replies); otherwise they
      serve their own data (`--data_path`), of which the server knows nothing, and a reply counts
      for at most `TYPICAL_COUNT_FACTOR` times the typical one. The lower median is an honest
      client's count as long as most clients are honest, even with two clients.

    Counts at or below `floor(kind)` are never capped, whatever the round brings: averaging on
    arrival folds those in at once and holds back only larger claims until the round is in.
    """

    fixed: int = 0
    known: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_run(cls, max_examples_per_client: int, partition_counts: Sequence[tuple[int, int]]) -> ExampleCap:
        """The cap of a run: `--max_examples_per_client`, or automatic from the (train, eval) counts of
        each of the run's partitions (`data.client_split_sizes`)."""
        if max_examples_per_client:
            return cls(fixed=max_examples_per_client)
        known = {}
        if partition_counts:
            known[MessageType.TRAIN] = max(train for train, _ in partition_counts)
            known[MessageType.EVALUATE] = max(evaluation for _, evaluation in partition_counts)
        return cls(known=known)

    def floor(self, kind: str) -> int | None:
        """The largest count no round's cap goes below (None: unknown before the round's replies)."""
        return self.fixed or self.known.get(kind)

    def limit(self, kind: str, counts: Sequence[int]) -> int:
        """The cap of a round whose valid `kind` replies report `counts` (not empty)."""
        if self.fixed:
            return self.fixed
        typical = sorted(counts)[(len(counts) - 1) // 2]
        known = self.known.get(kind)
        if known is not None and typical <= known:
            return known
        return TYPICAL_COUNT_FACTOR * typical

    def describe(self, kind: str) -> str:
        """Where the cap comes from, for the log and the round's notes."""
        if self.fixed:
            return "--max_examples_per_client"
        return (
            f"automatic: the largest partition's {'train' if kind == MessageType.TRAIN else 'eval'} split, "
            f"or {TYPICAL_COUNT_FACTOR}x the round's median count; set --max_examples_per_client to choose"
        )


def _names(names) -> str:
    names = [_shorten(str(name), 40) for name in names]
    shown = ", ".join(repr(name) for name in names[:_NAMES_SHOWN])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > _NAMES_SHOWN else ''}]"


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
