"""What a resumed run must equal: shared by the resume tests of every task and `--peft` setting."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import NO_SUCH_PID
from safetensors.numpy import load_file

from hf_flower import checkpoint

# Metrics that measure time, not learning: they differ between any two runs.
TIMING = ("runtime", "per_second", "preparation_time")


def learning_metrics(record: dict) -> dict:
    """A round's train/evaluate/central metrics without the timings."""
    return {
        group: {k: v for k, v in record[group].items() if not any(t in k for t in TIMING)}
        for group in ("train", "evaluate", "central")
    }


def interrupted_after(reference: Path, output_dir: Path, last_round: int) -> None:
    """What a run killed while writing round `last_round + 1` leaves: rounds 0..`last_round`, their
    history, and a hidden half-written round."""
    output_dir.mkdir(parents=True)
    for round_num in range(last_round + 1):
        shutil.copytree(
            checkpoint.round_dir(reference, round_num), checkpoint.round_dir(output_dir, round_num)
        )
    history = checkpoint.read_history(reference)
    checkpoint.write_history(
        output_dir, {**history, "status": "running", "rounds": history["rounds"][: last_round + 1]}
    )
    half = output_dir / f".round-{last_round + 1}{checkpoint.TMP_ROUND_MARKER}{NO_SUCH_PID}-deadbeef"
    half.mkdir()
    (half / checkpoint.CONFIG_FILE).write_text('{"model_type": "be')  # cut off mid-write


def round_weights(folder: Path) -> dict:
    """The weights a round folder holds: a full model's, or an adapter round's adapters."""
    adapter = folder / checkpoint.ADAPTER_WEIGHTS_FILE
    return load_file(adapter if adapter.is_file() else folder / checkpoint.WEIGHTS_FILE)


def assert_resumed_like(output_dir: Path, reference: Path, resumed_after: int) -> None:
    """The run in `output_dir`, resumed after round `resumed_after`, ended as `reference` did: the
    same rounds, clients and metrics, and the same weights and strategy state in each later round.

    Flower's FedAdam keeps its aggregate in float64 between rounds while a round folder holds the
    model's float32 weights, so a resumed round starts from the float32 rounding of the
    uninterrupted run's arrays: equal up to float32 rounding, not bit for bit.
    """
    rounds = checkpoint.list_rounds(reference)
    assert checkpoint.list_rounds(output_dir) == rounds
    assert not [p for p in output_dir.iterdir() if checkpoint.TMP_ROUND_MARKER in p.name]
    history, expected = checkpoint.read_history(output_dir), checkpoint.read_history(reference)
    assert history["status"] == "completed" and history["resumed_after"] == resumed_after
    assert [r["round"] for r in history["rounds"]] == rounds
    for ours, theirs in zip(history["rounds"], expected["rounds"], strict=True):
        assert ours["clients"] == theirs["clients"]
        ours_m, theirs_m = learning_metrics(ours), learning_metrics(theirs)
        for group in ours_m:
            assert ours_m[group].keys() == theirs_m[group].keys()
            for key, value in ours_m[group].items():
                assert value == pytest.approx(theirs_m[group][key], rel=1e-5, abs=1e-6), (ours["round"], key)
    assert history["best_round"] == expected["best_round"]

    for round_num in rounds[resumed_after + 1 :]:
        ours_w = round_weights(checkpoint.round_dir(output_dir, round_num))
        theirs_w = round_weights(checkpoint.round_dir(reference, round_num))
        assert ours_w.keys() == theirs_w.keys()
        for key in ours_w:
            np.testing.assert_allclose(ours_w[key], theirs_w[key], rtol=1e-5, atol=1e-6, err_msg=key)
        ours_s = checkpoint.read_strategy_state(checkpoint.round_dir(output_dir, round_num))
        theirs_s = checkpoint.read_strategy_state(checkpoint.round_dir(reference, round_num))
        assert (ours_s is None) == (theirs_s is None)
        if ours_s is not None:
            assert ours_s[0].keys() == theirs_s[0].keys()
            for key in ours_s[0]:
                np.testing.assert_allclose(
                    ours_s[0][key], theirs_s[0][key], rtol=1e-4, atol=1e-7, err_msg=key
                )
