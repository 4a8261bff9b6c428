"""Argument groups and their YAML + command-line parser.

Every setting lives in one `@dataclass` field, one module per group. Scripts parse them with `HfFlowerParser`
(YAML via `--config`, command-line flags override it); the ServerApp and ClientApp rebuild the
same objects from Flower's run config (`hf_flower.run_config`), so `flwr run .` with
`[tool.flwr.app.config]` and `scripts/simulate.py` are two doors to one configuration.
`transformers.TrainingArguments` is passed through untouched to every client's `Trainer`.
"""

from __future__ import annotations

from .adapter import PEFT_METHODS, PeftArguments
from .data import (
    OFFLINE_CHAT_DATASET,
    OFFLINE_DATASET,
    OFFLINE_SKILLS_DATASET,
    PARTITIONERS,
    DataArguments,
)
from .federation import (
    DEFAULT_OUTPUT_DIR,
    SCHEDULE_SCOPES,
    TRANSFER_DTYPE_NAMES,
    FederationArguments,
    parse_json_object,
    parse_trainer_config,
)
from .hub import (
    HUB_STRATEGIES,
    HUB_TRAINING_FIELDS,
    SECRET_TRAINING_FIELDS,
    HubArguments,
)
from .model import OFFLINE_MODEL, ModelArguments, split_names
from .parser import (
    ARGUMENT_GROUPS,
    NOT_TRAINING_FLAGS,
    RUN_GROUPS,
    TASK_GROUPS,
    HfFlowerParser,
    RunArguments,
    finalize,
    groups_from_dict,
    load_yaml_config,
    parse_args,
)

__all__ = [
    "ARGUMENT_GROUPS",
    "DEFAULT_OUTPUT_DIR",
    "NOT_TRAINING_FLAGS",
    "RUN_GROUPS",
    "TASK_GROUPS",
    "DataArguments",
    "FederationArguments",
    "HUB_STRATEGIES",
    "HUB_TRAINING_FIELDS",
    "HfFlowerParser",
    "HubArguments",
    "ModelArguments",
    "OFFLINE_CHAT_DATASET",
    "OFFLINE_DATASET",
    "OFFLINE_MODEL",
    "OFFLINE_SKILLS_DATASET",
    "PARTITIONERS",
    "PEFT_METHODS",
    "PeftArguments",
    "RunArguments",
    "SCHEDULE_SCOPES",
    "SECRET_TRAINING_FIELDS",
    "TRANSFER_DTYPE_NAMES",
    "finalize",
    "groups_from_dict",
    "load_yaml_config",
    "parse_args",
    "parse_json_object",
    "parse_trainer_config",
    "split_names",
]
