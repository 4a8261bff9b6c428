"""huggingface_example: A Flower / Hugging Face app."""

# Copied from Flower's examples/quickstart-huggingface (adap/flower at
# fdef7afb1dca3030553be302366cfd285ed6632c) for benchmarks/vs_quickstart.py. Changes, and only these:
# - load_data: reads partition `partition_id` from `data_dir` with `load_from_disk` (rows written by
#   the harness: exactly hf-flower's partition, before its own eval hold-out) instead of
#   `FederatedDataset("stanfordnlp/imdb")`, which needs the Hub; hence the new `data_dir` argument
#   and no `fds` cache. Its own 80/20 `train_test_split(test_size=0.2, seed=42)` is kept.
# - truncation at max_length=128 in the tokenizer call (upstream truncates at the model_max_length 512
#   it sets) and batch size 16 (upstream 32): the settings of the hf-flower run it is compared with.
# - test_fn: `evaluate.load("accuracy")` fetches its script from the Hub; accuracy is counted here.

from typing import Any

import torch
from datasets import load_from_disk
from datasets.utils.logging import disable_progress_bar
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

disable_progress_bar()
MAX_LENGTH = 128  # upstream: truncation at model_max_length=512
BATCH_SIZE = 16  # upstream: 32


def load_data(
    partition_id: int, num_partitions: int, model_name: str, data_dir: str
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Load IMDB data (training and eval)"""
    # The harness wrote the `num_partitions` partitions with save_to_disk
    partition = load_from_disk(f"{data_dir}/partition-{partition_id}")
    # Divide data: 80% train, 20% test
    partition_train_test = partition.train_test_split(test_size=0.2, seed=42)

    tokenizer = AutoTokenizer.from_pretrained(model_name, model_max_length=512)

    def tokenize_function(examples):
        return tokenizer(
            examples["text"],
            truncation=True,
            max_length=MAX_LENGTH,
            add_special_tokens=True,
        )

    partition_train_test = partition_train_test.map(tokenize_function, batched=True)
    partition_train_test = partition_train_test.remove_columns("text")
    partition_train_test = partition_train_test.rename_column("label", "labels")

    data_collator = DataCollatorWithPadding(tokenizer=tokenizer)
    trainloader = DataLoader(
        partition_train_test["train"],
        shuffle=True,
        batch_size=BATCH_SIZE,
        collate_fn=data_collator,
    )

    testloader = DataLoader(partition_train_test["test"], batch_size=BATCH_SIZE, collate_fn=data_collator)

    return trainloader, testloader


def get_model(model_name):
    return AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)


def train_fn(net, trainloader, epochs, device) -> None:
    optimizer = AdamW(net.parameters(), lr=5e-5)
    net.train()
    for _ in range(epochs):
        for batch in trainloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = net(**batch)
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def test_fn(net, testloader, device) -> tuple[Any | float, Any]:
    correct = 0  # upstream: metric = load_metric("accuracy")
    loss = 0
    net.eval()
    for batch in testloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            outputs = net(**batch)
        logits = outputs.logits
        loss += outputs.loss.item()
        predictions = torch.argmax(logits, dim=-1)
        correct += (predictions == batch["labels"]).sum().item()
    loss /= len(testloader.dataset)
    accuracy = correct / len(testloader.dataset)
    return loss, accuracy
