"""Round overhead of a loopback deployment: our long-lived clients (A) against Flower's default (B).

Both modes run the same server (`scripts/server.py`: a SuperLink and our ServerApp) with the same
settings and two clients on this machine:

  A  2 x `scripts/client.py --partition_id i --num_partitions 2`: a SuperNode with
     `--isolation process` and one long-lived process that keeps torch, the model and the
     tokenised data loaded between messages.
  B  2 x plain `flower-supernode --node-config "partition-id=i num-partitions=2"` with Flower's
     default isolation: a fresh `flwr-clientapp` process per message, which imports torch and
     transformers and builds the model and the data again each time (our ClientApp from the FAB).

For every round, from the round records the ServerApp saves (history.json):

  round       `seconds` of the record: from the end of the previous round to the end of this
              round's central evaluation
  train       local training: max over clients of Trainer's `train_runtime`
  client_eval federated evaluation: max over clients of Trainer's `eval_runtime`
  central     the server's central evaluation: `central.eval_runtime`
  overhead    round - train - client_eval - central: everything that is not model work
              (Flower's polling and message passing, weight conversion, process start-up, ...)

Round 1 carries the warm-up (first model load, first compilation of kernels) and is reported on
its own; the summary averages rounds 2..N. Command (the numbers in benchmarks/README.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/round_overhead.py --num_rounds 3 \\
        --output benchmarks/results/round_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_flower import checkpoint  # noqa: E402
from hf_flower.launch.flower import flower_env, flower_executable  # noqa: E402
from hf_flower.launch.processes import LOOPBACK, ManagedProcess, free_port  # noqa: E402

MODES = {
    "A": "long-lived scripts/client.py (SuperNode --isolation process)",
    "B": "flower-supernode, default isolation (flwr-clientapp per message)",
}
NUM_CLIENTS = 2
TARGET_PCT = 10.0
COLUMNS = ("round", "train", "client_eval", "central", "overhead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--max_train_samples", type=int, default=None, help="default: the config's")
    parser.add_argument("--max_test_samples", type=int, default=None, help="default: the config's")
    parser.add_argument("--modes", default="AB", help="which modes to run, in order (default AB)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "round_overhead.json"))
    parser.add_argument(
        "--work_dir", default=None, help="keep runs and logs here (default: a temporary folder, deleted)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per mode")
    args = parser.parse_args(argv)
    if args.num_rounds < 2:
        parser.error("--num_rounds must be at least 2 (round 1 is warm-up).")
    if set(args.modes) - set(MODES):
        parser.error(f"--modes takes letters from {''.join(MODES)}.")
    return args


# ----------------------------------------------------------------------------- commands


def server_command(args: argparse.Namespace, port: int, output_dir: Path) -> list[str]:
    command = [
        sys.executable, str(ROOT / "scripts" / "server.py"), "--config", args.config,
        "--num_rounds", str(args.num_rounds), "--output_dir", str(output_dir),
        "--host", LOOPBACK, "--port", str(port),
    ]  # fmt: skip
    for flag in ("max_train_samples", "max_test_samples"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    return command


def long_lived_client(superlink: str, partition_id: int, work_dir: Path) -> list[str]:
    """Mode A: our client script."""
    return [
        sys.executable, str(ROOT / "scripts" / "client.py"), "--superlink", superlink,
        "--partition_id", str(partition_id), "--num_partitions", str(NUM_CLIENTS),
        "--work_dir", str(work_dir), "--superlink_timeout", "30",
    ]  # fmt: skip


def reference_supernode(superlink: str, partition_id: int, work_dir: Path) -> list[str]:
    """Mode B: Flower's SuperNode with its default isolation, nothing of ours but the FAB."""
    return [
        flower_executable("flower-supernode"), "--insecure", "--superlink", superlink,
        "--host", LOOPBACK, "--port", str(free_port()),
        "--node-config", f"partition-id={partition_id} num-partitions={NUM_CLIENTS}",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- one mode


def run_mode(mode: str, args: argparse.Namespace, work_dir: Path) -> dict:
    """Serve `num_rounds` rounds to two clients of `mode`; the round records and wall time."""
    work_dir.mkdir(parents=True)
    port = free_port()
    superlink = f"{LOOPBACK}:{port}"
    output_dir = work_dir / "run"
    client = long_lived_client if mode == "A" else reference_supernode
    started = time.monotonic()
    with ManagedProcess(
        server_command(args, port, output_dir), work_dir / "server.log", cwd=str(ROOT)
    ) as server:
        server.wait_for_port(port, timeout=120)
        clients = []
        try:
            for i in range(NUM_CLIENTS):
                client_dir = work_dir / f"client-{i}"
                client_dir.mkdir()
                clients.append(
                    ManagedProcess(
                        client(superlink, i, client_dir),
                        client_dir / "client.log",
                        env=flower_env(client_dir / ".flwr"),
                        cwd=str(client_dir),
                    ).__enter__()
                )
            wait_for_server(server, clients, started + args.timeout)
        finally:
            for proc in clients:
                proc.stop()
        if server.process.returncode != 0:
            raise RuntimeError(
                f"mode {mode}: the server exited with {server.process.returncode}:\n{server.tail()}"
            )
    wall = time.monotonic() - started
    history = checkpoint.read_history(output_dir)
    rounds = [round_times(record) for record in history["rounds"] if record["round"] >= 1]
    return {"mode": mode, "description": MODES[mode], "wall_seconds": round(wall, 1), "rounds": rounds}


def wait_for_server(server: ManagedProcess, clients: list[ManagedProcess], deadline: float) -> None:
    """Until the server has served every round; fail early, with its log, if a client dies."""
    while server.running():
        for proc in clients:
            if not proc.running():
                raise RuntimeError(f"a client exited during the run:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run took longer than --timeout:\n{server.tail()}")
        time.sleep(1)


# ----------------------------------------------------------------------------- numbers


def round_times(record: dict) -> dict:
    """Seconds of one round record, split into model work and overhead."""
    results = record["client_results"]
    times = {
        "round": record["seconds"],
        "train": max(c["train_runtime"] for c in results["train"]),
        "client_eval": max(c.get("eval_runtime", 0.0) for c in results["evaluate"]),
        "central": record["central"]["eval_runtime"],
    }
    times["overhead"] = times["round"] - times["train"] - times["client_eval"] - times["central"]
    times["overhead_pct_of_train"] = 100 * times["overhead"] / times["train"]
    return {"round_num": record["round"], **{k: round(v, 2) for k, v in times.items()}}


def summarize(rounds: list[dict]) -> dict:
    """Round 1 on its own; the mean of rounds 2..N."""
    steady = rounds[1:]
    mean = {key: round(statistics.fmean(r[key] for r in steady), 2) for key in COLUMNS}
    mean["overhead_pct_of_train"] = round(100 * mean["overhead"] / mean["train"], 1)
    return {"round_1": rounds[0], "mean_rounds_2_to_n": mean}


def print_mode(result: dict) -> None:
    print(f"\nMode {result['mode']}: {result['description']} (wall {result['wall_seconds']:.1f} s)")
    header = f"{'round':>12} " + " ".join(f"{c:>12}" for c in COLUMNS) + f" {'overhead %':>11}"
    print(header)
    rows = [(str(r["round_num"]), r) for r in result["rounds"]]
    rows.append(("mean 2..N", result["summary"]["mean_rounds_2_to_n"]))
    for label, row in rows:
        values = " ".join(f"{row[c]:>12.2f}" for c in COLUMNS)
        print(f"{label:>12} {values} {row['overhead_pct_of_train']:>10.1f}%")


def machine() -> dict:
    import flwr
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flwr": flwr.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # every process below inherits it
    work_root = Path(args.work_dir or tempfile.mkdtemp(prefix="round-overhead-")).resolve()
    results = {}
    try:
        for mode in args.modes:
            print(f"Mode {mode}: {MODES[mode]} ...", flush=True)
            result = run_mode(mode, args, work_root / mode)
            result["summary"] = summarize(result["rounds"])
            print_mode(result)
            results[mode] = result
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_root, ignore_errors=True)
    report = {
        "command": " ".join(["HF_HUB_OFFLINE=1", Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir")},
        "target_overhead_pct_of_train": TARGET_PCT,
        "modes": results,
    }
    if {"A", "B"} <= results.keys():
        a, b = (results[m]["summary"]["mean_rounds_2_to_n"]["overhead"] for m in "AB")
        report["overhead_ratio_b_over_a"] = round(b / a, 2) if a > 0 else None
        print(
            f"\nOverhead B/A (mean of rounds 2..N): {b:.2f} s / {a:.2f} s = {report['overhead_ratio_b_over_a']}"
        )
    if "A" in results:
        pct = results["A"]["summary"]["mean_rounds_2_to_n"]["overhead_pct_of_train"]
        verdict = "meets" if pct <= TARGET_PCT else "misses"
        print(f"Mode A overhead: {pct:.1f}% of local training time ({verdict} the {TARGET_PCT:.0f}% target)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
