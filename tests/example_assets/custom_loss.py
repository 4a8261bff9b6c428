"""Tiny assets for `examples/custom_loss.py`: a tiny BERT classifier and balanced train/test CSVs of
synthetic reviews, which the example itself makes imbalanced (one positive for three negatives)."""

import pathlib

from conftest import build_tiny_model, write_reviews_csv


def build(folder: pathlib.Path) -> dict:
    model_dir = build_tiny_model(folder / "tiny-bert")
    # 128 balanced rows -> 64 negatives + 21 positives: about 42 training reviews per client of 2.
    train_csv = write_reviews_csv(folder / "train.csv", num_rows=128, seed=0)
    # 48 balanced rows -> 24 negatives + 8 positives: 32 for the server, 16 for each client.
    test_csv = write_reviews_csv(folder / "test.csv", num_rows=48, seed=1)
    return {
        "model_name_or_path": str(model_dir),
        "dataset": {"train": str(train_csv), "test": str(test_csv)},
        "negatives_per_positive": 3,
        "max_length": 32,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 2,
        "output_dir": str(folder / "outputs"),
    }
