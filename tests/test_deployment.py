"""Deployment on loopback: `scripts/server.py`, and clients under `accelerate launch` and plain python."""

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import build_tiny_model, make_review, run_config_of
from transformers import AutoConfig, pipeline

from hf_flower import checkpoint
from hf_flower.launch.processes import ManagedProcess, free_port
from hf_flower.progress.live import PROGRESS_DIR_ENV

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MULTI_CPU = ROOT / "accelerate_configs" / "multi_cpu.yaml"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """A tiny model without dropout, so one process and two ranks compute the same thing."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-no-dropout"))
    config = AutoConfig.from_pretrained(path)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(path)
    return path


def rank_metrics(tmp_path, batch_size: int, launcher: list[str], flags: list[str], facts=None) -> dict:
    """The metrics of one train and one evaluate message on partition 0 of 2 (`rank_metrics.py`)."""
    run_config = run_config_of(
        [
            *flags, "--local_epochs", "2", "--per_device_train_batch_size", str(batch_size),
            "--per_device_eval_batch_size", "4", "--output_dir", str(tmp_path / "unused"),
        ]
    )  # fmt: skip
    config_path = tmp_path / f"run_config_{batch_size}.json"
    config_path.write_text(json.dumps(run_config))
    output = tmp_path / f"metrics_{batch_size}.json"
    worker = str(ROOT / "tests" / "workers" / "rank_metrics.py")
    facts_arg = [json.dumps(facts)] if facts is not None else []
    with ManagedProcess(
        [*launcher, worker, str(config_path), str(output), *facts_arg], tmp_path / f"log_{batch_size}"
    ) as proc:
        proc.process.wait(timeout=240)
        assert proc.process.returncode == 0, proc.tail(40)
    return json.loads(output.read_text())


def test_two_rank_client_reports_what_one_process_reports(tmp_path, no_dropout_model, reviews_csv):
    """Point 5: 2 ranks x batch 4 and 1 process x batch 8 on one partition give the same numbers.

    Tolerance 1e-5 relative: the same examples in the same global batches, so the only
    difference is the order of floating-point sums in DDP's gradient all-reduce.
    """
    flags = [
        "--model_name_or_path", str(no_dropout_model), "--dataset", str(reviews_csv), "--max_length", "32",
        "--test_size", "40", "--client_eval_size", "12", "--learning_rate", "0.02",
    ]  # fmt: skip
    one = rank_metrics(tmp_path, 8, [sys.executable], flags)
    two = rank_metrics(tmp_path, 4, [ACCELERATE, "launch", "--config_file", str(MULTI_CPU)], flags)
    assert two["train"]["num-examples"] == one["train"]["num-examples"] == 88  # the whole partition
    assert two["train"]["train_steps"] == one["train"]["train_steps"]
    assert two["train"]["train_loss"] == pytest.approx(one["train"]["train_loss"], rel=1e-5)
    assert two["weights_l1"] == pytest.approx(one["weights_l1"], rel=1e-5)
    assert two["weights_l1"] != pytest.approx(two["start_l1"], rel=1e-3)  # it did train
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "num-examples"):
        assert two["evaluate"][key] == pytest.approx(one["evaluate"][key], rel=1e-5), key


def server_command(tmp_path, model_dir, csv, port, *flags):
    return [
        sys.executable, str(ROOT / "scripts" / "server.py"),
        "--model_name_or_path", str(model_dir), "--dataset", str(csv), "--max_length", "32",
        "--test_size", "40", "--num_rounds", "2", "--learning_rate", "5e-3",
        "--output_dir", str(tmp_path / "run"), "--port", str(port), "--insecure", *flags,
    ]  # fmt: skip


def client_command(port, data, work_dir, launcher=(sys.executable,)):
    """A client serving partition `data` of 2 of the server's data set, or its own file `data`."""
    serves = (
        ["--partition_id", str(data), "--num_partitions", "2"]
        if isinstance(data, int)
        else ["--data_path", str(data)]
    )
    return [
        *launcher, str(ROOT / "scripts" / "client.py"), "--superlink", f"127.0.0.1:{port}", *serves,
        "--superlink_timeout", "10", "--work_dir", str(work_dir), "--insecure",
    ]  # fmt: skip


def wait_for_exit(proc: ManagedProcess, timeout: float) -> int:
    proc.process.wait(timeout=timeout)
    return proc.process.returncode


def write_labelled_reviews(path, labels: list[str], seed: int) -> Path:
    """A CSV of synthetic reviews with string labels, one row per entry of `labels`, in that order."""
    rng = random.Random(seed)
    rows = [(make_review(int(label == "positive"), rng), label) for label in labels]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return path


def kill_launcher_only(proc: ManagedProcess, within: float = 10.0) -> list[str]:
    """SIGKILL the client launcher alone, as the OOM killer would; return its processes (SuperNode
    and the rest) still alive `within` seconds later: none, since they die with their parent."""
    root = psutil.Process(proc.process.pid)
    children = root.children(recursive=True)
    assert children, "the client started no SuperNode"
    root.kill()
    proc.process.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=within)
    return [" ".join(p.cmdline()) for p in alive]


def test_own_data_clients_two_rank_and_plain_survive_a_killed_client(
    tmp_path, tiny_model_dir, no_leftover_processes
):
    """One 2-rank `accelerate launch` client and two plain ones, each with its own file (issue 3
    point 1, issue 12): the server's data names the classes; one client holds only `positive` rows,
    one lists `positive` first, one holds both, `negative` first. With min_train_clients=2, the
    third client's launcher is SIGKILLed while it trains round 1: its SuperNode dies with it within
    10 s (issue 11), the round finishes with the other two, and the restarted client trains in
    round 2."""
    port = free_port()
    server_csv = write_labelled_reviews(tmp_path / "server.csv", ["negative", "positive"] * 60, seed=0)
    own = {
        "c0": write_labelled_reviews(tmp_path / "c0.csv", ["positive"] * 60, seed=1),
        "c1": write_labelled_reviews(tmp_path / "c1.csv", ["positive"] * 50 + ["negative"] * 50, seed=2),
        "c2": write_labelled_reviews(tmp_path / "c2.csv", ["negative", "positive"] * 70, seed=3),
    }
    server_flags = (
        "--num_clients", "3", "--min_train_clients", "2", "--min_evaluate_clients", "2",
        "--min_available_clients", "3", "--client_eval_size", "0.2", "--local_epochs", "10",
        "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--round_timeout", "120",
    )  # fmt: skip
    accelerate_launch = (ACCELERATE, "launch", "--config_file", str(MULTI_CPU))

    def client(name, launcher=(sys.executable,)):
        # Heartbeats every 10 s: the SuperLink declares a killed node dead after ~20 s, not ~60.
        # The run's model is a folder on this machine: a client loads it only when allowed.
        command = [
            *client_command(port, own[name[:2]], tmp_path / name, launcher),
            "--heartbeat_interval",
            "10",
            "--allowed_models",
            str(tiny_model_dir),
        ]
        # Its training steps go to progress files (`live_progress`), which say when it trains.
        env = {**os.environ, PROGRESS_DIR_ENV: str(tmp_path / f"{name}-progress")}
        return ManagedProcess(command, tmp_path / f"{name}.log", env=env)

    def training(name: str, server_round: int) -> bool:
        """Whether client `name` is between its first and last step of `server_round`."""
        for path in (tmp_path / f"{name}-progress").glob(f"client-*-round-{server_round}.json"):
            progress = json.loads(path.read_text() or "{}")
            if 0 < progress.get("step", 0) < progress.get("max_steps", 0):
                return True
        return False

    output_dir = tmp_path / "run"
    server_cmd = server_command(tmp_path, tiny_model_dir, server_csv, port, *server_flags)
    with (
        ManagedProcess(server_cmd, tmp_path / "server.log") as server,
        client("c0", accelerate_launch) as ddp_client,
        client("c1") as client1,
    ):
        victim = client("c2").__enter__()
        try:
            deadline = time.monotonic() + 180
            while not training("c2", 1):  # kill it while it trains round 1
                assert time.monotonic() < deadline, victim.tail(40)
                time.sleep(0.1)
            assert kill_launcher_only(victim) == []
            # The restarted client is a new SuperNode; the server waits for 3 before round 2.
            with client("c2-restarted") as restarted:
                assert wait_for_exit(server, 300) == 0, server.tail(40)
                # The server stopped its SuperLink: clients leave within --superlink_timeout.
                for survivor in (ddp_client, client1, restarted):
                    assert wait_for_exit(survivor, 60) == 0, survivor.tail(40)
        finally:
            victim.stop()

    assert checkpoint.list_rounds(output_dir) == [0, 1, 2]
    history = checkpoint.read_history(output_dir)
    assert history["status"] == "completed"
    round1, round2 = history["rounds"][1:]
    # A client's file is all its data: its rows less its own eval split (0.2, rounded up).
    assert round1["clients"]["train_sampled"] == 3 and round1["clients"]["train_succeeded"] == 2
    assert sorted(c["num-examples"] for c in round1["client_results"]["train"]) == [48, 80]
    assert len(round1["failures"]) == 1, round1["failures"]  # the killed node, named once
    # Round 1 ends when Flower declares the killed SuperNode dead (two heartbeats missed), so by
    # round 2 only the 3 live nodes are listed: the restarted client trains again.
    assert round2["clients"]["train_succeeded"] == 3
    assert sorted(c["num-examples"] for c in round2["client_results"]["train"]) == [48, 80, 112]
    # Round 2 trains from the aggregate the clients evaluated in round 1: it travels to them by id
    # only (in full to the restarted client too when it joined after round 1's evaluation), while
    # round 1 trained all three from weights sent in full. Sent in full every time, round 2 would
    # move as much as round 1 or more; by id it moves 0.44x (restarted client evaluated round 1)
    # to 0.69x (it did not).
    assert round2["bytes_sent"] < 0.8 * round1["bytes_sent"], (round1["bytes_sent"], round2["bytes_sent"])
    classify = pipeline("text-classification", model=str(output_dir / "round-2"))
    assert classify("great excellent superb loved wonderful")[0]["label"] == "positive"
    assert classify("awful terrible worst boring hated")[0]["label"] == "negative"
    assert "round 2/2 | clients 3/3" in (tmp_path / "server.log").read_text()
    assert "Client connected" in (tmp_path / "c0.log").read_text()
    shutil.rmtree(output_dir / ".flwr", ignore_errors=True)


def causal_lm_flags(model_dir, data) -> list[str]:
    """A tiny causal LM learning one-word answers to chat prompts: LoRA without dropout, so one
    process and two ranks compute the same thing."""
    return [
        "--task", "causal-lm", "--model_name_or_path", str(model_dir), "--dataset", str(data),
        "--prompt_column", "prompt", "--completion_column", "completion", "--max_length", "48",
        "--test_size", "8", "--client_eval_size", "4", "--eval_max_new_tokens", "3",
        "--lora_dropout", "0", "--learning_rate", "1e-2",
    ]  # fmt: skip


def test_two_rank_causal_lm_client_reports_what_one_process_reports(
    tmp_path, tiny_chat_model_dir, chat_jsonl
):
    """Issue 10: as for classification, 2 ranks x batch 4 and 1 process x batch 8 agree within 1e-5.

    Each rank pads its own batch (SFT batches are padded on the right, so padding changes no real
    token's output) and Trainer averages the loss over the tokens of all ranks.
    """
    flags = causal_lm_flags(tiny_chat_model_dir, chat_jsonl)
    one = rank_metrics(tmp_path, 8, [sys.executable], flags, facts={})
    two = rank_metrics(tmp_path, 4, [ACCELERATE, "launch", "--config_file", str(MULTI_CPU)], flags, facts={})
    assert two["train"]["num-examples"] == one["train"]["num-examples"] == 16
    assert two["train"]["train_loss"] == pytest.approx(one["train"]["train_loss"], rel=1e-5)
    assert two["weights_l1"] == pytest.approx(one["weights_l1"], rel=1e-5)
    assert two["weights_l1"] != pytest.approx(two["start_l1"], rel=1e-3)  # it did train
    for key in ("eval_loss", "eval_perplexity", "eval_exact_match", "eval_label_accuracy", "num-examples"):
        assert two["evaluate"][key] == pytest.approx(one["evaluate"][key], rel=1e-5), key


def test_a_users_script_serves_and_joins_a_deployment_with_two_ranks_and_one(tmp_path, no_leftover_processes):
    """Issue 21: `hf-flower server --trainer examples/sft_trl.py:make_trainer` and two clients running
    the script itself, one under `accelerate launch` (2 ranks x batch 4) and one plain (batch 8),
    both on partition 0: what the two ranks report is what one process reports, within 1e-5 (TRL's
    SFTTrainer with LoRA; issue 10's deployment of SFT, now on a user's own Trainer)."""
    from example_assets import sft_trl
    from peft import AutoPeftModelForCausalLM

    # No dropout, and evaluation in batches of 4 on both clients: one process then computes what the
    # two ranks do (Trainer averages an evaluation's loss over its batches).
    config = {**sft_trl.build(tmp_path / "assets"), "lora_dropout": 0.0, "per_device_eval_batch_size": 4}
    script = ROOT / "examples" / "sft_trl.py"
    port = free_port()
    server_cmd = [
        sys.executable, "-m", "hf_flower", "server", "--trainer", f"{script}:make_trainer",
        "--trainer_config", json.dumps(config), "--num_rounds", "1", "--output_dir", str(tmp_path / "run"),
        "--port", str(port), "--insecure",
    ]  # fmt: skip

    def client(name, batch_size, launcher=(sys.executable,)):
        command = [
            *launcher, str(script), "client", "--superlink", f"127.0.0.1:{port}", "--insecure",
            "--partition_id", "0", "--num_partitions", "2", "--superlink_timeout", "10",
            "--work_dir", str(tmp_path / name),
            "--trainer_config", json.dumps({**config, "per_device_train_batch_size": batch_size}),
        ]  # fmt: skip
        return ManagedProcess(command, tmp_path / f"{name}.log")

    accelerate_launch = (ACCELERATE, "launch", "--config_file", str(MULTI_CPU))
    with (
        ManagedProcess(server_cmd, tmp_path / "server.log") as server,
        client("two-ranks", 4, accelerate_launch) as two_ranks,
        client("one-process", 8) as one_process,
    ):
        assert wait_for_exit(server, 300) == 0, server.tail(40)
        for done in (two_ranks, one_process):
            assert wait_for_exit(done, 60) == 0, done.tail(40)

    history = checkpoint.read_history(tmp_path / "run")
    assert history["status"] == "completed"
    replies = history["rounds"][1]["client_results"]
    for kind, keys in (
        ("train", ("train_loss", "num-examples")),
        ("evaluate", ("eval_loss", "num-examples")),
    ):
        one, two = replies[kind]
        for key in keys:
            assert one[key] == pytest.approx(two[key], rel=1e-5), (kind, key, one, two)
    assert (
        replies["train"][0]["train_steps"] == replies["train"][1]["train_steps"] == 8
    )  # 32 rows, 8 a batch, 2 epochs
    central = [r["central"]["eval_loss"] for r in history["rounds"]]
    assert central[1] < central[0]  # the federated adapters learnt
    assert (
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "round-1").peft_config["default"].r == 16
    )
    assert "Client connected" in (tmp_path / "two-ranks.log").read_text()
    shutil.rmtree(tmp_path / "run" / ".flwr", ignore_errors=True)
