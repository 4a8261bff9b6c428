"""Argument groups: YAML + flags, Flower run config round trip, and the errors of bad values."""

import json
import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from hf_flower.arguments import parse_args
from hf_flower.arguments.run_config import from_run_config, to_run_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    config = write_yaml(tmp_path, "num_rounds: 7\nlearning_rate: 1.0e-3\noutput_dir: out\ndataset: my.csv\n")
    run_args = parse_args(["--config", config, "--num_rounds", "2", "--adam_beta2", "0.98"])
    assert run_args.federation.num_rounds == 2
    assert run_args.training.learning_rate == pytest.approx(1e-3)
    assert run_args.training.adam_beta2 == pytest.approx(0.98)
    assert run_args.data.dataset == "my.csv"


def test_training_arguments_describe_the_whole_run():
    """`--num_train_epochs` (or `--max_steps`) is the whole federated training, as for one
    `trainer.train()`; `--local_epochs` says it per round instead, and the two must agree."""
    run_args = parse_args(["--num_train_epochs", "6", "--num_rounds", "3"])
    assert run_args.training.num_train_epochs == 6 and run_args.federation.local_epochs is None
    assert parse_args(["--local_epochs", "2", "--num_rounds", "3", "--num_train_epochs", "6"])
    with pytest.raises(
        ValueError, match=r"--num_train_epochs 5 \(the whole federated training\) and --local_epochs 1"
    ):
        parse_args(["--num_train_epochs", "5", "--local_epochs", "1", "--num_rounds", "3"])


def test_unknown_yaml_key_is_named(tmp_path):
    config = write_yaml(tmp_path, "num_round: 3\n")
    with pytest.raises(ValueError, match=r"Unknown keys in .*\['num_round'\]"):
        parse_args(["--config", config])


def test_token_in_yaml_is_refused(tmp_path):
    config = write_yaml(tmp_path, "hub_token: hf_secret\noutput_dir: out\n")
    with pytest.raises(ValueError, match="HF_TOKEN"):
        parse_args(["--config", config])


def test_output_dir_is_the_servers_not_the_trainers():
    run_args = parse_args(["--output_dir", "out"])
    assert run_args.federation.output_dir == "out"
    assert parse_args([]).federation.output_dir == "outputs/hf-flower"
    # A client's Trainer writes no checkpoints: no run config carries a TrainingArguments output_dir.
    assert "training.output-dir" not in to_run_config(run_args)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_rounds", "0"], "num_rounds must be at least 1"),
        (["--num_clients", "0"], "num_clients must be at least 1"),
        (["--fraction_train", "1.5"], "fraction_train must be between 0 and 1"),
        (["--local_epochs", "0"], "local_epochs must be positive"),
        (["--max_length", "0"], "max_length must be positive"),
        (["--dirichlet_alpha", "0"], "dirichlet_alpha must be positive"),
        (["--test_size", "2.5"], "test_size must be a fraction"),
        (["--num_labels", "1"], "num_labels must be at least 2"),
        (["--strategy_kwargs", "{proximal_mu: 1}"], "strategy_kwargs must be a JSON object"),
    ],
)
def test_bad_values_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--output_dir", "out", *flags])


def test_unknown_partitioner():
    with pytest.raises(SystemExit):  # argparse `choices` rejects it with the valid set
        parse_args(["--output_dir", "out", "--partitioner", "shards"])


def test_run_config_round_trip():
    run_args = parse_args(
        [
            "--config", QUICKSTART,
            "--strategy", "FedProx", "--strategy_kwargs", '{"proximal_mu": 0.1}',
            "--adam_beta2", "0.98", "--report_to", "tensorboard", "--max_test_samples", "7",
        ]
    )  # fmt: skip
    run_config = to_run_config(run_args)
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    back = from_run_config(run_config)
    assert back.model == run_args.model
    assert back.data == run_args.data
    assert back.federation == run_args.federation
    assert back.training.to_dict() == run_args.training.to_dict()


def test_token_is_refused_on_the_command_line():
    for argv in (["--hub_token", "hf_secret"], ["--hub_token=hf_secret"]):
        with pytest.raises(ValueError, match="HF_TOKEN"):
            parse_args(["--output_dir", "out", *argv])


@pytest.mark.parametrize(
    "extra", [{"hub_token": "hf_secret"}, {"push_to_hub": True}, {"hub_model_id": "eve/x"}]
)
def test_run_config_carrying_hub_fields_is_refused(extra):
    run_config = to_run_config(parse_args(["--output_dir", "out"]))
    run_config["training.extra"] = json.dumps(extra)
    with pytest.raises(
        ValueError, match=rf"training.extra sets \['{next(iter(extra))}'\]: a run config carries no Hub token"
    ):
        from_run_config(run_config)


def test_hub_flags_go_to_the_server_never_to_the_clients_trainer():
    run_args = parse_args(
        ["--output_dir", "out", "--push_to_hub", "--hub_model_id", "alice/fed", "--hub_strategy", "end"]
    )
    assert run_args.hub.push_to_hub and run_args.hub.hub_model_id == "alice/fed"
    assert run_args.hub.hub_strategy == "end"
    assert run_args.training.push_to_hub is False
    back = from_run_config(to_run_config(run_args))
    assert back.hub == run_args.hub and back.training.push_to_hub is False
    with pytest.raises(ValueError, match="needs --hub_model_id"):
        parse_args(["--output_dir", "out", "--push_to_hub"])
    with pytest.raises(ValueError, match="only one"):
        parse_args(["--output_dir", "out", "--resume", "--overwrite_output_dir"])


def test_pyproject_run_config_is_the_quickstart():
    """`flwr run .` and `scripts/simulate.py --config configs/quickstart.yaml` run the same job."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert app_config == to_run_config(parse_args(["--config", QUICKSTART]))


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("peft: qlora\n", "Unknown peft method 'qlora'; choose one of ['auto', 'none', 'lora']"),
        (
            "transfer_dtype: fp8\n",
            "Unknown transfer_dtype 'fp8'; choose one of ['float32', 'float16', 'bfloat16']",
        ),
        ("peft: lora\nlora_r: 0\n", "lora_r must be at least 1"),
    ],
)
def test_bad_adapter_and_transfer_settings_are_named(tmp_path, yaml_text, message):
    config = write_yaml(tmp_path, yaml_text + "output_dir: out\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(["--config", config])


def test_module_lists_take_commas_or_spaces_and_survive_the_run_config():
    run_args = parse_args(
        ["--output_dir", "out", "--peft", "lora", "--lora_target_modules", "query,value", "dense",
         "--freeze_modules", "embeddings", "--transfer_dtype", "bfloat16"]
    )  # fmt: skip
    assert run_args.peft.lora_target_modules == ["query", "value", "dense"]
    back = from_run_config(to_run_config(run_args))
    assert back.peft == run_args.peft and back.model.freeze_modules == ["embeddings"]
    assert back.federation.transfer_dtype == "bfloat16"


def test_run_config_holds_plain_values_only():
    """Enums (lr_scheduler_type is a `SchedulerType`) become plain strings: the run config and a
    launcher's `RunPlan` never carry a transformers object (unpickling one imports torch)."""
    run_config = to_run_config(parse_args(["--config", QUICKSTART, "--lr_scheduler_type", "cosine"]))
    assert run_config["training.lr-scheduler-type"] == "cosine"
    assert {type(value) for value in run_config.values()} <= {bool, int, float, str}


def test_local_paths_reach_flowers_processes_absolute(tmp_path, tiny_model_dir, reviews_csv, monkeypatch):
    """Flower runs the apps in a working folder of its own: a launcher makes the relative paths of
    its command line absolute (the output folder, the model, the data set, a template file)."""
    from hf_flower.launch.plan import parse_run

    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text("{{ messages }}")
    (tmp_path / "reviews.csv").write_bytes(reviews_csv.read_bytes())
    monkeypatch.chdir(tmp_path)
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dataset", "reviews.csv", "--output_dir", "run"]
    run_config, _ = parse_run([*flags, "--chat_template", "templates/chat.jinja"])
    run_args = from_run_config(run_config)
    assert run_args.data.dataset == str(tmp_path / "reviews.csv")
    assert run_args.data.chat_template == str(tmp_path / "templates" / "chat.jinja")
    assert run_args.federation.output_dir == str(tmp_path / "run")
    assert run_args.model.model_name_or_path == str(tiny_model_dir)  # absolute already
    run_config, _ = parse_run([*flags[:2], "--dataset", "imdb", "--output_dir", "run"])
    assert from_run_config(run_config).data.dataset == "imdb"  # a Hub name: no such file here


def test_a_builtin_trainers_scratch_folder_is_removed_when_its_process_exits():
    import subprocess
    import sys

    code = "from hf_flower.tasks import scratch_dir; print(scratch_dir())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    folder = Path(done.stdout.strip())
    assert folder.name.startswith("hf-flower-trainer-") and not folder.exists()
