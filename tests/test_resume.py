"""`--resume`: a run continued after an interruption ends as the uninterrupted run does.

FedAdam is used because it carries state between rounds (its moments `m_t`, `v_t`, and a
learning rate that depends on the round number): a resume that lost either, or numbered the
rounds from 1 again, would diverge from the uninterrupted run.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_flags
from safetensors.numpy import load_file

from hf_flower import checkpoint
from hf_flower.arguments import parse_args
from hf_flower.checkpoint import OutputDirError
from hf_flower.launch.plan import RunPlan
from hf_flower.launch.simulation import run_simulation
from hf_flower.preflight import check_run

# Metrics that measure time, not learning: they differ between any two runs.
TIMING = ("runtime", "per_second", "preparation_time")
STRATEGY = ["--strategy", "FedAdam", "--strategy_kwargs", '{"eta": 0.01, "eta_l": 0.01}']


def flags(output_dir, tiny_model_dir, reviews_csv, *extra) -> list[str]:
    return tiny_run_flags(output_dir, tiny_model_dir, reviews_csv, "--num_rounds", "4", *STRATEGY, *extra)


def learning_metrics(record: dict) -> dict:
    """A round's train/evaluate/central metrics without the timings."""
    return {
        group: {k: v for k, v in record[group].items() if not any(t in k for t in TIMING)}
        for group in ("train", "evaluate", "central")
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, reviews_csv):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert (
        run_simulation(RunPlan.from_run_args(parse_args(flags(output_dir, tiny_model_dir, reviews_csv)))) == 0
    )
    return output_dir


def interrupted_after_round_2(reference: Path, output_dir: Path) -> None:
    """What a run killed while writing round 3 leaves: rounds 0-2, their history, a hidden half round."""
    output_dir.mkdir(parents=True)
    for round_num in (0, 1, 2):
        shutil.copytree(
            checkpoint.round_dir(reference, round_num), checkpoint.round_dir(output_dir, round_num)
        )
    history = checkpoint.read_history(reference)
    checkpoint.write_history(output_dir, {**history, "status": "running", "rounds": history["rounds"][:3]})
    half = output_dir / f".round-3{checkpoint.TMP_ROUND_MARKER}4242-deadbeef"
    half.mkdir()
    (half / checkpoint.CONFIG_FILE).write_text('{"model_type": "be')  # cut off mid-write


def test_resumed_run_matches_the_uninterrupted_run(
    uninterrupted, tmp_path, tiny_model_dir, reviews_csv, capsys
):
    output_dir = tmp_path / "run"
    interrupted_after_round_2(uninterrupted, output_dir)
    assert checkpoint.latest_round(output_dir) == 2  # the half-written round 3 does not count

    resumed = parse_args(flags(output_dir, tiny_model_dir, reviews_csv, "--resume"))
    check_run(resumed, prepare_output=True)
    assert run_simulation(RunPlan.from_run_args(resumed)) == 0
    assert "round 3/4" in capsys.readouterr().out

    assert checkpoint.list_rounds(output_dir) == [0, 1, 2, 3, 4]
    assert not [p for p in output_dir.iterdir() if checkpoint.TMP_ROUND_MARKER in p.name]
    history, reference = checkpoint.read_history(output_dir), checkpoint.read_history(uninterrupted)
    assert history["status"] == "completed" and history["resumed_after"] == 2
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2, 3, 4]
    for ours, theirs in zip(history["rounds"], reference["rounds"], strict=True):
        assert ours["clients"] == theirs["clients"]
        ours_m, theirs_m = learning_metrics(ours), learning_metrics(theirs)
        for group in ours_m:
            assert ours_m[group].keys() == theirs_m[group].keys()
            for key, value in ours_m[group].items():
                assert value == pytest.approx(theirs_m[group][key], rel=1e-5, abs=1e-6), (ours["round"], key)
    assert history["best_round"] == reference["best_round"]

    # Weights and FedAdam's moments after rounds 3 and 4. Flower's FedAdam keeps its aggregate in
    # float64 between rounds while a round folder holds the model's float32 weights, so the
    # resumed round 3 starts from the float32 rounding of the uninterrupted run's float64
    # arrays: equal up to float32 rounding, not bit for bit.
    for round_num in (3, 4):
        ours_w = load_file(checkpoint.round_dir(output_dir, round_num) / checkpoint.WEIGHTS_FILE)
        theirs_w = load_file(checkpoint.round_dir(uninterrupted, round_num) / checkpoint.WEIGHTS_FILE)
        assert ours_w.keys() == theirs_w.keys()
        for key in ours_w:
            np.testing.assert_allclose(ours_w[key], theirs_w[key], rtol=1e-5, atol=1e-6, err_msg=key)
        ours_s, _ = checkpoint.read_strategy_state(checkpoint.round_dir(output_dir, round_num))
        theirs_s, _ = checkpoint.read_strategy_state(checkpoint.round_dir(uninterrupted, round_num))
        assert ours_s.keys() == theirs_s.keys() and any(k.startswith("m_t/") for k in ours_s)
        for key in ours_s:
            np.testing.assert_allclose(ours_s[key], theirs_s[key], rtol=1e-4, atol=1e-7, err_msg=key)


def make_round(output_dir: Path, round_num: int, tiny_model_dir: Path, **config_changes) -> Path:
    """A complete-looking round folder: the tiny model with labels "0"/"1" and `config_changes`."""
    folder = checkpoint.round_dir(output_dir, round_num)
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / checkpoint.CONFIG_FILE).read_text())
    config.update({"id2label": {"0": "0", "1": "1"}, "label2id": {"0": 0, "1": 1}, **config_changes})
    (folder / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
    (folder / checkpoint.METRICS_FILE).write_text(json.dumps({"round": round_num}))
    return folder


def snapshot(path: Path) -> set:
    return {p.relative_to(path) for p in path.rglob("*")}


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty", "holds no complete round to continue from"),
        ("only-half-round", "holds no complete round to continue from"),
        ("other-labels", "labels: saved ['neg', 'pos'], this run's data ['0', '1']"),
        ("other-model", "hidden_size: saved 32, this run 16"),
        ("nothing-left", "already holds round 4 and --num_rounds is 4: nothing to continue"),
    ],
)
def test_resume_refuses_folders_it_cannot_continue(tmp_path, tiny_model_dir, reviews_csv, setup, message):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    if setup == "only-half-round":
        (output_dir / f".round-1{checkpoint.TMP_ROUND_MARKER}1-cafe").mkdir()
    elif setup == "other-labels":
        make_round(output_dir, 1, tiny_model_dir, id2label={"0": "neg", "1": "pos"})
    elif setup == "other-model":
        make_round(output_dir, 1, tiny_model_dir, hidden_size=32)
    elif setup == "nothing-left":
        make_round(output_dir, 4, tiny_model_dir)
    before = snapshot(output_dir)
    run_args = parse_args(flags(output_dir, tiny_model_dir, reviews_csv, "--resume"))
    with pytest.raises(OutputDirError, match="--resume") as err:
        check_run(run_args, prepare_output=True)
    assert message in str(err.value)
    assert snapshot(output_dir) == before  # nothing deleted, not even a hidden half round


def test_resume_needs_the_same_strategy(tmp_path):
    from flwr.serverapp.strategy import FedAdam, FedAvg

    from hf_flower.strategies import StrategyError, get_strategy_state, set_strategy_state

    adam = FedAdam()
    adam.m_t = {"w": np.ones(3, dtype=np.float32)}
    adam.v_t = {"w": np.full(3, 2.0)}
    checkpoint.write_strategy_state(tmp_path, *get_strategy_state(adam))
    restored = FedAdam()
    set_strategy_state(restored, *checkpoint.read_strategy_state(tmp_path))
    np.testing.assert_array_equal(restored.m_t["w"], adam.m_t["w"])
    assert restored.v_t["w"].dtype == np.float64
    with pytest.raises(StrategyError, match="trained with strategy FedAdam, this run uses FedAvg"):
        set_strategy_state(FedAvg(), *checkpoint.read_strategy_state(tmp_path))
