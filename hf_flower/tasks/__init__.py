"""What differs by task, behind one small interface: `Task`, one module per task.

A run names its task with `--task` (`ModelArguments.task`); `get_task(name)` returns the object
that the client, the server, the pre-flight checks and the model card ask for everything
task-specific: the model class, data preparation and collator, metrics, central evaluation and the
card. Nothing else branches on the task. Adding a task (token classification, seq2seq) is one new
module here defining `TASK`, and one line in `TASK_MODULES`.

This module imports nothing heavy: `arguments/` reads the task names from it without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, Trainer

    from ..arguments import RunArguments
    from ..data import ClientData

# --task name -> module of this package that defines `TASK`.
TASK_MODULES = {"text-classification": "text_classification", "causal-lm": "causal_lm"}
TASK_NAMES = tuple(TASK_MODULES)
DEFAULT_TASK = "text-classification"
# `--peft auto`: what each task trains by default (language models are fine-tuned with LoRA).
TASK_DEFAULT_PEFT = {"text-classification": "none", "causal-lm": "lora"}

# What the server decides once from its data and sends to every client with each message
# (`ConfigRecord`-safe: names to lists of strings), e.g. the classes of a classification run.
RunFacts = dict[str, list[str]]


class Task:
    """The interface of a task; each task module subclasses it once.

    Attributes:
        name: The `--task` value.
        pipeline_tag: The Hub's pipeline tag of a saved round (`pipeline(pipeline_tag, model=...)`).
        best_metric: The central metric that names a run's best round, and whether higher is better.
        card_template: The model card's template in `hf_flower/templates/`.
        card_metrics: The central metrics the card's metadata reports (`eval_` dropped).
        reported_metrics: The evaluation metrics a client sends the server.
        plotted_scores: The metrics metrics.png draws beside the loss.
    """

    name: str
    pipeline_tag: str
    best_metric: str = "eval_loss"
    greater_is_better: bool = False
    card_template: str
    reported_metrics: tuple[str, ...] = ("eval_loss", "eval_runtime")
    card_metrics: tuple[str, ...] = ()
    plotted_scores: tuple[str, ...] = ("eval_accuracy",)

    # --- Arguments and facts ------------------------------------------------------------------

    def check_args(self, run_args: RunArguments) -> None:
        """Refuse settings that belong to another task, naming the flag."""

    def run_facts(self, run_args: RunArguments) -> RunFacts:
        """What the server decides from its data set and every client must share."""
        return {}

    def facts_from_message(self, config: dict[str, Any]) -> RunFacts:
        """The facts in a server's message, checked: they shape the client's model."""
        return {}

    def check_run(self, run_args: RunArguments, facts: RunFacts) -> None:
        """Cheap pre-flight checks of model and data, before any Flower process starts."""

    # --- Model and data -----------------------------------------------------------------------

    def auto_model_class(self):
        """The transformers `AutoModelFor...` class that loads a full round folder."""
        raise NotImplementedError

    def load_model(self, run_args: RunArguments, facts: RunFacts, on_client: bool = False) -> PreTrainedModel:
        """The model to train, with `--peft`/`--freeze_modules` applied. `on_client`: the copy a
        client trains (quantized with `--load_in_4bit`); the server's stays full precision."""
        raise NotImplementedError

    def client_data(
        self, run_args: RunArguments, tokenizer, facts: RunFacts, partition_id: int, num_partitions: int
    ) -> ClientData:
        """Partition `partition_id` of the run's data set, tokenised: train and eval splits."""
        raise NotImplementedError

    def own_data(self, run_args: RunArguments, tokenizer, facts: RunFacts, path: str) -> ClientData:
        """A deployed client's own file or folder, tokenised: all of it, less its eval split."""
        raise NotImplementedError

    def partition_sizes(self, run_args: RunArguments) -> list[int]:
        """Examples per partition, without tokenising (the pre-flight check)."""
        raise NotImplementedError

    def central_test_set(self, run_args: RunArguments, tokenizer, facts: RunFacts) -> Dataset:
        """The server's tokenised test split, which no client trains on."""
        raise NotImplementedError

    def data_collator(self, tokenizer):
        raise NotImplementedError

    # --- Metrics ------------------------------------------------------------------------------

    def compute_metrics(self, facts: RunFacts):
        """`Trainer(compute_metrics=...)`, or None."""
        return None

    def evaluate(self, trainer: Trainer, dataset: Dataset, run_args: RunArguments) -> dict[str, float]:
        """Every `eval_*` metric of the model in `trainer` on `dataset` (client and server alike)."""
        metrics = trainer.evaluate(dataset)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def client_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The evaluation metrics a client reports to the server (no timings beyond the runtime)."""
        return {k: v for k, v in metrics.items() if k in self.reported_metrics}

    # --- Model card ---------------------------------------------------------------------------

    def card_fields(self, run_args: RunArguments, facts: RunFacts) -> dict[str, Any]:
        """Template fields of the model card that depend on the task."""
        return {}


def get_task(name: str) -> Task:
    """The `Task` named by `--task`."""
    if name not in TASK_MODULES:
        raise ValueError(f"Unknown task {name!r}; choose one of {list(TASK_MODULES)}.")
    return importlib.import_module(f"{__name__}.{TASK_MODULES[name]}").TASK
