"""Pushing rounds to the Hub, against `fake_hub.FakeHub` on loopback (the real Hub is unreachable here).

huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is imported, and this process
imported it offline (conftest), so every Hub client here is a subprocess (scripts/simulate.py,
scripts/push.py, a `from_pretrained` check) whose environment points at the fake Hub; the token
travels only in its `HF_TOKEN`. One 2-round simulation that pushes is shared by the module.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import processes_of, tiny_run_flags
from fake_hub import FakeHub
from huggingface_hub import ModelCard

from hf_flower import checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fake_alice_token"
REPO_ID = "alice/tiny-federated"


def tiny_flags(tmp_path, tiny_model_dir, reviews_csv, *flags) -> list[str]:
    return tiny_run_flags(tmp_path / "run", tiny_model_dir, reviews_csv, *flags)


def hub_env(hub: FakeHub, token: str | None = TOKEN) -> dict:
    """This process's environment, online against the fake Hub, with `token` as HF_TOKEN."""
    env = dict(os.environ)
    env.update(
        {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            # Plain LFS uploads: the fake Hub does not speak Xet storage.
            "HF_HUB_DISABLE_XET": "1",
            "HF_FLOWER_HUB_RETRY_DELAYS": "0.2,0.2",
        }
    )
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def run_script(script: str, argv: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_no_leftovers(tmp_path, wait: float = 20.0):
    """As conftest's `no_leftover_processes`, for runs a module-scoped fixture starts."""
    deadline = time.monotonic() + wait
    while (left := [p for p in processes_of(tmp_path) if p.is_running()]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {[' '.join(p.cmdline()) for p in left]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fake_hub():
    with FakeHub() as hub:
        hub.add_user(TOKEN, "alice", orgs=("alice-lab",))
        hub.add_user("hf_fake_reader", "rita", role="read")
        hub.add_repo("bob/his-model")
        yield hub


@dataclass
class PushedRun:
    """The fixture's run, and the second run it started on the same folder while the first ran."""

    output_dir: Path
    result: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    second_refused_after: float
    first_still_running: bool  # when the second was refused: it did not wait for the first


@pytest.fixture(scope="module")
def pushed_run(fake_hub, tmp_path_factory, tiny_model_dir, reviews_csv) -> PushedRun:
    """A 2-round simulation that pushes every round to REPO_ID on the fake Hub. Once it has saved
    round 0, a second `simulate.py` on the same folder tries to start over it (issue 11: one run
    per output folder)."""
    tmp_path = tmp_path_factory.mktemp("pushed")
    output_dir = tmp_path / "run"
    argv = tiny_flags(tmp_path, tiny_model_dir, reviews_csv, "--push_to_hub", "--hub_model_id", REPO_ID)
    command = [sys.executable, str(ROOT / "scripts" / "simulate.py"), *argv]
    first = subprocess.Popen(
        command, env=hub_env(fake_hub), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.round_dir(output_dir, 0).exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the run saved no round 0 in 180 s"
            time.sleep(0.2)
        started = time.monotonic()
        # The harshest second run: one that would delete the folder's rounds.
        second = run_script("simulate.py", [*argv, "--overwrite_output_dir"], hub_env(fake_hub), timeout=120)
        refused_after = time.monotonic() - started
        first_still_running = first.poll() is None
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    result = subprocess.CompletedProcess(command, first.returncode, stdout, stderr)
    assert_no_leftovers(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return PushedRun(output_dir, result, second, refused_after, first_still_running)


def test_a_second_run_on_the_folder_is_refused_and_the_first_completes(pushed_run):
    second = pushed_run.second
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert "in use by another hf-flower run: pid " in second.stderr
    assert "Simulating" not in second.stdout  # it started no Flower process
    # Refused at once, not after waiting for the first run (a time bound would depend on the load).
    assert pushed_run.first_still_running, pushed_run.second_refused_after
    # The first run went on untouched: every round saved, intact, and in its history.
    output_dir = pushed_run.output_dir
    assert checkpoint.list_rounds(output_dir) == [0, 1, 2]
    for round_num in (0, 1, 2):
        checkpoint.verify_round(checkpoint.round_dir(output_dir, round_num))
    history = checkpoint.read_history(output_dir)
    assert history["status"] == "completed" and [r["round"] for r in history["rounds"]] == [0, 1, 2]


def test_every_round_loads_back_by_revision(pushed_run, fake_hub, tmp_path):
    output_dir, result = pushed_run.output_dir, pushed_run.result
    assert f"hub: rounds [0, 1, 2] pushed to {REPO_ID}" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert TOKEN not in json.dumps(checkpoint.read_history(output_dir))
    repo = fake_hub.repos[REPO_ID]
    assert {"main", "round-0", "round-1", "round-2"} <= set(repo.branches)
    # main is round 2, file for file; the strategy state (for --resume) stays local.
    assert repo.files("main")["model.safetensors"].sha256 == sha256(
        output_dir / "round-2" / "model.safetensors"
    )
    assert {"README.md", "metrics.png", "config.json", "metrics.json"} <= set(repo.files("round-1"))
    assert checkpoint.STRATEGY_STATE_FILE not in repo.files("round-1")

    check = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        out = {{}}
        for revision, folder in (("round-1", "round-1"), ("round-2", "round-2"), (None, "round-2")):
            kwargs = {{"revision": revision}} if revision else {{}}
            hub_model = AutoModelForSequenceClassification.from_pretrained("{REPO_ID}", **kwargs)
            AutoTokenizer.from_pretrained("{REPO_ID}", **kwargs)
            local = AutoModelForSequenceClassification.from_pretrained(sys.argv[1] + "/" + folder)
            hub_sd, local_sd = hub_model.state_dict(), local.state_dict()
            out[revision or "main"] = hub_sd.keys() == local_sd.keys() and all(
                torch.equal(hub_sd[k], local_sd[k]) for k in local_sd)
        print(json.dumps(out))
        """
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check, str(output_dir)],
        env=hub_env(fake_hub),  # the repo is private: its owner's token reads it
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {
        "round-1": True,
        "round-2": True,
        "main": True,
    }
    # round-1 and round-2 differ, so the revisions really are different rounds.
    assert (
        repo.files("round-1")["model.safetensors"].sha256 != repo.files("round-2")["model.safetensors"].sha256
    )


def test_round_card_metadata_table_and_plot(pushed_run):
    output_dir = pushed_run.output_dir
    history = checkpoint.read_history(output_dir)
    card = ModelCard.load(output_dir / "round-2" / checkpoint.CARD_FILE)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-classification"
    assert {"federated-learning", "flower"} <= set(data.tags)
    assert data.model_name == REPO_ID
    accuracy = next(r for r in data.eval_results if r.metric_type == "accuracy")
    assert accuracy.metric_value == pytest.approx(history["rounds"][2]["central"]["eval_accuracy"])
    assert accuracy.task_type == "text-classification"
    # The per-round table (rounds 0..2), the linked plot beside the card, and how to load a round.
    for record in history["rounds"]:
        assert f"\n| {record['round']} | " in card.text
    assert f"{record['central']['eval_accuracy']:.4f}" in card.text
    assert f"]({checkpoint.PLOT_FILE})" in card.text
    assert (output_dir / "round-2" / checkpoint.PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert 'revision="round-2"' in card.text
    assert "FedAvg" in card.text and "| clients | 2 |" in card.text
    # Round 1's card covers rounds 0 and 1 only.
    assert "\n| 2 | " not in ModelCard.load(output_dir / "round-1" / checkpoint.CARD_FILE).text


def test_tensorboard_and_plot_script(pushed_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = pushed_run.output_dir
    events = EventAccumulator(str(output_dir / checkpoint.TENSORBOARD_DIR))
    events.Reload()
    assert [s.step for s in events.Scalars("central/eval_accuracy")] == [0, 1, 2]
    assert [s.step for s in events.Scalars("train/train_loss")] == [1, 2]
    assert [s.step for s in events.Scalars("evaluate/eval_accuracy")] == [1, 2]

    from hf_flower.commands import plot

    assert plot.main([str(output_dir), "--out", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def assert_aggregates_only(pushed_metrics: bytes) -> dict:
    """A pushed metrics.json: the round's aggregate metrics, nothing that names or singles out a client."""
    text = pushed_metrics.decode()
    for private in ("client_results", "failures", "notes", "node_id", "partition-id", "Traceback"):
        assert private not in text, private
    return json.loads(text)


def test_pushed_metrics_hold_aggregates_only(pushed_run, fake_hub):
    output_dir = pushed_run.output_dir
    history = checkpoint.read_history(output_dir)
    repo = fake_hub.repos[REPO_ID]
    for revision, round_num in (("round-1", 1), ("round-2", 2), ("main", 2)):
        metrics = assert_aggregates_only(repo.files(revision)[checkpoint.METRICS_FILE].data)
        assert metrics["train"] == history["rounds"][round_num]["train"]
        assert checkpoint.CHECKSUMS_FILE not in repo.files(revision)
    # Each client's results stay in the local history.
    assert {c["partition-id"] for c in history["rounds"][1]["client_results"]["train"]} == {0, 1}


def test_new_repos_are_private_unless_asked(pushed_run, fake_hub):
    from hf_flower.arguments import HubArguments
    from hf_flower.commands import push

    assert fake_hub.repos[REPO_ID].private  # the live push of the fixture's run created it
    assert HubArguments().hub_private is True
    argv = ["out", "--hub_model_id", REPO_ID]
    assert push.make_parser().parse_args(argv).hub_private is True
    assert push.make_parser().parse_args([*argv, "--hub_private", "false"]).hub_private is False


def test_push_script_pushes_exactly_the_checked_files(pushed_run, fake_hub, tmp_path):
    output_dir = pushed_run.output_dir
    copy = tmp_path / "run"
    for name in ("round-1", "round-2"):
        shutil.copytree(output_dir / name, copy / name)
    # A secret elsewhere on the machine, a link to it planted in round 1, a stray file in round 2.
    secret = tmp_path / "token"
    secret.write_text("hf_secret_of_the_operator")
    link = copy / "round-1" / "tokenizer_extra.json"
    link.symlink_to(secret)
    (copy / "round-2" / "notes.txt").write_text("not for the Hub")
    argv = [str(copy), "--hub_model_id", "alice-lab/later", "--rounds", "1", "2"]

    refused = run_script("push.py", argv, hub_env(fake_hub))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{link} is a link (to {secret})" in refused.stderr
    assert "alice-lab/later" not in fake_hub.repos  # refused before the Hub was asked for anything

    link.unlink()
    result = run_script("push.py", argv, hub_env(fake_hub))
    assert result.returncode == 0, result.stderr[-3000:]
    repo = fake_hub.repos["alice-lab/later"]
    assert repo.private and "round-0" not in repo.branches
    for revision, folder in (("round-1", "round-1"), ("round-2", "round-2"), ("main", "round-2")):
        listed = json.loads((copy / folder / checkpoint.CHECKSUMS_FILE).read_text())["files"]
        pushed = repo.files(revision)
        # Exactly the checked files, less the strategy state (kept for --resume).
        assert set(pushed) - {".gitattributes"} == set(listed) - {checkpoint.STRATEGY_STATE_FILE}
        assert pushed["model.safetensors"].sha256 == sha256(output_dir / folder / "model.safetensors")
        assert_aggregates_only(pushed[checkpoint.METRICS_FILE].data)
    uploaded = [f.data for files in repo.commits.values() for f in files.values()]
    assert not any(b"hf_secret_of_the_operator" in data or b"not for the Hub" in data for data in uploaded)

    # A round saved before checksums existed has no checked files: refused, naming it.
    (copy / "round-1" / checkpoint.CHECKSUMS_FILE).unlink()
    old = run_script("push.py", [*argv[:-1]], hub_env(fake_hub))
    assert old.returncode == 2 and f"{copy / 'round-1'} has no {checkpoint.CHECKSUMS_FILE}" in old.stderr


def test_push_script_refuses_a_round_without_weights(pushed_run, tmp_path, capsys):
    output_dir = pushed_run.output_dir
    copy = tmp_path / "run"
    shutil.copytree(output_dir / "round-1", copy / "round-1")
    (copy / "round-1" / checkpoint.WEIGHTS_FILE).unlink()
    from hf_flower.commands import push

    assert push.main([str(copy), "--hub_model_id", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert "round-1 is incomplete" in err and checkpoint.WEIGHTS_FILE in err
    assert (copy / "round-1" / checkpoint.CONFIG_FILE).is_file()  # nothing local removed

    # Weights cut short (a copy onto a full disk) are named before anything is uploaded.
    weights = copy / "round-1" / checkpoint.WEIGHTS_FILE
    weights.write_bytes((output_dir / "round-1" / checkpoint.WEIGHTS_FILE).read_bytes()[:-10])
    assert push.main([str(copy), "--hub_model_id", REPO_ID]) == 2
    assert f"{weights} is damaged" in capsys.readouterr().err


def test_a_repo_of_someone_else_stops_the_run_before_training(
    fake_hub, tmp_path, tiny_model_dir, reviews_csv
):
    # An earlier run's round in output_dir must survive: nothing local is touched.
    earlier = tmp_path / "run" / "round-0"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    argv = ["--overwrite_output_dir", "--push_to_hub", "--hub_model_id", "bob/his-model"]
    result = run_script(
        "simulate.py", tiny_flags(tmp_path, tiny_model_dir, reviews_csv, *argv), hub_env(fake_hub)
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        "'bob' is not you or one of your organisations, so the token of 'alice' cannot push there"
        in result.stderr
    )
    assert "Use --hub_model_id alice/his-model" in result.stderr
    assert "Simulating" not in result.stdout  # no Flower process was started
    assert (earlier / "config.json").is_file()


def test_bad_repo_ids_and_tokens_are_refused_with_the_fix(fake_hub):
    """The checks `check_run` makes before round 1, one process for all cases."""
    cases = [
        ("not a valid/id!", TOKEN, "is not a valid Hub repo id"),
        ("alice/x", None, "needs a Hugging Face token and none was found. Set HF_TOKEN"),
        ("alice/x", "hf_wrong_token", "rejected the Hugging Face token (401"),
        ("rita/model", "hf_fake_reader", "is read-only; pushing needs a write token"),
        ("tiny", TOKEN, None),  # a bare name goes under the token's user
    ]
    code = textwrap.dedent(
        """
        import json, os, sys
        from hf_flower import hub
        for repo_id, token in json.loads(sys.argv[1]):
            os.environ.pop("HF_TOKEN", None)
            if token:
                os.environ["HF_TOKEN"] = token
            try:
                print(json.dumps(hub.check_push_access(repo_id)))
            except hub.HubError as err:
                print(json.dumps(str(err)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps([[repo, token] for repo, token, _ in cases])],
        env=hub_env(fake_hub, token=None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.strip().splitlines()]
    for (_, token, message), answer in zip(cases, answers, strict=True):
        assert message in answer if message else answer == "alice/tiny"
        assert not token or token not in answer  # the token is never echoed


def test_a_repo_of_someone_else_is_refused_by_the_hub_too(fake_hub, tiny_model_dir, tmp_path):
    """Past our own owner check (e.g. a stale org membership), the Hub's 403 fails the push, unretried."""
    folder = checkpoint.save_round(
        tmp_path, 1, lambda d: shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True), {"round": 1}
    )
    code = textwrap.dedent(
        """
        import sys
        from hf_flower import hub
        try:
            hub.create_repo("bob/new-model", private=False)
        except hub.HubError as err:
            print("create:", err)
        pusher = hub.RoundPusher("bob/his-model", delays=(30.0,))
        print("push ok:", pusher.push(1, sys.argv[1]))
        print("failure:", pusher.failures[1])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        env=hub_env(fake_hub),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "create: Creating or opening the Hub repo bob/new-model failed" in result.stdout
    assert "403" in result.stdout and "push ok: False" in result.stdout
    assert "retrying" not in result.stderr  # a 403 is not retried (the 30 s pause would show)
    assert "bob/new-model" not in fake_hub.repos


def test_failed_uploads_keep_training_and_fail_the_run(fake_hub, tmp_path, tiny_model_dir, reviews_csv):
    """The Hub answers the token check, then every upload gets 503: training goes on, rounds stay local."""
    fake_hub.fail_writes = True
    try:
        result = run_script(
            "simulate.py",
            tiny_flags(
                tmp_path,
                tiny_model_dir,
                reviews_csv,
                "--num_rounds",
                "1",
                "--push_to_hub",
                "--hub_model_id",
                "alice/down",
            ),  # fmt: skip
            hub_env(fake_hub),
        )
    finally:
        fake_hub.fail_writes = False
    assert_no_leftovers(tmp_path)
    output_dir = tmp_path / "run"
    assert result.returncode == 1, result.stdout[-3000:]
    assert checkpoint.list_rounds(output_dir) == [0, 1]
    history = checkpoint.read_history(output_dir)
    assert history["status"] == "failed"
    assert history["error"].startswith("HubPushError: pushing round(s) [0, 1] to alice/down failed")
    assert "503" in history["error"]
    assert history["hub"]["pushed"] == [] and sorted(history["hub"]["failed"]) == ["0", "1"]
    assert [r["round"] for r in history["rounds"]] == [0, 1]  # every round trained and saved
    assert "pushing rounds [0, 1] FAILED (kept locally)" in result.stdout
