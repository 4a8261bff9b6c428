"""Sequence classification: one label per text (or text pair), any `AutoModelForSequenceClassification`.

The classes are the run's, decided once by the server from its data set (`run_facts`) and sent with
every message, so a client whose own file holds only some classes still builds the same model.
Data preparation lives in `hf_flower.data`, the model in `hf_flower.modeling`, the metrics (accuracy,
macro F1) in `hf_flower.metrics`; this module says which of them a classification run uses.
"""

from __future__ import annotations

from typing import Any

from .. import data as data_lib
from ..constants import LABEL_NAMES_KEY, MAX_LABELS
from . import RunFacts, Task

# Flags of other tasks, refused here: they would be silently ignored otherwise.
CAUSAL_LM_FLAGS = ("prompt_column", "completion_column", "messages_column")


class TextClassification(Task):
    name = "text-classification"
    pipeline_tag = "text-classification"
    best_metric = "eval_accuracy"
    greater_is_better = True
    card_template = "model_card.md"
    card_metrics = ("accuracy", "f1")
    reported_metrics = ("eval_loss", "eval_accuracy", "eval_f1", "eval_runtime")

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

    def run_facts(self, run_args) -> RunFacts:
        return {LABEL_NAMES_KEY: data_lib.load_label_names(run_args.data)}

    def facts_from_message(self, config: dict[str, Any]) -> RunFacts:
        names = config.get(LABEL_NAMES_KEY)
        if names is None:
            raise ValueError(
                f"The server's message carries no {LABEL_NAMES_KEY!r}: it runs another version of "
                "hf-flower. Run one version on the server and the clients."
            )
        if (
            not isinstance(names, list)
            or not 2 <= len(names) <= MAX_LABELS
            or not all(isinstance(name, str) and name for name in names)
            or len(set(names)) != len(names)
        ):
            raise ValueError(
                f"The server sent {LABEL_NAMES_KEY!r} = {str(names)[:200]}: expected 2 to {MAX_LABELS} "
                "distinct, non-empty class names."
            )
        return {LABEL_NAMES_KEY: list(names)}

    def check_run(self, run_args, facts: RunFacts) -> None:
        from ..modeling import check_num_labels, check_trainable

        label_names = facts[LABEL_NAMES_KEY]
        check_num_labels(run_args.model, label_names)
        check_trainable(run_args.model, run_args.peft, len(label_names), self.auto_model_class())

    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def load_model(self, run_args, facts: RunFacts, on_client: bool = False):
        from ..modeling import load_model

        return load_model(run_args.model, facts[LABEL_NAMES_KEY], run_args.peft)

    def client_data(self, run_args, tokenizer, facts, partition_id, num_partitions):
        seed = run_args.training.seed
        return data_lib.client_data(run_args.data, tokenizer, partition_id, num_partitions, seed)

    def own_data(self, run_args, tokenizer, facts, path):
        seed = run_args.training.seed
        return data_lib.own_data(path, run_args.data, tokenizer, facts[LABEL_NAMES_KEY], seed)

    def partition_sizes(self, run_args) -> list[int]:
        federation = run_args.federation
        return data_lib.partition_sizes(run_args.data, federation.num_clients, run_args.training.seed)

    def central_test_set(self, run_args, tokenizer, facts):
        return data_lib.central_test_set(run_args.data, tokenizer, run_args.training.seed)

    def data_collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, facts: RunFacts):
        from .classification_metrics import make_compute_metrics

        return make_compute_metrics(len(facts[LABEL_NAMES_KEY]))

    def card_fields(self, run_args, facts: RunFacts) -> dict[str, Any]:
        return {"labels": facts[LABEL_NAMES_KEY]}


TASK = TextClassification()
