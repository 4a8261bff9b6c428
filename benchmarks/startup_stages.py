"""Where the time before round 1 goes, process by process, and which work each process does twice.

A simulation spends its first minute in three kinds of processes before any client trains. Each is
measured here in a fresh process of its own, without Flower's runtime or Ray, through the code the
simulation runs:

- `preflight`: the launcher's short-lived child (`launch.plan.prepare_in_child`), which parses the
  flags and runs the pre-flight checks (`launch.simulation.prepare_simulation`: `parse_run`, then
  `server.preflight.check_run`, which loads the data set and the model's config and prepares the
  output folder);
- `serverapp`: what the ServerApp's `main` does before the strategy starts: its own checks
  (`check_run`), the server's Trainer with its tokenised test split, the strategy and the initial
  weights; round 0's central evaluation comes after it and is measured only with `--round0_eval`;
- `client`: one simulated client's first Trainer, built as a client builds it for its first message
  (`client.session.session_for`: the run's `make_trainer` for partition 0 of 2).

Each side runs `--repeat` times with plain timers (the first run may fill caches on disk: datasets'
Arrow copy of the reviews, the tokenised rows), then once more under cProfile, which counts the work
done: data sources loaded, splits and partitions computed, batches tokenised (cache misses), model
configs read, models and Trainers built. Which heavy packages each step imported is recorded too.
Seconds on a shared machine vary: compare the stages of one run with each other, and the counts.

Command (the workload of `vs_quickstart.py`'s hf-flower run: all-MiniLM-L6-v2 offline, 2 clients x
256 IMDB reviews, max length 128; about 2 minutes on 2 CPU cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/startup_stages.py --label after

Flags of the run go after `--` and are added to vs_quickstart.py's (later flags win).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import run_facts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = ("preflight", "serverapp", "client")
# Packages whose import costs seconds: which step of a side first imported each.
HEAVY_PACKAGES = (
    "torch", "transformers", "datasets", "flwr", "flwr_datasets", "ray", "peft", "accelerate",
    "seaborn", "matplotlib.pyplot", "scipy.stats",
)  # fmt: skip
# Work counted under cProfile: (end of the file's path, function) -> what a call means.
WORK = {
    ("hf_flower/data/sources.py", "load_raw_splits"): "load_raw_splits calls",
    ("hf_flower/data/sources.py", "_load_source"): "data source read (_load_source)",
    ("datasets/load.py", "load_dataset"): "datasets.load_dataset calls",
    ("hf_flower/data/splits.py", "prepare_splits"): "splits cut (prepare_splits)",
    ("hf_flower/data/labels.py", "label_names"): "class names read (label_names)",
    ("hf_flower/data/partitions.py", "partition_rows"): "partitions computed (partition_rows)",
    ("hf_flower/data/tokenization.py", "tokenize"): "tokenize calls",
    ("hf_flower/data/tokenization.py", "_tokenize_batch"): "batches tokenised (cache misses)",
    ("transformers/configuration_utils.py", "get_config_dict"): "model configs read",
    ("hf_flower/modeling.py", "skeleton"): "model skeletons built (meta device)",
    ("hf_flower/modeling.py", "load_tokenizer"): "tokenizers loaded",
    ("transformers/modeling_utils.py", "from_pretrained"): "models loaded (from_pretrained)",
    ("transformers/trainer.py", "__init__"): "Trainers built",
    ("hf_flower/server/preflight.py", "check_run"): "check_run",
    ("hf_flower/server/preflight.py", "partition_counts"): "partition_counts",
}


# --- The sides (each in a process of its own) ----------------------------------------------------


class Steps:
    """Wall and CPU seconds of each step of one side, and the heavy packages it imported first.

    CPU seconds (this process's, all its threads) move less than wall seconds when other work
    shares the cores."""

    def __init__(self):
        self.rows: list[dict] = []
        self.started = (time.perf_counter(), time.process_time())
        self.imported = {p for p in HEAVY_PACKAGES if p in sys.modules}

    def mark(self, name: str) -> None:
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        new = [p for p in HEAVY_PACKAGES if p in sys.modules and p not in self.imported]
        self.imported.update(new)
        self.rows.append(
            {"step": name, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "imported": new}
        )
        self.started = (time.perf_counter(), time.process_time())


def preflight_side(argv: list[str], run_config: dict | None, args) -> tuple[Steps, dict]:
    """The launcher's child: parse the flags, check the run, prepare the output folder."""
    steps = Steps()
    from hf_flower.launch.simulation import prepare_simulation

    steps.mark("import hf_flower.launch.simulation")
    plan = prepare_simulation(argv, claim=lambda output_dir: None)
    steps.mark("prepare_simulation (parse_run + check_run)")
    return steps, plan.run_config


def serverapp_side(argv: list[str], run_config: dict, args) -> tuple[Steps, dict]:
    """What the ServerApp's `main` does before the strategy's start, in its order (and round 0's
    central evaluation with --round0_eval)."""
    steps = Steps()
    import torch

    from hf_flower.server import server_app  # noqa: F401 - what Flower imports first

    torch.set_num_threads(1)
    steps.mark("import hf_flower.server.server_app")
    from hf_flower.arguments import FederationArguments
    from hf_flower.arguments.run_config import group_from_run_config
    from hf_flower.context import SERVER, TrainerContext
    from hf_flower.factory import build_trainer, load_factory, model_facts
    from hf_flower.server.preflight import check_run
    from hf_flower.server.strategies import build_strategy
    from hf_flower.tasks import trainer_ref
    from hf_flower.weights import get_weights

    federation = group_from_run_config(FederationArguments, run_config)
    check_run(run_config, prepare_output=True)
    steps.mark("check_run")
    ref = trainer_ref(federation, run_config)
    context = TrainerContext(
        role=SERVER, config=federation.trainer_config, num_rounds=federation.num_rounds, run_config=run_config
    )
    trainer = build_trainer(load_factory(ref), context, ref)
    steps.mark("the server's Trainer")
    build_strategy(federation)
    get_weights(trainer.model, "float32")
    model_facts(trainer.model)
    steps.mark("strategy, initial weights")
    if args.round0_eval:
        from hf_flower.server.rounds import central_metrics

        central_metrics(trainer, 0)
        steps.mark("round 0 central evaluation")
    return steps, run_config


def client_side(argv: list[str], run_config: dict, args) -> tuple[Steps, dict]:
    """One simulated client's first Trainer, for the first message it gets (round 1's train)."""
    steps = Steps()
    import torch
    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from hf_flower.arguments.policy import ClientPolicy
    from hf_flower.client import client_app, session  # noqa: F401 - what a worker imports first
    from hf_flower.constants import LABEL_NAMES_KEY, MODEL_CLASS_KEY, SERVER_ROUND_KEY

    torch.set_num_threads(1)
    steps.mark("import hf_flower.client.client_app")
    os.environ.update(ClientPolicy.of_operator(run_config).to_env())  # as the launcher gives Ray's workers
    node = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
        run_config=run_config,
    )  # fmt: skip
    facts = {MODEL_CLASS_KEY: "BertForSequenceClassification", LABEL_NAMES_KEY: ["negative", "positive"]}
    content = RecordDict({"config": ConfigRecord({SERVER_ROUND_KEY: 1, **facts})})
    metadata = Metadata(
        run_id=1, message_id="train-1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN,
    )  # fmt: skip
    session.session_for(Message(metadata=metadata, content=content), node)
    steps.mark("session_for: the client's Trainer")
    return steps, run_config


SIDE_FUNCTIONS = {"preflight": preflight_side, "serverapp": serverapp_side, "client": client_side}


def work_counts(profile: cProfile.Profile) -> dict:
    """Calls and cumulative seconds (under the profiler) of the functions in `WORK`."""
    counts = {}
    for (file, _, function), (primitive_calls, _, _, cumulative, _) in pstats.Stats(profile).stats.items():
        for (suffix, name), label in WORK.items():
            if function == name and file.replace(os.sep, "/").endswith(suffix):
                row = counts.setdefault(label, {"calls": 0, "cumulative_seconds": 0.0})
                row["calls"] += primitive_calls
                row["cumulative_seconds"] = round(row["cumulative_seconds"] + cumulative, 2)
    return dict(sorted(counts.items()))


def worker(args) -> dict:
    """One side, measured in this process."""
    spec = json.loads(Path(args.spec).read_text())
    side = SIDE_FUNCTIONS[args.worker]
    if not args.profile:
        steps, run_config = side(spec["argv"], spec["run_config"], args)
        return {"steps": steps.rows, "run_config": run_config}
    profile = cProfile.Profile()
    profile.enable()
    steps, run_config = side(spec["argv"], spec["run_config"], args)
    profile.disable()
    return {"steps": steps.rows, "run_config": run_config, "work": work_counts(profile)}


# --- Driver --------------------------------------------------------------------------------------


def run_flags(output_dir: Path, overrides: list[str]) -> list[str]:
    """vs_quickstart.py's hf-flower flags (its defaults), then `overrides`."""
    from vs_quickstart import base_flags

    settings = argparse.Namespace(reviews_per_client=256, test_reviews=512, num_rounds=3)
    return [*base_flags(settings, output_dir), *overrides]


def run_side(side: str, spec_file: Path, args, profile: bool) -> dict:
    """`side` measured in a fresh process (its imports are its own); its steps and seconds."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [
            sys.executable,
            __file__,
            "--worker",
            side,
            "--spec",
            str(spec_file),
            "--result",
            result.name,
        ]
        command += ["--profile"] * profile + ["--round0_eval"] * args.round0_eval
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        started = time.monotonic()
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        return {
            **json.loads(Path(result.name).read_text()),
            "process_seconds": round(time.monotonic() - started, 2),
        }


def measure(args) -> dict:
    """Every side `--repeat` times with timers, then once under cProfile; in order, so the
    ServerApp and the client get the run config the pre-flight child made."""
    with tempfile.TemporaryDirectory(prefix="startup_stages_") as work:
        argv = run_flags(Path(work) / "run", args.overrides)
        spec_file = Path(work) / "spec.json"
        run_config = None
        if "preflight" not in args.sides:
            from hf_flower.launch.plan import parse_run

            run_config, _ = parse_run(argv)
        spec_file.write_text(json.dumps({"argv": argv, "run_config": run_config}))
        results = {}
        for side in args.sides:
            runs = []
            for attempt in range(args.repeat + 1):
                profile = attempt == args.repeat
                print(f"=== {side} ({'cProfile' if profile else f'run {attempt + 1}'})", flush=True)
                runs.append(run_side(side, spec_file, args, profile))
            if side == "preflight":  # what the launcher hands the ServerApp and the clients
                spec_file.write_text(json.dumps({"argv": argv, "run_config": runs[-1]["run_config"]}))
            timed = runs[:-1]
            results[side] = {
                "process_seconds": [r["process_seconds"] for r in timed],
                "steps": [
                    {
                        "step": row["step"],
                        "seconds": [r["steps"][i]["seconds"] for r in timed],
                        "cpu_seconds": [r["steps"][i]["cpu_seconds"] for r in timed],
                        "imported": row["imported"],
                    }
                    for i, row in enumerate(timed[0]["steps"])
                ],
                "work": runs[-1]["work"],
            }
        return results


def report(label: str, results: dict) -> None:
    for side, result in results.items():
        print(f"{label} / {side}: process {result['process_seconds']} s")
        for row in result["steps"]:
            imported = f"  (imports {', '.join(row['imported'])})" if row["imported"] else ""
            print(f"  {row['step']:<58} {row['seconds']} s (CPU {row['cpu_seconds']} s){imported}")
        for name, row in result["work"].items():
            print(f"  {name:<58} {row['calls']:>4} calls  {row['cumulative_seconds']} s under cProfile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--repeat", type=int, default=2, help="Timed runs of each side (default 2).")
    parser.add_argument(
        "--round0_eval", action="store_true", help="Also time the ServerApp's round 0 evaluation (~30 s)."
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "startup_stages.json"))
    parser.add_argument("--label", default="current", help="The key the results are kept under.")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Flags of the run, after `--`.")
    args = parser.parse_args(argv)

    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0
    run = {
        **run_facts("benchmarks/startup_stages.py", argv if argv is not None else sys.argv[1:]),
        "sides": measure(args),
    }
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    results[args.label] = run
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    report(args.label, run["sides"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
