"""hf-flower against Flower's own quickstart-huggingface loop, on the same rows: accuracy, time, memory.

Question: what does hf-flower (Trainer on every client, round checkpoints, its launcher) cost or
gain against the plain training loop Flower's examples teach, run the same way?

Three systems, in one invocation, on the same data:

1. `loop`: the client and server code of Flower's `examples/quickstart-huggingface`, copied to
   `benchmarks/quickstart_huggingface/` and changed only where this machine or the comparison needs
   it (each file says what changed): the offline all-MiniLM-L6-v2 instead of bert-tiny, partitions
   read with `load_from_disk` (client i gets exactly hf-flower's partition i, before any hold-out,
   and keeps its own 80/20 `train_test_split(seed=42)`), max length 128, batch 16, accuracy counted
   without `evaluate`, and every round's aggregate saved as `round-N.safetensors`. Everything else
   is upstream: torch AdamW at lr 5e-5 (its default weight decay 0.01, constant rate, no seed),
   a new model `from_pretrained` for each message, replies that count batches as `num-examples`
   (equal partitions: FedAvg's weights stay equal), FedAvg over 2 clients, 3 rounds.
2. `hf-flower`: `scripts/simulate.py` with the same settings and no --config file, so Trainer's
   and hf-flower's defaults for everything else (no weight decay, a linearly decaying learning
   rate, seed 42); `--hf_flower_flags` adds flags to compare variants.
3. `central`: one Trainer (lr 5e-5, batch 16, seed 42, Trainer's defaults otherwise) trained for
   as many epochs as there are rounds on the union of hf-flower's client training rows (each
   partition minus hf-flower's own 20% evaluation hold-out). Accuracy only.

Both federations run on Flower's simulation engine: a `flower-superlink --simulation` on a free
loopback port, 2 virtual SuperNodes, Ray, one CPU per client. Accuracy is measured afterwards, by one
function, on the same central test rows (held out of the IMDB reviews before the clients' pool),
for every saved round of both systems (round 0: the pretrained encoder with a fresh head, each
system's own). Wall time is the whole command (the loop: SuperLink start until `flwr run` exits);
time to round 1 is until round 1's checkpoint exists (hf-flower's includes its own central
evaluation, which the loop does not do); memory is the peak of the summed PSS and RSS of each
process tree, sampled every 0.5 s (the loop: the SuperLink and `flwr run` with all descendants).

Command (the table in benchmarks/README.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vs_quickstart.py --output benchmarks/results/vs_quickstart.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import tomli_w
from measure import MB, TreeMemory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_flower.arguments import OFFLINE_MODEL, parse_args  # noqa: E402
from hf_flower.arguments.run_config import to_run_config  # noqa: E402
from hf_flower.launch.flower import (  # noqa: E402
    COMPLETED,
    CONNECTION,
    flower_env,
    flower_executable,
    run_status,
    write_connection,
)
from hf_flower.launch.plan import RunPlan  # noqa: E402
from hf_flower.launch.processes import LOOPBACK, ManagedProcess, free_port  # noqa: E402
from hf_flower.launch.simulation import simulation_config  # noqa: E402
from hf_flower.tasks import resolve  # noqa: E402

APP_DIR = Path(__file__).resolve().parent / "quickstart_huggingface"
SYSTEMS = ("loop", "hf-flower", "central")
NUM_CLIENTS = 2
SEED = 42
POLL_SECONDS = 0.5
# What must match for results of an earlier invocation (--output) to be compared with this one.
SETTINGS_KEYS = ("reviews_per_client", "test_reviews", "num_rounds")


def base_flags(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The flags of the hf-flower run, before --hf_flower_flags; also the central run's settings."""
    n = str(NUM_CLIENTS)
    return [
        "--model_name_or_path", OFFLINE_MODEL, "--dataset", "offline-imdb", "--max_length", "128",
        "--max_train_samples", str(args.reviews_per_client * NUM_CLIENTS),
        "--test_size", str(args.test_reviews), "--max_test_samples", str(args.test_reviews),
        "--client_eval_size", "0.2", "--partitioner", "iid", "--num_clients", n,
        "--min_train_clients", n, "--min_evaluate_clients", n, "--min_available_clients", n,
        "--num_rounds", str(args.num_rounds), "--local_epochs", "1", "--learning_rate", "5e-5",
        "--per_device_train_batch_size", "16", "--seed", str(SEED),
        "--output_dir", str(output_dir), "--overwrite_output_dir",
    ]  # fmt: skip


# --- Data -------------------------------------------------------------------------------------


def write_partitions(run_args, folder: Path) -> list[int]:
    """Save each client's rows as hf-flower partitions them (before its eval hold-out), for the loop."""
    from hf_flower import data

    splits = data.prepare_splits(run_args.data, SEED)
    labels = data.label_ids(splits.pool, run_args.data.label_column, splits.names)
    rows = data.partition_rows(labels, run_args.data, NUM_CLIENTS, SEED)
    for partition_id, partition in enumerate(rows):
        splits.pool.select(partition).save_to_disk(str(folder / f"partition-{partition_id}"))
    return [len(partition) for partition in rows]


# --- Running and measuring ----------------------------------------------------------------------


def follow(command: ManagedProcess, round_1: Path, started: float, superlink=None) -> float | None:
    """Wait for `command` to exit; seconds from `started` until `round_1` existed (None: never)."""
    seconds_to_round_1 = None
    while command.running():
        if seconds_to_round_1 is None and round_1.exists():
            seconds_to_round_1 = time.monotonic() - started
        if superlink is not None and not superlink.running():
            raise RuntimeError(f"The SuperLink stopped unexpectedly:\n{superlink.tail()}")
        time.sleep(POLL_SECONDS)
    if seconds_to_round_1 is None and round_1.exists():
        seconds_to_round_1 = time.monotonic() - started
    return seconds_to_round_1


def stop(memory: TreeMemory) -> dict:
    """Stop sampling; the peaks, in MB, with each process's share at the PSS peak."""
    memory.stopped.set()
    memory.join()
    return {
        "peak_pss_mb": round(memory.peak_pss / MB),
        "peak_rss_mb": round(memory.peak_rss / MB),
        "peak_processes": memory.peak_processes,
        "pss_by_process_at_peak": memory.peak_by_process,
    }


def run_loop(run_args, args: argparse.Namespace, work_dir: Path) -> dict:
    """Flower's quickstart loop on a simulation SuperLink: time, memory, its saved rounds."""
    from hf_flower.modeling import resolve_model_path

    folder = work_dir / "loop"
    flwr_home, logs, rounds = folder / ".flwr", folder / "logs", folder / "rounds"
    port = free_port()
    write_connection(flwr_home, f"{LOOPBACK}:{port}")
    env = flower_env(flwr_home)
    run_config = flwr_home / "run_config.toml"
    run_config.write_text(
        tomli_w.dumps(
            {
                "num-server-rounds": args.num_rounds,
                "fraction-train": 1.0,
                "fraction-evaluate": 1.0,
                "model-name": resolve_model_path(OFFLINE_MODEL),
                "data-dir": str(work_dir / "partitions"),
                "output-dir": str(rounds),
            }
        )
    )
    superlink_cmd = [
        flower_executable("flower-superlink"), "--insecure", "--simulation",
        "--disable-runtime-dependency-installation", "--host", LOOPBACK, "--port", str(port),
    ]  # fmt: skip
    submit_cmd = [
        flower_executable("flwr"), "run", str(APP_DIR), CONNECTION,
        "--federation-config", simulation_config(RunPlan.from_run_config(to_run_config(run_args))), "--run-config", str(run_config), "--stream",
    ]  # fmt: skip
    print(f"=== loop: logs in {logs}", flush=True)
    started = time.monotonic()
    with ManagedProcess(superlink_cmd, logs / "superlink.log", env=env, cwd=str(flwr_home)) as superlink:
        memory = TreeMemory(superlink.process.pid, POLL_SECONDS)
        memory.start()
        try:
            superlink.wait_for_port(port)
            with ManagedProcess(submit_cmd, logs / "run.log", env=env, cwd=str(flwr_home)) as submission:
                memory.add_root(submission.process.pid)
                to_round_1 = follow(submission, rounds / "round-1.safetensors", started, superlink)
                wall = time.monotonic() - started
                code, submission_tail = submission.process.returncode, submission.tail()
        finally:
            measured = stop(memory)
        status = run_status(flwr_home, env)
    if code != 0 or not status.startswith(COMPLETED):
        raise RuntimeError(f"The loop's run failed (flwr run: {code}, status {status}):\n{submission_tail}")
    return {
        "command": submit_cmd,
        "wall_seconds": round(wall, 1),
        "seconds_to_round_1": round(to_round_1, 1) if to_round_1 is not None else None,
        **measured,
        "rounds_dir": str(rounds),
    }


def run_hf_flower(args: argparse.Namespace, work_dir: Path) -> dict:
    """`scripts/simulate.py` with the same settings (and --hf_flower_flags): time, memory, history."""
    output_dir = work_dir / "hf-flower"
    extra = shlex.split(args.hf_flower_flags)
    command = [sys.executable, str(ROOT / "scripts" / "simulate.py"), *base_flags(args, output_dir), *extra]
    log = work_dir / "logs" / "hf-flower.log"
    print(f"=== hf-flower: log in {log}", flush=True)
    started = time.monotonic()
    with ManagedProcess(command, log, cwd=str(ROOT)) as simulation:
        memory = TreeMemory(simulation.process.pid, POLL_SECONDS)
        memory.start()
        try:
            to_round_1 = follow(simulation, output_dir / "round-1", started)
            wall = time.monotonic() - started
        finally:
            measured = stop(memory)
        code, tail = simulation.process.returncode, simulation.tail()
    if code != 0:
        raise RuntimeError(f"scripts/simulate.py exited with {code}:\n{tail}")
    history = json.loads((output_dir / "history.json").read_text())
    return {
        "command": command,
        "flags": extra,
        "wall_seconds": round(wall, 1),
        "seconds_to_round_1": round(to_round_1, 1) if to_round_1 is not None else None,
        **measured,
        "in_run_central_accuracy": {
            str(r["round"]): r["central"]["eval_accuracy"] for r in history["rounds"]
        },
        "in_run_central_eval_seconds": {
            str(r["round"]): r["central"].get("eval_runtime") for r in history["rounds"]
        },
        "rounds_dir": str(output_dir),
    }


def run_central(run_args, args: argparse.Namespace, work_dir: Path, evaluate) -> dict:
    """One Trainer on the union of hf-flower's client training rows, for as many epochs as rounds."""
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from hf_flower import data
    from hf_flower.modeling import load_model, load_tokenizer

    print("=== central", flush=True)
    set_seed(SEED)
    tokenizer = load_tokenizer(run_args.model)
    names = data.load_label_names(run_args.data)
    parts = [
        data.client_data(run_args.data, tokenizer, i, NUM_CLIENTS, SEED).train for i in range(NUM_CLIENTS)
    ]
    union = datasets.concatenate_datasets(parts)
    training = dataclasses.replace(
        run_args.training,
        output_dir=str(work_dir / "central"),
        num_train_epochs=args.num_rounds,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
    )
    model = load_model(run_args.model, names, run_args.peft)
    trainer = Trainer(
        model=model,
        args=training,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        train_dataset=union,
    )
    started = time.monotonic()
    trainer.train()
    return {
        "train_rows": "hf-flower's client train rows (each partition minus its 20% eval hold-out)",
        "train_examples": len(union),
        "epochs": args.num_rounds,
        "wall_seconds": round(time.monotonic() - started, 1),
        "accuracy": evaluate(trainer.model),
    }


# --- Accuracy, the same way for every system -----------------------------------------------------


def make_evaluator(run_args):
    """`evaluate(model) -> accuracy` on the central test rows: the one measure of every system."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from hf_flower import data
    from hf_flower.modeling import load_tokenizer

    tokenizer = load_tokenizer(run_args.model)
    test_set = data.central_test_set(run_args.data, tokenizer, SEED)
    collate = DataCollatorWithPadding(tokenizer)

    def evaluate(model) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in DataLoader(test_set, batch_size=64, collate_fn=collate):
                labels = batch.pop("labels")
                correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
        return round(correct / len(test_set), 4)

    return evaluate, len(test_set)


def evaluate_rounds(system: str, rounds_dir: Path, num_rounds: int, evaluate) -> dict[str, float]:
    """Accuracy of every round the system saved (round 0 too, when it is there)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from hf_flower.modeling import resolve_model_path

    accuracy = {}
    for n in range(num_rounds + 1):
        if system == "loop":
            weights = rounds_dir / f"round-{n}.safetensors"
            if not weights.exists():
                continue
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(OFFLINE_MODEL), num_labels=2
            )
            model.load_state_dict(load_file(str(weights)), strict=True)
        else:
            folder = rounds_dir / f"round-{n}"
            if not folder.is_dir():
                continue
            model = AutoModelForSequenceClassification.from_pretrained(str(folder))
        accuracy[str(n)] = evaluate(model)
        print(f"{system} round {n}: accuracy {accuracy[str(n)]:.4f}", flush=True)
    return accuracy


# --- Report -------------------------------------------------------------------------------------


def compare(systems: dict) -> dict:
    """hf-flower / loop for time and memory; accuracy differences against the loop and centralized."""
    loop, ours, central = systems.get("loop"), systems.get("hf-flower"), systems.get("central")
    comparison = {}
    if loop and ours:

        def ratio(key):
            return round(ours[key] / loop[key], 2) if ours.get(key) and loop.get(key) else None

        comparison["hf_flower_over_loop"] = {
            key: ratio(key) for key in ("wall_seconds", "seconds_to_round_1", "peak_pss_mb", "peak_rss_mb")
        }
        comparison["accuracy_hf_flower_minus_loop"] = {
            n: round(ours["accuracy"][n] - loop["accuracy"][n], 4)
            for n in ours["accuracy"]
            if n in loop["accuracy"]
        }
    if central:
        final = {
            name: s["accuracy"][max(s["accuracy"], key=int)]
            for name, s in systems.items()
            if name != "central"
        }
        comparison["final_accuracy_minus_central"] = {
            name: round(value - central["accuracy"], 4) for name, value in final.items()
        }
    return comparison


def markdown(results: dict) -> str:
    """The table (and notes) for benchmarks/README.md."""
    systems, num_rounds = results["systems"], results["settings"]["num_rounds"]
    rounds = [str(n) for n in range(num_rounds + 1)]

    def cell(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = ["system", *[f"acc. round {n}" for n in rounds], "wall (s)", "to round 1 (s)", "peak PSS (MB)"]
    header.append("peak RSS (MB)")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    labels = {"loop": "Flower quickstart loop", "hf-flower": "hf-flower"}
    for name, label in labels.items():
        if name in systems:
            s = systems[name]
            accuracy = [cell(s["accuracy"].get(n)) for n in rounds]
            numbers = [cell(s[k], 1) for k in ("wall_seconds", "seconds_to_round_1")]
            numbers += [cell(s[k]) for k in ("peak_pss_mb", "peak_rss_mb")]
            lines.append(f"| {label} | " + " | ".join(accuracy + numbers) + " |")
    comparison = results["comparison"]
    if "hf_flower_over_loop" in comparison:
        r = comparison["hf_flower_over_loop"]
        diffs = comparison["accuracy_hf_flower_minus_loop"]
        accuracy = [f"{diffs[n]:+.3f}" if n in diffs else "-" for n in rounds]
        numbers = [
            cell(r[k], 2) for k in ("wall_seconds", "seconds_to_round_1", "peak_pss_mb", "peak_rss_mb")
        ]
        lines.append("| hf-flower / loop (accuracy: difference) | " + " | ".join(accuracy + numbers) + " |")
    if "central" in systems:
        c = systems["central"]
        accuracy = ["-"] * num_rounds + [cell(c["accuracy"])]
        label = f"centralized, {c['epochs']} epoch(s) on {c['train_examples']} reviews"
        lines.append(f"| {label} | " + " | ".join(accuracy + ["-"] * 4) + " |")
    notes = []
    if "final_accuracy_minus_central" in comparison:
        diffs = ", ".join(f"{k} {v:+.3f}" for k, v in comparison["final_accuracy_minus_central"].items())
        notes.append(f"- Final accuracy minus centralized: {diffs}.")
    if "hf-flower" in systems:
        in_run = systems["hf-flower"]["in_run_central_accuracy"]
        notes.append(
            "- hf-flower's own in-run central accuracy (cross-check): "
            + ", ".join(f"round {n} {v:.3f}" for n, v in in_run.items())
            + "."
        )
    for name, label in labels.items():
        if name in systems:
            top = systems[name]["pss_by_process_at_peak"][:6]
            notes.append(
                f"- {label}, PSS at its peak: "
                + ", ".join(f"{p['name']} {p['pss_mb']} MB" for p in top)
                + "."
            )
    return "\n".join(lines + [""] + notes)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **{name: importlib.metadata.version(name) for name in ("torch", "transformers", "flwr")},
    }


def quiet_libraries() -> None:
    """No load reports or progress bars from this process (the fresh head's missing keys are expected)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def previous_systems(output: Path, settings: dict) -> dict:
    """Systems of an earlier invocation with the same settings, to compare with the ones run now."""
    if not output.is_file():
        return {}
    earlier = json.loads(output.read_text())
    if {k: earlier.get("settings", {}).get(k) for k in SETTINGS_KEYS} != {
        k: settings[k] for k in SETTINGS_KEYS
    }:
        print(f"{output} holds other settings: replaced.", flush=True)
        return {}
    return earlier.get("systems", {})


def main(argv: list[str] | None = None) -> int:
    global SEED
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reviews_per_client", type=int, default=256, help="Each client's partition.")
    parser.add_argument("--test_reviews", type=int, default=512, help="Central test reviews.")
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument(
        "--seed", type=int, default=SEED, help="Partitions, test rows, hf-flower's and central's seed."
    )
    parser.add_argument(
        "--only", action="append", choices=SYSTEMS, help="Run only this system (repeatable); others are "
        "kept from --output when it has the same settings."
    )  # fmt: skip
    parser.add_argument("--skip_central", action="store_true", help="Do not train the centralized reference.")
    parser.add_argument(
        "--hf_flower_flags", default="", help="Extra flags of the hf-flower run (one string)."
    )
    parser.add_argument(
        "--work_dir", help="Partitions, rounds and logs (default: a new folder under outputs/)."
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "vs_quickstart.json"))
    args = parser.parse_args(argv)
    SEED = args.seed  # every step of this script reads it

    selected = [s for s in (args.only or SYSTEMS) if not (s == "central" and args.skip_central)]
    if args.work_dir:
        work_dir = Path(args.work_dir).resolve()
    else:
        (ROOT / "outputs").mkdir(exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="vs-quickstart-", dir=ROOT / "outputs"))
    for name in ("partitions", "loop", "hf-flower", "central", "logs"):  # ours: start clean
        shutil.rmtree(work_dir / name, ignore_errors=True)
    print(f"Work folder: {work_dir}", flush=True)

    settings = {
        "model": OFFLINE_MODEL,
        "dataset": "offline-imdb",
        "reviews_per_client": args.reviews_per_client,
        "test_reviews": args.test_reviews,
        "num_rounds": args.num_rounds,
        "num_clients": NUM_CLIENTS,
        "max_length": 128,
        "batch_size": 16,
        "learning_rate": 5e-5,
        "seed": SEED,
        "client_eval_size": 0.2,
        "partitioner": "iid",
    }
    quiet_libraries()
    output = Path(args.output)
    systems = previous_systems(output, settings)
    run_args = resolve(parse_args(base_flags(args, work_dir / "central")))
    evaluate, test_rows = make_evaluator(run_args)

    def record(name: str, run) -> None:
        """Run one system; keep its result, the load average before it and when it finished."""
        load = round(os.getloadavg()[0], 2)
        systems[name] = {
            **run(),
            "load_at_start": load,
            "finished": datetime.now().isoformat(timespec="seconds"),
        }

    if "loop" in selected:
        sizes = write_partitions(run_args, work_dir / "partitions")
        record("loop", lambda: {**run_loop(run_args, args, work_dir), "partition_sizes": sizes})
    if "hf-flower" in selected:
        record("hf-flower", lambda: run_hf_flower(args, work_dir))
    for name in ("loop", "hf-flower"):
        if name in selected:
            systems[name]["accuracy"] = evaluate_rounds(
                name, Path(systems[name]["rounds_dir"]), args.num_rounds, evaluate
            )
    if "central" in selected:
        record("central", lambda: run_central(run_args, args, work_dir, evaluate))

    results = {
        "settings": settings,
        "test_rows": test_rows,
        "machine": machine(),
        "work_dir": str(work_dir),
        "systems": systems,
        "comparison": compare(systems),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nResults in {output}\n\n{markdown(results)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
