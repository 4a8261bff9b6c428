"""Accuracy and macro F1 computed offline, checked on cases worked out by hand."""

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_flower.tasks.classification_metrics import classification_metrics, make_compute_metrics


def test_accuracy_and_macro_f1():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2])
    metrics = classification_metrics(predictions, labels, num_labels=3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: 0 -> 0.5, 1 -> 2/3, 2 -> 1.0
    assert metrics["f1"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_class_never_seen_scores_zero():
    metrics = classification_metrics(np.array([0, 0]), np.array([0, 0]), num_labels=2)
    assert metrics == {"accuracy": 1.0, "f1": 0.5}


def test_compute_metrics_takes_logits():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [1.0, 0.0]])
    metrics = make_compute_metrics(2)(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1])))
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        classification_metrics(np.array([0, 1]), np.array([0, 1, 1]), num_labels=2)
