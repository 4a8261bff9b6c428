"""Supervised fine-tuning (SFT) of a causal language model, LoRA by default (`--peft auto`).

`make_trainer` is the factory of `--task causal-lm`. Data: plain text, prompt/completion columns or
chat messages (`sft_data`), the loss on the completion (or the assistant's turns) by default.
Evaluation, on the server's test split and on each client's own eval split alike (`GeneratingTrainer.evaluate`
below): loss and perplexity, and, when the data has completions, the greedy answer to each held-out
prompt (`--eval_max_new_tokens` new tokens; at most `--max_generate_samples` prompts, the same ones
every round) scored by exact match of the stripped completion and, for label-like completions, by
label accuracy (the first label word in the answer) (`sft_metrics`).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers import Trainer, set_seed

from .. import data as data_lib
from ..arguments.precision import apply_precision
from ..context import TrainerContext
from ..modeling import load_causal_lm, load_causal_lm_config, load_tokenizer, skeleton
from . import Task, run_arguments, scratch_dir
from .sft_data import (
    check_sft_columns,
    check_sft_tokenizer,
    load_sft_splits,
    sft_columns,
    sft_format,
    with_chat_template,
)
from .sft_metrics import exact_match, generate_completions, generation_subset, label_accuracy, perplexity
from .sft_tokens import IGNORE_INDEX, drop_untrained, generation_prompts, sft_collator, tokenize_sft

# Columns of a tokenised eval set that feed generation, not the loss: removed before the loss.
PROMPT_IDS, REFERENCE = "prompt_ids", "reference"
GENERATION_COLUMNS = (PROMPT_IDS, REFERENCE)
# Settings of sequence classification, refused here rather than silently ignored.
CLASSIFICATION_FLAGS = ("text_pair_column", "num_labels")


class GeneratingTrainer(Trainer):
    """A `Trainer` whose evaluation also generates: perplexity, and exact match (and label accuracy)
    of the greedy answers to the eval set's prompts, when it has them (`with_generation_inputs`).
    The loss and perplexity cover the whole eval set; generation, the slow part, only a fixed subset
    of its prompts when `max_generate_samples` caps them (`sft_metrics.generation_subset`).

    Args:
        max_new_tokens: Tokens generated per held-out prompt (`--eval_max_new_tokens`).
        max_generate_samples: Prompts generated from per evaluation (`--max_generate_samples`):
            None for all of them, 0 for none (no exact match is reported).
    """

    def __init__(self, *args, max_new_tokens: int = 16, max_generate_samples: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens
        self.max_generate_samples = max_generate_samples

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss, with the vocabulary-sized logits computed only where the loss reads
        them (`labelled_logits`): SFT trains a short completion after a long prompt, and the logits
        of every position (8 x 192 x 49152 floats for the quickstart's batch, upcast to float32 in
        the loss) were most of a step's memory. Where the logits are needed whole (a label smoother,
        `compute_loss_func`, `compute_metrics`) or the model cannot skip them, nothing changes."""
        whole_logits_needed = self.label_smoother or self.compute_loss_func or self.compute_metrics
        if (
            not whole_logits_needed
            and "labels" in inputs
            and skips_logits(self.accelerator.unwrap_model(model))
        ):
            inputs = {**inputs, **labelled_logits(inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        generation = [c for c in GENERATION_COLUMNS if c in dataset.column_names]
        metrics = super().evaluate(dataset.remove_columns(generation), ignore_keys, metric_key_prefix)
        metrics[f"{metric_key_prefix}_perplexity"] = perplexity(metrics[f"{metric_key_prefix}_loss"])
        if len(generation) == len(GENERATION_COLUMNS) and len(dataset) and self.max_generate_samples != 0:
            dataset = dataset.select(generation_subset(len(dataset), self.max_generate_samples))
            references = dataset[REFERENCE]
            with self.accelerator.autocast():  # the run's mixed precision (--bf16), as in evaluate
                answers = generate_completions(
                    self.model,
                    self.processing_class,
                    dataset[PROMPT_IDS],
                    self.max_new_tokens,
                    batch_size=self.args.per_device_eval_batch_size,
                )
            metrics[f"{metric_key_prefix}_exact_match"] = exact_match(answers, references)
            accuracy = label_accuracy(answers, references)
            if accuracy is not None:
                metrics[f"{metric_key_prefix}_label_accuracy"] = accuracy
        return metrics


def skips_logits(model) -> bool:
    """Whether `model` (or the base of a PEFT model) takes `logits_to_keep` and computes its loss
    with transformers' causal-LM loss, which takes the labels of the kept logits (`shift_labels`)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepts = "logits_to_keep" in inspect.signature(base.forward).parameters
    return accepts and getattr(base, "loss_function", None) is ForCausalLMLoss


def labelled_logits(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs that keep the logits of the positions whose next token has a label, the same
    positions in every row (`logits_to_keep`), and the labels those logits predict (`shift_labels`:
    -100 where a row has none). The loss is the same as with every position's logits; none are
    dropped when no position has a label."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if not len(positions):
        return {}
    return {"logits_to_keep": positions, "shift_labels": targets[:, positions]}


def make_trainer(context: TrainerContext) -> Trainer:
    """The Trainer of a causal-LM SFT run, for the server or one client (a client's base model is
    quantized with `--load_in_4bit`; the server's stays full precision)."""
    run_args = run_arguments(context)
    tokenizer = with_chat_template(load_tokenizer(run_args.model), run_args.data)
    set_seed(run_args.training.seed)  # the adapters' initial weights, the same in every run
    model = load_causal_lm(
        run_args.model, run_args.peft, quantize=context.is_client, training_args=run_args.training
    )
    if context.is_server:
        train, evaluation = None, central_test_set(run_args, tokenizer)
    else:
        train, evaluation = client_datasets(
            run_args, tokenizer, context.partition_id, context.num_partitions, context.data_path
        )
    return GeneratingTrainer(
        model=model,
        args=apply_precision(
            dataclasses.replace(run_args.training, output_dir=scratch_dir()), run_args.model.precision
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=sft_collator(tokenizer),
        processing_class=tokenizer,
        max_new_tokens=run_args.data.eval_max_new_tokens,
        max_generate_samples=run_args.data.max_generate_samples,
    )


def client_datasets(run_args, tokenizer, partition_id=None, num_partitions=None, data_path=None):
    """A client's tokenised train split and its eval split (with the generation inputs): its own file
    (`data_path`) less its eval rows, or partition `partition_id` of the run's data set. Rows that
    truncation left nothing to train on are dropped from both (`drop_untrained` logs how many)."""
    data_args, seed = run_args.data, run_args.training.seed
    if data_path is not None:
        rows, eval_rows, train_rows = data_lib.own_rows(data_path, data_args, seed, check_sft_columns)
    else:
        splits, eval_rows, train_rows = data_lib.client_rows(
            data_args, partition_id, num_partitions, seed, check_sft_columns
        )
        rows = splits.pool
    tokenized = tokenize_sft(rows, tokenizer, data_args)
    evaluation = with_generation_inputs(
        tokenized.select(eval_rows), rows.select(eval_rows), tokenizer, run_args
    )
    train, _ = drop_untrained(tokenized.select(train_rows), "training rows")
    evaluation, _ = drop_untrained(evaluation, "eval rows")
    return train, evaluation


def central_test_set(run_args, tokenizer):
    """The server's tokenised test split, with the generation inputs, less the rows that truncation
    left nothing to train on (`drop_untrained`)."""
    splits = data_lib.prepare_splits(run_args.data, run_args.training.seed, check_sft_columns)
    test = with_generation_inputs(
        tokenize_sft(splits.test, tokenizer, run_args.data), splits.test, tokenizer, run_args
    )
    return drop_untrained(test, "test rows")[0]


def with_generation_inputs(tokenized, rows, tokenizer, run_args):
    """`tokenized` with, when the rows have completions, each row's prompt tokens and reference
    completion: what evaluation generates from and scores against."""
    if sft_format(run_args.data) == "text" or not len(rows):
        return tokenized
    prompts, references = generation_prompts(rows, tokenizer, run_args.data)
    return tokenized.add_column(PROMPT_IDS, prompts).add_column(REFERENCE, references)


class CausalLM(Task):
    name = "causal-lm"

    def check_args(self, run_args) -> None:
        for flag in CLASSIFICATION_FLAGS:
            if getattr(run_args.data, flag, None) or getattr(run_args.model, flag, None):
                raise ValueError(
                    f"--{flag} is a text-classification setting; this run's task is causal-lm. Drop it, "
                    "or use --task text-classification."
                )
        if run_args.data.partitioner != "iid" and not run_args.data.partition_column:
            raise ValueError(
                f"--partitioner {run_args.data.partitioner} splits examples by label, and causal-lm "
                "examples have none. Name the column to split by with --partition_column (`skill` of "
                "offline-basic-skills), use --partitioner iid, or give each client its own --data_path."
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
        if run_args.data.max_generate_samples < 0:
            raise ValueError(
                f"--max_generate_samples must be 0 (no generation) or more, got {run_args.data.max_generate_samples}."
            )
        sft_format(run_args.data)

    def data_columns(self, data_args) -> dict[str, str]:
        return {flag.removeprefix("--"): column for flag, column in sft_columns(data_args).items()}

    def check_run(self, run_args, label_names) -> None:
        load_causal_lm_config(run_args.model)
        self.skeleton(run_args, label_names)
        train, _ = load_sft_splits(run_args.data)
        tokenizer = with_chat_template(load_tokenizer(run_args.model), run_args.data)
        check_sft_tokenizer(tokenizer, train, run_args.data)

    def skeleton(self, run_args, label_names):
        from transformers import AutoModelForCausalLM

        return skeleton(run_args.model, run_args.peft, AutoModelForCausalLM, peft_task_type="CAUSAL_LM")

    def partition_sizes(self, run_args) -> list[int]:
        federation, seed = run_args.federation, run_args.training.seed
        return data_lib.partition_sizes(run_args.data, federation.num_clients, seed, check_sft_columns)


TASK = CausalLM()
