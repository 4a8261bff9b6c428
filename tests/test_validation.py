"""No reply can break or steer a run: `validate_reply`, the example cap and the bounded waits.

The fuzz tests run a real Flower strategy's `start()` over `TrackingGrid` and an in-process grid
whose clients are plain functions: three honest ones (the weights they were sent plus a fixed
step) and one that sends a malformed reply. The run must finish with the honest clients, name the
bad reply in the round's failures, and aggregate exactly what the honest replies give.
"""

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from hf_flower.arguments import FederationArguments
from hf_flower.constants import (
    ARRAYS_HELD_KEY,
    ARRAYS_KEY,
    CLIENT_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PACKED_ARRAYS_KEY,
    PACKED_LAYOUT_KEY,
    PARTITION_ID_KEY,
)
from hf_flower.progress.lines import printable
from hf_flower.server.replies import RoundRules
from hf_flower.server.round_grid import ClientsMissingError, TrackingGrid
from hf_flower.server.strategies import nodes_waited_for
from hf_flower.server.validation import (
    MAX_WEIGHT_MAGNITUDE,
    ExampleCap,
    ExpectedReply,
    InvalidReplyError,
    UpdateClip,
    validate_reply,
)
from hf_flower.transport import wire
from hf_flower.transport.averaging import averages_replies
from hf_flower.weights import arrays_to_state_dict, get_weights, state_dict_to_arrays

TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE


pytestmark = pytest.mark.usefixtures("server_identity")


torch.manual_seed(0)
MODEL = torch.nn.Linear(4, 3)
REFERENCE = {name: p.detach() for name, p in MODEL.named_parameters()}
EXPECTED = ExpectedReply(REFERENCE, max_update_norm=5.0)
# The same run without --max_update_norm: the example cap alone bounds far-off replies.
NO_NORM_BOUND = dataclasses.replace(EXPECTED, max_update_norm=0.0)
# What the server knows of the run's partitions: (train, eval) examples of the largest.
CAP = ExampleCap.for_run(0, [(30, 8), (25, 7)])


@dataclasses.dataclass
class Client:
    """One node: what it honestly reports, and how it spoils its reply (`attack(kind, content)`)."""

    node: int
    step: float
    train_examples: int
    eval_examples: int
    accuracy: float
    attack: Callable[[str, RecordDict], None] | None = None

    def answer(self, message: Message) -> Message:
        kind = message.metadata.message_type
        content = self.train(message) if kind == TRAIN else self.evaluate()
        if self.attack is not None:
            self.attack(kind, content)
        return Message(content, reply_to=message)

    def trained(self, sent: dict) -> dict:
        return {name: value + self.step for name, value in sent.items()}

    def train(self, message: Message) -> RecordDict:
        sent = arrays_to_state_dict(message.content[ARRAYS_KEY], REFERENCE)
        metrics = {
            "train_loss": 0.5,
            "train_runtime": 1.0,
            "train_steps": 3,
            NUM_EXAMPLES_KEY: self.train_examples,
        }
        return self.reply(metrics, state_dict_to_arrays(self.trained(sent)))

    def evaluate(self) -> RecordDict:
        metrics = {
            "eval_loss": 0.4,
            "eval_accuracy": self.accuracy,
            "eval_f1": self.accuracy,
            "eval_runtime": 0.5,
            NUM_EXAMPLES_KEY: self.eval_examples,
        }
        return self.reply(metrics)

    def reply(self, metrics: dict, arrays: ArrayRecord | None = None) -> RecordDict:
        content = RecordDict(
            {METRICS_KEY: MetricRecord(metrics), CLIENT_KEY: ConfigRecord({PARTITION_ID_KEY: self.node - 1})}
        )
        if arrays is not None:
            content[ARRAYS_KEY] = arrays
        return content


class ClientGrid:
    """A Flower `Grid` of in-process clients: each pushed message is answered at once."""

    def __init__(self, clients: list[Client]):
        self.clients = {client.node: client for client in clients}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.clients)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grids do
            delivered = Message(metadata=message.metadata, content=RecordDict(dict(message.content)))
            self.replies[message.metadata.message_id] = self.clients[message.metadata.dst_node_id].answer(
                delivered
            )
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        """Flower's own exchange (`Grid.send_and_receive`): push everything, pull the replies."""
        return self.pull_messages(self.push_messages(messages))


def honest_clients() -> list[Client]:
    return [
        Client(node=1, step=0.1, train_examples=10, eval_examples=5, accuracy=0.6),
        Client(node=2, step=-0.2, train_examples=20, eval_examples=6, accuracy=0.7),
        Client(node=3, step=0.3, train_examples=30, eval_examples=7, accuracy=0.9),
    ]


def attacker(attack, kind_attacked: str, train_examples: int = 20) -> Client:
    def spoil(kind, content):
        if kind == kind_attacked:
            attack(content)

    return Client(
        node=4, step=0.05, train_examples=train_examples, eval_examples=6, accuracy=0.5, attack=spoil
    )


def run_round(
    strategy,
    clients: list[Client],
    expected: ExpectedReply = EXPECTED,
    cap: ExampleCap = CAP,
    fast_transport: bool = True,
):
    """One round of `strategy` over the clients; the grid and the round's aggregated weights."""
    grid = TrackingGrid(
        ClientGrid(clients),
        RoundRules(expected, 3, cap, average_on_arrival=fast_transport and averages_replies(strategy)),
        wait_for_clients_timeout=5,  # a test that sampled more clients than it has fails, not hangs
        fast_transport=fast_transport,
    )
    aggregates = {}

    def keep(server_round, arrays):
        aggregates[server_round] = arrays

    result = strategy.start(
        grid=grid, initial_arrays=get_weights(MODEL), num_rounds=1, timeout=10, evaluate_fn=keep
    )
    return grid, aggregates[1], result


def make_strategy(name: str, clients: int = 4):
    cls = {"FedAvg": FedAvg, "FedMedian": FedMedian}[name]
    return cls(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=clients)


def expected_aggregate(strategy_name: str, clients: list[Client], weights: list[int] | None = None) -> dict:
    """FedAvg (examples-weighted mean) or FedMedian of the clients' trained weights, with numpy."""
    sent = {name: value.numpy().astype(np.float64) for name, value in REFERENCE.items()}
    trained = [client.trained(sent) for client in clients]
    if strategy_name == "FedMedian":
        return {name: np.median([t[name] for t in trained], axis=0) for name in sent}
    weights = weights or [client.train_examples for client in clients]
    return {name: sum(w * t[name] for w, t in zip(weights, trained)) / sum(weights) for name in sent}


def assert_aggregate(got: ArrayRecord, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-5, atol=1e-6)


# --- malformed replies ----------------------------------------------------------------------------


def set_metric(name, value):
    def attack(content):
        content[METRICS_KEY][name] = value

    return attack


def drop_metric(name):
    def attack(content):
        del content[METRICS_KEY][name]

    return attack


def drop_record(key):
    def attack(content):
        del content[key]

    return attack


def extra_record(content):
    content["extra"] = MetricRecord({"x": 1.0})


def without_partition_id(content):
    content[CLIENT_KEY] = ConfigRecord({})


def many_metrics(content):
    content[METRICS_KEY] = MetricRecord({**content[METRICS_KEY], **{f"m{i}": 0.0 for i in range(5000)}})


def many_eval_metrics(content):
    """Names as Trainer's evaluate() makes them, but more than any compute_metrics reports."""
    content[METRICS_KEY] = MetricRecord({**content[METRICS_KEY], **{f"eval_m{i}": 0.0 for i in range(300)}})


def change_weights(change):
    def attack(content):
        state_dict = {name: torch.from_numpy(a.numpy().copy()) for name, a in content[ARRAYS_KEY].items()}
        content[ARRAYS_KEY] = state_dict_to_arrays(change(state_dict))  # no dtype given: kept as changed

    return attack


def huge_value(state_dict):
    state_dict["weight"][0, 0] = 3e38
    return state_dict


def packed_layout(**change):
    def attack(content):
        wire.pack(content)
        content[PACKED_LAYOUT_KEY] = ConfigRecord({**content[PACKED_LAYOUT_KEY], **change})

    return attack


def rows_of_unsent_weights(content):
    """Rows sent against weights of the client's own choosing, which the server never sent."""
    own = content[ARRAYS_KEY]
    wire.pack(content, base_id=own.object_id, base=own)


def forged_row_counts(content):
    rows_of_unsent_weights(content)
    content[PACKED_LAYOUT_KEY] = ConfigRecord({**content[PACKED_LAYOUT_KEY], "rows": [3, -1]})


MALFORMED = {
    "num-examples [1, 2]": (TRAIN, set_metric(NUM_EXAMPLES_KEY, [1, 2])),
    "num-examples -100": (TRAIN, set_metric(NUM_EXAMPLES_KEY, -100)),
    "num-examples -1e12": (TRAIN, set_metric(NUM_EXAMPLES_KEY, -1e12)),
    "num-examples -99": (TRAIN, set_metric(NUM_EXAMPLES_KEY, -99)),
    "num-examples NaN": (TRAIN, set_metric(NUM_EXAMPLES_KEY, math.nan)),
    "num-examples inf": (TRAIN, set_metric(NUM_EXAMPLES_KEY, math.inf)),
    "num-examples 2.5": (TRAIN, set_metric(NUM_EXAMPLES_KEY, 2.5)),
    "train_loss as a list": (TRAIN, set_metric("train_loss", [0.1, 0.2])),
    "train_loss negative": (TRAIN, set_metric("train_loss", -1.0)),
    "train_runtime 1.7e308": (TRAIN, set_metric("train_runtime", 1.7e308)),
    "5,000 extra metrics (train)": (TRAIN, many_metrics),
    "without train_steps": (TRAIN, drop_metric("train_steps")),
    "packed, malformed ndims": (TRAIN, packed_layout(ndims=[-1, 4])),
    "packed, negative dims summing right": (TRAIN, packed_layout(dims=[-3, -4, 3])),
    "packed, dims as text": (TRAIN, packed_layout(dims="3,4,3")),
    "packed by rows of weights never sent": (TRAIN, rows_of_unsent_weights),
    "packed rows, forged counts": (TRAIN, forged_row_counts),
    "without partition-id": (TRAIN, without_partition_id),
    "extra record (train)": (TRAIN, extra_record),
    "without weights": (TRAIN, drop_record(ARRAYS_KEY)),
    "weights 3e38": (TRAIN, change_weights(huge_value)),
    "float64 weights": (TRAIN, change_weights(lambda sd: {k: v.double() for k, v in sd.items()})),
    "int64 weights": (TRAIN, change_weights(lambda sd: {k: v.long() for k, v in sd.items()})),
    "complex64 weights": (
        TRAIN,
        change_weights(lambda sd: {k: v.to(torch.complex64) for k, v in sd.items()}),
    ),
    "bool weights": (TRAIN, change_weights(lambda sd: {k: v > 0 for k, v in sd.items()})),
    "NaN weights": (TRAIN, change_weights(lambda sd: {k: v * math.nan for k, v in sd.items()})),
    "update beyond --max_update_norm": (TRAIN, change_weights(lambda sd: {k: v + 30 for k, v in sd.items()})),
    "evaluate without metrics": (EVALUATE, drop_record(METRICS_KEY)),
    "evaluate without num-examples": (EVALUATE, drop_metric(NUM_EXAMPLES_KEY)),
    "evaluate num-examples -10": (EVALUATE, set_metric(NUM_EXAMPLES_KEY, -10)),
    "evaluate accuracy 1e9": (EVALUATE, set_metric("eval_accuracy", 1e9)),
    "evaluate eval_loss 1e308": (EVALUATE, set_metric("eval_loss", 1e308)),
    "evaluate 5,000 extra metrics": (EVALUATE, many_metrics),
    "evaluate 300 eval_ metrics": (EVALUATE, many_eval_metrics),
    "evaluate a metric name no Trainer makes": (EVALUATE, set_metric("eval_\x1b[2Jloss", 0.1)),
    "evaluate extra record": (EVALUATE, extra_record),
    "evaluate without partition-id": (EVALUATE, without_partition_id),
}


@pytest.mark.parametrize("strategy_name", ["FedAvg", "FedMedian"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_reply_is_its_clients_failure_and_the_honest_ones_aggregate(strategy_name, case):
    kind, attack = MALFORMED[case]
    honest = honest_clients()
    bad = attacker(attack, kind)
    grid, aggregate, result = run_round(make_strategy(strategy_name), [*honest, bad])

    trained_by = honest if kind == TRAIN else [*honest, bad]
    assert_aggregate(aggregate, expected_aggregate(strategy_name, trained_by))
    (failure,) = grid.rounds[1].failures
    assert failure.startswith(f"round 1 {kind}: node {bad.node} (partition ")
    assert "its reply was rejected" in failure and len(failure) < 1000
    # Federated evaluation, as Flower aggregates it, comes from the valid replies only.
    evaluated_by = honest if kind == EVALUATE else [*honest, bad]
    examples = [c.eval_examples for c in evaluated_by]
    accuracy = sum(c.accuracy * n for c, n in zip(evaluated_by, examples)) / sum(examples)
    assert result.evaluate_metrics_clientapp[1]["eval_accuracy"] == pytest.approx(accuracy)
    assert grid.rounds[1].metrics[EVALUATE]["eval_accuracy"] == pytest.approx(accuracy)


def test_failures_name_the_reason():
    honest = honest_clients()
    for case, reason in (
        ("num-examples -100", "'num-examples' is -100, not a whole number of at least 1"),
        ("float64 weights", "received torch.float64 values, expected torch.float32"),
        ("weights 3e38", f"beyond the {MAX_WEIGHT_MAGNITUDE:g} accepted"),
        ("update beyond --max_update_norm", "above --max_update_norm 5"),
        ("packed, negative dims summing right", "declared shapes differ from the model's"),
        ("train_runtime 1.7e308", "beyond the 1e+30 accepted"),
        ("evaluate eval_loss 1e308", "beyond the 1e+30 accepted"),
        ("packed by rows of weights never sent", "which this receiver does not hold"),
        ("without partition-id", "'partition-id' is None"),
        ("5,000 extra metrics (train)", "... (5000 in all)"),
    ):
        kind, attack = MALFORMED[case]
        grid, _, _ = run_round(make_strategy("FedAvg"), [*honest, attacker(attack, kind)])
        assert reason in grid.rounds[1].failures[0], case


# --- weighting a client cannot inflate ----------------------------------------------------------------


def test_a_1e12_example_claim_weighs_at_most_the_cap_under_fedavg():
    honest = honest_clients()
    bad = Client(node=4, step=5.0, train_examples=10**12, eval_examples=6, accuracy=0.5)
    bad.train_examples = 1e12  # sent as a float, as the client did
    # The cap the server builds (`ExampleCap.for_run` with the run's partitions); these clients
    # report other counts than their partitions' (their own data): twice the lower median (20).
    grid, aggregate, _ = run_round(make_strategy("FedAvg"), [*honest, bad], NO_NORM_BOUND, CAP)

    cap = 40
    weights = [c.train_examples for c in honest] + [cap]
    expected = expected_aggregate("FedAvg", [*honest, bad], weights)
    assert_aggregate(aggregate, expected)
    # The attacker moved the aggregate by its capped share of the way to its weights, no more.
    honest_mean = expected_aggregate("FedAvg", honest)
    attacker_weights = expected_aggregate("FedAvg", [bad])
    share = cap / sum(weights)
    for name, value in honest_mean.items():
        moved = np.abs(aggregate[name].numpy() - value)
        assert np.all(moved <= share * np.abs(attacker_weights[name] - value) + 1e-5)
        assert np.all(moved > 0.5 * share * np.abs(attacker_weights[name] - value))  # capped, not dropped
    assert grid.rounds[1].failures == []
    (note,) = grid.rounds[1].notes
    assert note.startswith("round 1 train: node 4 (partition 3): num-examples 1000000000000 capped to 40")


def send_round(
    clients: list[Client], cap: ExampleCap, averaging: bool, expected: ExpectedReply = NO_NORM_BOUND
):
    """One FedAvg training exchange over `TrackingGrid`: the grid and FedAvg's aggregate."""
    grid = TrackingGrid(
        ClientGrid(clients), RoundRules(expected, len(clients), cap, average_on_arrival=averaging)
    )
    strategy = FedAvg(min_available_nodes=len(clients))
    messages = strategy.configure_train(1, get_weights(MODEL), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages, timeout=10))
    return grid, arrays


@pytest.mark.parametrize("averaging", [True, False])
def test_an_own_data_client_cannot_claim_the_servers_largest_partition(averaging):
    """Issue 22, point 3: 25,000 rows over 2 partitions on the server, but both clients serve their
    own data (`--data_path`). The attacker names partition 1 and its exact train size, 10,000,
    beside an honest client's 200 rows: it weighs twice the honest client (2/3), not 98%."""
    cap = ExampleCap.for_run(0, [(10_000, 2_500), (10_000, 2_500)])
    honest = Client(node=1, step=0.1, train_examples=200, eval_examples=50, accuracy=0.8)
    bad = Client(node=2, step=5.0, train_examples=10_000, eval_examples=50, accuracy=0.5)
    grid, aggregate = send_round([honest, bad], cap, averaging)

    assert_aggregate(aggregate, expected_aggregate("FedAvg", [honest, bad], [200, 400]))
    (note,) = grid.rounds[1].notes
    assert "num-examples 10000 capped to 400" in note


@pytest.mark.parametrize("averaging", [True, False])
def test_honest_heterogeneous_partitions_keep_exact_fedavg(averaging):
    """Clients reporting exactly their partitions' sizes (172 and 900 of a label-skewed split) keep
    them, whatever their ratio; a third naming partition 2 with a count of its own is capped at
    twice the typical count and below its partition's size."""
    cap = ExampleCap.for_run(0, [(172, 20), (900, 100), (500, 60)])
    clients = [
        Client(node=1, step=0.1, train_examples=172, eval_examples=20, accuracy=0.8),
        Client(node=2, step=-0.2, train_examples=900, eval_examples=100, accuracy=0.7),
    ]
    grid, aggregate = send_round(clients, cap, averaging)
    assert_aggregate(aggregate, expected_aggregate("FedAvg", clients))
    assert grid.rounds[1].notes == []

    bad = Client(node=3, step=5.0, train_examples=10**9, eval_examples=60, accuracy=0.5)
    grid, aggregate = send_round([*clients, bad], cap, averaging)
    assert_aggregate(aggregate, expected_aggregate("FedAvg", [*clients, bad], [172, 900, 500]))


def test_a_1e12_evaluation_claim_weighs_at_most_the_cap_in_fedavgs_metrics():
    """FedAvg weighs federated evaluation metrics by `num-examples` too: a client claiming 1e12
    evaluation examples with accuracy 0 cannot make the round's accuracy 0 (the cap the server
    builds: the typical eval count, 6, is not a partition's, so twice it)."""
    honest = honest_clients()
    bad = Client(node=4, step=0.05, train_examples=20, eval_examples=10**12, accuracy=0.0)
    grid, _, result = run_round(make_strategy("FedAvg"), [*honest, bad], NO_NORM_BOUND, CAP)

    examples = [c.eval_examples for c in honest] + [12]
    accuracies = [c.accuracy for c in honest] + [0.0]
    accuracy = sum(a * n for a, n in zip(accuracies, examples)) / sum(examples)
    assert result.evaluate_metrics_clientapp[1]["eval_accuracy"] == pytest.approx(accuracy)
    assert any("num-examples 1000000000000 capped to 12" in note for note in grid.rounds[1].notes)


def test_averaging_on_arrival_and_the_strategy_weigh_the_same_capped_counts():
    """Own-data clients (nothing known of partitions): the cap is twice the round's lower median."""
    honest = honest_clients()
    bad = Client(node=4, step=5.0, train_examples=1000, eval_examples=6, accuracy=0.5)
    aggregates = {
        averaging: send_round([*honest, bad], ExampleCap(), averaging)[1] for averaging in (True, False)
    }
    weights = [10, 20, 30, 2 * 20]
    for arrays in aggregates.values():
        assert_aggregate(arrays, expected_aggregate("FedAvg", [*honest, bad], weights))


def test_example_cap_rules():
    assert ExampleCap(fixed=50).limits(TRAIN, [(0, 10), (1, 10**9)]) == [50, 50]
    partitions = ExampleCap.for_run(0, [(90, 10), (45, 5)])
    # The typical reply reports its partition exactly: exact ones keep theirs, others are capped
    # at twice the typical count and at their partition's size.
    assert partitions.limits(TRAIN, [(0, 90), (1, 45), (1, 10**12)]) == [90, 45, 45]
    assert partitions.limits(EVALUATE, [(0, 10), (1, 5), (0, 11)]) == [10, 5, 10]
    # Own data (the typical reply is not a partition's): twice the lower median, for everyone,
    # even a claim of a partition's exact size.
    assert partitions.limits(TRAIN, [(0, 400), (1, 500), (0, 90), (1, 10**12)]) == [800] * 4
    assert partitions.limits(TRAIN, [(0, 200), (1, 45)]) == [90, 45]
    assert partitions.limits(TRAIN, [(0, 45), (1, 45)]) == [
        90,
        90,
    ]  # equal counts: the inexact one is typical
    assert ExampleCap().limits(EVALUATE, [(0, 10**12), (1, 3)]) == [6, 6]  # two clients: the honest one


def test_replies_are_folded_on_arrival_only_when_no_end_of_the_round_would_change_them():
    """`never_capped` / `never_clipped` against every way the round can still end: for random
    arrival orders, a reply judged unchangeable is never capped or clipped once all are in."""
    rng = np.random.default_rng(0)
    cap = ExampleCap.for_run(0, [(50, 5), (80, 8), (20, 2)])
    clip = UpdateClip(3.0)
    for _ in range(300):
        n = int(rng.integers(1, 8))
        claims = [
            (int(rng.integers(0, 4)), int(rng.choice([20, 50, 80, int(rng.integers(1, 200))])))
            for _ in range(n)
        ]
        norms = [float(rng.choice([1.0, rng.uniform(0.1, 10.0)])) for _ in range(n)]
        for arrived in range(1, n + 1):
            counts = [c for _, c in claims[:arrived]]
            for i in range(arrived):
                limits = cap.limits(TRAIN, claims)
                if cap.never_capped(TRAIN, claims[i], counts, n - arrived):
                    assert claims[i][1] <= limits[i]
                if clip.never_clipped(norms[i], norms[:arrived], n - arrived):
                    assert norms[i] <= clip.limit(norms)


# --- the default update bound (--update_clip_factor) ------------------------------------------------


@pytest.mark.parametrize("averaging", [True, False])
def test_the_default_bound_keeps_a_x1000_update_within_range(averaging):
    """Issue 22, point 4: FedAvg over 3 replies, one of them its update x 1000. With the run's
    default bound (`ExpectedReply.for_run` of default `FederationArguments`), the attacker's update
    is clipped to 3x the round's median update norm and the aggregate stays among the honest
    weights' range; without it (`--update_clip_factor 0`), it leaves it by orders of magnitude."""
    sent = {name: value.numpy() for name, value in REFERENCE.items()}
    honest = [
        Client(node=1, step=0.1, train_examples=10, eval_examples=5, accuracy=0.6),
        Client(node=2, step=-0.2, train_examples=10, eval_examples=5, accuracy=0.6),
    ]
    bad = Client(node=3, step=0.1 * 1000, train_examples=10, eval_examples=5, accuracy=0.6)
    default = ExpectedReply.for_run(FederationArguments(), REFERENCE)
    assert default.update_clip_factor == 3.0 and default.max_update_norm == 0.0

    grid, aggregate = send_round([*honest, bad], ExampleCap(), averaging, default)
    # Norms are |step| * sqrt(15): the lower median is 0.2's, so the attacker moves by 0.6.
    assert_aggregate(aggregate, {name: value + (0.1 - 0.2 + 0.6) / 3 for name, value in sent.items()})
    for name, value in sent.items():
        assert np.all(np.abs(aggregate[name].numpy() - value) <= 0.6)
    assert grid.rounds[1].failures == []
    (note,) = grid.rounds[1].notes
    assert note.startswith("round 1 train: node 3 (partition 2): update norm 387.3 clipped to 2.324")
    norms = sorted(c["update_norm"] for c in grid.rounds[1].clients[TRAIN])
    assert norms == pytest.approx([0.1 * 15**0.5, 0.2 * 15**0.5, 100 * 15**0.5], rel=1e-5)

    off = dataclasses.replace(default, update_clip_factor=0.0)
    grid, aggregate = send_round([*honest, bad], ExampleCap(), averaging, off)
    for name, value in sent.items():
        assert np.all(np.abs(aggregate[name].numpy() - value) > 30)
    assert grid.rounds[1].notes == []


def test_update_clip_rules():
    assert UpdateClip(0.0).limit([1.0, 2.0]) is None
    assert UpdateClip(3.0).limit([5.0, 1.0, 1000.0]) == 15.0
    assert UpdateClip(3.0).limit([1000.0, 1.0]) == 3.0  # two clients: the smaller one
    for value in (-1.0, 0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="update_clip_factor must be 0"):
            FederationArguments(update_clip_factor=value)
    assert FederationArguments(update_clip_factor=0).update_clip_factor == 0


# --- validate_reply on its own -------------------------------------------------------------------


def honest_train_content() -> RecordDict:
    return Client(node=1, step=0.1, train_examples=10, eval_examples=5, accuracy=0.6).train(
        Message(RecordDict({ARRAYS_KEY: get_weights(MODEL)}), dst_node_id=1, message_type=TRAIN)
    )


def test_honest_replies_pass_and_packed_ones_are_unpacked():
    content = honest_train_content()
    content[CLIENT_KEY][ARRAYS_HELD_KEY] = "ab" * 32
    validate_reply(TRAIN, content, EXPECTED)
    wire.pack(content)
    validate_reply(TRAIN, content, EXPECTED)
    assert list(content.array_records) == [ARRAYS_KEY]
    assert list(content[ARRAYS_KEY]) == list(REFERENCE)


def test_rows_a_reply_leaves_out_are_those_of_the_weights_it_was_sent():
    sent = get_weights(MODEL)
    trained = {name: torch.from_numpy(a.numpy().copy()) for name, a in sent.items()}
    trained["weight"][1] += 0.5
    content = honest_train_content()
    content[ARRAYS_KEY] = state_dict_to_arrays(trained)
    wire.pack(content, base_id=sent.object_id, base=sent)
    assert content[PACKED_LAYOUT_KEY]["rows"] == [1, -1]

    validate_reply(TRAIN, content, EXPECTED, sent_arrays={sent.object_id: sent})

    for name, value in arrays_to_state_dict(content[ARRAYS_KEY], REFERENCE).items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_weights_must_travel_in_the_runs_transfer_dtype(dtype):
    expected = dataclasses.replace(EXPECTED, transfer_dtype=dtype)
    content = honest_train_content()
    with pytest.raises(InvalidReplyError, match=f"received torch.float32 values, expected torch.{dtype}"):
        validate_reply(TRAIN, content, expected)
    content[ARRAYS_KEY] = get_weights(MODEL, dtype)  # what a client of this run sends
    validate_reply(TRAIN, content, expected, sent=REFERENCE)
    wire.pack(content)
    validate_reply(TRAIN, content, expected, sent=REFERENCE)


def test_validate_reply_raises_only_invalid_reply_error():
    for kind, attack in MALFORMED.values():
        if kind != TRAIN:
            continue
        content = honest_train_content()
        attack(content)
        sent = {name: value.clone() for name, value in REFERENCE.items()}
        with pytest.raises(InvalidReplyError):
            validate_reply(TRAIN, content, EXPECTED, sent)


def test_client_side_adaptive_clipping_may_report_its_norm_bit(tmp_path):
    from hf_flower.arguments import parse_args

    flags = ["--output_dir", str(tmp_path), "--strategy", "DifferentialPrivacyClientSideAdaptiveClipping"]
    run_args = parse_args(
        [*flags, "--strategy_kwargs", '{"noise_multiplier": 0.1, "num_sampled_clients": 2}']
    )
    expected = ExpectedReply.for_run(run_args.federation, REFERENCE)
    content = honest_train_content()
    content[METRICS_KEY]["norm_bit"] = 1
    validate_reply(TRAIN, content, expected)
    with pytest.raises(InvalidReplyError, match="unexpected names"):
        validate_reply(TRAIN, content, EXPECTED)
    content[METRICS_KEY]["norm_bit"] = 2
    with pytest.raises(InvalidReplyError, match="outside"):
        validate_reply(TRAIN, content, expected)


def test_evaluate_metrics_only_some_clients_report_are_left_out():
    """`eval_label_accuracy`-like metrics depend on a client's data: Flower must never see uneven keys."""

    def without_f1(kind, content):
        if kind == EVALUATE:
            del content[METRICS_KEY]["eval_f1"]

    clients = honest_clients()
    clients[0].attack = without_f1
    grid, _, result = run_round(make_strategy("FedMedian", clients=3), clients)
    assert grid.rounds[1].failures == []
    assert "eval_f1" not in result.evaluate_metrics_clientapp[1]
    assert "eval_accuracy" in result.evaluate_metrics_clientapp[1]


# --- bounded waits ------------------------------------------------------------------------------------


class TooFewNodes(ClientGrid):
    """A grid where one node ever connects."""

    def get_node_ids(self):
        return [1]


def test_waiting_for_clients_ends_with_a_clear_error():
    strategy = FedAvg(min_available_nodes=3)
    grid = TrackingGrid(
        TooFewNodes([]),
        RoundRules(EXPECTED, 2),
        wait_for_clients_timeout=0.1,
        clients_wanted=nodes_waited_for(strategy),
    )
    started = time.monotonic()
    with pytest.raises(ClientsMissingError) as error:
        strategy.start(grid=grid, initial_arrays=get_weights(MODEL), num_rounds=1)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "1 connected, the strategy waits for 3" in message and "--wait_for_clients_timeout" in message


def test_each_wait_for_clients_has_its_own_deadline():
    grid = TrackingGrid(TooFewNodes([]), RoundRules(EXPECTED, 2), wait_for_clients_timeout=0.2)
    grid.get_node_ids()
    time.sleep(0.3)
    grid.send_and_receive([])  # the strategy sent a round: the next poll starts a new wait
    grid.get_node_ids()
    grid.get_node_ids()
    time.sleep(0.3)
    with pytest.raises(ClientsMissingError):
        grid.get_node_ids()


def test_nodes_waited_for_reads_the_strategy_and_the_one_a_wrapper_wraps():
    assert nodes_waited_for(FedAvg(min_available_nodes=2, min_train_nodes=5)) == 5
    assert nodes_waited_for(FedAvg(min_evaluate_nodes=7, fraction_evaluate=0.0)) == 2
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    wrapper = DifferentialPrivacyServerSideFixedClipping(FedAvg(min_available_nodes=4), 0.1, 1.0, 4)
    assert nodes_waited_for(wrapper) == 4


@pytest.mark.parametrize("name", ["round_timeout", "wait_for_clients_timeout"])
@pytest.mark.parametrize("value", [-5.0, 0.0, math.nan, math.inf])
def test_timeouts_must_be_positive_and_finite(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive, finite number of seconds.*--{name}"):
        FederationArguments(**{name: value})


def test_cap_and_norm_flags_are_checked():
    with pytest.raises(ValueError, match="max_examples_per_client must be 0"):
        FederationArguments(max_examples_per_client=-1)
    for value in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_update_norm must be 0"):
            FederationArguments(max_update_norm=value)
    federation = FederationArguments(
        max_examples_per_client=500, max_update_norm=2.5, wait_for_clients_timeout=30
    )
    assert (federation.max_examples_per_client, federation.max_update_norm) == (500, 2.5)


@pytest.mark.parametrize("strategy_name", ["FedAvg", "FedMedian"])
@pytest.mark.parametrize("case", ["num-examples -1e12", "NaN weights", "evaluate accuracy 1e9"])
def test_the_fast_and_the_plain_flower_path_aggregate_the_same(strategy_name, case):
    """`--fast_transport false` (Flower's own `Grid.send_and_receive`, no averaging on arrival)
    saves the same aggregate, refuses the same reply and reports the same evaluation as the fast
    exchange: the seam to fall back on when a Flower release breaks the fast path."""
    kind, attack = MALFORMED[case]
    outcomes = []
    for fast in (True, False):
        clients = [*honest_clients(), attacker(attack, kind)]
        grid, aggregate, result = run_round(make_strategy(strategy_name), clients, fast_transport=fast)
        outcomes.append((aggregate, grid.rounds[1], result.evaluate_metrics_clientapp[1]))
    (fast_arrays, fast_round, fast_eval), (plain_arrays, plain_round, plain_eval) = outcomes
    assert_aggregate(plain_arrays, {name: fast_arrays[name].numpy() for name in fast_arrays})
    assert len(plain_round.failures) == len(fast_round.failures) == 1
    assert plain_round.failures[0].split(":")[-1] == fast_round.failures[0].split(":")[-1]
    assert plain_round.succeeded == fast_round.succeeded
    assert dict(plain_eval) == pytest.approx(dict(fast_eval))


# --- packed layouts, error reasons ----------------------------------------------------------------


def test_a_packed_layout_of_200000_names_is_refused_before_anything_is_built():
    """Issue 22, point 5: a reply of under 1 MB declaring 200,000 one-value tensors. Unpacked first,
    it built 200,000 Flower Arrays (17.9 s of server CPU) before its names met the model's."""
    content = honest_train_content()
    wire.pack(content)
    names = [f"layer.{i}" for i in range(200_000)]
    content[PACKED_LAYOUT_KEY] = ConfigRecord(
        {"names": names, "ndims": [1] * len(names), "dims": [1] * len(names)}
    )
    content[PACKED_ARRAYS_KEY] = ArrayRecord(
        {wire.FLAT_ARRAY_NAME: Array(np.zeros(len(names), dtype=np.float32))}
    )

    start = time.process_time()
    with pytest.raises(InvalidReplyError, match="declaring 200000 tensors; the model has 2"):
        validate_reply(TRAIN, content, EXPECTED)
    assert time.process_time() - start < 0.5


@pytest.mark.parametrize(
    "layout, error",
    [
        ({"names": ["bias", "other"]}, "names the model lacks"),
        ({"dims": [4, 3, 3]}, "declared shapes differ"),
        ({"ndims": [1, 1]}, "declared shapes differ"),
    ],
)
def test_a_packed_layout_must_be_the_models(layout, error):
    content = honest_train_content()
    wire.pack(content)
    content[PACKED_LAYOUT_KEY] = ConfigRecord({**content[PACKED_LAYOUT_KEY], **layout})
    with pytest.raises(InvalidReplyError, match=error):
        validate_reply(TRAIN, content, EXPECTED)


def test_packed_weights_in_another_dtype_or_size_are_refused_unread():
    content = honest_train_content()
    wire.pack(content)
    content[PACKED_ARRAYS_KEY] = ArrayRecord({wire.FLAT_ARRAY_NAME: Array(np.zeros(15, dtype=np.float16))})
    with pytest.raises(InvalidReplyError, match="in float16, expected float32"):
        validate_reply(TRAIN, content, EXPECTED)
    content[PACKED_ARRAYS_KEY] = ArrayRecord({wire.FLAT_ARRAY_NAME: Array(np.zeros(10**6, dtype=np.float32))})
    with pytest.raises(InvalidReplyError, match="larger than the model's 15 values"):
        validate_reply(TRAIN, content, EXPECTED)


def test_a_clients_error_reason_is_stored_and_shown_bounded_and_printable():
    """Issue 22, point 9: an error reply's reason of 10 MB with terminal escape codes."""
    reason = "\x1b[2J\x1b]0;owned\x07boom\r\n\x1b[31m" + "x" * 10**7

    class Failing(Client):
        def answer(self, message):
            return Message(Error(code=1, reason=reason), reply_to=message)

    failing = Failing(node=4, step=0.0, train_examples=1, eval_examples=1, accuracy=0.0)
    grid, _, _ = run_round(make_strategy("FedAvg"), [*honest_clients(), failing])
    train, evaluate = grid.rounds[1].failures
    assert train.startswith("round 1 train: node 4: boom xxx") and evaluate.startswith("round 1 evaluate")
    for failure in (train, evaluate):
        assert failure.endswith("...") and len(failure) < 600
        assert "\x1b" not in failure and "\r" not in failure and "owned" not in failure
    assert printable("a\x1b[1mb\x9b2Jc\u202ed\x00e\ttab") == "abc d e tab"


def test_metrics_up_to_1e308_cannot_make_weighted_means_inf():
    """Issue 22, point 9: an evaluation loss of 1.7e308 (finite) times 6 examples overflowed the
    round's weighted mean; such a reply is refused and the mean stays the honest clients'."""
    honest = honest_clients()
    bad = attacker(set_metric("eval_loss", 1.7e308), EVALUATE)
    grid, _, result = run_round(make_strategy("FedAvg"), [*honest, bad])
    assert "beyond the 1e+30 accepted" in grid.rounds[1].failures[0]
    assert result.evaluate_metrics_clientapp[1]["eval_loss"] == pytest.approx(0.4)
