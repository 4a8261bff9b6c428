"""Classification metrics for `Trainer(compute_metrics=...)`, computed locally with numpy.

`evaluate.load("accuracy")` downloads its metric script from the Hub, which fails offline, so the
two metrics every client and the server report are computed here in a few lines instead.
"""

import numpy as np
from transformers import EvalPrediction


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 of predicted class ids against true ones.

    Macro F1 averages the F1 of every class in `range(num_labels)`; a class with no true and no
    predicted example scores 0, as in scikit-learn's `f1_score(average="macro", zero_division=0)`.
    """
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels.")
    if labels.size == 0:
        return {"accuracy": float("nan"), "f1": float("nan")}
    f1_scores = []
    for label in range(num_labels):
        true_positives = np.sum((predictions == label) & (labels == label))
        denominator = np.sum(predictions == label) + np.sum(labels == label)
        f1_scores.append(2 * true_positives / denominator if denominator else 0.0)
    return {"accuracy": float(np.mean(predictions == labels)), "f1": float(np.mean(f1_scores))}


def make_compute_metrics(num_labels: int):
    """A `compute_metrics` for `Trainer` that turns logits into accuracy and macro F1."""

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = (
            eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        )
        return classification_metrics(np.argmax(logits, axis=-1), eval_pred.label_ids, num_labels)

    return compute_metrics
