"""Every script of `examples/` federates: 2 clients, 2 rounds in Flower's simulation engine, with the
tiny model and data of `example_assets/<name>.py`.

Each run's rounds load with the class a user of that task would use, its training loss falls from
round 1 to round 2, and the keys of its `compute_metrics` are in history.json and on the model card.
One example runs as a user runs it, `python examples/<name>.py simulate ...` (`hf_flower.main`);
the others through `hf_flower.simulate(make_trainer, ...)` from Python.
"""

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import transformers
from huggingface_hub import ModelCard

import hf_flower
from hf_flower import checkpoint
from hf_flower.factory import load_factory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class Example:
    model_class: str  # what loads a round: transformers' or peft's Auto class
    processor_class: str
    metrics: tuple[str, ...]  # keys of the example's compute_metrics (central evaluation), with eval_


EXAMPLES = {
    "sft_trl": Example(
        "AutoPeftModelForCausalLM", "AutoTokenizer", ("eval_perplexity", "eval_mean_token_accuracy")
    ),
    "token_classification": Example(
        "AutoModelForTokenClassification",
        "AutoTokenizer",
        ("eval_overall_f1", "eval_overall_accuracy", "eval_PER_f1", "eval_LOC_f1", "eval_ORG_f1"),
    ),
    "seq2seq": Example(
        "AutoModelForSeq2SeqLM", "AutoTokenizer", ("eval_rouge1", "eval_rougeL", "eval_gen_len")
    ),
    "image_classification": Example(
        "AutoModelForImageClassification", "AutoImageProcessor", ("eval_accuracy", "eval_f1")
    ),
    "custom_loss": Example(
        "AutoModelForSequenceClassification",
        "AutoTokenizer",
        ("eval_accuracy", "eval_macro_f1", "eval_recall_positive"),
    ),
}
# Run as a user runs it, through the script's own command line.
THROUGH_THE_SCRIPT = "sft_trl"
SETTINGS = {
    "num_clients": 2,
    "num_rounds": 2,
    "min_train_clients": 2,
    "min_evaluate_clients": 2,
    "min_available_clients": 2,
}


def run_example(name: str, tmp_path: Path) -> Path:
    """Federate example `name` on its tiny assets; the run's output folder."""
    config = importlib.import_module(f"example_assets.{name}").build(tmp_path / "assets")
    output_dir = tmp_path / "run"
    script = ROOT / "examples" / f"{name}.py"
    if name == THROUGH_THE_SCRIPT:
        flags = [f"--{key}={value}" for key, value in SETTINGS.items()]
        command = [sys.executable, str(script), "simulate", *flags, "--output_dir", str(output_dir)]
        done = subprocess.run(
            [*command, "--trainer_config", json.dumps(config)], capture_output=True, text=True, timeout=400
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    else:
        make_trainer = load_factory(f"{script}:make_trainer")
        history = hf_flower.simulate(
            make_trainer, trainer_config=config, output_dir=str(output_dir), **SETTINGS
        )
        assert history["status"] == "completed"
    return output_dir


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_federates(name, tmp_path, no_leftover_processes):
    example = EXAMPLES[name]
    output_dir = run_example(name, tmp_path)

    history = checkpoint.read_history(output_dir)
    assert history["status"] == "completed" and [r["round"] for r in history["rounds"]] == [0, 1, 2]
    first, second = (record["train"]["train_loss"] for record in history["rounds"][1:])
    assert second < first, (first, second)
    for record in history["rounds"]:
        assert set(example.metrics) <= set(record["central"]), record["central"]
    assert "eval_loss" in history["rounds"][2]["evaluate"]  # the clients evaluated too

    last = output_dir / "round-2"
    card = ModelCard.load(last / checkpoint.CARD_FILE)
    for metric in example.metrics:
        assert f"| {metric.removeprefix('eval_')} |" in card.text, metric
    assert f"{example.model_class}.from_pretrained" in card.text
    library = peft if example.model_class.startswith("AutoPeft") else transformers
    model = getattr(library, example.model_class).from_pretrained(last)
    assert getattr(transformers, example.processor_class).from_pretrained(last) is not None
    assert not model.training or model.eval()
