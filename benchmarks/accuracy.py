"""Accuracy after the same rounds: full fine-tuning, LoRA and bfloat16 transfer, IID and Dirichlet.

Every run is the offline quickstart (`configs/quickstart.yaml`: all-MiniLM-L6-v2, 2 clients with
536 training reviews each, 500 central test reviews, 3 rounds of 1 local epoch, FedAvg) with the
flags of its row below, run through `scripts/simulate.py` one after the other. The reference
(`central-*`) trains one model on the union of the clients' training splits for as many epochs
as the federation has rounds (3), with the same TrainingArguments, and evaluates on the same
central test split.

Results go to a JSON file after every run; a run already in it is skipped, so the command can
be interrupted and started again. `--only NAME ...` picks runs.

Command (the numbers in benchmarks/README.md; about 35 minutes on 2 CPU cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy.py --output benchmarks/results/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
DIRICHLET = ["--partitioner", "dirichlet", "--dirichlet_alpha", "0.5"]
# LoRA trains far fewer weights from a small init: it needs a larger step than full fine-tuning
# (1e-4 in the quickstart).
LORA = ["--peft", "lora", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-3"]
BF16 = ["--transfer_dtype", "bfloat16"]

RUNS = {
    "iid-full-fp32": [],
    "iid-lora-r8": LORA,
    "iid-full-bf16": BF16,
    "central-iid": None,
    "dirichlet-full-fp32": DIRICHLET,
    "dirichlet-lora-r8-lr2e-3": DIRICHLET + LORA + ["--learning_rate", "2e-3"],
    "dirichlet-full-bf16": DIRICHLET + BF16,
    "central-dirichlet": DIRICHLET,
    # LoRA tuning (IID): a larger step, and the pooler (frozen otherwise) trained in full too.
    "iid-lora-r8-lr2e-3": LORA + ["--learning_rate", "2e-3"],
    "iid-lora-r8-lr5e-3": LORA + ["--learning_rate", "5e-3"],
    "iid-lora-r8-lr5e-3-pooler": LORA
    + ["--learning_rate", "5e-3", "--modules_to_save", "classifier", "pooler"],
}


def federated(name: str, flags: list[str], work_dir: Path) -> dict:
    """One `scripts/simulate.py` run; its history.json, summarised."""
    output_dir = work_dir / name
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--config", str(QUICKSTART),
        "--output_dir", str(output_dir), "--overwrite_output_dir", *flags,
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.monotonic() - started
    history = json.loads((output_dir / "history.json").read_text())
    rounds = history["rounds"]
    last = rounds[-1]
    return {
        "kind": "federated",
        "flags": flags,
        "central_accuracy": [r["central"]["eval_accuracy"] for r in rounds],
        "final_accuracy": last["central"]["eval_accuracy"],
        "final_f1": last["central"].get("eval_f1"),
        # One client's share of a round: what it received (train + evaluate) and sent back.
        "bytes_per_client_per_round": (last["bytes_sent"] + last["bytes_received"])
        // len(last["client_results"]["train"]),
        "train_runtime_per_round": [
            max(c["train_runtime"] for c in r["client_results"]["train"]) for r in rounds[1:]
        ],
        "wall_seconds": round(seconds, 1),
    }


def centralized(name: str, flags: list[str]) -> dict:
    """Train on the union of the clients' training splits; evaluate like the server does."""
    import dataclasses

    import datasets
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from hf_flower import data as data_lib
    from hf_flower.arguments import parse_args
    from hf_flower.modeling import load_model, load_tokenizer
    from hf_flower.tasks import resolve
    from hf_flower.tasks.classification_metrics import make_compute_metrics

    run_args = resolve(parse_args(["--config", str(QUICKSTART), *flags]))
    federation, seed = run_args.federation, run_args.training.seed
    set_seed(seed)
    tokenizer = load_tokenizer(run_args.model)
    label_names = data_lib.load_label_names(run_args.data)
    model = load_model(run_args.model, label_names, run_args.peft)
    parts = [
        data_lib.client_data(run_args.data, tokenizer, i, federation.num_clients, seed).train
        for i in range(federation.num_clients)
    ]
    union = datasets.concatenate_datasets(parts)
    test_set = data_lib.central_test_set(run_args.data, tokenizer, seed)
    args = dataclasses.replace(
        run_args.training,
        output_dir=str(ROOT / "outputs" / "bench-accuracy" / name),
        num_train_epochs=(federation.local_epochs or 1) * federation.num_rounds,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(len(label_names)),
        train_dataset=union,
        eval_dataset=test_set,
    )
    started = time.monotonic()
    output = trainer.train()
    results = trainer.evaluate()
    return {
        "kind": "centralized",
        "flags": flags,
        "train_examples": len(union),
        "epochs": args.num_train_epochs,
        "final_accuracy": results["eval_accuracy"],
        "final_f1": results.get("eval_f1"),
        "train_runtime": output.metrics["train_runtime"],
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench-accuracy"))
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="Run only these (default: all).")
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="Flags added to every run (trials)."
    )
    args = parser.parse_args(argv)

    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    results.setdefault("runs", {})
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    for name in args.only or RUNS:
        if name in results["runs"]:
            print(f"{name}: already in {output}, skipped", flush=True)
            continue
        flags = RUNS[name]
        load = os.getloadavg()[0]
        print(f"=== {name} (load {load:.2f})", flush=True)
        if name.startswith("central"):
            result = centralized(name, (flags or []) + args.extra)
        else:
            result = federated(name, flags + args.extra, Path(args.work_dir))
        result["load_at_start"] = round(load, 2)
        result["finished"] = datetime.now().isoformat(timespec="seconds")
        results["runs"][name] = result
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: final central accuracy {result['final_accuracy']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
