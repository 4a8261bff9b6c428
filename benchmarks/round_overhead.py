"""Round overhead of a loopback deployment: our long-lived clients (A) against Flower's default (B).

Both modes run the same server (`scripts/server.py`: a SuperLink and our ServerApp) with the same
settings, and two clients on this machine:

  A  2 x `scripts/client.py --partition_id i --num_partitions 2`: a SuperNode with
     `--isolation process` and one long-lived process that keeps torch, the model and the
     tokenised data loaded between messages.
  B  2 x plain `flower-supernode --node-config "partition-id=i num-partitions=2"` with Flower's
     default isolation: a fresh `flwr-clientapp` process per message, which imports torch and
     transformers and builds the model and the data again each time (our ClientApp from the FAB).

Per round, from the round records the ServerApp saves (history.json), in seconds:

  round        the record's `seconds`: end of the previous round to end of this round, which is
               the end of its federated evaluation when central evaluation runs in the background
               while the next round trains (`evaluate_in_background`, the default), and the end
               of its central evaluation when it runs between rounds
  train        local training: max over clients of Trainer's `train_runtime`
  client_eval  federated evaluation: max over clients of Trainer's `eval_runtime`
  central      the server's central evaluation: `central.eval_runtime` (inside the round only
               when it runs between rounds; in the background it shares the cores with training)
  overhead     round - train - client_eval (- central, between rounds): all that is not model
               work (Flower's polling and message passing, weight conversion, ...)
  mb_sent,     megabytes of messages the server sent and received in the round
  mb_received

Round 1 carries the warm-up and is reported on its own; the summary averages rounds 2..N. Flower's
processes run with FLWR_LOG_LEVEL=DEBUG only so that their logs carry timestamps: the script reads
them to split the overhead into phases along the slowest client ("where the time goes"). Each client
gets OMP_NUM_THREADS=1 (one core each, as in simulation with `client-resources.num-cpus = 1`);
`--client_threads 0` leaves torch's default (all cores per client).

Commands (the numbers in benchmarks/README.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/round_overhead.py --num_rounds 3 --modes A \\
        --output benchmarks/results/round_overhead_background.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/round_overhead.py --num_rounds 3 --modes A \\
        --evaluate_in_background false --output benchmarks/results/round_overhead_between.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/round_overhead.py --num_rounds 3 \\
        --output benchmarks/results/round_overhead.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/round_overhead.py --num_rounds 3 --modes A \\
        --transfer_dtype bfloat16 --output benchmarks/results/round_overhead_bf16.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/round_overhead.py --num_rounds 3 --modes A \\
        --weight_decay 0 --output benchmarks/results/round_overhead_weight_decay_0.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_flower import checkpoint  # noqa: E402
from hf_flower.launch.flower import LOGS_DIRNAME, flower_env, flower_executable  # noqa: E402
from hf_flower.launch.processes import LOOPBACK, ManagedProcess, free_port  # noqa: E402

MODES = {
    "A": "long-lived scripts/client.py (SuperNode --isolation process)",
    "B": "flower-supernode, default isolation (flwr-clientapp per message)",
}
NUM_CLIENTS = 2
TARGET_PCT = 5.0  # issue 13: at most 5% of local training in rounds 2..N
COLUMNS = ("round", "train", "client_eval", "central", "overhead", "mb_sent", "mb_received")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--max_train_samples", type=int, default=None, help="default: the config's")
    parser.add_argument("--max_test_samples", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--client_threads", type=int, default=1, help="OMP_NUM_THREADS of each client (0: unset)"
    )
    parser.add_argument(
        "--transfer_dtype", default=None, help="precision of the weights on the wire (default: float32)"
    )
    parser.add_argument(
        "--weight_decay", type=float, default=None, help="AdamW's weight decay (default: the config's, 0.01)"
    )
    parser.add_argument(
        "--evaluate_in_background",
        choices=("true", "false"),
        default=None,
        help="central evaluation beside the next round (true) or between rounds (default: the config's)",
    )
    parser.add_argument("--modes", default="AB", help="which modes to run, in this order (default AB)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "round_overhead.json"))
    parser.add_argument(
        "--work_dir", default=None, help="keep runs and logs here (default: a temp dir, deleted)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per mode")
    args = parser.parse_args(argv)
    if args.num_rounds < 2:
        parser.error("--num_rounds must be at least 2 (round 1 is warm-up).")
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes takes letters from {''.join(MODES)}.")
    return args


# ----------------------------------------------------------------------------- commands


def server_command(args: argparse.Namespace, port: int, output_dir: Path) -> list[str]:
    command = [
        sys.executable, str(ROOT / "scripts" / "server.py"), "--config", args.config,
        "--num_rounds", str(args.num_rounds), "--output_dir", str(output_dir),
        "--host", LOOPBACK, "--port", str(port), "--insecure",
    ]  # fmt: skip
    for flag in (
        "max_train_samples",
        "max_test_samples",
        "transfer_dtype",
        "weight_decay",
        "evaluate_in_background",
    ):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    return command


def long_lived_client(superlink: str, partition_id: int, work_dir: Path) -> list[str]:
    """Mode A: our client script."""
    return [
        sys.executable, str(ROOT / "scripts" / "client.py"), "--superlink", superlink,
        "--partition_id", str(partition_id), "--num_partitions", str(NUM_CLIENTS),
        "--work_dir", str(work_dir), "--superlink_timeout", "30", "--insecure",
    ]  # fmt: skip


def reference_supernode(superlink: str, partition_id: int, work_dir: Path) -> list[str]:
    """Mode B: Flower's SuperNode with its default isolation; nothing of ours but the FAB."""
    return [
        flower_executable("flower-supernode"), "--insecure", "--superlink", superlink,
        "--host", LOOPBACK, "--port", str(free_port()),
        "--node-config", f"partition-id={partition_id} num-partitions={NUM_CLIENTS}",
    ]  # fmt: skip


def client_env(work_dir: Path, threads: int) -> dict[str, str]:
    """Flower's scripts first on PATH, the client's own FLWR_HOME, and its share of the cores."""
    env = flower_env(work_dir / ".flwr")
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ----------------------------------------------------------------------------- one mode


def run_mode(mode: str, args: argparse.Namespace, work_dir: Path) -> dict:
    """Serve `num_rounds` rounds to two clients of `mode`: per-round times and phases."""
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
                process = ManagedProcess(
                    client(superlink, i, client_dir),
                    client_dir / "client.log",
                    env=client_env(client_dir, args.client_threads),
                    cwd=str(client_dir),
                )
                clients.append(process.__enter__())
            wait_for_server(server, clients, started + args.timeout)
        finally:
            for process in clients:
                process.stop()
        if server.process.returncode != 0:
            raise RuntimeError(
                f"mode {mode}: the server exited with {server.process.returncode}:\n{server.tail()}"
            )
    wall = time.monotonic() - started
    history = checkpoint.read_history(output_dir)
    between = not history["run_config"]["federation.evaluate-in-background"]
    records = [r for r in history["rounds"] if r["round"] >= 1]
    rounds = [round_times(record, between) for record in records]
    for row, phases in zip(rounds, timeline(work_dir, mode, records, between)):
        row["phases"] = phases
    return {
        "mode": mode,
        "description": MODES[mode],
        "central_evaluation": "between rounds" if between else "in the background",
        "wall_seconds": round(wall, 1),
        "rounds": rounds,
    }


def wait_for_server(server: ManagedProcess, clients: list[ManagedProcess], deadline: float) -> None:
    """Until the server has served every round; fail early, with its log, if a client dies."""
    while server.running():
        for process in clients:
            if not process.running():
                raise RuntimeError(f"a client exited during the run:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run took longer than --timeout:\n{server.tail()}")
        time.sleep(1)


# ----------------------------------------------------------------------------- numbers


def round_times(record: dict, central_between_rounds: bool) -> dict:
    """Seconds of one round record, split into model work and overhead."""
    results = record["client_results"]
    times = {
        "round": record["seconds"],
        "train": max(c["train_runtime"] for c in results["train"]),
        "client_eval": max(c.get("eval_runtime", 0.0) for c in results["evaluate"]),
        "central": record["central"]["eval_runtime"],
    }
    times["overhead"] = times["round"] - times["train"] - times["client_eval"]
    if central_between_rounds:
        times["overhead"] -= times["central"]
    times["overhead_pct_of_train"] = 100 * times["overhead"] / times["train"]
    # Weights and messages the server sent and received in the round (`RoundStats`).
    moved = {f"mb_{way}": round(record[f"bytes_{way}"] / 1e6, 1) for way in ("sent", "received")}
    return {"round_num": record["round"], **{k: round(v, 2) for k, v in times.items()}, **moved}


def summarize(rounds: list[dict]) -> dict:
    """Round 1 on its own; the mean of rounds 2..N (times and phases)."""
    steady = rounds[1:]
    mean = {key: round(statistics.fmean(r[key] for r in steady), 2) for key in COLUMNS}
    mean["overhead_pct_of_train"] = round(100 * mean["overhead"] / mean["train"], 1)
    if all(r.get("phases") for r in steady):
        mean["phases"] = {
            k: round(statistics.fmean(r["phases"][k] for r in steady), 2) for k in steady[0]["phases"]
        }
    return {"round_1": rounds[0], "mean_rounds_2_to_n": mean}


# ----------------------------------------------------------------------------- where the time goes

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_START = re.compile(r"(?=(?:DEBUG|INFO|WARNING|ERROR)\s+\d{4}-\d\d-\d\d )")
LOG_LINE = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):\s*(.*)$")
ROUND_END = re.compile(r"^round (\d+)/\d+ \| clients")  # our ServerApp's line once a round is saved
SERVER_MARKS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
RECEIVING = re.compile(r"^Receiving: (\w+) message")
CLIENT_MARKS = {  # SuperNode log lines, in the order they happen for one message
    "Received successfully": "received",  # the whole message is in the SuperNode
    "Runtime.ConfirmMessageReceived": "confirmed",  # ... and in the ClientApp's process
    "Runtime.PushMessages": "pushed",  # the ClientApp hands its reply to the SuperNode
    "Sent successfully": "sent",  # the reply is in the SuperLink
}
EXCHANGES = (("train", "train_runtime"), ("evaluate", "eval_runtime"))


def log_events(path: Path) -> list[tuple[float, str]]:
    """(timestamp, text) of every timestamped Flower log line (FLWR_LOG_LEVEL=DEBUG adds them)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        # A progress bar's text may come first on the line (tqdm writes no newline).
        for part in LOG_START.split(ANSI.sub("", line)):
            if match := LOG_LINE.match(part):
                stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append((stamp, match[2].strip()))
    return events


def server_marks(run_log: Path, central_between_rounds: bool) -> dict[int, dict[str, float]]:
    """When each round started and ended, and when the strategy configured/aggregated each step.

    A round ends where its record's `seconds` end: with its saved-round line when central
    evaluation runs between rounds, at its federated evaluation's aggregation otherwise."""
    rounds: dict[int, dict[str, float]] = {}
    for stamp, text in log_events(run_log):
        mark = text.split(":", 1)[0]
        if mark == "configure_train":
            rounds[len(rounds) + 1] = {mark: stamp}
        elif mark in SERVER_MARKS and rounds:
            rounds[len(rounds)].setdefault(mark, stamp)
        elif central_between_rounds and (match := ROUND_END.match(text)) and int(match[1]) in rounds:
            rounds[int(match[1])]["end"] = stamp
    for n, marks in rounds.items():
        if not central_between_rounds and "aggregate_evaluate" in marks:
            marks["end"] = marks["aggregate_evaluate"]
        marks["start"] = rounds.get(n - 1, {}).get("end", marks["configure_train"])
    return rounds


def client_messages(supernode_log: Path) -> dict[str, list[dict[str, float]]]:
    """Per message kind, in order, when each stage of one message happened on this SuperNode."""
    messages: dict[str, list[dict[str, float]]] = {"train": [], "evaluate": []}
    last = None
    for stamp, text in log_events(supernode_log):
        if match := RECEIVING.match(text):
            last = {"receiving": stamp}
            messages.setdefault(match[1], []).append(last)
        elif last is not None:
            for prefix, key in CLIENT_MARKS.items():
                if text.startswith(prefix):
                    last.setdefault(key, stamp)
    return messages


def timeline(work_dir: Path, mode: str, records: list[dict], central_between_rounds: bool) -> list[dict]:
    """Phases of every round along the slowest client; {} for a round whose logs lack a mark."""
    server = server_marks(work_dir / "run" / LOGS_DIRNAME / "run.log", central_between_rounds)
    supernode_log = "supernode.log" if mode == "A" else "client.log"
    clients = {i: client_messages(work_dir / f"client-{i}" / supernode_log) for i in range(NUM_CLIENTS)}
    phases = []
    for record in records:
        try:
            phases.append(round_phases(record, server[record["round"]], clients, central_between_rounds))
        except (KeyError, IndexError):
            phases.append({})
    return phases


def round_phases(record: dict, marks: dict, clients: dict, central_between_rounds: bool) -> dict[str, float]:
    """Round seconds along the critical path, model work left out; they add up to its overhead."""
    n = record["round"]
    phases = {"server: start of round to train messages built": marks["configure_train"] - marks["start"]}
    for kind, runtime_key in EXCHANGES:
        begin, end = marks[f"configure_{kind}"], marks[f"aggregate_{kind}"]
        runtimes = {c["partition-id"]: c[runtime_key] for c in record["client_results"][kind]}
        # The client whose reply reached the SuperLink last is the one the server waited for.
        slowest, msg = max(
            ((i, c[kind][n - 1]) for i, c in clients.items()), key=lambda item: item[1]["sent"]
        )
        phases.update(
            {
                f"{kind}: ServerApp -> SuperLink -> SuperNode (its poll)": msg["receiving"] - begin,
                f"{kind}: message download SuperLink -> SuperNode": msg["received"] - msg["receiving"],
                f"{kind}: SuperNode -> ClientApp, after the download": msg["confirmed"] - msg["received"],
                f"{kind}: ClientApp besides Trainer": msg["pushed"] - msg["confirmed"] - runtimes[slowest],
                f"{kind}: reply ClientApp -> SuperNode -> SuperLink": msg["sent"] - msg["pushed"],
                f"{kind}: replies SuperLink -> ServerApp (its poll)": end - msg["sent"],
            }
        )
        if kind == "train":
            phases["aggregate train, configure evaluate"] = marks["configure_evaluate"] - end
    if central_between_rounds:
        phases["central evaluation besides Trainer, save round"] = (
            marks["end"] - marks["aggregate_evaluate"] - record["central"]["eval_runtime"]
        )
    return {k: round(v, 2) for k, v in phases.items()}


# ----------------------------------------------------------------------------- report


def print_times(result: dict) -> None:
    print(
        f"\nMode {result['mode']}: {result['description']}, central evaluation "
        f"{result['central_evaluation']} (wall {result['wall_seconds']:.1f} s)"
    )
    print(f"{'':>10} " + " ".join(f"{c:>11}" for c in COLUMNS) + f" {'overhead %':>11}")
    rows = [(f"round {r['round_num']}", r) for r in result["rounds"]]
    rows.append(("mean 2..N", result["summary"]["mean_rounds_2_to_n"]))
    for label, row in rows:
        values = " ".join(f"{row[c]:>11.2f}" for c in COLUMNS)
        print(f"{label:>10} {values} {row['overhead_pct_of_train']:>10.1f}%")


def print_phases(results: dict) -> None:
    """Overhead phases per mode: round 1, and the mean of rounds 2..N."""
    columns = {}
    for mode, result in results.items():
        columns[f"{mode} round 1"] = result["rounds"][0].get("phases") or {}
        columns[f"{mode} mean 2..N"] = result["summary"]["mean_rounds_2_to_n"].get("phases") or {}
    names = next((list(p) for p in columns.values() if p), [])
    if not names:
        print("\nNo phase breakdown: a Flower log lacked a timestamped mark.")
        return
    width = max(len(n) for n in names)
    print("\nWhere the overhead goes (seconds, along the slowest client):")
    print(f"{'':<{width}} " + " ".join(f"{c:>13}" for c in columns))
    for name in [*names, "total"]:
        cells = [
            p.get(name, sum(p.values()) if name == "total" and p else float("nan")) for p in columns.values()
        ]
        print(f"{name:<{width}} " + " ".join(f"{v:>13.2f}" for v in cells))


def machine() -> dict:
    import flwr
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "gpu": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flwr": flwr.__version__,
    }


def compare(results: dict) -> dict:
    """The verdicts: mode A against the target, and B's overhead over A's."""
    verdict = {}
    if "A" in results:
        pct = results["A"]["summary"]["mean_rounds_2_to_n"]["overhead_pct_of_train"]
        verdict["a_overhead_pct_of_train"] = pct
        verdict["a_meets_target"] = pct <= TARGET_PCT
        print(f"\nMode A overhead: {pct:.1f}% of local training time (target <= {TARGET_PCT:.0f}%: "
              f"{'met' if pct <= TARGET_PCT else 'missed'})")  # fmt: skip
    if {"A", "B"} <= results.keys():
        a, b = (results[m]["summary"]["mean_rounds_2_to_n"]["overhead"] for m in "AB")
        verdict["overhead_ratio_b_over_a"] = round(b / a, 2) if a > 0 else None
        print(
            f"Overhead B/A, mean of rounds 2..N: {b:.2f} s / {a:.2f} s = {verdict['overhead_ratio_b_over_a']}"
        )
    return verdict


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # every process below inherits these
    os.environ["FLWR_LOG_LEVEL"] = "DEBUG"  # timestamps in Flower's logs, for the phases
    work_root = Path(args.work_dir or tempfile.mkdtemp(prefix="round-overhead-")).resolve()
    results = {}
    try:
        for mode in args.modes:
            print(f"Mode {mode}: {MODES[mode]} ...", flush=True)
            result = run_mode(mode, args, work_root / mode)
            result["summary"] = summarize(result["rounds"])
            print_times(result)
            results[mode] = result
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_root, ignore_errors=True)
    print_phases(results)
    report = {
        "command": " ".join(["HF_HUB_OFFLINE=1", sys.executable, *sys.argv]),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir")},
        "target_overhead_pct_of_train": TARGET_PCT,
        **compare(results),
        "modes": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
