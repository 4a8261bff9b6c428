"""The ClientApp's train/evaluate handlers, called in-process with real Flower messages."""

import time

import pytest
import torch
from conftest import REVIEW_FACTS, REVIEW_LABELS
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from hf_flower.arguments import parse_args
from hf_flower.arguments.run_config import to_run_config
from hf_flower.client import client_app
from hf_flower.weights import get_weights


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, reviews_csv):
    run_args = parse_args(
        [
            "--model_name_or_path", str(tiny_model_dir), "--dataset", str(reviews_csv),
            "--max_length", "32", "--test_size", "40", "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    return to_run_config(run_args)


def context(run_config, partition_id=0):
    node_config = {"partition-id": partition_id, "num-partitions": 2}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def instruction(arrays, kind=MessageType.TRAIN, server_round=1, ttl=3600.0, **config):
    """A message as a SuperNode hands it to the ClientApp (sent now, living `ttl` seconds)."""
    content = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord(
                {"server-round": server_round, "label-names": list(REVIEW_LABELS), **config}
            ),
        }
    )
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id=str(server_round), created_at=time.time(), ttl=ttl, message_type=kind,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


def test_train_replies_new_weights_and_reuses_the_model(run_config):
    ctx = context(run_config)
    task_misses = client_app.load_run.cache_info().misses
    partition_misses = client_app.load_partition.cache_info().misses
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    start = get_weights(task.model)
    reply = client_app.train(instruction(start), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["train_steps"] == 3
    assert reply.content["client"]["partition-id"] == 0
    new = reply.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(new[k], v) for k, v in start.to_torch_state_dict().items())
    # A second message in the same process reuses the model, tokenizer and data.
    client_app.train(instruction(start, server_round=2), ctx)
    assert client_app.load_run.cache_info().misses == task_misses + 1
    assert client_app.load_partition.cache_info().misses == partition_misses + 1


def test_training_stops_when_the_message_expires(run_config, monkeypatch):
    """The server makes a message expire when its round ends (`--round_timeout`): the client stops
    training there, at a step boundary, and says so instead of replying late."""
    from hf_flower.client import round_driver as trainer

    stops = []
    original = trainer.TaskDeadline.on_step_end

    def record(self, args, state, control, **kwargs):
        control = original(self, args, state, control, **kwargs)
        stops.append((state.global_step, control.should_training_stop))
        return control

    monkeypatch.setattr(trainer.TaskDeadline, "on_step_end", record)
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    message = instruction(get_weights(task.model), ttl=0.01)
    time.sleep(0.05)
    reply = client_app.train(message, context(run_config))
    assert stops == [(1, True)]  # of --max_steps 3
    assert reply.has_error()
    assert "message expired after 1 training steps" in reply.error.reason
    assert "--round_timeout" in reply.error.reason


def test_evaluate_reports_loss_accuracy_f1(run_config):
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    reply = client_app.evaluate(
        instruction(get_weights(task.model), MessageType.EVALUATE), context(run_config)
    )
    metrics = reply.content["metrics"]
    assert set(metrics) == {"eval_loss", "eval_accuracy", "eval_f1", "eval_runtime", "num-examples"}
    assert 0 <= metrics["eval_accuracy"] <= 1


def test_failure_is_reported_with_partition_and_round(run_config):
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    arrays = get_weights(task.model)
    del arrays["classifier.weight"]
    reply = client_app.train(instruction(arrays, server_round=4), context(run_config, partition_id=1))
    assert reply.has_error()
    assert "client partition 1 failed during training of round 4" in reply.error.reason
    assert "classifier.weight" in reply.error.reason


def test_proximal_term_pulls_towards_global_weights(run_config):
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    client = client_app.load_partition(client_app._frozen(run_config), REVIEW_FACTS, 0, 2)
    plain = client_app.build_trainer(task, 0.0, train_dataset=client.train)
    proximal = client_app.build_trainer(task, 10.0, train_dataset=client.train)
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.1)
    batch = plain.data_collator([client.train[i] for i in range(4)])
    task.model.eval()
    assert proximal.compute_loss(task.model, dict(batch)) > plain.compute_loss(task.model, dict(batch)) + 1.0


def test_client_side_dp_clips_the_update(run_config):
    run_config = {**run_config, "federation.strategy": "DifferentialPrivacyClientSideFixedClipping"}
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    start = get_weights(task.model)
    before = {k: v.clone() for k, v in start.to_torch_state_dict().items()}
    message = instruction(start, clipping_norm=0.01)
    reply = client_app.differential_privacy_mod(message, context(run_config), client_app.train)
    assert not reply.has_error()
    after = reply.content["arrays"].to_torch_state_dict()
    update_norm = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    assert update_norm <= 0.01 + 1e-6


@pytest.mark.parametrize(
    "flags, travels",
    [
        (["--peft", "lora", "--transfer_dtype", "bfloat16"], lambda n: ".lora_" in n or ".modules_to_save." in n),
        (["--freeze_modules", "embeddings,encoder.layer.0", "--transfer_dtype", "float16"],
         lambda n: ".embeddings." not in n and ".layer.0." not in n),
    ],
)  # fmt: skip
def test_only_the_trainable_part_travels_in_the_transfer_dtype(
    tmp_path, tiny_model_dir, reviews_csv, flags, travels
):
    run_args = parse_args(
        [
            "--model_name_or_path", str(tiny_model_dir), "--dataset", str(reviews_csv),
            "--max_length", "32", "--test_size", "40", "--max_steps", "2", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "run"), *flags,
        ]
    )  # fmt: skip
    run_config = to_run_config(run_args)
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    frozen = {n: p.detach().clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    assert frozen  # something is frozen
    start = get_weights(task.model, run_args.federation.transfer_dtype)

    reply = client_app.train(instruction(start), context(run_config))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    arrays = reply.content["arrays"]
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert list(arrays) == trainable and all(travels(n) for n in arrays)
    assert {a.dtype for a in arrays.values()} == {run_args.federation.transfer_dtype}
    for name, p in task.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # frozen weights never change


def test_own_data_client_maps_its_labels_onto_the_servers(tmp_path, run_config):
    """A deployed client's file: labels by name onto the run's classes; an unknown one is named."""
    own = tmp_path / "own.csv"
    own.write_text("text,label\n" + "great film,positive\n" * 9 + "a film,mixed\n")
    node = Context(
        run_id=1, node_id=8, node_config={"data-path": str(own)}, state=RecordDict(), run_config=run_config
    )
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    message = instruction(get_weights(task.model), **{"label-names": ["negative", "positive"]})

    reply = client_app.train(message, node)

    assert reply.has_error()
    assert "Label 'mixed' in column 'label'" in reply.error.reason
    assert "not one of the run's classes ['negative', 'positive']" in reply.error.reason


def test_message_without_the_runs_classes_is_refused(run_config):
    task = client_app.load_run(client_app._frozen(run_config), REVIEW_FACTS)
    message = instruction(get_weights(task.model))
    del message.content["config"]["label-names"]
    reply = client_app.train(message, context(run_config))
    assert reply.has_error() and "carries no 'label-names'" in reply.error.reason
