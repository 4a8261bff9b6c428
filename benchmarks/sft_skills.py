"""Does federation pay? `configs/sft_skills.yaml` (6 clients, one AI2 basic skill each, LoRA on
SmolLM2-135M-Instruct) against the pretrained model, each client alone, and centralized training.

Every model is scored the same way: exact match of the stripped greedy answer (`sft_metrics`,
through `GeneratingTrainer.evaluate`, as the server scores) on the first `--test_per_skill`
held-out questions of each skill (the `offline-basic-skills` test split: no client trained on
them), per skill and on average over the six. Parts, each written to the JSON file as soon as it is
done (a part already there is skipped, so the command can be stopped and started again; `--only`
picks parts):

- `pretrained`: the model before any training.
- `alone`: each client's own Trainer on its own skill (its partition's training rows), for the
  steps it trains in the whole federation (`max_steps`), scored on all six skills; the table also
  gives the mean of the six clients.
- `fedavg`: the config through `scripts/simulate.py` with plain averaging (`--strategy FedAvg`), the
  last round's adapters scored.
- `fedavgm`: the same with the config's server optimizer, FedAvgM (`--server_momentum`,
  `--server_learning_rate`; the config's 0.5 and 3 by default).
- `centralized`: one Trainer on the union of the clients' training rows, for as many examples as
  the federation trains on in all (`num_clients * max_steps` steps of the same batch size).

Then the table (markdown, beside the JSON) and the issue's three checks on the mean: federated at
least 10 points above pretrained, above the mean of the clients alone, within 5 points of centralized.

Commands (the full run: about an hour on 2 CPU cores, two federations of about 13 minutes, 6 x 32
+ 192 training steps of 2-5 s, ten evaluations of 6 x 50 prompts; `--smoke` checks the script end
to end, 4 min 46 s here; measured results in benchmarks/README.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft_skills.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft_skills.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "sft_skills.yaml"
# --smoke: every part at its smallest, to check the script (the scores mean nothing).
SMOKE_FLAGS = (
    "--num_rounds", "1", "--max_steps", "2", "--per_device_train_batch_size", "2",
    "--max_test_samples", "6", "--client_eval_size", "1", "--eval_max_new_tokens", "4",
    "--max_train_samples", "60",
)  # fmt: skip
SMOKE_TEST_PER_SKILL = 2
# The targets, in exact-match points (0-100) of the mean over skills.
ABOVE_PRETRAINED, WITHIN_CENTRALIZED = 10.0, 5.0


def run_args_of(flags: list[str]):
    from hf_flower.arguments import parse_args
    from hf_flower.tasks import resolve

    return resolve(parse_args(["--config", str(CONFIG), *flags]))


def server_trainer(run_args):
    """The run's Trainer as its server builds it: the model with fresh adapters (LoRA's B is zero,
    so it answers as the pretrained model), the tokenizer, the collator."""
    from hf_flower.arguments.run_config import to_run_config
    from hf_flower.context import TrainerContext
    from hf_flower.tasks.causal_lm import make_trainer

    context = TrainerContext(
        role="server", num_rounds=run_args.federation.num_rounds, run_config=to_run_config(run_args)
    )
    return make_trainer(context)


def skill_tests(run_args, tokenizer, test_per_skill: int) -> dict:
    """Per skill, its first `test_per_skill` held-out questions, tokenised with generation inputs."""
    from hf_flower.data.skills import SKILLS, load_basic_skills
    from hf_flower.tasks.causal_lm import with_generation_inputs
    from hf_flower.tasks.sft_tokens import tokenize_sft

    _, test = load_basic_skills()
    tests = {}
    for skill in SKILLS:
        rows = test.filter(lambda row, skill=skill: row["skill"] == skill).select(range(test_per_skill))
        tests[skill] = with_generation_inputs(
            tokenize_sft(rows, tokenizer, run_args.data), rows, tokenizer, run_args
        )
    return tests


def score(trainer, tests: dict) -> dict:
    """Exact match (0-100) on each skill's held-out questions, and their mean."""
    per_skill = {}
    for skill, dataset in tests.items():
        metrics = trainer.evaluate(dataset)
        per_skill[skill] = round(100 * metrics["eval_exact_match"], 1)
        print(f"  {skill}: {per_skill[skill]}", flush=True)
    return {"per_skill": per_skill, "mean": round(sum(per_skill.values()) / len(per_skill), 1)}


def train_and_score(run_args, train, max_steps: int, work_dir: Path, test_per_skill: int) -> dict:
    """A fresh model trained on `train` for `max_steps` (the run's batch size and learning rate), scored."""
    from hf_flower.arguments.precision import apply_precision
    from hf_flower.tasks.causal_lm import GeneratingTrainer

    server = server_trainer(run_args)
    # The precision each federated client chooses on this machine (`--precision auto`).
    training = apply_precision(dataclasses.replace(
        run_args.training, output_dir=str(work_dir), max_steps=max_steps, save_strategy="no",
        eval_strategy="no", report_to="none",
    ), run_args.model.precision)  # fmt: skip
    trainer = GeneratingTrainer(
        model=server.model,
        args=training,
        data_collator=server.data_collator,
        processing_class=server.processing_class,
        train_dataset=train,
        max_new_tokens=run_args.data.eval_max_new_tokens,
    )
    output = trainer.train()
    scores = score(trainer, skill_tests(run_args, server.processing_class, test_per_skill))
    batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
    return {
        **scores,
        "train_rows": len(train),
        "examples_seen": max_steps * batch,
        "train_runtime": round(output.metrics["train_runtime"], 1),
    }


def client_train(run_args, tokenizer, partition_id: int):
    from hf_flower.tasks.causal_lm import client_datasets

    return client_datasets(run_args, tokenizer, partition_id, run_args.federation.num_clients)[0]


def total_steps(run_args) -> int:
    """The steps one client trains in the whole federation (`max_steps`, which the rounds share)."""
    if run_args.training.max_steps <= 0:
        raise SystemExit(f"{CONFIG.name} must set max_steps: the examples seen are counted from it.")
    return run_args.training.max_steps


def pretrained(args, flags, work_dir: Path) -> dict:
    run_args = run_args_of(flags)
    server = server_trainer(run_args)
    return score(server, skill_tests(run_args, server.processing_class, args.test_per_skill))


def alone(args, flags, work_dir: Path) -> dict:
    from hf_flower.data.skills import SKILLS

    run_args = run_args_of(flags)
    tokenizer = server_trainer(run_args).processing_class
    clients = {}
    for partition_id, skill in enumerate(SKILLS):
        print(f"alone: client {partition_id} ({skill})", flush=True)
        train = client_train(run_args, tokenizer, partition_id)
        clients[skill] = train_and_score(
            run_args, train, total_steps(run_args), work_dir / f"alone-{skill}", args.test_per_skill
        )
    per_skill = {s: round(sum(c["per_skill"][s] for c in clients.values()) / len(clients), 1) for s in SKILLS}
    return {
        "clients": clients,
        "mean_of_clients": {
            "per_skill": per_skill,
            "mean": round(sum(per_skill.values()) / len(per_skill), 1),
        },
    }


def federated(args, flags, work_dir: Path, name: str, strategy_flags: list[str]) -> dict:
    """The config through `scripts/simulate.py`; its last round's adapters scored per skill."""
    import subprocess

    from hf_flower import checkpoint
    from hf_flower.server.resume import load_round_arrays

    output_dir = work_dir / name
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--config", str(CONFIG), *flags,
        *strategy_flags, "--output_dir", str(output_dir), "--overwrite_output_dir",
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.monotonic() - started
    run_args = run_args_of([*flags, *strategy_flags])
    last = checkpoint.latest_round(output_dir)
    server = server_trainer(run_args)
    load_round_arrays(checkpoint.round_dir(output_dir, last), server.model)
    scores = score(server, skill_tests(run_args, server.processing_class, args.test_per_skill))
    rounds = checkpoint.read_history(output_dir)["rounds"]
    federation, training = run_args.federation, run_args.training
    return {
        **scores,
        "strategy": strategy_flags or [federation.strategy],
        "round": last,
        "examples_seen": federation.num_clients
        * total_steps(run_args)
        * training.per_device_train_batch_size,
        "wall_seconds": round(seconds, 1),
        "central_exact_match_by_round": [r["central"].get("eval_exact_match") for r in rounds],
    }


def centralized(args, flags, work_dir: Path) -> dict:
    import datasets

    run_args = run_args_of(flags)
    tokenizer = server_trainer(run_args).processing_class
    clients = run_args.federation.num_clients
    union = datasets.concatenate_datasets([client_train(run_args, tokenizer, i) for i in range(clients)])
    return train_and_score(
        run_args, union, clients * total_steps(run_args), work_dir / "centralized", args.test_per_skill
    )


def parts(args) -> dict:
    momentum = json.dumps(
        {"server_momentum": args.server_momentum, "server_learning_rate": args.server_learning_rate}
    )
    return {
        "pretrained": pretrained,
        "alone": alone,
        "fedavg": lambda a, f, w: federated(
            a, f, w, "fedavg", ["--strategy", "FedAvg", "--strategy_kwargs", "{}"]
        ),
        "fedavgm": lambda a, f, w: federated(
            a, f, w, "fedavgm", ["--strategy", "FedAvgM", "--strategy_kwargs", momentum]
        ),
        "centralized": centralized,
    }


def table(results: dict) -> str:
    """The markdown table of every row present, and the issue's checks when their rows are there."""
    from hf_flower.data.skills import SKILLS

    rows = []
    if "pretrained" in results:
        rows.append(("pretrained", results["pretrained"], "0"))
    for skill, client in results.get("alone", {}).get("clients", {}).items():
        rows.append((f"alone: {skill} client", client, str(client["examples_seen"])))
    if "alone" in results:
        rows.append(("alone: mean of the 6 clients", results["alone"]["mean_of_clients"], ""))
    for name, label in (
        ("fedavg", "federated, FedAvg"),
        ("fedavgm", "federated, FedAvgM"),
        ("centralized", "centralized (union)"),
    ):
        if name in results:
            rows.append((label, results[name], str(results[name]["examples_seen"])))
    lines = [
        "| model | " + " | ".join(SKILLS) + " | **mean** | examples seen |",
        "| --- |" + " --- |" * (len(SKILLS) + 2),
    ]
    for label, row, seen in rows:
        cells = [f"{row['per_skill'][s]:.1f}" for s in SKILLS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{row['mean']:.1f}** | {seen} |")
    lines += ["", *checks(results)]
    return "\n".join(lines) + "\n"


def checks(results: dict) -> list[str]:
    """The issue's targets for each federated row, met or not."""
    found = []
    for name in ("fedavg", "fedavgm"):
        if name not in results:
            continue
        mean = results[name]["mean"]
        targets = []
        if "pretrained" in results:
            base = results["pretrained"]["mean"]
            targets.append(
                (f">= pretrained + {ABOVE_PRETRAINED:g} ({base:.1f})", mean >= base + ABOVE_PRETRAINED)
            )
        if "alone" in results:
            solo = results["alone"]["mean_of_clients"]["mean"]
            targets.append((f"> mean of the clients alone ({solo:.1f})", mean > solo))
        if "centralized" in results:
            central = results["centralized"]["mean"]
            targets.append(
                (
                    f"within {WITHIN_CENTRALIZED:g} of centralized ({central:.1f})",
                    mean >= central - WITHIN_CENTRALIZED,
                )
            )
        for text, met in targets:
            found.append(f"- {name} mean {mean:.1f} {text}: {'met' if met else '**not met**'}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output",
        help="JSON results (default: benchmarks/results/sft_skills.json; --smoke: under --work_dir)",
    )
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench-sft-skills"))
    parser.add_argument(
        "--only", nargs="+", choices=["pretrained", "alone", "fedavg", "fedavgm", "centralized"]
    )
    parser.add_argument(
        "--test_per_skill", type=int, default=50, help="Held-out questions scored per skill (at most 100)."
    )
    parser.add_argument("--server_momentum", type=float, default=0.5, help="FedAvgM's server momentum.")
    parser.add_argument(
        "--server_learning_rate", type=float, default=3.0, help="FedAvgM's server learning rate."
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Everything at its smallest: checks the script, scores mean nothing.",
    )
    parser.add_argument(
        "--flags", default="", help="More flags for every run of the config, e.g. '--num_rounds 5'."
    )
    args = parser.parse_args(argv)

    flags = [*(SMOKE_FLAGS if args.smoke else ()), *args.flags.split()]
    if args.smoke:
        args.test_per_skill = SMOKE_TEST_PER_SKILL
        args.work_dir = str(Path(args.work_dir).with_name(Path(args.work_dir).name + "-smoke"))
    default_output = (
        Path(args.work_dir) / "sft_skills.json"
        if args.smoke
        else ROOT / "benchmarks" / "results" / "sft_skills.json"
    )
    output = Path(args.output) if args.output else default_output
    results = json.loads(output.read_text()) if output.is_file() else {}
    results["settings"] = {
        "config": CONFIG.name,
        "flags": flags,
        "test_per_skill": args.test_per_skill,
        "server_momentum": args.server_momentum,
        "server_learning_rate": args.server_learning_rate,
    }
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    work_dir = Path(args.work_dir)
    for name, part in parts(args).items():
        if args.only and name not in args.only:
            continue
        if name in results:
            print(f"{name}: already in {output}, skipped", flush=True)
            continue
        print(f"=== {name} (load {os.getloadavg()[0]:.2f})", flush=True)
        started = time.monotonic()
        results[name] = {
            **part(args, flags, work_dir),
            "part_seconds": round(time.monotonic() - started, 1),
            "finished": datetime.now().isoformat(timespec="seconds"),
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
    markdown = table(results)
    output.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
