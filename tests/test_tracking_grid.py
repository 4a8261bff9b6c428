"""`TrackingGrid` with long-lived clients: weights a node already holds travel by id only."""

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from hf_flower.constants import (
    ARRAYS_KEY,
    ARRAYS_NOT_HELD_CODE,
    CLIENT_KEY,
    CONFIG_KEY,
    NUM_EXAMPLES_KEY,
    PACKED_ARRAYS_KEY,
    SERVER_ROUND_KEY,
)
from hf_flower.server.replies import RoundRules
from hf_flower.server.round_grid import TrackingGrid
from hf_flower.server.validation import ExampleCap, ExpectedReply
from hf_flower.transport.client_loop import HeldWeights, serve
from hf_flower.transport.wire import FLAT_ARRAY_NAME, pack_arrays
from hf_flower.weights import get_weights, state_dict_to_arrays

pytestmark = pytest.mark.usefixtures("server_identity")


# What an honest client reports besides its example count (`client_app.train` / `evaluate`).
TRAIN_METRICS = {"train_loss": 0.5, "train_runtime": 1.0, "train_steps": 2}
EVALUATE_METRICS = {"eval_loss": 0.6, "eval_runtime": 1.0}


class FakeNode:
    """A long-lived client: `scripts/client.py`'s handling of a message around a trivial app."""

    def __init__(self):
        self.held = HeldWeights()
        self.received = []  # the weights the app itself saw, message by message
        self.packed = []  # whether each message's weights travelled as one flat array

    def answer(self, message: Message) -> Message:
        self.packed.append(PACKED_ARRAYS_KEY in message.content.array_records)
        return serve(message, None, self.held, self.app)

    def app(self, message: Message, context) -> Message:
        arrays = message.content[ARRAYS_KEY]
        self.received.append(arrays)
        train = message.metadata.message_type == MessageType.TRAIN
        content = RecordDict(
            {
                "metrics": MetricRecord(
                    {**(TRAIN_METRICS if train else EVALUATE_METRICS), NUM_EXAMPLES_KEY: 1}
                ),
                CLIENT_KEY: ConfigRecord({"partition-id": 0}),
            }
        )
        if train:
            content[ARRAYS_KEY] = arrays
        return Message(content, reply_to=message)


class FakeGrid:
    """Delivers every pushed message at once to its node and keeps the reply for the next pull."""

    def __init__(self, nodes: dict[int, FakeNode]):
        self.nodes = nodes
        self.replies: dict[str, Message] = {}
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grids do
            self.pushed.append(message)
            # The node gets its own copy, as it would over the wire.
            delivered = Message(metadata=message.metadata, content=RecordDict(dict(message.content)))
            node = self.nodes[message.metadata.dst_node_id]
            self.replies[message.metadata.message_id] = node.answer(delivered)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def send(grid: TrackingGrid, kind: str, arrays: ArrayRecord, server_round: int, nodes=(1, 2)):
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({SERVER_ROUND_KEY: server_round})})
    messages = [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]
    return grid.send_and_receive(messages, timeout=5)


def weights(seed: int) -> tuple[dict, ArrayRecord]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model.state_dict(), get_weights(model)


def nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def packed_nbytes(arrays: ArrayRecord) -> int:
    return len(pack_arrays(arrays)[0][FLAT_ARRAY_NAME].data)


def assert_same_arrays(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())


def test_weights_a_node_holds_travel_by_id_and_the_rest_packed():
    reference, initial = weights(0)
    _, aggregate = weights(1)
    nodes = {1: FakeNode(), 2: FakeNode()}
    fake = FakeGrid(nodes)
    grid = TrackingGrid(fake, RoundRules(ExpectedReply(reference), min_train_clients=2))

    assert len(send(grid, MessageType.TRAIN, initial, 1)) == 2
    assert len(send(grid, MessageType.EVALUATE, aggregate, 1)) == 2
    # Round 1 trains before any node has said what it is: per-tensor; then one flat array.
    assert grid.rounds[1].bytes_sent == 2 * nbytes(initial) + 2 * packed_nbytes(aggregate)
    assert [node.packed for node in nodes.values()] == [[False, True], [False, True]]

    # Round 2 trains from the aggregate both nodes just evaluated: only its id travels.
    assert len(send(grid, MessageType.TRAIN, aggregate, 2)) == 2
    assert grid.rounds[2].bytes_sent == 0
    assert all(not m.content.array_records for m in fake.pushed[-2:])
    for node in nodes.values():
        assert_same_arrays(node.received[-2], aggregate)  # unpacked exactly
        assert_same_arrays(node.received[-1], aggregate)  # filled in from what it held


def test_packed_replies_reach_the_strategy_as_ordinary_records():
    reference, initial = weights(0)
    grid = TrackingGrid(
        FakeGrid({1: FakeNode(), 2: FakeNode()}), RoundRules(ExpectedReply(reference), min_train_clients=2)
    )
    for reply in send(grid, MessageType.TRAIN, initial, 1):
        assert PACKED_ARRAYS_KEY not in reply.content.array_records
        assert_same_arrays(reply.content[ARRAYS_KEY], initial)


def test_a_node_that_lost_its_weights_gets_them_in_full():
    reference, initial = weights(0)
    nodes = {1: FakeNode(), 2: FakeNode()}
    grid = TrackingGrid(FakeGrid(nodes), RoundRules(ExpectedReply(reference), min_train_clients=2))
    send(grid, MessageType.EVALUATE, initial, 1)

    nodes[2].held = HeldWeights()  # node 2 restarted under the same node id
    replies = send(grid, MessageType.TRAIN, initial, 2)

    assert len(replies) == 2 and grid.rounds[2].failures == []
    assert grid.rounds[2].bytes_sent == packed_nbytes(initial)  # node 1 by id, node 2 in full
    assert_same_arrays(nodes[2].received[-1], initial)


def test_clients_that_say_nothing_always_get_full_per_tensor_weights():
    """Simulation and Flower's default isolation never announce weights: nothing changes for them."""
    reference, initial = weights(0)

    class PlainNode(FakeNode):
        def answer(self, message):
            self.packed.append(PACKED_ARRAYS_KEY in message.content.array_records)
            return self.app(message, None)

    grid = TrackingGrid(
        FakeGrid({1: PlainNode(), 2: PlainNode()}), RoundRules(ExpectedReply(reference), min_train_clients=2)
    )
    send(grid, MessageType.EVALUATE, initial, 1)
    send(grid, MessageType.TRAIN, initial, 2)
    assert grid.rounds[2].bytes_sent == 2 * nbytes(initial)


def test_replies_averaged_on_arrival_aggregate_like_all_of_them():
    """FedAvg of the one averaged reply equals FedAvg of every reply; the replies keep no weights."""
    reference, initial = weights(0)
    updates = {1: weights(1)[1], 2: weights(2)[1]}
    examples = {1: 30, 2: 10}

    class TrainingNode(FakeNode):
        def __init__(self, node):
            super().__init__()
            self.node = node

        def app(self, message, context):
            reply = super().app(message, context)
            reply.content[ARRAYS_KEY] = updates[self.node]
            reply.content["metrics"] = MetricRecord(
                {**TRAIN_METRICS, NUM_EXAMPLES_KEY: examples[self.node], "train_loss": float(self.node)}
            )
            return reply

    nodes = {n: TrainingNode(n) for n in (1, 2)}
    grid = TrackingGrid(
        FakeGrid(nodes),
        RoundRules(ExpectedReply(reference), 2, example_cap=ExampleCap(fixed=100), average_on_arrival=True),
    )
    (averaged,) = send(grid, MessageType.TRAIN, initial, 1)

    expected = {key: (updates[1][key].numpy() * 30 + updates[2][key].numpy() * 10) / 40 for key in reference}
    arrays, metrics = FedAvg().aggregate_train(1, [averaged])
    for key in reference:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx((1 * 30 + 2 * 10) / 40)
    assert averaged.content["metrics"][NUM_EXAMPLES_KEY] == 40
    assert grid.rounds[1].succeeded[MessageType.TRAIN] == 2


def test_replies_are_reported_to_a_launcher_as_they_arrive(tmp_path, monkeypatch):
    """With HF_FLOWER_PROGRESS_DIR set, each phase's replies (and refusals) land in its file."""
    from flwr.app import Error

    from hf_flower.progress import live as live_progress

    monkeypatch.setenv(live_progress.PROGRESS_DIR_ENV, str(tmp_path))
    reference, initial = weights(0)

    class RejectedNode(FakeNode):  # replies with none of the model's weights
        def app(self, message, context):
            reply = super().app(message, context)
            reply.content[ARRAYS_KEY] = ArrayRecord()
            return reply

    class FailingNode(FakeNode):
        def app(self, message, context):
            return Message(Error(code=0, reason="client partition 2 failed\ntraceback"), reply_to=message)

    nodes = {1: FakeNode(), 2: RejectedNode(), 3: FailingNode()}
    grid = TrackingGrid(FakeGrid(nodes), RoundRules(ExpectedReply(reference), min_train_clients=1))
    assert len(send(grid, MessageType.TRAIN, initial, 4, nodes=(1, 2, 3))) == 1

    phase = live_progress.read_rounds(tmp_path)[4].phases["train"]
    assert (phase.sampled, phase.finished) == (3, True)
    replies = sorted(phase.replies, key=lambda r: r.node_id)  # in the order they arrived
    assert [(r.node_id, r.partition_id, r.status) for r in replies] == [
        (1, 0, "ok"), (2, 0, "rejected"), (3, None, "error"),
    ]  # fmt: skip
    assert replies[0].metrics == {**TRAIN_METRICS, NUM_EXAMPLES_KEY: 1.0}
    assert "its reply was rejected" in replies[1].error
    assert replies[2].error == "client partition 2 failed"


def test_a_round_has_one_deadline_and_its_messages_expire_with_it(monkeypatch):
    """`--round_timeout` bounds a round's training and federated evaluation together, and every
    message of the round expires when the round ends (its client stops working on it)."""
    import time

    reference, initial = weights(0)
    fake = FakeGrid({1: FakeNode(), 2: FakeNode()})
    grid = TrackingGrid(fake, RoundRules(ExpectedReply(reference), min_train_clients=2))
    send(grid, MessageType.TRAIN, initial, server_round=1)  # timeout=5
    assert all(4.5 < m.metadata.ttl <= 5.1 for m in fake.pushed)
    trained_at = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: trained_at + 3.0)  # 3 s of the round pass
    fake.pushed.clear()
    send(grid, MessageType.EVALUATE, initial, server_round=1)
    ttls = [m.metadata.ttl - (time.time() - m.metadata.created_at) for m in fake.pushed]
    assert all(1.5 < ttl <= 2.1 for ttl in ttls), ttls  # what is left of the round's 5 s
    monkeypatch.setattr(time, "monotonic", lambda: trained_at + 3.5)
    fake.pushed.clear()
    send(grid, MessageType.TRAIN, initial, server_round=2)  # the next round has its own 5 s
    assert all(4.5 < m.metadata.ttl <= 5.1 for m in fake.pushed), [m.metadata.ttl for m in fake.pushed]


def test_replies_leave_out_the_rows_training_left_as_they_were():
    """A long-lived client's reply carries the embedding rows its round changed and nothing else of
    that tensor; the strategy gets every tensor back exactly as the client trained it."""
    torch.manual_seed(0)
    reference = {"embeddings": torch.randn(1000, 8), "bias": torch.randn(8)}
    initial = state_dict_to_arrays(reference)
    trained = {"embeddings": reference["embeddings"].clone(), "bias": reference["bias"] + 1}
    trained["embeddings"][[3, 50]] += 1.0

    class EmbeddingNode(FakeNode):
        def app(self, message, context):
            reply = super().app(message, context)
            if reply.content.array_records:
                reply.content[ARRAYS_KEY] = state_dict_to_arrays(trained)
            return reply

    grid = TrackingGrid(
        FakeGrid({1: EmbeddingNode(), 2: EmbeddingNode()}),
        RoundRules(ExpectedReply(reference), min_train_clients=2),
    )
    replies = send(grid, MessageType.TRAIN, initial, 1)

    assert len(replies) == 2 and grid.rounds[1].failures == []
    for reply in replies:
        assert_same_arrays(reply.content[ARRAYS_KEY], state_dict_to_arrays(trained))
    # 2 of 1000 rows, the bias, their indices and the headers: under a tenth of the weights.
    assert grid.rounds[1].bytes_received < 2 * nbytes(initial) / 10


def embedding_weights(changed_rows=()) -> ArrayRecord:
    """Weights with a 1000-row embedding, `changed_rows` of it moved."""
    torch.manual_seed(0)
    state = {"embeddings": torch.randn(1000, 8), "bias": torch.randn(8)}
    state["embeddings"][list(changed_rows)] += 1.0
    return state_dict_to_arrays(state)


def test_an_aggregate_goes_as_the_rows_that_differ_from_what_the_node_holds():
    previous, aggregate = embedding_weights(), embedding_weights(changed_rows=[7, 99])
    nodes = {1: FakeNode(), 2: FakeNode()}
    grid = TrackingGrid(FakeGrid(nodes), RoundRules(ExpectedReply({"embeddings": torch.zeros(1000, 8), "bias": torch.zeros(8)}),
                        min_train_clients=2))  # fmt: skip
    send(grid, MessageType.TRAIN, previous, 1)  # both nodes now hold `previous`

    send(grid, MessageType.EVALUATE, aggregate, 1)

    # Two rows (and the bias) per node, not the 1000 x 8 embedding.
    assert grid.rounds[1].bytes_sent - 2 * nbytes(previous) < nbytes(aggregate) / 10
    for node in nodes.values():
        assert_same_arrays(node.received[-1], aggregate)
    # Round 2 trains from the aggregate the nodes rebuilt: its id alone travels.
    send(grid, MessageType.TRAIN, aggregate, 2)
    assert grid.rounds[2].bytes_sent == 0


def test_a_node_without_the_base_of_the_rows_gets_the_weights_in_full():
    previous, aggregate = embedding_weights(), embedding_weights(changed_rows=[7])
    nodes = {1: FakeNode(), 2: FakeNode()}
    grid = TrackingGrid(FakeGrid(nodes), RoundRules(ExpectedReply({"embeddings": torch.zeros(1000, 8), "bias": torch.zeros(8)}),
                        min_train_clients=2))  # fmt: skip
    send(grid, MessageType.TRAIN, previous, 1)
    nodes[2].held = HeldWeights()  # node 2 restarted under the same node id

    replies = send(grid, MessageType.EVALUATE, aggregate, 1)

    assert len(replies) == 2 and grid.rounds[1].failures == []
    assert grid.rounds[1].bytes_sent - 2 * nbytes(previous) > packed_nbytes(aggregate)  # node 2 in full
    assert_same_arrays(nodes[2].received[-1], aggregate)


def test_a_node_that_always_answers_not_held_gets_one_full_resend_then_fails():
    """Issue 22, point 9: such a node got the full weights every 0.2 s until the round's deadline.
    Now it gets them in full once; the same answer to weights sent in full is its failure."""
    reference, initial = weights(0)

    class NeverHolds(FakeNode):
        def answer(self, message):
            self.packed.append(PACKED_ARRAYS_KEY in message.content.array_records)
            return Message(Error(code=ARRAYS_NOT_HELD_CODE, reason="weights not held"), reply_to=message)

    nodes = {1: FakeNode(), 2: NeverHolds()}
    fake = FakeGrid(nodes)
    grid = TrackingGrid(fake, RoundRules(ExpectedReply(reference), min_train_clients=1))
    start = time.monotonic()
    replies = send(grid, MessageType.TRAIN, initial, 1)

    assert time.monotonic() - start < 2
    assert len(replies) == 1 and len(nodes[2].packed) == 2
    (failure,) = grid.rounds[1].failures
    assert failure == "round 1 train: node 2: weights not held"
