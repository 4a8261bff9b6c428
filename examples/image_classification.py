"""Federated fine-tuning of a Vision Transformer for image classification with Flower and the Trainer.

Fine-tunes `google/vit-base-patch16-224-in21k` on the beans leaf-disease images
(`AI-Lab-Makerere/beans`, 3 classes), as transformers' `run_image_classification.py` and the
"Fine-tune ViT for image classification" blog post do, and reports accuracy and macro F1. Each
client trains on its share of the train split and evaluates on a held-out tenth of that share; the
server evaluates every round's model on the test split and saves it with its image processor.

    python examples/image_classification.py train
    python examples/image_classification.py simulate --num_clients 2 --num_rounds 2
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml examples/image_classification.py client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2

and `hf-flower server --trainer examples/image_classification.py:make_trainer --insecure` serves it.

Settings (`--trainer_config '{"key": value}'`, defaults in `DEFAULTS`):
    model_name_or_path: a checkpoint with an image processor. Its classification head is replaced by
        one for the data set's classes.
    dataset: a Hub image data set with `train` and `test` splits, or "sklearn-digits": scikit-learn's
        bundled handwritten digits (1,797 8x8 grey images, 10 classes), split 80/20 with `seed`.
    image_column, label_column: the PIL image and ClassLabel columns ("sklearn-digits" names them as
        beans does: image, labels).
    max_train_samples, max_eval_samples: keep only that many (shuffled) train / test images.
    learning_rate, num_train_epochs, per_device_train_batch_size: of the whole federated training.
    output_dir, seed.

Offline (no Hub) there is no pretrained vision model to download: train a small ViT from scratch on
the digits instead. Save one, randomly initialised, with its image processor (16x16 inputs, 4x4
patches):

    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128)
    ViTForImageClassification(config).save_pretrained("tiny-vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained("tiny-vit")

and point `model_name_or_path` at it. In 10 epochs (900 steps, a few minutes on two CPU cores) it
reaches about 95% test accuracy:

    python examples/image_classification.py train --trainer_config '{"model_name_or_path": "tiny-vit",
        "dataset": "sklearn-digits", "learning_rate": 1e-3, "num_train_epochs": 10}'
"""

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_flower

DEFAULTS = {
    "model_name_or_path": "google/vit-base-patch16-224-in21k",
    "dataset": "AI-Lab-Makerere/beans",
    "image_column": "image",
    "label_column": "labels",
    "max_train_samples": None,
    "max_eval_samples": None,
    "learning_rate": 2e-4,
    "num_train_epochs": 4,
    "per_device_train_batch_size": 16,
    "output_dir": "outputs/image_classification",
    "seed": 42,
}
# The share of a client's training data it holds out to evaluate the global model each round.
CLIENT_EVAL_FRACTION = 0.1


def load_digits_dataset(seed: int) -> DatasetDict:
    """scikit-learn's handwritten digits as an image data set like beans: RGB PIL images in `image`,
    a ClassLabel in `labels`, and a stratified `train`/`test` split."""
    digits = load_digits()
    # Pixels are ink intensities from 0 to 16: scale them to 8-bit grey (white digits on black), then
    # to RGB, the three channels the image processor expects.
    images = [
        PILImage.fromarray((image * 255 / 16).astype(np.uint8), mode="L").convert("RGB")
        for image in digits.images
    ]
    features = Features({"image": Image(), "labels": ClassLabel(names=[str(d) for d in digits.target_names])})
    dataset = Dataset.from_dict({"image": images, "labels": digits.target}, features=features)
    return dataset.train_test_split(test_size=0.2, seed=seed, stratify_by_column="labels")


def load_data(config: dict) -> DatasetDict:
    """The `train` and `test` splits of the configured data set, each cut to its maximum size."""
    if config["dataset"] == "sklearn-digits":
        dataset = load_digits_dataset(config["seed"])
    else:
        dataset = load_dataset(config["dataset"])
    for split, max_samples in (("train", config["max_train_samples"]), ("test", config["max_eval_samples"])):
        if max_samples is not None:
            dataset[split] = dataset[split].shuffle(seed=config["seed"]).select(range(max_samples))
    return DatasetDict(train=dataset["train"], test=dataset["test"])


def make_transform(image_processor, image_column: str, label_column: str):
    """A `with_transform` function that turns a batch of PIL images into the model's `pixel_values`
    when the Trainer reads it, so the data set keeps the compact images, not the tensors."""

    def transform(batch):
        inputs = image_processor([image.convert("RGB") for image in batch[image_column]], return_tensors="pt")
        inputs["labels"] = batch[label_column]
        return inputs

    return transform


def collate_fn(examples):
    """Stack the transformed examples into a batch of images and class ids."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def compute_metrics(eval_pred):
    """Accuracy and macro F1 of the highest-scoring class: what evaluate.load("accuracy") and
    evaluate.load("f1") with average="macro" compute, without the Hub."""
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def make_trainer(context: hf_flower.TrainerContext) -> Trainer:
    """A Trainer of the image classifier for this process: a client, the server or a local run."""
    config = {**DEFAULTS, **context.config}
    set_seed(config["seed"])
    image_column, label_column = config["image_column"], config["label_column"]

    dataset = load_data(config)
    # A client builds the server model's head (its classes, in its order) whichever classes its own
    # data holds, and numbers its labels the same way.
    label_names = list(context.label_names or dataset["train"].features[label_column].names)
    label2id = {name: i for i, name in enumerate(label_names)}
    if label_names != dataset["train"].features[label_column].names:
        dataset = dataset.align_labels_with_mapping(label2id, label_column)

    model = AutoModelForImageClassification.from_pretrained(
        config["model_name_or_path"],
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id=label2id,
        ignore_mismatched_sizes=True,  # replace the checkpoint's head (if any) with one for these classes
    )
    image_processor = AutoImageProcessor.from_pretrained(config["model_name_or_path"])
    transform = make_transform(image_processor, image_column, label_column)

    # The server evaluates on the test split and needs no training data; a local run trains on the
    # whole train split; a client trains on its share of it and evaluates on a held-out part.
    train_dataset, eval_dataset = None, dataset["test"]
    if context.is_client:
        split = context.partition(dataset["train"]).train_test_split(
            test_size=CLIENT_EVAL_FRACTION, seed=config["seed"]
        )
        train_dataset, eval_dataset = split["train"], split["test"]
    elif not context.is_server:
        train_dataset = dataset["train"]

    args = TrainingArguments(
        output_dir=config["output_dir"],
        learning_rate=config["learning_rate"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        per_device_eval_batch_size=32,
        num_train_epochs=config["num_train_epochs"],
        warmup_steps=0.1,  # a fraction: the first 10% of the steps
        weight_decay=0.01,
        logging_steps=10,
        remove_unused_columns=False,  # the transform reads the image column, which the model does not take
        report_to="none",
        seed=config["seed"],
    )
    return Trainer(
        model=model,
        args=args,
        data_collator=collate_fn,
        train_dataset=train_dataset.with_transform(transform) if train_dataset is not None else None,
        eval_dataset=eval_dataset.with_transform(transform),
        processing_class=image_processor,
        compute_metrics=compute_metrics,
    )


if __name__ == "__main__":
    hf_flower.main(make_trainer)
