"""Flower's run config <-> the argument groups: flat TOML scalars under `group.kebab-name` keys.

`to_run_config` flattens a parsed run for `flwr run` and the simulation; the ServerApp and every
ClientApp rebuild the same objects with `from_run_config`, so `[tool.flwr.app.config]` and
`scripts/simulate.py` are two doors to one configuration.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from collections.abc import Callable
from typing import Any

from transformers import TrainingArguments

from . import (
    DataArguments,
    FederationArguments,
    HubArguments,
    ModelArguments,
    PeftArguments,
    RunArguments,
)
from .parser import NOT_TRAINING_FLAGS

# TrainingArguments that get their own run-config key (`training.<kebab-name>`), so they can be
# set with `flwr run . --run-config`. Any other field travels in `training.extra` as JSON. Clients
# follow only the fields of `policy.SERVER_SETTABLE_TRAINING_FIELDS`.
RUN_CONFIG_TRAINING_FIELDS = (
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "max_steps",
    "seed",
    "bf16",
    "fp16",
    "logging_steps",
    "report_to",
)
RUN_CONFIG_PREFIXES = {
    ModelArguments: "model",
    DataArguments: "data",
    FederationArguments: "federation",
    PeftArguments: "adapter",
    HubArguments: "hub",
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _encode(value: Any) -> bool | int | float | str:
    """A run-config value: TOML scalars only, `None` as "" and containers as JSON."""
    if value is None:
        return ""
    if isinstance(value, enum.Enum):  # SchedulerType, SaveStrategy, ...: str enums, plain str here
        return value.value
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def _decode(value: Any, annotation: Any) -> Any:
    """Undo `_encode` for a field of type `annotation`."""
    options = [typing.get_origin(o) or o for o in typing.get_args(annotation) or (annotation,)]
    if value == "" and type(None) in options:
        return None
    if isinstance(value, str) and value and (dict in options or list in options):
        return json.loads(value)
    return value


def training_overrides(training: TrainingArguments) -> dict[str, Any]:
    """The TrainingArguments fields that differ from their defaults, as JSON-able values (never
    `output_dir`: a client's Trainer writes no checkpoints; the server's rounds go to
    `FederationArguments.output_dir`)."""
    defaults = TrainingArguments(output_dir=training.output_dir).to_dict()
    current = training.to_dict()
    return {
        name: value
        for name, value in current.items()
        if value != defaults.get(name) and name not in NOT_TRAINING_FLAGS and not name.startswith("_")
    }


def groups_to_run_config(*groups) -> dict[str, bool | int | float | str]:
    """Flatten argument groups (`FederationArguments`, `HubArguments`, ...) into Flower's run config
    (`group.kebab-name = value`)."""
    config: dict[str, Any] = {}
    for group in groups:
        prefix = RUN_CONFIG_PREFIXES[type(group)]
        for f in dataclasses.fields(group):
            config[f"{prefix}.{_kebab(f.name)}"] = _encode(getattr(group, f.name))
    return config


def to_run_config(run_args: RunArguments) -> dict[str, bool | int | float | str]:
    """Flatten all groups of a built-in task's run into Flower's run config."""
    config = groups_to_run_config(
        run_args.model, run_args.data, run_args.federation, run_args.peft, run_args.hub
    )
    overrides = training_overrides(run_args.training)
    for name in RUN_CONFIG_TRAINING_FIELDS:
        value = overrides.pop(name, None)
        if value is None:
            value = getattr(run_args.training, name)
        config[f"training.{_kebab(name)}"] = _encode(value)
    config["training.extra"] = json.dumps(overrides, sort_keys=True)
    return config


def group_from_run_config(group_cls: type, run_config: dict[str, Any]):
    """One argument group (`FederationArguments`, ...) from Flower's run config; keys it lacks keep
    their defaults."""
    prefix = RUN_CONFIG_PREFIXES[group_cls]
    kwargs = {}
    for name, annotation in typing.get_type_hints(group_cls).items():
        key = f"{prefix}.{_kebab(name)}"
        if key in run_config:
            kwargs[name] = _decode(run_config[key], annotation)
    return group_cls(**kwargs)


def from_run_config(
    run_config: dict[str, Any], policy: Callable[[ModelArguments, dict[str, Any]], None] | None = None
) -> RunArguments:
    """Rebuild the argument groups from Flower's run config (the inverse of `to_run_config`).

    `policy` (a client's `ClientPolicy.check`) sees the model arguments and the TrainingArguments
    keyword arguments before anything is built from them, and raises to refuse the run.
    """
    model, data, federation, peft, hub = (
        group_from_run_config(group_cls, run_config) for group_cls in RUN_CONFIG_PREFIXES
    )
    training_kwargs = json.loads(run_config.get("training.extra") or "{}")
    if not isinstance(training_kwargs, dict):
        raise ValueError(f"training.extra must be a JSON object (field: value), got {training_kwargs!r}.")
    annotations = typing.get_type_hints(TrainingArguments)
    for name in RUN_CONFIG_TRAINING_FIELDS:
        key = f"training.{_kebab(name)}"
        if key in run_config:
            training_kwargs[name] = _decode(run_config[key], annotations[name])
    unknown = sorted(set(training_kwargs) - set(annotations))
    if unknown:
        raise ValueError(f"training.extra names fields TrainingArguments does not have: {unknown}.")
    if policy is not None:
        policy(model, training_kwargs)
    refused = sorted(set(training_kwargs) & set(NOT_TRAINING_FLAGS))
    if refused:
        raise ValueError(
            f"training.extra sets {refused}: a run config carries no Hub token, no Hub settings and no "
            "output_dir of TrainingArguments (the server saves rounds in federation.output-dir and pushes "
            "them with the hub.* keys; tokens come from HF_TOKEN or `hf auth login`). Remove them from "
            "the run config."
        )
    training = TrainingArguments(**training_kwargs)
    return RunArguments(model, data, federation, training, peft, hub)
