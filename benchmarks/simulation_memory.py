"""Peak memory and wall time of a simulation with many virtual clients (10 and 50 by default).

Each run is `scripts/simulate.py` on the offline quickstart model (all-MiniLM-L6-v2) with little
data per client, so that the number of clients, not training, drives the run:
`--max_train_samples 24*N` (about 20 training and 4 evaluation reviews per client),
`--max_length 64`, 100 central test reviews, 2 rounds, every client sampled every round. Flower's
simulation runs as many clients at once as the CPUs allow (`num-cpus = 1` each: 2 here).

Memory is sampled every 0.5 s over the whole process tree of the command (simulate.py, the
SuperLink, the ServerApp, Ray and its workers): the peak of the summed RSS (shared pages counted
once per process, an upper bound) and of the summed PSS (shared pages split between processes).

Command (the table in benchmarks/README.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/simulation_memory.py --clients 10 50 \\
        --output benchmarks/results/simulation_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from measure import run_measured

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MODES = {"full-fp32": [], "lora-r8": ["--peft", "lora", "--learning_rate", "1e-3"]}


def run(num_clients: int, mode: str, work_dir: Path, num_rounds: int) -> dict:
    n = str(num_clients)
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--config", str(QUICKSTART),
        "--num_clients", n, "--min_train_clients", n, "--min_evaluate_clients", n, "--min_available_clients", n,
        "--num_rounds", str(num_rounds), "--max_train_samples", str(24 * num_clients), "--client_eval_size", "4",
        "--max_length", "64", "--max_test_samples", "100", "--test_size", "100",
        "--per_device_train_batch_size", "8",
        "--output_dir", str(work_dir / f"{mode}-{n}"), "--overwrite_output_dir", *MODES[mode],
    ]  # fmt: skip
    seconds, sampler = run_measured(command, ROOT)
    history = json.loads((work_dir / f"{mode}-{n}" / "history.json").read_text())
    return {
        "clients": num_clients,
        "mode": mode,
        "rounds": num_rounds,
        "wall_seconds": round(seconds, 1),
        "round_seconds": [r["seconds"] for r in history["rounds"][1:]],
        "peak_rss_mb": round(sampler.peak_rss / 2**20),
        "peak_pss_mb": round(sampler.peak_pss / 2**20),
        "peak_processes": sampler.peak_processes,
        "final_central_accuracy": history["rounds"][-1]["central"]["eval_accuracy"],
        "load_at_start": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench-memory"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "simulation_memory.json"))
    args = parser.parse_args(argv)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {"runs": {}}
    for mode in args.modes:
        for n in args.clients:
            key = f"{mode}-{n}"
            if key in results["runs"]:
                print(f"{key}: already in {output}, skipped", flush=True)
                continue
            result = run(n, mode, Path(args.work_dir), args.num_rounds)
            results["runs"][key] = result
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=2) + "\n")
            print(
                f"{key}: {result['wall_seconds']} s, peak RSS {result['peak_rss_mb']} MB, "
                f"peak PSS {result['peak_pss_mb']} MB, {result['peak_processes']} processes",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
