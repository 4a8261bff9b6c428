"""Tiny assets for `examples/custom_loss.py`: a tiny BERT classifier with its word-level tokenizer, and
balanced train/test CSVs of short synthetic reviews, which the example itself makes imbalanced (one
positive for three negatives)."""

import csv
import pathlib
import random

from conftest import FILLER_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS, build_tiny_model


def build_fast_learning_bert(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """conftest's tiny BERT classifier and tokenizer, with one layer, one head, no dropout and larger
    initial weights (`initializer_range=0.2`).

    conftest's two-layer BERT (initializer_range=0.02) sits on a plateau for its first ~30 steps on
    these reviews; this one learns them within the 8 steps of a test's round.
    """
    return build_tiny_model(
        path,
        seed=seed,
        num_hidden_layers=1,
        num_attention_heads=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )


def write_short_reviews_csv(path: pathlib.Path, num_rows: int, seed: int) -> pathlib.Path:
    """A balanced CSV (text,label) of reviews of 0-3 filler words and 1-2 words of their sentiment.

    Shorter than conftest's reviews, so that the tiny BERT learns them in the few steps of a test's
    rounds (on the longer ones its loss stays flat for about 30 steps).
    """
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(num_rows):
            label = i % 2
            sentiment = POSITIVE_WORDS if label == 1 else NEGATIVE_WORDS
            words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(0, 3))]
            words += [rng.choice(sentiment) for _ in range(rng.randint(1, 2))]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


def build(folder: pathlib.Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = build_fast_learning_bert(folder / "tiny-bert")
    # 192 balanced rows -> 96 negatives + 32 positives: 64 training reviews (8 steps) per client of 2.
    train_csv = write_short_reviews_csv(folder / "train.csv", num_rows=192, seed=0)
    # 48 balanced rows -> 24 negatives + 8 positives: 32 for the server, 16 for each client.
    test_csv = write_short_reviews_csv(folder / "test.csv", num_rows=48, seed=1)
    return {
        "model_name_or_path": str(model_dir),
        "dataset": {"train": str(train_csv), "test": str(test_csv)},
        "negatives_per_positive": 3,
        "max_length": 32,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 2,
        "output_dir": str(folder / "outputs"),
    }
