"""Federated fine-tuning of a sequence-to-sequence model for summarisation, with `Seq2SeqTrainer`.

Fine-tunes T5 (`google-t5/t5-small`) on CNN/DailyMail news articles and their highlights, as
transformers' `examples/pytorch/summarization/run_summarization.py` does, with the data split between
Flower clients. Evaluation generates summaries (`predict_with_generate`) and reports ROUGE-1, ROUGE-2,
ROUGE-L and ROUGE-Lsum (F-measure, x100, computed with the `rouge_score` package) and `gen_len`, the
mean length of the generated summaries in tokens.

    python examples/seq2seq.py train
    python examples/seq2seq.py simulate --num_clients 2 --num_rounds 2
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml examples/seq2seq.py client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2

and `hf-flower server --trainer examples/seq2seq.py:make_trainer --insecure` serves it.

Each client trains on its share of the train split and evaluates on its share of the validation
split; the server evaluates the aggregated model on the test split.

Settings (`context.config`, defaults in `DEFAULTS`):
    model_name_or_path: a seq2seq model on the Hub or a local folder.
    dataset, dataset_config: a data set on the Hub (and its configuration), or a local folder of
        `train`, `validation` and `test` files (JSON lines, CSV, ...).
    text_column, summary_column: the columns holding the documents and their reference summaries.
    source_prefix: prepended to every document; T5 was pre-trained with task prefixes, so keep
        "summarize: " for T5 and set "" for other models (BART, Pegasus, ...).
    max_source_length, max_target_length: token limits of documents and summaries (generated
        summaries stop at max_target_length too).
    max_eval_samples: at most this many examples per evaluation, as generation is slow (None: all).
    learning_rate, num_train_epochs, per_device_train_batch_size: of the whole federated training.
    output_dir: where the Trainer writes.

No sequence-to-sequence model is packaged for use without the Hub: offline, pass a model folder you
have (`model_name_or_path`) and local `train`/`validation`/`test` JSON Lines (`dataset`), as
`tests/example_assets/seq2seq.py` does with a tiny T5.
"""

import re

import numpy as np
from datasets import load_dataset
from rouge_score import rouge_scorer
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

import hf_flower

DEFAULTS = {
    "model_name_or_path": "google-t5/t5-small",
    "dataset": "abisee/cnn_dailymail",
    "dataset_config": "3.0.0",
    "text_column": "article",
    "summary_column": "highlights",
    "source_prefix": "summarize: ",
    "max_source_length": 512,
    "max_target_length": 128,
    "max_eval_samples": 1000,
    "learning_rate": 3e-4,  # the T5 docs advise 1e-4 to 3e-4 for fine-tuning T5 with AdamW
    "num_train_epochs": 1,
    "per_device_train_batch_size": 16,
    "output_dir": "outputs/seq2seq",
}
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def preprocess(examples, tokenizer, config):
    """Tokenise the prefixed documents as inputs and their summaries as labels."""
    inputs = [config["source_prefix"] + document for document in examples[config["text_column"]]]
    model_inputs = tokenizer(inputs, max_length=config["max_source_length"], truncation=True)
    labels = tokenizer(
        text_target=examples[config["summary_column"]],
        max_length=config["max_target_length"],
        truncation=True,
    )
    model_inputs["labels"] = labels["input_ids"]
    return model_inputs


def load_splits(context, tokenizer, config):
    """The tokenised train and evaluation data this caller needs.

    A client trains on its partition of the train split and evaluates on its partition of the
    validation split; the server (and a local run) evaluates on the test split, and the server
    trains on nothing.
    """
    raw = load_dataset(config["dataset"], config["dataset_config"])

    def tokenize(dataset):
        return dataset.map(
            preprocess,
            batched=True,
            remove_columns=dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer, "config": config},
        )

    train_dataset = None if context.is_server else tokenize(context.partition(raw["train"]))
    eval_dataset = context.partition(raw["validation"]) if context.is_client else raw["test"]
    if config["max_eval_samples"] is not None:
        eval_dataset = eval_dataset.select(range(min(config["max_eval_samples"], len(eval_dataset))))
    return train_dataset, tokenize(eval_dataset)


def split_sentences(text):
    """One sentence a line: rougeLsum scores sentence by sentence, split at newlines.

    Decoding loses the references' newlines, so put them back after each full stop, as
    run_summarization does with nltk.sent_tokenize (which needs a download of nltk's punkt data).
    """
    return "\n".join(re.split(r"(?<=[.!?])\s+", text.strip()))


def build_compute_metrics(tokenizer):
    """ROUGE of the generated summaries against the references, and their mean length."""
    # What evaluate.load("rouge") computes, without the Hub: rouge_score's F-measures with stemming.
    # evaluate reports the bootstrap median of their mean (BootstrapAggregator's "mid"); we report
    # the plain mean, which is the same up to the bootstrap's noise, and deterministic.
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=True)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        if isinstance(preds, tuple):
            preds = preds[0]
        # The Trainer pads predictions and labels of different batches with -100: not a token id.
        preds = np.where(preds != -100, preds, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        decoded_preds = tokenizer.batch_decode(preds, skip_special_tokens=True)
        decoded_labels = tokenizer.batch_decode(labels, skip_special_tokens=True)
        scores = [
            scorer.score(split_sentences(label), split_sentences(pred))
            for label, pred in zip(decoded_labels, decoded_preds)
        ]
        metrics = {
            key: 100 * float(np.mean([score[key].fmeasure for score in scores])) for key in ROUGE_TYPES
        }
        metrics["gen_len"] = float(np.mean(np.count_nonzero(preds != tokenizer.pad_token_id, axis=-1)))
        return metrics

    return compute_metrics


def make_trainer(context: hf_flower.TrainerContext) -> Seq2SeqTrainer:
    config = {**DEFAULTS, **context.config}
    tokenizer = AutoTokenizer.from_pretrained(config["model_name_or_path"])
    model = AutoModelForSeq2SeqLM.from_pretrained(config["model_name_or_path"])
    train_dataset, eval_dataset = load_splits(context, tokenizer, config)

    args = Seq2SeqTrainingArguments(
        output_dir=config["output_dir"],
        learning_rate=config["learning_rate"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        per_device_eval_batch_size=config["per_device_train_batch_size"],
        num_train_epochs=config["num_train_epochs"],
        weight_decay=0.01,
        predict_with_generate=True,  # evaluate what the model writes, not teacher-forced loss only
        generation_max_length=config["max_target_length"],
        logging_steps=10,
        report_to="none",
        seed=42,
    )
    return Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        # Pads inputs and labels per batch (labels with -100) and makes the decoder inputs.
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=build_compute_metrics(tokenizer),
    )


if __name__ == "__main__":
    hf_flower.main(make_trainer)
