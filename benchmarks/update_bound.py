"""What the default update bound (`--update_clip_factor 3`) costs honest runs and what it stops.

Issue 22, point 4: with FedAvg and no bound, one client can move every weight by its share of
anything up to 65504. This script runs the offline quickstart (all-MiniLM-L6-v2, real IMDB reviews,
`configs/quickstart.yaml`) with 3 clients, four times:

    (a) honest clients, the default bound;     (b) honest clients, --update_clip_factor 0;
    (c) one client of three sends its update x 1000, the default bound;   (d) the same attack, no bound.

The hostile client is a mod of this benchmark's ClientApp (`update_bound_app.py`, copied into a
Flower app folder beside a `plan.json`), not a flag of the library: partition 2 trains honestly,
then replies `sent + 1000 * (trained - sent)`.

    HF_HUB_OFFLINE=1 nice .venv/bin/python benchmarks/update_bound.py --output benchmarks/results/update_bound.json
    HF_HUB_OFFLINE=1 nice .venv/bin/python benchmarks/update_bound.py --only a c   # some runs only

Each run's final central accuracy, per-round accuracies, the clients' update norms (from
history.json) and the notes of clipped updates are written to `--output` as each run finishes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hf_flower.launch.app import write_app_with

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
APP = Path(__file__).with_name("update_bound_app.py")
HOSTILE_PARTITION = 2
UPDATE_FACTOR = 1000.0

RUNS = {
    "a": {"attack": False, "flags": []},
    "b": {"attack": False, "flags": ["--update_clip_factor", "0"]},
    "c": {"attack": True, "flags": []},
    "d": {"attack": True, "flags": ["--update_clip_factor", "0"]},
}
DESCRIPTIONS = {
    "a": "honest, default bound",
    "b": "honest, bound off",
    "c": f"partition {HOSTILE_PARTITION} sends its update x {UPDATE_FACTOR:g}, default bound",
    "d": f"partition {HOSTILE_PARTITION} sends its update x {UPDATE_FACTOR:g}, bound off",
}


def make_app(folder: Path, run_config: dict, plan: dict) -> Path:
    """A Flower app folder: hf-flower's ServerApp, this benchmark's ClientApp, the run's config."""
    return write_app_with(folder / "app", run_config, {"clientapp": APP}, {"plan.json": json.dumps(plan)})


def run(name: str, args) -> dict:
    from hf_flower.arguments import parse_args
    from hf_flower.arguments.run_config import to_run_config
    from hf_flower.checkpoint import read_history
    from hf_flower.launch.plan import RunPlan
    from hf_flower.launch.simulation import run_simulation
    from hf_flower.tasks import resolve

    folder = Path(args.work_dir) / name
    flags = [
        "--config", str(QUICKSTART),
        "--num_clients", "3", "--min_train_clients", "3", "--min_evaluate_clients", "3",
        "--min_available_clients", "3", "--num_rounds", str(args.num_rounds),
        "--max_train_samples", str(args.max_train_samples), "--max_test_samples", str(args.test_size),
        "--test_size", str(args.test_size), "--client_eval_size", "32",
        "--output_dir", str(folder / "run"), "--overwrite_output_dir",
        *RUNS[name]["flags"],
    ]  # fmt: skip
    run_config = to_run_config(resolve(parse_args(flags)))
    plan = {"hostile_partition": HOSTILE_PARTITION if RUNS[name]["attack"] else None, "factor": UPDATE_FACTOR}
    app_dir = make_app(folder, run_config, plan)
    start = time.monotonic()
    status = run_simulation(RunPlan.from_run_config(run_config), app_dir=app_dir)
    seconds = time.monotonic() - start
    history = read_history(Path(run_config["federation.output-dir"]))
    rounds = history["rounds"]
    return {
        "run": DESCRIPTIONS[name],
        "flags": RUNS[name]["flags"],
        "exit_status": status,
        "seconds": round(seconds, 1),
        "central_accuracy": [r["central"].get("eval_accuracy") for r in rounds],
        "final_central_accuracy": rounds[-1]["central"].get("eval_accuracy"),
        "update_norms": {
            r["round"]: {
                c["partition-id"]: c.get("update_norm") for c in r.get("client_results", {}).get("train", [])
            }
            for r in rounds
            if r["round"] > 0
        },
        "notes": [note for r in rounds for note in r.get("notes", [])],
        "failures": [failure for r in rounds for failure in r.get("failures", [])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--max_train_samples", type=int, default=840, help="split over the 3 clients")
    parser.add_argument("--test_size", type=int, default=500)
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "update_bound"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "update_bound.json"))
    args = parser.parse_args()
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    for name in args.only:
        results[name] = run(name, args)
        print(json.dumps({name: results[name]}, indent=1), flush=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1) + "\n")
    done = {k: v["final_central_accuracy"] for k, v in results.items()}
    print("final central accuracy:", done)
    if {"a", "b", "c"} <= set(done):
        print(f"(c) - (a): {done['c'] - done['a']:+.3f} (acceptance: within 0.02)")
        print(f"(a) - (b): {done['a'] - done['b']:+.3f} (acceptance: at least -0.005)")


if __name__ == "__main__":
    main()
