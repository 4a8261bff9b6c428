"""The offline quickstart run through the Python API and through `scripts/simulate.py`: equal rounds.

The built-in text-classification task is a Trainer factory like any user's
(`hf_flower.tasks.text_classification.make_trainer`), so the quickstart runs both ways:

    scripts/simulate.py --config configs/quickstart.yaml
    hf_flower.simulate(make_trainer, trainer_config=<the YAML's task settings>, <its federation settings>)

This script runs both (one after the other, on the same machine) and compares every round they
saved: the bytes of the weights, the config, and the central metrics. The cards differ by design
(the API run names no Hub data set unless told, `hub_dataset`), and so do the timings.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/api_vs_cli.py                       # the quickstart
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/api_vs_cli.py --num_rounds 2 --max_train_samples 256
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TIMINGS = ("runtime", "per_second", "preparation_time")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def central(record: dict) -> dict:
    return {k: v for k, v in record["central"].items() if not any(t in k for t in TIMINGS)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "api_vs_cli"))
    parser.add_argument("--num_rounds", type=int)
    parser.add_argument("--max_train_samples", type=int)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "api_vs_cli.json"))
    args = parser.parse_args()

    import hf_flower
    from hf_flower.arguments import FederationArguments, HubArguments
    from hf_flower.tasks.text_classification import make_trainer

    settings = yaml.safe_load(QUICKSTART.read_text())
    overrides = {"num_rounds": args.num_rounds, "max_train_samples": args.max_train_samples}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    run_fields = {f.name for group in (FederationArguments, HubArguments) for f in dataclasses.fields(group)}
    federation = {k: v for k, v in settings.items() if k in run_fields}
    task = {k: v for k, v in settings.items() if k not in run_fields}
    out = Path(args.output_dir)

    started = time.time()
    cli_flags = [f"--{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in settings.items()]
    cli_flags = [flag for flag in cli_flags if not flag.startswith("--output_dir=")]
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), *cli_flags,
         "--output_dir", str(out / "cli"), "--overwrite_output_dir"],
        check=True,
    )  # fmt: skip
    cli_seconds = time.time() - started

    started = time.time()
    federation["output_dir"] = str(out / "api")
    history = hf_flower.simulate(make_trainer, trainer_config=task, overwrite_output_dir=True, **federation)
    api_seconds = time.time() - started

    cli_history = json.loads((out / "cli" / "history.json").read_text())
    rounds = []
    for cli_record, api_record in zip(cli_history["rounds"], history["rounds"], strict=True):
        n = cli_record["round"]
        files = {
            name: sha256(out / "cli" / f"round-{n}" / name) == sha256(out / "api" / f"round-{n}" / name)
            for name in ("model.safetensors", "config.json", "tokenizer.json")
        }
        rounds.append(
            {
                "round": n,
                "equal_files": files,
                "equal_central_metrics": central(cli_record) == central(api_record),
                "central_accuracy": [
                    cli_record["central"].get("eval_accuracy"),
                    api_record["central"].get("eval_accuracy"),
                ],
            }
        )
    results = {
        "command": " ".join(sys.argv),
        "settings": settings,
        "seconds": {"cli": round(cli_seconds, 1), "api": round(api_seconds, 1)},
        "bit_for_bit": all(all(r["equal_files"].values()) and r["equal_central_metrics"] for r in rounds),
        "rounds": rounds,
    }
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
