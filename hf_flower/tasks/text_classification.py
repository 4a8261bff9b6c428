"""Sequence classification: one label per text (or text pair), any `AutoModelForSequenceClassification`.

`make_trainer` is the factory of `--task text-classification`: a `Trainer` with the model of
`--model_name_or_path`, the tokenised data of `--dataset` (this client's partition or own file; the
server's test split) and accuracy and macro F1. The classes are the run's, read by the server from
its data set and sent with every message (the server model's `id2label`), so a client whose own file
holds only some classes still builds the same model. Data preparation lives in `hf_flower.data`, the
model in `hf_flower.modeling`, the metrics in `classification_metrics`.
"""

from __future__ import annotations

import dataclasses

from transformers import DataCollatorWithPadding, Trainer, set_seed

from .. import data as data_lib
from ..arguments.precision import apply_precision
from ..context import TrainerContext
from ..modeling import check_num_labels, load_model, load_tokenizer, skeleton
from . import Task, run_arguments, scratch_dir
from .classification_metrics import make_compute_metrics

# Flags of other tasks, refused here: they would be silently ignored otherwise.
CAUSAL_LM_FLAGS = ("prompt_column", "completion_column", "messages_column")
# The central metric that names a run's best round, unless --metric_for_best_model says otherwise.
BEST_METRIC = "accuracy"


def make_trainer(context: TrainerContext) -> Trainer:
    """The Trainer of a text-classification run, for the server or one client."""
    run_args = run_arguments(context)
    if context.data_path is not None and not context.label_names:
        raise ValueError(
            "The server's message carries no class names ('label-names'), and a client's own file may "
            "hold only some of the run's classes. Run one version of hf-flower on server and clients."
        )
    label_names = list(context.label_names or []) or data_lib.load_label_names(run_args.data)
    set_seed(run_args.training.seed)  # the new head's initial weights, the same in every run
    tokenizer = load_tokenizer(run_args.model)
    model = load_model(run_args.model, label_names, run_args.peft)
    seed = run_args.training.seed
    if context.is_server:
        train, evaluation = None, data_lib.central_test_set(run_args.data, tokenizer, seed)
    elif context.data_path is not None:
        own = data_lib.own_data(context.data_path, run_args.data, tokenizer, label_names, seed)
        train, evaluation = own.train, own.eval
    else:
        client = data_lib.client_data(
            run_args.data, tokenizer, context.partition_id, context.num_partitions, seed
        )
        train, evaluation = client.train, client.eval
    training = run_args.training
    args = dataclasses.replace(
        training,
        output_dir=scratch_dir(),
        metric_for_best_model=training.metric_for_best_model or BEST_METRIC,
    )
    args = apply_precision(args, run_args.model.precision)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(len(label_names)),
    )
    # A sequence classifier's loss is a per-batch mean that ignores `num_items_in_batch`; left True,
    # Trainer multiplies it by the number of ranks (2x the loss under 2-rank DDP).
    trainer.model_accepts_loss_kwargs = False
    return trainer


class TextClassification(Task):
    name = "text-classification"

    def check_args(self, run_args) -> None:
        for flag in CAUSAL_LM_FLAGS:
            if getattr(run_args.data, flag):
                raise ValueError(
                    f"--{flag} is a causal-lm setting; this run's task is text-classification. Drop it, "
                    "or add --task causal-lm."
                )
        if run_args.model.load_in_4bit:
            raise ValueError(
                "--load_in_4bit (QLoRA) is a causal-lm setting; this run's task is text-classification, "
                "whose models are small enough to train in full precision. Drop --load_in_4bit."
            )

    def data_columns(self, data_args) -> dict[str, str]:
        names = ("text_column", "text_pair_column", "label_column")
        return {name: getattr(data_args, name) for name in names if getattr(data_args, name) is not None}

    def label_names(self, run_args) -> list[str]:
        return data_lib.load_label_names(run_args.data)

    def check_run(self, run_args, label_names) -> None:
        check_num_labels(run_args.model, label_names)
        self.skeleton(run_args, label_names)

    def skeleton(self, run_args, label_names):
        from transformers import AutoModelForSequenceClassification

        return skeleton(run_args.model, run_args.peft, AutoModelForSequenceClassification, label_names)

    def partition_sizes(self, run_args) -> list[int]:
        federation = run_args.federation
        return data_lib.partition_sizes(run_args.data, federation.num_clients, run_args.training.seed)


TASK = TextClassification()
