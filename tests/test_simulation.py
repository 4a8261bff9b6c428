"""Integration tests: real Flower simulations (SuperLink, Ray) with a tiny model on tiny data.

Each test builds a Flower app folder whose ClientApp is hf-flower's own, wrapped in the recording
mods of `flower_test_app.py`, runs it with `run_simulation`, and checks what was saved on disk.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config_of, tiny_run_flags, trainer_for
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification

from hf_flower import checkpoint
from hf_flower.launch.app import write_app_with
from hf_flower.launch.plan import RunPlan
from hf_flower.launch.simulation import run_simulation

pytestmark = pytest.mark.slow
TEST_APP = Path(__file__).with_name("flower_test_app.py")


def make_app(tmp_path: Path, run_config: dict, plan: dict) -> Path:
    """A Flower app folder: our ServerApp, the recording ClientApp, and this run's config."""
    return write_app_with(
        tmp_path / "app", run_config, {"clientapp": TEST_APP}, {"plan.json": json.dumps(plan)}
    )


def tiny_run_config(tmp_path, tiny_model_dir, reviews_csv, *flags) -> dict:
    return run_config_of(tiny_run_flags(tmp_path / "run", tiny_model_dir, reviews_csv, *flags))


def assert_weighted_average(output_dir: Path, record_dir: Path, server_round: int, partitions) -> list[int]:
    """The saved round equals the examples-weighted mean of `partitions`' recorded replies;
    returns their example counts."""
    weights, examples = [], []
    for partition in partitions:
        path = record_dir / f"round-{server_round}" / f"partition-{partition}.safetensors"
        weights.append(load_file(path))
        with safe_open(path, "np") as f:
            examples.append(int(f.metadata()["num_examples"]))
    saved = load_file(output_dir / f"round-{server_round}" / "model.safetensors")
    assert set(saved) == set(weights[0])
    total = sum(examples)
    for key in saved:
        expected = sum(w[key].astype(np.float64) * n / total for w, n in zip(weights, examples))
        np.testing.assert_allclose(saved[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
    # The clients really trained: their replies differ from each other.
    assert any(not np.array_equal(weights[0][k], weights[1][k]) for k in saved)
    return examples


def test_rounds_average_good_replies_reject_nan_and_stop_below_minimum(
    tmp_path, tiny_model_dir, reviews_csv, no_leftover_processes, capsys
):
    """One 3-client run, min_train_clients=2: round 1 averages all three replies; in round 2
    partition 2 sends NaN, which is rejected while the round goes on with the other two; in
    round 3 two clients fail, fewer than the minimum, and the run stops with rounds 0-2 saved."""
    run_config = tiny_run_config(
        tmp_path, tiny_model_dir, reviews_csv,
        "--num_clients", "3", "--num_rounds", "3", "--min_train_clients", "2",
        "--min_evaluate_clients", "2", "--min_available_clients", "3", "--evaluate_initial_model", "false",
    )  # fmt: skip
    record_dir = tmp_path / "replies"
    plan = {
        "record_dir": str(record_dir),
        "nan_update": {"partition": 2, "round": 2},
        "drop_key": [{"partition": 1, "round": 3}, {"partition": 2, "round": 3}],
    }
    app_dir = make_app(tmp_path, run_config, plan)

    assert run_simulation(RunPlan.from_run_config(run_config), app_dir=app_dir) == 1

    output_dir = Path(run_config["federation.output-dir"])
    assert checkpoint.list_rounds(output_dir) == [0, 1, 2]
    history = checkpoint.read_history(output_dir)
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    # --evaluate_initial_model false: round 0 is saved but not evaluated; later rounds are.
    assert history["rounds"][0]["central"] == {}
    round1, round2 = history["rounds"][1:]

    examples = assert_weighted_average(output_dir, record_dir, 1, [0, 1, 2])
    assert round1["clients"]["train_succeeded"] == 3 and round1["failures"] == []
    assert sorted(c["num-examples"] for c in round1["client_results"]["train"]) == sorted(examples)

    assert_weighted_average(output_dir, record_dir, 2, [0, 1])
    assert round2["clients"]["train_sampled"] == 3 and round2["clients"]["train_succeeded"] == 2
    assert len(round2["failures"]) == 1
    assert "partition 2" in round2["failures"][0] and "NaN" in round2["failures"][0]
    assert sorted(c["partition-id"] for c in round2["client_results"]["train"]) == [0, 1]
    for record in (round1, round2):
        assert 0.0 <= record["central"]["eval_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(output_dir / "round-2")
    assert model.config.id2label == {0: "0", 1: "1"}

    assert history["status"] == "failed"
    assert "Round 3: 1 of 3 clients trained successfully" in history["error"]
    assert "client partition 1 failed during training of round 3" in history["error"]
    assert "WeightsMismatchError" in history["error"]

    printed = capsys.readouterr().out
    assert printed.count("round 1/3 | clients 3/3") == 1 and printed.count("round 2/3 | clients 2/3") == 1
    assert "status: failed" in printed
    assert "round 3/3 client 1: FAILED in train (" in printed  # as soon as its reply came
    # Inside each round, plain lines (stdout is no terminal here): every client's steps, reported
    # from its Ray worker through HF_FLOWER_PROGRESS_DIR, and each of its replies.
    assert "\r" not in printed and "\x1b" not in printed
    for partition in (0, 1, 2):
        head = f"round 1/3 client {partition}: "
        assert re.search(rf"{head}step (\d+)/\1 \(100%\), loss \d", printed), printed
        assert f"{head}replied to train" in printed and f"{head}replied to evaluate" in printed


LORA_FLAGS = ("--peft", "lora", "--lora_r", "4", "--transfer_dtype", "bfloat16", "--save_merged")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, reviews_csv):
    """A 2-round LoRA run (`LORA_FLAGS`) that records its replies: the folder and its run args."""
    tmp_path = tmp_path_factory.mktemp("lora")
    run_config = tiny_run_config(tmp_path, tiny_model_dir, reviews_csv, *LORA_FLAGS)
    app_dir = make_app(tmp_path, run_config, {"record_dir": str(tmp_path / "replies")})
    assert run_simulation(RunPlan.from_run_config(run_config), app_dir=app_dir) == 0
    return tmp_path


def test_lora_rounds_are_peft_folders_and_only_adapters_travel(lora_run, tiny_model_dir):
    import torch
    from peft import AutoPeftModelForSequenceClassification, PeftModel

    record_dir = lora_run / "replies"
    output_dir = lora_run / "run"
    assert checkpoint.list_rounds(output_dir) == [0, 1, 2]
    round_1 = output_dir / "round-1"
    assert (round_1 / "adapter_model.safetensors").is_file() and not (round_1 / "config.json").exists()
    adapter_config = json.loads((round_1 / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)  # as the user named it

    # Replies held the adapters and the head only, as raw bfloat16.
    (reply,) = (record_dir / "round-1").glob("partition-0.safetensors")
    with safe_open(reply, "pt") as f:
        keys = list(f.keys())
        assert all(".lora_" in k or ".modules_to_save." in k for k in keys)
    metrics = checkpoint.read_round_metrics(output_dir, 1)
    full_bytes = 4 * sum(
        p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).parameters()
    )
    assert metrics["bytes_received"] < 2 * full_bytes * 0.5  # two replies, each far below fp32

    inputs = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    auto = AutoPeftModelForSequenceClassification.from_pretrained(round_1).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    manual = PeftModel.from_pretrained(base, round_1).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(round_1 / "merged").eval()
    with torch.no_grad():
        expected = auto(**inputs).logits
        torch.testing.assert_close(manual(**inputs).logits, expected)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    assert merged.config.id2label == {0: "0", 1: "1"}
    card = ModelCard.load(round_1 / "README.md")  # ours, written over the one peft saves
    assert card.data.library_name == "peft"
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in card.text


def test_lora_round_loads_back_as_resume_continues_it(lora_run, tmp_path, tiny_model_dir, reviews_csv):
    """What `--resume` starts from after an adapter round: the saved adapters and classification
    head (`modules_to_save`) in a fresh PEFT model, which then computes what the saved round does.
    (A whole resumed run is checked for full rounds in test_resume.py and for adapters in
    test_causal_lm.py.)"""
    import torch
    from peft import AutoPeftModelForSequenceClassification

    from hf_flower.server import resume
    from hf_flower.weights import decode_arrays, get_weights

    model = trainer_for(tiny_run_config(tmp_path, tiny_model_dir, reviews_csv, *LORA_FLAGS)).model
    fresh = decode_arrays(get_weights(model, "float32"))
    round_1 = lora_run / "run" / "round-1"

    arrays = decode_arrays(resume.load_round_arrays(round_1, model))

    assert arrays.keys() == fresh.keys()
    assert any(".modules_to_save." in key for key in arrays)
    assert all(
        not torch.equal(arrays[k], fresh[k]) for k in arrays if ".lora_B." in k or ".modules_to_save." in k
    )
    inputs = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    saved = AutoPeftModelForSequenceClassification.from_pretrained(round_1).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, saved(**inputs).logits)
