"""The ClientApp's train/evaluate handlers, called in-process with real Flower messages: the Trainer the
run's factory builds, kept between rounds and checked against the server's model; and what a failing
client tells the server (a category and a reference, never its data)."""

import time

import numpy as np
import pytest
import torch
from conftest import REVIEW_LABELS, run_config_of, trainer_for
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from hf_flower.arguments.policy import ClientPolicy, RunRefused
from hf_flower.client import client_app, failures, session
from hf_flower.client.callbacks import TaskExpiredError
from hf_flower.data import DataError
from hf_flower.factory import FactoryError, model_facts
from hf_flower.modeling import ModelError
from hf_flower.weights import WeightsMismatchError, get_weights


def tiny_flags(tmp_path, tiny_model_dir, reviews_csv, *flags):
    return [
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(reviews_csv),
        "--max_length", "32", "--test_size", "40", "--max_steps", "9", "--num_rounds", "3",
        "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "run"), *flags,
    ]  # fmt: skip


def handle(message, context):
    """The ClientApp's answer to `message`, as Flower runs it (mods included)."""
    return client_app.app(message=message, context=context)


@pytest.fixture
def deployed(monkeypatch, tiny_model_dir, reviews_csv):
    """A deployed client's policy (`hf-flower client --allowed_models ... --allowed_data ...`), which
    admits the tests' local model and data set; the conftest's default is the operator's own run."""
    policy = ClientPolicy.from_flags(allowed_models=str(tiny_model_dir), allowed_data=str(reviews_csv))
    for name, value in policy.to_env().items():
        monkeypatch.setenv(name, value)
    return policy


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, reviews_csv):
    return run_config_of(tiny_flags(tmp_path, tiny_model_dir, reviews_csv))


@pytest.fixture
def server(run_config):
    """The server's Trainer of the run: its model gives the weights and facts every message carries."""
    return trainer_for(run_config)


def context(run_config, partition_id=0, run_id=1):
    node_config = {"partition-id": partition_id, "num-partitions": 2}
    return Context(
        run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def instruction(arrays, kind=MessageType.TRAIN, server_round=1, ttl=3600.0, facts=None, **config):
    """A message as a SuperNode hands it to the ClientApp (sent now, living `ttl` seconds), with what
    the server says of its model (`facts`, by default a 2-class classifier's)."""
    facts = (
        facts
        if facts is not None
        else {"model-class": "BertForSequenceClassification", "label-names": list(REVIEW_LABELS)}
    )
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round, **facts, **config})}
    )
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id=str(server_round), created_at=time.time(), ttl=ttl, message_type=kind,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


def test_train_replies_new_weights_and_keeps_the_trainer(run_config, server):
    ctx = context(run_config)
    start = get_weights(server.model)
    reply = handle(instruction(start), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    # --max_steps 9 over --num_rounds 3: each round trains its third.
    assert metrics["num-examples"] > 0 and metrics["train_steps"] == 3
    assert reply.content["client"]["partition-id"] == 0
    new = reply.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(new[k], v) for k, v in start.to_torch_state_dict().items())
    # The next message of the run and partition reuses the Trainer: model, tokenizer and data.
    trainer = session.session_for(instruction(start), ctx).driver.trainer
    handle(instruction(start, server_round=2), ctx)
    assert session.session_for(instruction(start), ctx).driver.trainer is trainer
    # Another partition in this process gets its own, and the first one goes: one Trainer a process.
    other = session.session_for(instruction(start), context(run_config, partition_id=1))
    assert other.driver.trainer is not trainer and other.context.partition_id == 1


def test_training_stops_when_the_message_expires(run_config, server, monkeypatch):
    """The server makes a message expire when its round ends (`--round_timeout`): the client stops
    training there, at a step boundary, and says so instead of replying late."""
    from hf_flower.client import callbacks

    stops = []
    original = callbacks.TaskDeadline.on_step_end

    def record(self, args, state, control, **kwargs):
        control = original(self, args, state, control, **kwargs)
        stops.append((state.global_step, control.should_training_stop))
        return control

    monkeypatch.setattr(callbacks.TaskDeadline, "on_step_end", record)
    message = instruction(get_weights(server.model), ttl=0.01)
    time.sleep(0.05)
    reply = handle(message, context(run_config))
    assert stops == [(1, True)]  # of the round's 3 steps
    assert reply.has_error()
    assert "message expired after 1 training steps" in reply.error.reason
    assert "--round_timeout" in reply.error.reason


def test_evaluate_reports_every_metric_of_the_trainers_evaluate(run_config, server):
    reply = handle(instruction(get_weights(server.model), MessageType.EVALUATE), context(run_config))
    metrics = reply.content["metrics"]
    assert set(metrics) == {"eval_loss", "eval_accuracy", "eval_f1", "eval_runtime", "num-examples"}
    assert 0 <= metrics["eval_accuracy"] <= 1


def test_failure_is_reported_with_partition_and_round(run_config, server):
    arrays = get_weights(server.model)
    del arrays["classifier.weight"]
    reply = handle(instruction(arrays, server_round=4), context(run_config, partition_id=1))
    assert reply.has_error()
    assert "client partition 1 failed during training of round 4" in reply.error.reason
    assert "classifier.weight" in reply.error.reason


def test_a_client_model_unlike_the_servers_is_refused_before_training(run_config, server):
    facts = {**model_facts(server.model), "model-class": "RobertaForSequenceClassification"}
    reply = handle(instruction(get_weights(server.model), facts=facts), context(run_config, run_id=2))
    assert reply.has_error()
    assert (
        "built another model than the server's (model class: the server's RobertaForSequenceClassification, "
        "this client's BertForSequenceClassification)" in reply.error.reason
    )


def test_proximal_term_pulls_towards_global_weights(run_config, server):
    """FedProx's `proximal-mu` (sent by Flower's FedProx) keeps a round's update closer to the
    weights the round started from."""
    start = get_weights(server.model)
    reference = start.to_torch_state_dict()

    def moved(**config) -> float:
        reply = handle(instruction(start, **config), context(run_config))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        after = reply.content["arrays"].to_torch_state_dict()
        return float(torch.sqrt(sum(((after[k] - reference[k]) ** 2).sum() for k in reference)))

    assert moved(**{"proximal-mu": 200.0}) < 0.5 * moved()


def test_client_side_dp_clips_the_update(run_config, server):
    run_config = {**run_config, "federation.strategy": "DifferentialPrivacyClientSideFixedClipping"}
    start = get_weights(server.model)
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
    flags = tiny_flags(tmp_path, tiny_model_dir, reviews_csv, "--learning_rate", "1e-2", *flags)
    run_config = run_config_of(flags)
    server = trainer_for(run_config)
    dtype = run_config["federation.transfer-dtype"]
    start = get_weights(server.model, dtype)
    facts = model_facts(server.model)

    reply = handle(instruction(start, facts=facts), context(run_config))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    model = session.session_for(instruction(start, facts=facts), context(run_config)).driver.trainer.model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen  # something is frozen
    arrays = reply.content["arrays"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(arrays) == trainable and all(travels(n) for n in arrays)
    assert {a.dtype for a in arrays.values()} == {dtype}
    server_weights = dict(server.model.named_parameters())
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, server_weights[name]), name  # frozen weights never change


def test_own_data_client_maps_its_labels_onto_the_servers(tmp_path, run_config, server):
    """A deployed client's file: labels by name onto the run's classes; an unknown one is named."""
    own = tmp_path / "own.csv"
    own.write_text("text,label\n" + "great film,positive\n" * 9 + "a film,mixed\n")
    node = Context(
        run_id=1, node_id=8, node_config={"data-path": str(own)}, state=RecordDict(), run_config=run_config
    )
    facts = {"model-class": "BertForSequenceClassification", "label-names": ["negative", "positive"]}

    reply = handle(instruction(get_weights(server.model), facts=facts), node)

    assert reply.has_error()
    assert "Label 'mixed' in column 'label'" in reply.error.reason
    assert "not one of the run's classes ['negative', 'positive']" in reply.error.reason


def test_own_data_client_needs_the_servers_classes(tmp_path, run_config, server):
    own = tmp_path / "own.csv"
    own.write_text("text,label\n" + "great film,positive\n" * 10)
    node = Context(
        run_id=3, node_id=8, node_config={"data-path": str(own)}, state=RecordDict(), run_config=run_config
    )
    reply = handle(instruction(get_weights(server.model), facts={}), node)
    assert reply.has_error() and "carries no class names ('label-names')" in reply.error.reason


def test_a_server_may_not_make_a_client_import_code(deployed, run_config, server, tmp_path, caplog):
    """Outside a simulation, a run config's `federation.trainer` is refused: the client runs its own
    factory or a built-in task."""
    script = tmp_path / "evil.py"
    script.write_text("import os\nos.environ['PWNED'] = '1'\ndef make_trainer(context):\n    pass\n")
    run_config = {**run_config, "federation.trainer": f"{script}:make_trainer"}
    reply = handle(instruction(get_weights(server.model)), context(run_config, run_id=4))
    assert reply.has_error()
    assert "refused-by-policy" in reply.error.reason
    assert "a server may not make a client import code" in caplog.text
    import os

    assert "PWNED" not in os.environ


def test_a_servers_trainer_config_never_reaches_a_deployed_clients_task(deployed, run_config, server):
    """A built-in task named by the run config reads its settings from the run config, which the
    client's policy checks, never from the server's `trainer_config` (the operator's own only in a
    simulation)."""
    run_config = {
        **run_config,
        "federation.trainer": "hf_flower.tasks.text_classification:make_trainer",
        "federation.trainer-config": '{"model_name_or_path": "evil/model", "trust_remote_code": true}',
    }
    node = context(run_config, run_id=5)
    reply = handle(instruction(get_weights(server.model)), node)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert session.session_for(instruction(get_weights(server.model)), node).context.config == {}


def test_a_deployed_clients_failure_names_its_kind_and_a_reference_never_its_data(
    tmp_path, deployed, run_config, server, caplog
):
    """Issue 22 point 1: a server that points the label column at a private column gets the kind
    of failure and a reference; the values (and the file's columns) stay in the client's own log."""
    private = [f"secret-{i:03d}" for i in range(12)]
    own = tmp_path / "own.csv"
    own.write_text("text,label,ssn\n" + "".join(f"great film,1,{value}\n" for value in private))
    node = Context(
        run_id=11, node_id=8, node_config={"data-path": str(own)}, state=RecordDict(),
        run_config={**run_config, "data.label-column": "ssn"},
    )  # fmt: skip
    facts = {"model-class": "BertForSequenceClassification", "label-names": ["0", "1"]}

    reply = handle(instruction(get_weights(server.model), server_round=3, facts=facts), node)

    reason = reply.error.reason
    assert reason.startswith(
        "client partition ? failed during training of round 3: data-does-not-fit-the-run: this client's data "
        "does not fit the run's data settings (reference "
    )
    assert not any(value in reason for value in private) and "ssn" not in reason and "own.csv" not in reason
    reference = reason.split("(reference ")[1].split(" ")[0]
    logged = next(r.getMessage() for r in caplog.records if reference in r.getMessage())
    assert "secret-000" in logged and "Traceback" in logged  # the operator's own log has it all


def test_a_query_message_gets_an_error_reply(deployed, run_config, server):
    from hf_flower.transport.client_loop import HeldWeights, serve

    reply = handle(instruction(get_weights(server.model), kind=MessageType.QUERY), context(run_config))
    assert reply.has_error() and "unsupported-message" in reply.error.reason
    # An action the ClientApp has no handler for, which it raises on, as the long-lived loop answers it.
    message = instruction(get_weights(server.model), kind="train.other")
    reply = serve(message, context(run_config), HeldWeights(), handle, failures.failure_reply)
    assert reply.has_error() and "unsupported-message" in reply.error.reason


def test_the_long_lived_loop_answers_what_it_cannot_handle(deployed, run_config):
    """Issue 22 point 7: a message whose packed weights cannot be read, and an app that raises, get
    error replies (`serve` with `fail`) instead of raising out of the client loop."""
    from flwr.app import Array, ArrayRecord

    from hf_flower.constants import PACKED_ARRAYS_KEY
    from hf_flower.transport.client_loop import HeldWeights, serve

    malformed = instruction(ArrayRecord(), server_round=2)  # packed arrays without their layout
    malformed.content[PACKED_ARRAYS_KEY] = ArrayRecord({"flat": Array(np.zeros(3, dtype=np.float32))})

    def crash(message, context):
        raise RuntimeError("secret-path /home/alice/data.csv")

    node = context(run_config)
    reply = serve(malformed, node, HeldWeights(), crash, failures.failure_reply)
    assert "failed during training of round 2: malformed-message" in reply.error.reason
    reply = serve(instruction(ArrayRecord()), node, HeldWeights(), crash, failures.failure_reply)
    assert "internal-error" in reply.error.reason and "secret" not in reply.error.reason
    with pytest.raises(RuntimeError):  # without `fail`, the caller answers
        serve(instruction(ArrayRecord()), node, HeldWeights(), crash)


@pytest.mark.parametrize(
    "err, category",
    [
        (RunRefused("x"), "refused-by-policy"),
        (DataError("x"), "data-does-not-fit-the-run"),
        (FactoryError("x"), "model-mismatch"),
        (ModelError("x"), "model-mismatch"),
        (WeightsMismatchError("x"), "weights-do-not-fit"),
        (torch.OutOfMemoryError("x"), "out-of-memory"),
        (TaskExpiredError("x"), "round-ended"),
        (KeyError("x"), "internal-error"),
    ],
)
def test_each_failure_has_a_category(err, category):
    assert failures.category_of(err).label == category


def test_a_built_in_task_downloads_without_the_clients_hub_token(deployed, run_config, server, monkeypatch):
    """Issue 22 point 6: what a run config names is fetched without this machine's token (the
    Hub request headers made while the task builds its Trainer carry none)."""
    from huggingface_hub.utils import build_hf_headers

    from hf_flower.tasks import text_classification

    monkeypatch.setenv("HF_TOKEN", "hf_client_secret")
    headers = []
    load_tokenizer = text_classification.load_tokenizer

    def recording(model_args):
        headers.append(build_hf_headers())
        return load_tokenizer(model_args)

    monkeypatch.setattr(text_classification, "load_tokenizer", recording)
    reply = handle(instruction(get_weights(server.model)), context(run_config, run_id=12))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert headers and "authorization" not in headers[0]
    assert "authorization" in build_hf_headers()  # the process's own requests keep it
