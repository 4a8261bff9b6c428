"""Checked checkpoints: every round records its files' checksums, and a damaged round is named
before anything loads it; rounds a resumed run trains again are moved aside, never deleted."""

import hashlib
import json
import logging
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from hf_flower import checkpoint, hub
from hf_flower.checkpoint import DamagedRoundError, OutputDirError
from hf_flower.server import resume


def write_full_round(folder):
    """What `save_pretrained` of a full model leaves, in miniature."""
    (folder / checkpoint.CONFIG_FILE).write_text('{"model_type": "bert"}')
    save_file({"w": np.arange(256, dtype=np.float32)}, folder / checkpoint.WEIGHTS_FILE)
    save_file({"m": np.ones(4, dtype=np.float32)}, folder / checkpoint.STRATEGY_STATE_FILE)


def write_adapter_round(folder):
    """What a PEFT adapter round holds: adapter_config.json and adapter_model.safetensors."""
    (folder / checkpoint.ADAPTER_CONFIG_FILE).write_text('{"r": 8}')
    save_file({"lora_A": np.ones((8, 16), dtype=np.float32)}, folder / checkpoint.ADAPTER_WEIGHTS_FILE)


def save_rounds(output_dir, rounds, write_files=write_full_round):
    for round_num in rounds:
        record = {"round": round_num, "train": {"train_loss": 0.5}, "client_results": {"train": []}}
        checkpoint.save_round(output_dir, round_num, write_files, record)
    history_rounds = [{"round": n, "client_results": {"train": [{"node_id": n}]}} for n in rounds]
    checkpoint.write_history(output_dir, {"status": "running", "rounds": history_rounds})


def cut_short(path, keep: int = 100):
    """A copy cut off before its end, as `cp` onto a full disk leaves it."""
    path.write_bytes(path.read_bytes()[:-keep])


def test_a_saved_round_records_every_file_and_verifies(tmp_path):
    folder = checkpoint.save_round(tmp_path, 0, write_full_round, {"round": 0})
    recorded = json.loads((folder / checkpoint.CHECKSUMS_FILE).read_text())["files"]
    assert sorted(recorded) == sorted(
        [
            checkpoint.CONFIG_FILE,
            checkpoint.WEIGHTS_FILE,
            checkpoint.STRATEGY_STATE_FILE,
            checkpoint.METRICS_FILE,
        ]
    )
    assert recorded[checkpoint.WEIGHTS_FILE]["size"] == (folder / checkpoint.WEIGHTS_FILE).stat().st_size
    checkpoint.verify_round(folder)


@pytest.mark.parametrize("write_files", [write_full_round, write_adapter_round])
@pytest.mark.parametrize("with_checksums", [True, False], ids=["checksums", "saved-before-checksums"])
def test_truncated_weights_are_named(tmp_path, write_files, with_checksums):
    folder = checkpoint.save_round(tmp_path, 1, write_files, {"round": 1})
    if not with_checksums:
        (folder / checkpoint.CHECKSUMS_FILE).unlink()
    weights = folder / (
        checkpoint.WEIGHTS_FILE if write_files is write_full_round else checkpoint.ADAPTER_WEIGHTS_FILE
    )
    cut_short(weights)
    with pytest.raises(DamagedRoundError, match=re.escape(f"{weights} is damaged")) as err:
        checkpoint.verify_round(folder)
    assert ("cut short" if with_checksums else "SafetensorError") in str(err.value)


def test_a_changed_or_missing_file_is_named(tmp_path):
    folder = checkpoint.save_round(tmp_path, 0, write_full_round, {"round": 0})
    state = folder / checkpoint.STRATEGY_STATE_FILE
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern off: only the checksum sees it
    state.write_bytes(bytes(data))
    with pytest.raises(DamagedRoundError, match=re.escape(f"{state} is damaged: its sha256 differs")):
        checkpoint.verify_round(folder)
    state.unlink()
    with pytest.raises(DamagedRoundError, match=re.escape(f"{state} is missing")):
        checkpoint.verify_round(folder)


def test_metrics_json_holds_aggregates_only(tmp_path):
    record = {
        "round": 1,
        "train": {"train_loss": 0.5},
        "client_results": {"train": [{"node_id": 7, "partition-id": 0, "num-examples": 12}]},
        "failures": ["round 1 train: node 8 (partition 1): Traceback ..."],
        "notes": ["round 1 train: node 7 (partition 0): num-examples 1e12 capped to 120"],
        "added_later": {"node_id": 7},  # a part no one listed as aggregate stays local
    }
    checkpoint.save_round(tmp_path, 1, write_full_round, record)
    assert checkpoint.read_round_metrics(tmp_path, 1) == {"round": 1, "train": {"train_loss": 0.5}}


def test_resume_names_the_damaged_round_and_the_latest_intact_one(tmp_path):
    save_rounds(tmp_path, [0, 1, 2])
    weights = checkpoint.round_dir(tmp_path, 2) / checkpoint.WEIGHTS_FILE
    cut_short(weights)
    with pytest.raises(OutputDirError, match=re.escape(f"--resume: {weights} is damaged")) as err:
        resume.find_resume_point(tmp_path)
    assert "Round 1 is the latest intact round before it" in str(err.value)
    assert "--resume_from_round 1" in str(err.value)

    point = resume.find_resume_point(tmp_path, from_round=1)
    assert point.round == 1 and point.folder == checkpoint.round_dir(tmp_path, 1)
    # The records come from history.json, per-client details included (metrics.json has none).
    assert [r["client_results"]["train"][0]["node_id"] for r in point.rounds] == [0, 1]

    with pytest.raises(
        OutputDirError, match=r"holds no complete round 5; its complete rounds are \[0, 1, 2\]"
    ):
        resume.find_resume_point(tmp_path, from_round=5)
    for earlier in (0, 1):
        cut_short(checkpoint.round_dir(tmp_path, earlier) / checkpoint.WEIGHTS_FILE)
    with pytest.raises(OutputDirError, match="No earlier round is intact"):
        resume.find_resume_point(tmp_path)


def test_later_rounds_are_moved_aside_and_said_so(tmp_path, caplog):
    save_rounds(tmp_path, [0, 1, 2, 3])
    (tmp_path / "round-4").mkdir()  # a round that is not complete is not lost either
    with caplog.at_level(logging.WARNING, logger=resume.__name__):
        resume.set_aside_later_rounds(tmp_path, 1)
    assert checkpoint.list_rounds(tmp_path) == [0, 1]
    (aside,) = tmp_path.glob(f"{checkpoint.SET_ASIDE_PREFIX}*")
    assert sorted(p.name for p in aside.iterdir()) == ["round-2", "round-3", "round-4"]
    checkpoint.verify_round(aside / "round-3")  # moved whole
    # The summary of a run that stops before its first new round points at round 1, not 3.
    assert [r["round"] for r in checkpoint.read_history(tmp_path)["rounds"]] == [0, 1]
    assert f"moved round-2, round-3, round-4 to {aside}" in caplog.text
    assert "Nothing was deleted" in caplog.text

    caplog.clear()
    resume.set_aside_later_rounds(tmp_path, 1)  # nothing left to move: nothing said
    assert caplog.text == "" and len(list(tmp_path.glob(f"{checkpoint.SET_ASIDE_PREFIX}*"))) == 1


def rewrite_checksums(folder, change):
    """checksums.json edited by hand: `change(files)` edits its `{name: {size, sha256}}`."""
    path = folder / checkpoint.CHECKSUMS_FILE
    data = json.loads(path.read_text())
    change(data["files"])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name", ["/etc/hostname", "../secret.txt", "sub/../../secret.txt", "./config.json", ""]
)
def test_checksums_names_outside_the_round_are_refused(tmp_path, name):
    folder = checkpoint.save_round(tmp_path / "run", 1, write_full_round, {"round": 1})
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    entry = {"size": secret.stat().st_size, "sha256": hashlib.sha256(b"secret").hexdigest()}
    rewrite_checksums(folder, lambda files: files.update({name: entry}))
    with pytest.raises(
        DamagedRoundError, match=re.escape(f"lists {name!r}, which is not a file inside {folder}")
    ):
        checkpoint.verify_round(folder)
    with pytest.raises(DamagedRoundError):
        hub.round_operations(folder)


def test_a_round_with_a_link_is_refused_and_never_pushed(tmp_path):
    folder = checkpoint.save_round(tmp_path / "run", 1, write_full_round, {"round": 1})
    checkpoint.verify_round(folder)  # verified once: a link planted later is still seen
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    for link in (folder / "special_tokens_map.json", folder / "merged"):
        link.symlink_to(secret if link.suffix else tmp_path)
        with pytest.raises(DamagedRoundError, match=re.escape(f"{link} is a link (to ")):
            checkpoint.verify_round(folder)
        with pytest.raises(DamagedRoundError, match=re.escape(f"{link} is a link")):
            hub.round_operations(folder)
        link.unlink()
    # Listed in checksums.json too (a link swapped in for a saved file): refused, not followed.
    weights = folder / checkpoint.WEIGHTS_FILE
    real = tmp_path / "weights"
    weights.rename(real)
    weights.symlink_to(real)
    with pytest.raises(DamagedRoundError, match=re.escape(f"{weights} is a link")):
        checkpoint.checked_files(folder)
    # The round folder itself a link to a folder elsewhere.
    weights.unlink()
    real.rename(weights)
    linked = tmp_path / "run" / "round-2"
    linked.symlink_to(folder)
    with pytest.raises(DamagedRoundError, match=re.escape(f"{linked} is a link")):
        checkpoint.verify_round(linked)


def test_saving_a_round_refuses_a_link(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("hf_secret")

    def write_with_link(folder):
        write_full_round(folder)
        (folder / "tokenizer.json").symlink_to(secret)

    with pytest.raises(OutputDirError, match=r"tokenizer\.json is a link .*holds plain files only"):
        checkpoint.save_round(tmp_path / "run", 1, write_with_link, {"round": 1})
    assert checkpoint.list_rounds(tmp_path / "run") == [] and list((tmp_path / "run").iterdir()) == []


def test_the_push_takes_exactly_the_checked_files(tmp_path):
    folder = checkpoint.save_round(
        tmp_path / "run", 1, write_full_round, {"round": 1, "train": {"loss": 1.0}}
    )
    (folder / "notes.txt").write_text("not listed in checksums.json")
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.json").write_text("{}")
    pushed = {op.path_in_repo for op in hub.round_operations(folder)}
    # checksums.json and the strategy state stay local; files it does not list never leave.
    assert pushed == {checkpoint.CONFIG_FILE, checkpoint.WEIGHTS_FILE, checkpoint.METRICS_FILE}
    assert set(checkpoint.checked_files(folder)) == pushed | {checkpoint.STRATEGY_STATE_FILE}
    # A round saved before checksums existed has no checked files.
    (folder / checkpoint.CHECKSUMS_FILE).unlink()
    with pytest.raises(DamagedRoundError, match=f"has no {checkpoint.CHECKSUMS_FILE}"):
        hub.round_operations(folder)
