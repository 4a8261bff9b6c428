"""Round checkpoints: atomic round folders, crash leftovers, the output folder check, history."""

import json
import math
import os

import pytest
import torch
from conftest import NO_SUCH_PID, make_tiny_bert
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizerFast,
)

from hf_flower.checkpoint import (
    HISTORY_FILE,
    METRICS_FILE,
    ROUND_PREFIX,
    WEIGHTS_FILE,
    OutputDirError,
    best_round,
    is_complete_round,
    latest_round,
    list_rounds,
    prepare_output_dir,
    read_history,
    read_round_metrics,
    round_dir,
    save_round,
    write_history,
)


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_bert()


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def save_model(model, tokenizer=None):
    """The typical `write_files`: what the server passes to `save_round`."""

    def write_files(folder):
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return write_files


def hidden_entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_constants_and_round_dir(tmp_path):
    assert (ROUND_PREFIX, HISTORY_FILE, METRICS_FILE, WEIGHTS_FILE) == (
        "round-",
        "history.json",
        "metrics.json",
        "model.safetensors",
    )
    assert round_dir(tmp_path, 3) == tmp_path / "round-3"
    assert round_dir(str(tmp_path), 0) == tmp_path / "round-0"
    for bad in (-1, 1.0, "2", True):
        with pytest.raises(ValueError, match="non-negative int"):
            round_dir(tmp_path, bad)


def test_saved_round_loads_with_from_pretrained(tmp_path, tiny_model, tiny_tokenizer):
    out = prepare_output_dir(tmp_path / "run", overwrite=False)
    metrics = {"round": 0, "central": {"eval_accuracy": 0.5, "eval_loss": float("nan")}}
    path = save_round(out, 0, save_model(tiny_model, tiny_tokenizer), metrics)

    assert path == out / "round-0"
    assert is_complete_round(path)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", WEIGHTS_FILE, METRICS_FILE, "tokenizer.json"} <= names
    assert hidden_entries(out) == []

    loaded = AutoModelForSequenceClassification.from_pretrained(path)
    expected = tiny_model.state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(path)
    assert reloaded_tokenizer("good movie")["input_ids"] == tiny_tokenizer("good movie")["input_ids"]

    # metrics.json: sorted keys, indent 2, NaN written as null.
    text = (path / METRICS_FILE).read_text()
    assert "NaN" not in text
    expected_metrics = {"central": {"eval_accuracy": 0.5, "eval_loss": None}, "round": 0}
    assert text == json.dumps(expected_metrics, sort_keys=True, indent=2) + "\n"
    assert read_round_metrics(out, 0) == {"round": 0, "central": {"eval_accuracy": 0.5, "eval_loss": None}}


def test_list_and_latest_rounds(tmp_path, tiny_model):
    out = prepare_output_dir(tmp_path, overwrite=False)
    assert list_rounds(out) == [] and latest_round(out) is None
    assert list_rounds(tmp_path / "missing") == []
    for n in (0, 1, 2, 10):
        save_round(out, n, save_model(tiny_model), {"round": n})
    (out / "round-11").mkdir()  # incomplete: no files
    (out / "round-01").mkdir()  # not a round name
    assert list_rounds(out) == [0, 1, 2, 10]
    assert latest_round(out) == 10
    assert not is_complete_round(out / "round-11")


def test_resaving_a_round_replaces_it(tmp_path, tiny_model):
    out = prepare_output_dir(tmp_path, overwrite=False)
    save_round(out, 1, save_model(tiny_model), {"round": 1, "seconds": 1.0})
    (out / "round-1" / "stale.txt").write_text("from the first save")
    save_round(out, 1, save_model(tiny_model), {"round": 1, "seconds": 2.0})
    assert read_round_metrics(out, 1)["seconds"] == 2.0
    assert not (out / "round-1" / "stale.txt").exists()
    assert hidden_entries(out) == []
    assert list_rounds(out) == [1]


def test_failing_write_files_leaves_nothing(tmp_path, tiny_model):
    out = prepare_output_dir(tmp_path, overwrite=False)
    save_round(out, 0, save_model(tiny_model), {"round": 0})

    def crash_halfway(folder):
        tiny_model.config.save_pretrained(folder)
        (folder / WEIGHTS_FILE).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_round(out, 1, crash_halfway, {"round": 1})
    assert not (out / "round-1").exists()
    assert hidden_entries(out) == []
    assert list_rounds(out) == [0]

    # Failing while replacing an existing round keeps the old round.
    with pytest.raises(RuntimeError, match="disk full"):
        save_round(out, 0, crash_halfway, {"round": 0, "seconds": 2.0})
    assert read_round_metrics(out, 0) == {"round": 0}
    assert hidden_entries(out) == []


def test_write_files_that_saves_nothing_is_an_error(tmp_path):
    with pytest.raises(OutputDirError, match="must save the model into the folder it is given"):
        save_round(tmp_path, 0, lambda folder: None, {"round": 0})
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_metrics_fail_before_saving(tmp_path, tiny_model):
    calls = []
    with pytest.raises(TypeError, match="cannot be saved as JSON"):
        save_round(tmp_path, 0, calls.append, {"round": 0, "bad": object()})
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path, tiny_model):
    out = prepare_output_dir(tmp_path / "run", overwrite=False)
    save_round(out, 0, save_model(tiny_model), {"round": 0})
    save_round(out, 1, save_model(tiny_model), {"round": 1})
    # A crash while round 2 was being written: a hidden temporary folder with partial files.
    leftover = out / f".round-2.tmp-{NO_SUCH_PID}-deadbeef"
    leftover.mkdir()
    tiny_model.config.save_pretrained(leftover)
    (leftover / WEIGHTS_FILE).write_bytes(b"partial")
    (out / f".{HISTORY_FILE}.tmp-{NO_SUCH_PID}-abcd").write_text('{"status": "runn')

    assert list_rounds(out) == [0, 1]
    assert latest_round(out) == 1
    assert not is_complete_round(leftover)

    with pytest.raises(OutputDirError):  # the earlier rounds still make it refuse...
        prepare_output_dir(out, overwrite=False)
    assert hidden_entries(out) == []  # ...but the leftovers are gone anyway
    assert list_rounds(out) == [0, 1]


def test_crash_while_replacing_a_round_restores_it(tmp_path, tiny_model):
    out = tmp_path / "run"
    save_round(out, 0, save_model(tiny_model), {"round": 0})
    # A crash between moving round-0 aside and renaming the new one into place.
    os.rename(out / "round-0", out / f".round-0.old-{NO_SUCH_PID}-abcd")
    new_copy = out / f".round-0.tmp-{NO_SUCH_PID}-ef01"
    save_model(tiny_model)(new_copy)
    assert list_rounds(out) == []

    prepare_output_dir(out, overwrite=True)  # restores round 0, then removes it as asked
    assert hidden_entries(out) == [] and list_rounds(out) == []

    save_round(out, 0, save_model(tiny_model), {"round": 0})
    os.rename(out / "round-0", out / f".round-0.old-{NO_SUCH_PID}-abcd")
    with pytest.raises(OutputDirError, match="round-0"):
        prepare_output_dir(out, overwrite=False)
    assert list_rounds(out) == [0]
    assert hidden_entries(out) == []


def test_prepare_refuses_earlier_run_and_overwrite_keeps_user_files(tmp_path, tiny_model):
    out = prepare_output_dir(tmp_path / "a" / "b", overwrite=False)  # creates parents
    assert out.is_dir()
    assert prepare_output_dir(out, overwrite=False) == out  # empty: fine again

    save_round(out, 0, save_model(tiny_model), {"round": 0})
    save_round(out, 1, save_model(tiny_model), {"round": 1})
    write_history(out, {"status": "completed", "rounds": [{"round": 0}, {"round": 1}]})
    (out / "notes.txt").write_text("mine")
    (out / "round-x").mkdir()  # not ours: not a round name

    with pytest.raises(OutputDirError, match=r"round-0, round-1, history\.json.*pass --overwrite_output_dir"):
        prepare_output_dir(out, overwrite=False)
    assert list_rounds(out) == [0, 1]

    assert prepare_output_dir(out, overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "round-x"]
    assert (out / "notes.txt").read_text() == "mine"


def test_prepare_refuses_history_alone(tmp_path):
    write_history(tmp_path, {"status": "failed", "error": "boom"})
    with pytest.raises(OutputDirError, match=r"history\.json"):
        prepare_output_dir(tmp_path, overwrite=False)


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match=r"is not writable \(.+\); choose another --output_dir"):
        prepare_output_dir(blocker / "run", overwrite=False)
    with pytest.raises(OutputDirError, match="is not a folder; choose another --output_dir"):
        prepare_output_dir(blocker, overwrite=False)


def test_history_round_trip(tmp_path):
    history = {
        "status": "running",
        "rounds": [{"round": 0, "central": {"eval_loss": float("nan"), "eval_accuracy": 0.5}}],
        "model": "tiny-bert",
        "inf": float("inf"),
    }
    write_history(tmp_path, history)
    assert read_history(tmp_path) == {
        "status": "running",
        "error": None,
        "rounds": [{"round": 0, "central": {"eval_loss": None, "eval_accuracy": 0.5}}],
        "model": "tiny-bert",
        "inf": None,
    }
    assert "NaN" not in (tmp_path / HISTORY_FILE).read_text()
    assert math.isnan(history["rounds"][0]["central"]["eval_loss"])  # the caller's dict is untouched

    write_history(tmp_path, {"status": "failed", "error": "client 3 crashed", "rounds": []})
    assert read_history(tmp_path)["error"] == "client 3 crashed"
    assert hidden_entries(tmp_path) == []


def test_history_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no history.json"):
        read_history(tmp_path)
    (tmp_path / HISTORY_FILE).write_text('{"status": ')
    with pytest.raises(OutputDirError, match="not valid JSON"):
        read_history(tmp_path)
    (tmp_path / HISTORY_FILE).write_text("[]")
    with pytest.raises(OutputDirError, match="not a JSON object"):
        read_history(tmp_path)
    with pytest.raises(ValueError, match="status"):
        write_history(tmp_path, {"status": "done"})
    with pytest.raises(ValueError, match="rounds"):
        write_history(tmp_path, {"status": "running", "rounds": {}})
    with pytest.raises(FileNotFoundError, match="no metrics for round 4"):
        read_round_metrics(tmp_path, 4)


def test_best_round():
    history = {
        "rounds": [
            {"round": 0, "central": {"eval_accuracy": 0.5, "eval_loss": 0.9}},
            {"round": 1},  # no central evaluation this round
            {"round": 2, "central": {"eval_accuracy": 0.8, "eval_loss": 0.4}},
            {"round": 3, "central": {"eval_accuracy": 0.8, "eval_loss": None}},
            {"round": 4, "central": {"eval_accuracy": None, "eval_loss": 0.3}},
        ]
    }
    assert best_round(history) == 2  # ties go to the earliest round
    assert best_round(history, "central.eval_loss", greater_is_better=False) == 4
    assert best_round(history, "central.eval_loss", greater_is_better=True) == 0
    assert best_round(history, "central.f1") is None
    assert best_round({"rounds": []}) is None
    assert best_round({"rounds": [{"eval": {"acc": 0.1}}, {"eval": {"acc": 0.3}}]}, "eval.acc") == 1
    assert best_round({"rounds": [{"round": 0, "central": {"eval_accuracy": float("nan")}}]}) is None
