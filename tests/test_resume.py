"""`--resume`: a run continued after an interruption ends as the uninterrupted run does.

FedAdam is used because it carries state between rounds (its moments `m_t`, `v_t`, and a
learning rate that depends on the round number): a resume that lost either, or numbered the
rounds from 1 again, would diverge from the uninterrupted run.
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config_of, tiny_run_flags
from resume_checks import assert_resumed_like, interrupted_after
from safetensors.numpy import save_file

from hf_flower import checkpoint
from hf_flower.arguments import FederationArguments
from hf_flower.checkpoint import OutputDirError
from hf_flower.commands import simulate
from hf_flower.launch.flower import LOGS_DIRNAME
from hf_flower.launch.plan import RunPlan
from hf_flower.launch.simulation import run_simulation
from hf_flower.server.preflight import check_run

STRATEGY = ["--strategy", "FedAdam", "--strategy_kwargs", '{"eta": 0.01, "eta_l": 0.01}']


def flags(output_dir, tiny_model_dir, reviews_csv, *extra) -> list[str]:
    return tiny_run_flags(output_dir, tiny_model_dir, reviews_csv, "--num_rounds", "3", *STRATEGY, *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, reviews_csv):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_config = run_config_of(flags(output_dir, tiny_model_dir, reviews_csv))
    assert run_simulation(RunPlan.from_run_config(run_config)) == 0
    return output_dir


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_run(
    uninterrupted, tmp_path, tiny_model_dir, reviews_csv, capsys
):
    """A run killed while writing round 3, whose round 2 was then cut short (a copy onto a full
    disk): `--resume` names the file before any Flower process starts, and `--resume_from_round 1`
    continues from round 1 to the same end as the uninterrupted run."""
    output_dir = tmp_path / "run"
    interrupted_after(uninterrupted, output_dir, 2)
    assert checkpoint.latest_round(output_dir) == 2  # the half-written round 3 does not count
    weights = checkpoint.round_dir(output_dir, 2) / checkpoint.WEIGHTS_FILE
    damaged = weights.read_bytes()[:-1000]
    weights.write_bytes(damaged)

    started = time.monotonic()
    assert simulate.main(flags(output_dir, tiny_model_dir, reviews_csv, "--resume")) == 2
    refused_after = time.monotonic() - started
    out, err = capsys.readouterr()
    assert f"error: --resume: {weights} is damaged" in err and "(cut short)" in err
    assert "continue from there with --resume_from_round 1" in err
    assert "Simulating" not in out and not (output_dir / LOGS_DIRNAME).exists()  # no Flower process
    assert refused_after < 20, refused_after  # the launcher's preparation only (Flower's start: 50 s)

    resumed = run_config_of(flags(output_dir, tiny_model_dir, reviews_csv, "--resume_from_round", "1"))
    check_run(resumed, prepare_output=True)
    (aside,) = output_dir.glob(f"{checkpoint.SET_ASIDE_PREFIX}*")
    assert (aside / "round-2" / checkpoint.WEIGHTS_FILE).read_bytes() == damaged  # kept, not deleted
    assert run_simulation(RunPlan.from_run_config(resumed)) == 0
    assert "round 3/3" in capsys.readouterr().out
    assert_resumed_like(output_dir, uninterrupted, 1)


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
        ("other-labels", "labels: saved ['neg', 'pos'], this run ['0', '1']"),
        ("other-model", "hidden_size: saved 32, this run 16"),
        ("nothing-left", "already holds round 3 and --num_rounds is 3: nothing to continue"),
        ("adapter-round", "holds LoRA adapters and this run's model trains every weight"),
        ("other-lora-rank", "r: saved 8, this run 4"),
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
        make_round(output_dir, 3, tiny_model_dir)
    elif setup in ("adapter-round", "other-lora-rank"):
        folder = checkpoint.round_dir(output_dir, 1)
        folder.mkdir()
        adapter = {"base_model_name_or_path": str(tiny_model_dir), "r": 8, "lora_alpha": 16}
        (folder / checkpoint.ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter))
        save_file({"lora_A": np.zeros((8, 16), dtype=np.float32)}, folder / checkpoint.ADAPTER_WEIGHTS_FILE)
        (folder / checkpoint.METRICS_FILE).write_text(json.dumps({"round": 1}))
    before = snapshot(output_dir)
    lora = ("--peft", "lora", "--lora_r", "4") if setup == "other-lora-rank" else ()
    run_config = run_config_of(flags(output_dir, tiny_model_dir, reviews_csv, *lora, "--resume"))
    with pytest.raises(OutputDirError, match="--resume") as err:
        check_run(run_config, prepare_output=True)
    assert message in str(err.value)
    assert snapshot(output_dir) == before  # nothing deleted, not even a hidden half round


def test_resume_needs_the_same_strategy(tmp_path):
    from flwr.serverapp.strategy import FedAdam, FedAvg

    from hf_flower.server.strategies import StrategyError, get_strategy_state, set_strategy_state

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


SHAPES = {"classifier.weight": (2, 4), "classifier.bias": (2,)}
DP_FIXED = {"noise_multiplier": 0.1, "clipping_norm": 5.0, "num_sampled_clients": 2}


def saved_state(folder, strategy_name: str, strategy_kwargs: dict, **state) -> FederationArguments:
    """A round folder's strategy state of `strategy_name` with `state` set on the strategy; the
    run's `FederationArguments`."""
    from hf_flower.server.strategies import build_strategy, get_strategy_state

    federation = FederationArguments(strategy=strategy_name, strategy_kwargs=strategy_kwargs)
    strategy = build_strategy(federation)
    for name, value in state.items():
        setattr(strategy, name, value)
    checkpoint.write_strategy_state(folder, *get_strategy_state(strategy))
    return federation


def moments(fill: float = 0.5, **changed) -> dict:
    return {name: changed.get(name, np.full(shape, fill, dtype=np.float32)) for name, shape in SHAPES.items()}


def test_restored_moments_must_fit_the_model(tmp_path):
    from hf_flower.server.resume import checked_strategy_state

    federation = saved_state(tmp_path, "FedAdam", {}, m_t=moments(), v_t=moments())
    tensors, _ = checked_strategy_state(tmp_path, federation, SHAPES)
    assert sorted(tensors) == sorted(f"{m}/{n}" for m in ("m_t", "v_t") for n in SHAPES)
    bad = {
        "another model's names": (
            dict(m_t={"encoder.w": np.zeros(3)}),
            "m_t names ['encoder.w'], not the model's",
        ),
        "another shape": (
            dict(v_t=moments(**{"classifier.bias": np.ones(3)})),
            "has shape (3,), the model's weight (2,)",
        ),
        "not finite": (dict(m_t=moments(**{"classifier.bias": np.array([1.0, np.nan])})), "not finite"),
        "negative second moment": (dict(v_t=moments(-1.0)), "holds negative values"),
    }
    for case, (state, message) in bad.items():
        federation = saved_state(tmp_path, "FedAdam", {}, **state)
        with pytest.raises(OutputDirError, match=r"--resume: .*strategy_state\.safetensors: ") as err:
            checked_strategy_state(tmp_path, federation, SHAPES)
        assert message in str(err.value), case
    # FedAvgM's momentum: one array per weight, in the weights' order.
    federation = saved_state(tmp_path, "FedAvgM", {}, momentum_vector=[np.zeros((2, 4)), np.zeros(2)])
    assert checked_strategy_state(tmp_path, federation, SHAPES) is not None
    federation = saved_state(tmp_path, "FedAvgM", {}, momentum_vector=[np.zeros(2), np.zeros((2, 4))])
    with pytest.raises(OutputDirError, match=r"momentum_vector of classifier\.weight has shape \(2,\)"):
        checked_strategy_state(tmp_path, federation, SHAPES)


def test_an_edited_clipping_norm_is_refused(tmp_path):
    from hf_flower.server.resume import checked_strategy_state

    name = "DifferentialPrivacyServerSideFixedClipping"
    federation = saved_state(tmp_path, name, DP_FIXED)
    assert checked_strategy_state(tmp_path, federation, SHAPES) is not None  # as saved: restored
    # The state says 50 where the run says 5: clients' updates would be clipped 10x looser.
    saved_state(tmp_path, name, DP_FIXED, clipping_norm=50.0)
    with pytest.raises(
        OutputDirError,
        match=r"clipping_norm is 50\.0, and this run's --strategy_kwargs set clipping_norm 5\.0",
    ):
        checked_strategy_state(tmp_path, federation, SHAPES)
    # An adaptive clipping norm moves every round: any finite positive value is the run's own.
    adaptive = {"noise_multiplier": 0.1, "num_sampled_clients": 2}
    federation = saved_state(
        tmp_path, "DifferentialPrivacyServerSideAdaptiveClipping", adaptive, clipping_norm=3.7
    )
    assert checked_strategy_state(tmp_path, federation, SHAPES)[1]["state"]["clipping_norm"]["value"] == 3.7
    saved_state(tmp_path, "DifferentialPrivacyServerSideAdaptiveClipping", adaptive, clipping_norm=-1.0)
    with pytest.raises(
        OutputDirError, match=r"clipping_norm is -1\.0; a clipping norm is a finite number > 0"
    ):
        checked_strategy_state(tmp_path, federation, SHAPES)
