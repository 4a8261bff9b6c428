"""A curious server against a real `hf-flower client` over loopback (issue 22, points 1, 6 and 7).

One SuperLink, one long-lived client serving its own file (`--data_path`) with a private column,
and a hostile ServerApp (`hostile_server_app.py`) submitted twice with `flwr run`: a run config
that points the label column at the private column (and reports to W&B, and names no strategy),
and one that names a model folder and a tokenizer file of the client's machine that its operator
did not allow. The ServerApp writes every reply it got; the tests read them.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from conftest import processes_of, run_config_of

from hf_flower.launch.app import write_app_with
from hf_flower.launch.client import FAILURES_LOG
from hf_flower.launch.flower import CONNECTION, flower_env, flower_executable, write_connection
from hf_flower.launch.processes import ManagedProcess, free_port

pytestmark = pytest.mark.slow

APP = Path(__file__).with_name("hostile_server_app.py")
# The private column of the client's file: 24 values a server must never read back.
PRIVATE = [f"ssn-{7301 + 37 * i}" for i in range(24)]


@dataclass
class HostileRun:
    tmp: Path
    client: ManagedProcess
    client_alive: bool
    replies: dict[str, dict]


def client_file(path: Path) -> Path:
    rows = [f"a {'great' if i % 2 else 'awful'} film,{i % 2},{value}" for i, value in enumerate(PRIVATE)]
    path.write_text("text,label,ssn\n" + "\n".join(rows) + "\n")
    return path


def base_model(tiny_model_dir: Path, path: Path) -> Path:
    """The tiny model without its classification head, which fits any number of classes (the
    class list grows), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).bert.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def honest_weights(run_config: dict, path: Path) -> list[str]:
    """The weights of the model the client builds for classes `PRIVATE` (what the last, honest
    message sends), saved as numpy arrays: the ServerApp needs no torch."""
    from hf_flower.arguments.run_config import from_run_config
    from hf_flower.modeling import load_model
    from hf_flower.weights import get_weights

    run_args = from_run_config(run_config)
    arrays = get_weights(load_model(run_args.model, sorted(PRIVATE), run_args.peft))
    np.savez(path, **{name: arrays[name].numpy() for name in arrays})
    return list(arrays)


def write_app(tmp: Path, run_config: dict) -> Path:
    return write_app_with(tmp / "hostile-app", run_config, {"serverapp": APP})


def wait_until_done(path: Path, superlink: ManagedProcess, client: ManagedProcess, timeout: float) -> dict:
    """What the ServerApp received, once it is done or the client has died (what it got so far)."""
    deadline = time.monotonic() + timeout
    while True:
        received = json.loads(path.read_text()) if path.exists() else {}
        if received.get("done") or not client.running():
            return received
        if not superlink.running():
            pytest.fail(f"the SuperLink exited:\n{superlink.tail(40)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the ServerApp did not finish within {timeout} s:\n{client.tail(40)}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir, reviews_csv) -> HostileRun:
    tmp = tmp_path_factory.mktemp("hostile")
    own = client_file(tmp / "own.csv")
    model_dir = base_model(tiny_model_dir, tmp / "base-model")
    # What the client's machine holds and its operator did not allow.
    (tmp / "other-model").mkdir()
    (tmp / "other-model" / "config.json").write_text("{}")
    (tmp / "secret.txt").write_text("the client's secret\n")

    flags = [
        "--model_name_or_path", str(model_dir), "--dataset", str(reviews_csv), "--max_length", "16",
        "--max_steps", "1", "--num_rounds", "1", "--per_device_train_batch_size", "8",
        "--output_dir", str(tmp / "run"), "--report_to", "wandb",
    ]  # fmt: skip
    run_config = {**run_config_of(flags), "data.label-column": "ssn"}
    del run_config["federation.strategy"]  # a run config without a strategy
    plan = {
        "private": PRIVATE,
        "weights": str(tmp / "honest.npz"),
        "weight_names": honest_weights(run_config, tmp / "honest.npz"),
        "out": str(tmp / "received"),
    }
    (tmp / "plan.json").write_text(json.dumps(plan))
    run_config.update({"hostile.plan": str(tmp / "plan.json"), "hostile.mode": "data"})
    app_dir = write_app(tmp, run_config)
    paths_config = {
        "hostile.mode": "paths",
        "model.model-name-or-path": str(tmp / "other-model"),
        "model.tokenizer-name-or-path": str(tmp / "secret.txt"),
    }
    (tmp / "paths.toml").write_text(tomli_w.dumps(paths_config))

    port = free_port()
    flwr_home = tmp / "flwr-home"
    env = flower_env(flwr_home)
    write_connection(flwr_home, f"127.0.0.1:{port}")
    superlink_cmd = [
        flower_executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    client_cmd = [
        sys.executable, "-m", "hf_flower", "client", "--superlink", f"127.0.0.1:{port}", "--insecure",
        "--data_path", str(own), "--allowed_models", str(model_dir), "--work_dir", str(tmp / "client"),
        "--superlink_timeout", "10",
    ]  # fmt: skip
    with (
        ManagedProcess(superlink_cmd, tmp / "superlink.log", env=env, cwd=str(flwr_home)) as superlink,
        ManagedProcess(
            client_cmd, tmp / "client.log", env={**env, "OMP_NUM_THREADS": "1"}, cwd=str(tmp)
        ) as client,
    ):
        superlink.wait_for_port(port)
        replies = {}
        # The paths first: a client that dies of the data run's messages (today's) still answers it.
        for mode, run_config_file in (("paths", tmp / "paths.toml"), ("data", None)):
            submit = [flower_executable("flwr"), "run", str(app_dir), CONNECTION]
            submit += ["--run-config", str(run_config_file)] if run_config_file else []
            with ManagedProcess(
                submit, tmp / f"submit-{mode}.log", env=env, cwd=str(flwr_home)
            ) as submission:
                submission.process.wait(timeout=60)
            replies[mode] = wait_until_done(tmp / f"received-{mode}.json", superlink, client, timeout=90)
        run = HostileRun(tmp, client, client.running(), replies)
    deadline = time.monotonic() + 20
    while (left := [p for p in processes_of(tmp) if p.is_running()]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {[' '.join(p.cmdline()) for p in left]}"
    return run


def test_error_replies_carry_a_category_and_a_reference_never_the_clients_data(hostile):
    """Point 1: the label column pointed at a private column, the class list grown by whatever a
    refusal names: no private value (nor the file's columns or path) reaches the server."""
    replies = hostile.replies["data"]
    attack = replies.get("label-attack-0", {"error": ""})
    assert "label-attack-1" not in replies  # nothing leaked, so the class list never grew
    assert "data-does-not-fit-the-run" in attack["error"], attack
    reasons = " ".join(
        reply.get("error", "")
        for run in hostile.replies.values()
        for reply in run.values()
        if reply is not True
    )
    assert not [value for value in PRIVATE if value in reasons]
    assert "ssn" not in reasons and "own.csv" not in reasons and "Traceback" not in reasons
    # The client's operator finds the whole error under the reference the server got.
    reference = attack["error"].split("(reference ")[1].split(" ")[0]
    log = (hostile.tmp / "client" / FAILURES_LOG).read_text()
    assert reference in log and PRIVATE[0] in log


def test_a_run_config_reaches_no_path_its_client_did_not_allow(hostile):
    """Point 6: a model folder and a tokenizer file of the client's machine are refused before
    anything is read; `report_to wandb` never reaches the client's trackers (it trains, below)."""
    refused = hostile.replies["paths"].get("local-paths", {"error": ""})
    assert "refused-by-policy" in refused["error"], refused
    assert "secret" not in refused["error"] and "other-model" not in refused["error"]
    assert not (hostile.tmp / "wandb").exists() and not (hostile.tmp / "client" / "wandb").exists()


def test_the_client_answers_anything_unexpected_and_keeps_serving(hostile):
    """Point 7: a query, packed weights without their layout and an action without a handler each
    get an error reply; the client is still alive and trains the honest message that follows
    (a run config without `federation.strategy`, with `report_to wandb`, which wandb, not installed
    here, would have failed)."""
    replies = hostile.replies["data"]
    expected = {
        "query": "unsupported-message",
        "malformed-layout": "malformed-message",
        "unknown-action": "unsupported-message",
    }
    for name, category in expected.items():
        assert category in replies.get(name, {}).get("error", ""), (name, replies.get(name))
    assert replies.get("honest") == {"reply": True, "error": "", "content": True}, hostile.client.tail(40)
    assert hostile.client_alive
