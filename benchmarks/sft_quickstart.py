"""The SFT quickstart measured: bytes, quality per round against centralized training, memory, time.

Three parts, each written to the JSON file as soon as it is done (a part already there is
skipped, so the command can be interrupted and started again; `--only` picks parts):

- `bytes`: bytes per client per round of SmolLM2-135M-Instruct as the quickstart trains it
  (LoRA r=8 on q_proj/v_proj), with `--transfer_dtype bfloat16`, and full fine-tuning in float32,
  counted on real messages built by our code (`get_weights`), no training. A client's round moves
  three copies: the weights down for training, its update up, the weights down for evaluation.
- `federated`: `configs/sft_quickstart.yaml` through `scripts/simulate.py` (2 clients, 2 rounds),
  with the peak memory of its whole process tree (`measure.TreeMemory`), the wall time, and per
  round: central exact match, label accuracy and perplexity, seconds, and the share of the round
  the slowest client spent in `Trainer.train`.
- `centralized`: one `Trainer` on the union of the clients' training splits, for as many epochs
  as the federation has rounds (2), with the same TrainingArguments and LoRA, evaluated like the
  server evaluates (the same test split, new tokens and metrics) before training and after
  each epoch.

Command (the tables in benchmarks/README.md; about 20 minutes on 2 CPU cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft_quickstart.py --output benchmarks/results/sft_quickstart.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import run_measured  # noqa: E402

CONFIG = ROOT / "configs" / "sft_quickstart.yaml"
MB = 1e6
MESSAGES_PER_ROUND = 3  # train (down), its reply (up), evaluate (down)
# What a round reports, and the name it has in the results.
QUALITY = {
    "eval_exact_match": "exact_match",
    "eval_label_accuracy": "label_accuracy",
    "eval_perplexity": "perplexity",
}


def run_args_of(*flags: str):
    from hf_flower.arguments import parse_args
    from hf_flower.tasks import resolve

    return resolve(parse_args(["--config", str(CONFIG), *flags]))


def server_trainer(run_args):
    """The quickstart's Trainer as its server builds it: the model, tokenizer and test split."""
    from hf_flower.arguments.run_config import to_run_config
    from hf_flower.context import TrainerContext
    from hf_flower.tasks.causal_lm import make_trainer

    context = TrainerContext(
        role="server", num_rounds=run_args.federation.num_rounds, run_config=to_run_config(run_args)
    )
    return make_trainer(context)


def message_bytes() -> dict:
    """Bytes per client per round of LoRA (float32, bfloat16) and of the full model in float32."""
    from hf_flower.weights import arrays_nbytes, get_weights

    sizes = {}
    for name, flags, dtype in (
        ("full-fp32", ("--peft", "none", "--save_merged", "false"), "float32"),
        ("lora-fp32", (), "float32"),
        ("lora-bf16", (), "bfloat16"),
    ):
        model = server_trainer(run_args_of(*flags)).model
        sizes[name] = MESSAGES_PER_ROUND * arrays_nbytes(get_weights(model, dtype))
    full = sizes["full-fp32"]
    return {
        name: {"mb_per_client_per_round": round(size / MB, 3), "share_of_full_fp32": round(size / full, 5)}
        for name, size in sizes.items()
    }


def federated(work_dir: Path) -> dict:
    """The quickstart as a user runs it, with the peak memory of its process tree."""
    output_dir = work_dir / "federated"
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--config", str(CONFIG),
        "--output_dir", str(output_dir), "--overwrite_output_dir",
    ]  # fmt: skip
    seconds, sampler = run_measured(command, ROOT)
    rounds = json.loads((output_dir / "history.json").read_text())["rounds"]
    per_round = []
    for record in rounds:
        row = {"round": record["round"], **{v: record["central"].get(k) for k, v in QUALITY.items()}}
        if record["round"] > 0:
            train = max(c["train_runtime"] for c in record["client_results"]["train"])
            row.update(
                seconds=record["seconds"],
                train_seconds=round(train, 1),
                train_share=round(train / record["seconds"], 3),
                mb_per_client=round(
                    (record["bytes_sent"] + record["bytes_received"])
                    / len(record["client_results"]["train"])
                    / MB,
                    3,
                ),
            )
        per_round.append(row)
    return {
        "wall_seconds": round(seconds, 1),
        "peak_pss_mb": round(sampler.peak_pss / 2**20),
        "peak_rss_mb": round(sampler.peak_rss / 2**20),
        "peak_by_process": sampler.peak_by_process[:8],
        "rounds": per_round,
    }


def centralized(work_dir: Path) -> dict:
    """LoRA SFT of one model on the union of the clients' training splits, evaluated per epoch."""
    import dataclasses

    import datasets
    from transformers import TrainerCallback

    from hf_flower.arguments.precision import apply_precision
    from hf_flower.tasks.causal_lm import GeneratingTrainer, client_datasets

    run_args = run_args_of()
    federation = run_args.federation
    server = server_trainer(run_args)  # seeds, loads the model and tokenizer, and the test split
    tokenizer = server.processing_class
    union = datasets.concatenate_datasets(
        [
            client_datasets(run_args, tokenizer, i, federation.num_clients)[0]
            for i in range(federation.num_clients)
        ]
    )
    training = apply_precision(  # what each federated client chooses on this machine
        dataclasses.replace(
            run_args.training,
            output_dir=str(work_dir / "centralized"),
            num_train_epochs=(federation.local_epochs or 1) * federation.num_rounds,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
        ),
        run_args.model.precision,
    )
    per_epoch = []

    class EvaluateEachEpoch(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            evaluate(round(state.epoch))

    trainer = GeneratingTrainer(
        model=server.model,
        args=training,
        data_collator=server.data_collator,
        processing_class=tokenizer,
        train_dataset=union,
        eval_dataset=server.eval_dataset,
        callbacks=[EvaluateEachEpoch()],
        max_new_tokens=run_args.data.eval_max_new_tokens,
    )

    def evaluate(epoch: int) -> None:
        metrics = trainer.evaluate()
        per_epoch.append({"epoch": epoch, **{v: metrics.get(k) for k, v in QUALITY.items()}})
        print(f"centralized, epoch {epoch}: {per_epoch[-1]}", flush=True)

    evaluate(0)
    started = time.monotonic()
    output = trainer.train()
    return {
        "train_examples": len(union),
        "epochs": training.num_train_epochs,
        "train_runtime": round(output.metrics["train_runtime"], 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "epochs_metrics": per_epoch,
    }


PARTS = {"bytes": lambda work_dir: message_bytes(), "federated": federated, "centralized": centralized}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "sft_quickstart.json"))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench-sft"))
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="Run only these parts (default: all).")
    args = parser.parse_args(argv)

    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    for name in args.only or PARTS:
        if name in results:
            print(f"{name}: already in {output}, skipped", flush=True)
            continue
        load = os.getloadavg()[0]
        print(f"=== {name} (load {load:.2f})", flush=True)
        result = PARTS[name](Path(args.work_dir))
        results[name] = {
            **result,
            "load_at_start": round(load, 2),
            "finished": datetime.now().isoformat(timespec="seconds"),
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
