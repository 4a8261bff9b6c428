"""Supervised fine-tuning (SFT) of a causal language model, LoRA by default (`--peft auto`).

Data: plain text, prompt/completion columns or chat messages (`sft_data`), the loss on the
completion (or the assistant's turns) by default. Evaluation, on the server's test split and on
each client's own eval split alike: loss and perplexity, and, when the data has completions, the
greedy answer to each held-out prompt (`--eval_max_new_tokens` new tokens) scored by exact match of
the stripped completion and, for label-like completions, by label accuracy (the first label word in
the answer) (`sft_metrics`). Nothing is decided by the server beyond the run config: no run facts.
"""

from __future__ import annotations

from typing import Any

from .. import data as data_lib
from . import RunFacts, Task
from .sft_data import check_sft_columns, sft_format
from .sft_metrics import (
    exact_match,
    generate_completions,
    label_accuracy,
    perplexity,
)
from .sft_tokens import generation_prompts, sft_collator, tokenize_sft

# Columns of a tokenised eval set that feed generation, not the loss: removed before `evaluate`.
PROMPT_IDS, REFERENCE = "prompt_ids", "reference"
GENERATION_COLUMNS = (PROMPT_IDS, REFERENCE)
# Settings of sequence classification, refused here rather than silently ignored.
CLASSIFICATION_FLAGS = ("text_pair_column", "num_labels")


class CausalLM(Task):
    name = "causal-lm"
    pipeline_tag = "text-generation"
    best_metric = "eval_loss"
    greater_is_better = False
    card_template = "model_card_causal_lm.md"
    card_metrics = ("exact_match", "label_accuracy", "perplexity")
    plotted_scores = ("eval_exact_match", "eval_label_accuracy")
    reported_metrics = (
        "eval_loss",
        "eval_perplexity",
        "eval_exact_match",
        "eval_label_accuracy",
        "eval_runtime",
    )

    def check_args(self, run_args) -> None:
        for flag in CLASSIFICATION_FLAGS:
            if getattr(run_args.data, flag, None) or getattr(run_args.model, flag, None):
                raise ValueError(
                    f"--{flag} is a text-classification setting; this run's task is causal-lm. Drop it, "
                    "or use --task text-classification."
                )
        if run_args.data.partitioner != "iid":
            raise ValueError(
                f"--partitioner {run_args.data.partitioner} splits examples by label, and causal-lm "
                "examples have none. Use --partitioner iid, or give each client its own --data_path."
            )
        if run_args.model.load_in_4bit and run_args.peft.peft != "lora":
            raise ValueError(
                "--load_in_4bit trains LoRA adapters on a frozen 4-bit base (QLoRA); 4-bit weights "
                f"cannot be fine-tuned themselves. Use --peft lora (or auto), not --peft {run_args.peft.peft}."
            )
        if run_args.data.eval_max_new_tokens < 1:
            raise ValueError(
                f"--eval_max_new_tokens must be at least 1, got {run_args.data.eval_max_new_tokens}."
            )
        sft_format(run_args.data)

    def check_run(self, run_args, facts: RunFacts) -> None:
        from ..modeling import check_trainable, load_causal_lm_config, load_tokenizer
        from .sft_data import check_sft_tokenizer, load_sft_splits

        load_causal_lm_config(run_args.model)
        check_trainable(run_args.model, run_args.peft, 0, self.auto_model_class())
        train, _ = load_sft_splits(run_args.data)
        check_sft_tokenizer(load_tokenizer(run_args.model), train, run_args.data)

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, run_args, facts: RunFacts, on_client: bool = False):
        from ..modeling import load_causal_lm

        return load_causal_lm(run_args.model, run_args.peft, quantize=on_client)

    def client_data(self, run_args, tokenizer, facts, partition_id, num_partitions):
        splits, eval_rows, train_rows = data_lib.client_rows(
            run_args.data, partition_id, num_partitions, run_args.training.seed, check_sft_columns
        )
        return self._client_data(splits.pool, train_rows, eval_rows, run_args, tokenizer)

    def own_data(self, run_args, tokenizer, facts, path):
        rows, eval_rows, train_rows = data_lib.own_rows(
            path, run_args.data, run_args.training.seed, check_sft_columns
        )
        return self._client_data(rows, train_rows, eval_rows, run_args, tokenizer)

    def _client_data(self, rows, train_rows, eval_rows, run_args, tokenizer) -> data_lib.ClientData:
        tokenized = tokenize_sft(rows, tokenizer, run_args.data)
        evaluation = with_generation_inputs(
            tokenized.select(eval_rows), rows.select(eval_rows), tokenizer, run_args
        )
        return data_lib.ClientData(train=tokenized.select(train_rows), eval=evaluation)

    def partition_sizes(self, run_args) -> list[int]:
        federation, seed = run_args.federation, run_args.training.seed
        return data_lib.partition_sizes(run_args.data, federation.num_clients, seed, check_sft_columns)

    def central_test_set(self, run_args, tokenizer, facts):
        splits = data_lib.prepare_splits(run_args.data, run_args.training.seed, check_sft_columns)
        return with_generation_inputs(
            tokenize_sft(splits.test, tokenizer, run_args.data), splits.test, tokenizer, run_args
        )

    def data_collator(self, tokenizer):
        return sft_collator(tokenizer)

    def evaluate(self, trainer, dataset, run_args) -> dict[str, float]:
        generation = [c for c in GENERATION_COLUMNS if c in dataset.column_names]
        metrics = super().evaluate(trainer, dataset.remove_columns(generation), run_args)
        metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
        if len(generation) == len(GENERATION_COLUMNS) and len(dataset):
            references = dataset[REFERENCE]
            with trainer.accelerator.autocast():  # the run's mixed precision (--bf16), as in evaluate
                answers = generate_completions(
                    trainer.model,
                    trainer.processing_class,
                    dataset[PROMPT_IDS],
                    run_args.data.eval_max_new_tokens,
                    batch_size=trainer.args.per_device_eval_batch_size,
                )
            metrics["eval_exact_match"] = exact_match(answers, references)
            accuracy = label_accuracy(answers, references)
            if accuracy is not None:
                metrics["eval_label_accuracy"] = accuracy
        return metrics

    def card_fields(self, run_args, facts: RunFacts) -> dict[str, Any]:
        return {"sft_format": sft_format(run_args.data)}


def with_generation_inputs(tokenized, rows, tokenizer, run_args):
    """`tokenized` with, when the rows have completions, each row's prompt tokens and reference
    completion: what evaluation generates from and scores against."""
    if sft_format(run_args.data) == "text" or not len(rows):
        return tokenized
    prompts, references = generation_prompts(rows, tokenizer, run_args.data)
    return tokenized.add_column(PROMPT_IDS, prompts).add_column(REFERENCE, references)


TASK = CausalLM()
