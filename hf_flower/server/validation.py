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
  `--max_update_norm`, an update no longer than that. A packed reply's declared layout is compared
  with the model's before a single tensor of it is built (`wire.check_layout`);
- metrics: training, exactly the names a client's round driver reports; evaluation, `eval_*` names
  as a Trainer's `evaluate()` makes them (at most `MAX_EVAL_METRICS`), each a finite number within
  `MAX_METRIC_MAGNITUDE`, and within `METRIC_RANGES` where a range exists;
- `num-examples`: a whole number of at least 1. How much it may weigh is `ExampleCap`'s decision,
  how far its update may move the weights `UpdateClip`'s.

What a client says of itself in words (an error reply's reason, or text quoted from a refused
reply) is logged, shown and stored only through `progress.lines.printable`: bounded, and without
control characters or terminal escape codes.
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

# The largest magnitude a reported metric (`num-examples` included) may have. Honest values sit
# far below it (a perplexity of 1e30 is a loss of 69), and bounded values keep the examples-weighted
# means of a round's metrics finite: (1e30 * 1e30) * a million clients is 1e66, far from float64's
# 1.8e308, where values up to 1.8e308 made those means inf.
MAX_METRIC_MAGNITUDE = 1e30

# Automatic example cap: a reply counts for at most this many times the round's typical (lower
# median) example count, unless it reports exactly the size of a partition of the run (`ExampleCap`).
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
        update_clip_factor: `--update_clip_factor` (0: off); `for_run` takes the run's (3 by
            default), the class alone bounds nothing.
    """

    reference: Mapping[str, torch.Tensor]
    transfer_dtype: str = "float32"
    train_metrics: tuple[str, ...] = TRAIN_METRICS
    max_update_norm: float = 0.0
    update_clip_factor: float = 0.0

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
            update_clip_factor=float(federation.update_clip_factor),
        )

    @property
    def measures_updates(self) -> bool:
        """Whether a training reply's update norm is needed (a fixed bound or clipping)."""
        return bool(self.max_update_norm or self.update_clip_factor)


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
        # The declared layout first, against the model: nothing is built for a layout that cannot fit.
        wire.check_layout(content, expected.reference, expected.transfer_dtype)
        wire.unpack(content, sent_arrays)
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
        if abs(value) > MAX_METRIC_MAGNITUDE:
            raise InvalidReplyError(
                f"its metric {name!r} is {value:.4g}, beyond the {MAX_METRIC_MAGNITUDE:g} accepted"
            )
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
    make its weights the aggregate. A count above its cap is lowered to it (logged, and noted in
    the round's record) before the strategy or the running mean sees it:

    - `fixed` (`--max_examples_per_client`): that many, for every client;
    - automatic (`fixed` 0): no reply counts for more than `TYPICAL_COUNT_FACTOR` times the round's
      typical count (its lower median: an honest client's count as long as most clients are
      honest, even with two), with one exception that keeps honest heterogeneous partitions exact:
      when the typical reply reports exactly the size of the partition it names (`known`: each of
      the run's partitions' train and eval split), the clients serve the run's partitions, and a
      reply that reports exactly its partition's size keeps it. Any other reply of such a round is
      capped at its partition's size too.

    Why not the largest partition for everyone (the cap before): the server computes its partitions
    whether or not clients use them, so a `--data_path` client could claim the largest (10,000 rows
    of a 25,000-row data set over two clients) against an honest client's 200 rows: 98% of FedAvg's
    weight. Now the typical client decides which rule holds: beside an honest own-data client, the
    claim counts for at most twice its count, whatever partition it names. A client that names a
    partition of a partitioned run and its exact size weighs what that partition's client weighs:
    the operator's own split bounds it.
    """

    fixed: int = 0
    # kind (train / evaluate) -> partition id -> the count that partition's client reports.
    known: Mapping[str, Mapping[int, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_run(cls, max_examples_per_client: int, partition_counts: Sequence[tuple[int, int]]) -> ExampleCap:
        """The cap of a run: `--max_examples_per_client`, or automatic from the (train, eval) counts of
        each of the run's partitions, by partition id (`data.client_split_sizes`)."""
        if max_examples_per_client:
            return cls(fixed=max_examples_per_client)
        known = {}
        if partition_counts:
            known[MessageType.TRAIN] = {i: train for i, (train, _) in enumerate(partition_counts)}
            known[MessageType.EVALUATE] = {
                i: evaluation for i, (_, evaluation) in enumerate(partition_counts)
            }
        return cls(known=known)

    def limits(self, kind: str, claims: Sequence[tuple[int | None, int]]) -> list[int]:
        """The cap of each of a round's valid `kind` replies, given as (partition id, count) claims."""
        if self.fixed:
            return [self.fixed] * len(claims)
        sizes = self.known.get(kind, {})
        exact = [sizes.get(partition) == count for partition, count in claims]
        # The typical reply: the lower median count; of equal counts, one that is not exact.
        order = sorted(range(len(claims)), key=lambda i: (claims[i][1], exact[i]))
        typical = order[(len(claims) - 1) // 2]
        bound = TYPICAL_COUNT_FACTOR * claims[typical][1]
        if not exact[typical]:  # clients with their own data: the server knows nothing of them
            return [bound] * len(claims)
        return [
            count if is_exact else min(bound, sizes.get(partition, bound))
            for (partition, count), is_exact in zip(claims, exact)
        ]

    def never_capped(
        self, kind: str, claim: tuple[int | None, int], counts: Sequence[int], pending: int
    ) -> bool:
        """Whether `claim` stays uncapped whatever the round still brings: `counts` are the round's
        valid counts so far (`claim`'s included), `pending` the replies still to come. What averaging
        on arrival folds in at once; other claims wait for the round."""
        partition, count = claim
        if self.fixed:
            return count <= self.fixed
        size = self.known.get(kind, {}).get(partition)
        if size is not None and count > size:
            return False
        least_typical = lower_median_floor(counts, pending)
        return least_typical is not None and count <= TYPICAL_COUNT_FACTOR * least_typical

    def describe(self, kind: str) -> str:
        """Where the cap comes from, for the log and the round's notes."""
        if self.fixed:
            return "--max_examples_per_client"
        return (
            f"automatic: {TYPICAL_COUNT_FACTOR}x the round's median count, or exactly the named partition's "
            f"{'train' if kind == MessageType.TRAIN else 'eval'} split; set --max_examples_per_client to choose"
        )


@dataclasses.dataclass(frozen=True)
class UpdateClip:
    """How far a valid training reply may move the weights: `--update_clip_factor`.

    Every update (a reply's weights less those it was sent) longer than `factor` times the round's
    typical update norm (the lower median over its valid training replies) is scaled down to that
    length, in its own direction; it is not refused, so an honest client that trained more than the
    others still counts. Norm clipping (Sun et al. 2019, "Can You Really Backdoor Federated
    Learning?") bounds what one client can move the aggregate by to `factor` honest updates, where
    FedAvg alone moves it by the client's share of anything up to `MAX_WEIGHT_MAGNITUDE`. The
    typical norm comes from the round itself, so it follows the learning rate and model without
    a setting. The factor, 3, was measured on the quickstart (`benchmarks/update_bound.py`):
    honest IID updates differ by far less than 3x, so honest rounds are averaged unchanged.
    """

    factor: float = 0.0

    def limit(self, norms: Sequence[float]) -> float | None:
        """The longest update of a round whose valid training replies have `norms` (None: off)."""
        if not self.factor or not norms:
            return None
        return self.factor * sorted(norms)[(len(norms) - 1) // 2]

    def never_clipped(self, norm: float, norms: Sequence[float], pending: int) -> bool:
        """Whether an update of `norm` stays unclipped whatever the round still brings (`norms`: the
        round's so far, this one's included; `pending`: replies still to come)."""
        if not self.factor:
            return True
        least_typical = lower_median_floor(norms, pending)
        return least_typical is not None and norm <= self.factor * least_typical


def lower_median_floor(values: Sequence[float], pending: int) -> float | None:
    """The least the lower median of `values` can become once up to `pending` more values, each as
    small as can be, are added (None: no bound yet, any of the pending ones may become it).

    With j more values below all of `values`, the lower median of the k + j is `values`' sorted
    element (k + j - 1) // 2 - j, which falls as j grows: the bound is the one for j = `pending`.
    Replies that fail or never come only raise it, so it holds for every way a round can end.
    """
    index = (len(values) + pending - 1) // 2 - pending
    return sorted(values)[index] if index >= 0 and values else None


def _names(names) -> str:
    names = [_shorten(str(name), 40) for name in names]
    shown = ", ".join(repr(name) for name in names[:_NAMES_SHOWN])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > _NAMES_SHOWN else ''}]"


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
