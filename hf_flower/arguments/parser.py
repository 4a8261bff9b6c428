"""The YAML + command-line parser of all argument groups, and the checks across groups."""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .adapter import PeftArguments
from .data import DataArguments
from .federation import FederationArguments
from .hub import HUB_TRAINING_FIELDS, SECRET_TRAINING_FIELDS, HubArguments
from .model import ModelArguments

# Every federated run: how it federates, and what the server saves and pushes.
RUN_GROUPS = (FederationArguments, HubArguments)
# The built-in tasks' own settings (`--task`): their model, data, adapters and TrainingArguments.
TASK_GROUPS = (ModelArguments, DataArguments, TrainingArguments, PeftArguments)
ARGUMENT_GROUPS = (
    ModelArguments,
    DataArguments,
    FederationArguments,
    TrainingArguments,
    PeftArguments,
    HubArguments,
)
# TrainingArguments fields that are no flags: the Hub's (`HubArguments` owns them) and `output_dir`
# (`FederationArguments.output_dir`, where the server saves the rounds; a client's Trainer writes no
# checkpoints).
NOT_TRAINING_FLAGS = (*HUB_TRAINING_FIELDS, "output_dir")


@dataclass
class RunArguments:
    """All argument groups of one run, as parsed."""

    model: ModelArguments
    data: DataArguments
    federation: FederationArguments
    training: TrainingArguments
    peft: PeftArguments = field(default_factory=PeftArguments)
    hub: HubArguments = field(default_factory=HubArguments)


class HfFlowerParser(HfArgumentParser):
    """`HfArgumentParser` over the argument groups, with `--config FILE.yaml` for defaults.

    As in trl's `TrlParser`: values in the YAML file become defaults, flags on the command line
    override them, and a key that no group knows is an error that names it.
    """

    def __init__(self, extra_groups: tuple = (), groups: tuple = ARGUMENT_GROUPS):
        self._group_fields: dict[type, set[str]] = {}
        super().__init__(tuple(groups) + tuple(extra_groups))

    def _add_dataclass_arguments(self, dtype) -> None:
        """Add a group's flags, leaving out TrainingArguments' `NOT_TRAINING_FLAGS`."""
        names = _flag_names(dtype)
        self._group_fields[dtype] = names
        if not issubclass(dtype, TrainingArguments):
            return super()._add_dataclass_arguments(dtype)
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.name in names:
                f.type = hints[f.name]
                self._parse_dataclass_field(self, f)

    def parse_args_and_config(self, args: list[str] | None = None) -> tuple:
        args = list(sys.argv[1:] if args is None else args)
        secret = [
            arg for arg in args if arg.split("=")[0] in {f"--{name}" for name in SECRET_TRAINING_FIELDS}
        ]
        if secret:
            raise ValueError(
                f"{secret[0].split('=')[0]}: tokens never go on the command line (shell history, process "
                "lists). Set HF_TOKEN in the environment or run `hf auth login`."
            )
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise ValueError("--config needs a path to a YAML file.")
            config_path = args[index + 1]
            del args[index : index + 2]
            self.set_defaults(**load_yaml_config(config_path, self.dataclass_types))
        namespace, unknown = self.parse_known_args(args=args)
        if unknown:
            raise ValueError(f"Unknown arguments {unknown}; see --help for the flags.")
        # Each group gets the flags it added (HfArgumentParser would also hand TrainingArguments
        # the flags of `HubArguments` and `FederationArguments` that share their names).
        return tuple(
            build_group(dtype, {name: getattr(namespace, name) for name in self._group_fields[dtype]})
            for dtype in self.dataclass_types
        )


def load_yaml_config(path: str | Path, groups) -> dict[str, Any]:
    """Read a YAML config and check that every key belongs to one of `groups`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values.")
    check_keys(config, groups, str(path))
    return config


def _flag_names(group) -> set[str]:
    """The fields of a group that are flags (not TrainingArguments' `NOT_TRAINING_FLAGS`)."""
    training = issubclass(group, TrainingArguments)
    return {
        f.name
        for f in dataclasses.fields(group)
        if f.init and not (training and f.name in NOT_TRAINING_FLAGS)
    }


def check_keys(config: Mapping[str, Any], groups, source: str) -> None:
    """Refuse keys of `config` (flag names without dashes) that no group knows, and tokens."""
    secret = sorted(set(config) & set(SECRET_TRAINING_FIELDS))
    if secret:
        raise ValueError(
            f"{source} sets {secret}: tokens never belong in config files. Set HF_TOKEN in the "
            "environment or run `hf auth login`."
        )
    unknown = sorted(set(config) - set().union(*(_flag_names(group) for group in groups)))
    if unknown:
        raise ValueError(
            f"Unknown keys in {source}: {unknown}. Use the names of the command-line flags "
            "without the leading dashes (see `--help`)."
        )


def groups_from_dict(config: Mapping[str, Any], groups, source: str) -> tuple:
    """Argument groups from flag names and values (the form of a YAML config), each group taking its
    own keys; a key no group knows is an error naming `source`."""
    check_keys(config, groups, source)
    return tuple(
        build_group(group, {name: value for name, value in config.items() if name in _flag_names(group)})
        for group in groups
    )


def build_group(group, values: Mapping[str, Any]):
    """An argument group from its flags' values; a `TrainingArguments` without `output_dir` (not a
    flag: the server saves the rounds in `FederationArguments.output_dir`)."""
    if issubclass(group, TrainingArguments):
        return group(output_dir=None, **values)
    return group(**values)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what the YAML error is, on one line: `line 3, column 7: <problem>`."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def parse_args(args: list[str] | None = None) -> RunArguments:
    """Parse the command line (and its `--config` YAML) into a `RunArguments`."""
    return finalize(RunArguments(*HfFlowerParser().parse_args_and_config(args)))


def finalize(run_args: RunArguments) -> RunArguments:
    """Checks across groups: `--local_epochs` and `--num_train_epochs` say one thing."""
    training, federation = run_args.training, run_args.federation
    if federation.local_epochs is not None:
        whole_run = federation.local_epochs * federation.num_rounds
        default_epochs = _training_field_default("num_train_epochs")
        if training.num_train_epochs not in (default_epochs, whole_run):
            raise ValueError(
                f"--num_train_epochs {training.num_train_epochs:g} (the whole federated training) and "
                f"--local_epochs {federation.local_epochs:g} per round x {federation.num_rounds} rounds "
                "disagree: give one of them."
            )
    return run_args


def _training_field_default(name: str) -> Any:
    f = next(f for f in dataclasses.fields(TrainingArguments) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()
