"""Bad input stops `hf-flower simulate` before any Flower process starts, with one clear message."""

import errno
import logging

import pytest
from conftest import build_tiny_model, write_reviews_csv

from hf_flower import checkpoint
from hf_flower.arguments import parse_args
from hf_flower.commands import simulate
from hf_flower.launch.plan import run_prepare
from hf_flower.launch.simulation import prepare_simulation
from hf_flower.modeling import ModelError, load_model
from hf_flower.server.replies import RoundFailedError


@pytest.fixture
def base_flags(tmp_path, tiny_model_dir, reviews_csv):
    return [
        "--model_name_or_path", str(tiny_model_dir),
        "--dataset", str(reviews_csv),
        "--max_length", "32",
        "--test_size", "40",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip


def run_and_expect(capsys, argv, message, through_the_command=False):
    """`hf-flower simulate argv` stops with exit code 2 and one `error:` line holding `message`.

    By default the launcher's preparation runs in this process (what its child process runs,
    without the few seconds of starting one); `through_the_command` runs the whole command.
    """
    if through_the_command:
        assert simulate.main(argv) == 2
        err = capsys.readouterr().err
    else:
        prepared = run_prepare(prepare_simulation, argv)
        assert prepared.plan is None and prepared.exit_code == 2
        err = prepared.error
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    assert message in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--model_name_or_path", "no-such-org/no-such-model"],
            "Cannot load model 'no-such-org/no-such-model'",
        ),
        (["--dataset", "no-such-dataset-xyz"], "Unknown dataset 'no-such-dataset-xyz'"),
        (["--text_column", "review"], "Column 'review' not found"),
        (["--label_column", "sentiment"], "Column 'sentiment' not found"),
        (["--num_clients", "500", "--min_train_clients", "2"], "cannot be split between 500 clients"),
        (["--num_labels", "3"], "num_labels=3 but the data has 2 classes"),
        (["--strategy", "FedFoo"], "Unknown strategy 'FedFoo'"),
        (["--strategy", "FedProx", "--strategy_kwargs", '{"mu": 0.1}'], "FedProx has no parameter(s) ['mu']"),
        (["--strategy", "QFedAvg"], "QFedAvg needs ['client_learning_rate']"),
        (["--strategy", "FedXgbBagging"], "Unknown strategy 'FedXgbBagging'"),
        (["--min_available_clients", "3"], "min_available_clients=3 exceeds num_clients=2"),
        (["--num_rounds", "0"], "num_rounds must be at least 1"),
        (
            ["--peft", "lora", "--lora_target_modules", "qry"],
            "--lora_target_modules 'qry' matches no module of BertForSequenceClassification; its linear "
            "layers are: classifier, dense, key, query, value",
        ),
        (["--peft", "lora", "--modules_to_save", "head"], "--modules_to_save 'head' matches no module"),
        (["--freeze_modules", "embedings"], "--freeze_modules 'embedings' matches no module"),
        (["--save_merged"], "save_merged needs adapters to merge: add --peft lora"),
        (
            [
                "--strategy", "DifferentialPrivacyClientSideFixedClipping", "--transfer_dtype", "bfloat16",
                "--strategy_kwargs", '{"noise_multiplier": 0.1, "clipping_norm": 1.0, "num_sampled_clients": 2}',
            ],
            "use --transfer_dtype float16 or float32",
        ),
    ],
)  # fmt: skip
def test_bad_input_is_named_before_training(capsys, base_flags, flags, message):
    run_and_expect(capsys, base_flags + flags, message)


def test_empty_partition(capsys, tmp_path, tiny_model_dir):
    small = write_reviews_csv(tmp_path / "small.csv", num_rows=30)
    flags = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(small), "--test_size", "4",
        "--num_clients", "13", "--min_train_clients", "2", "--partitioner", "dirichlet",
        "--dirichlet_alpha", "0.05", "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    run_and_expect(capsys, flags, "--dirichlet_alpha")


def test_unwritable_output_dir(capsys, base_flags, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run_and_expect(capsys, base_flags + ["--output_dir", str(blocker / "run")], "is not writable")


def test_existing_rounds_are_not_overwritten(capsys, base_flags, tmp_path):
    round_dir = tmp_path / "run" / "round-0"
    round_dir.mkdir(parents=True)
    (round_dir / "config.json").write_text("{}")
    run_and_expect(capsys, base_flags, "--overwrite_output_dir", through_the_command=True)
    assert (round_dir / "config.json").exists()


def test_checkpoint_with_other_label_count(tmp_path):
    three_labels = build_tiny_model(tmp_path / "three", num_labels=3)
    run_args = parse_args(["--model_name_or_path", str(three_labels)])
    with pytest.raises(ModelError, match="does not fit 2 labels"):
        load_model(run_args.model, ["negative", "positive"])


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(capfd, base_flags, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("num_rounds: 2\nstrategy_kwargs: {eta: 0.1\nnum_clients: 2\n")
    assert simulate.main(base_flags + ["--config", str(config)]) == 2
    problem = "line 3, column 12: expected ',' or '}', but got ':'"
    # All the launcher and its preparing process wrote: one line, no traceback.
    assert capfd.readouterr().err == f"error: --config {config} is not valid YAML: {problem}\n"


def test_strategy_kwargs_that_are_not_an_object_name_the_flag(capsys, base_flags):
    message = "--strategy_kwargs must be a JSON object of names and values"
    run_and_expect(capsys, base_flags + ["--strategy_kwargs", "[1,2]"], message)


def test_a_failed_history_write_does_not_hide_the_runs_error(
    tmp_path, tiny_model_dir, reviews_csv, monkeypatch, caplog
):
    """A full disk at the end of a failed run: the run's error is reported first and stays the
    error the ServerApp raises (`finish` returns nothing new); the failed write is reported too."""
    from test_round_checkpointer import make_checkpointer

    checkpointer = make_checkpointer(tmp_path, tiny_model_dir, reviews_csv, in_background=False)

    def full_disk(output_dir, history):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_history", full_disk)
    with caplog.at_level(logging.ERROR):
        assert checkpointer.finish(RoundFailedError("Round 1: 1 of 3 clients trained")) is None
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [
        "The run failed: RoundFailedError: Round 1: 1 of 3 clients trained",
        "Recording that in history.json failed too: [Errno 28] No space left on device",
    ]
    # A run that went well has nothing else to report: the failed write is its error.
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.finish(None)
