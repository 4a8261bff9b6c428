"""What a client lets a run config make it do: its operator's policy, not the server's.

A client executes whatever run the SuperLink hands it, and whoever reaches the SuperLink's port can
submit a run. So the run config is untrusted input on the client, checked when it is read (before
any model, data or `TrainingArguments` is built from it). What a run may make a client touch is an
allowlist of the client's operator, closed by default for what is the client's own:

- a run config that names a Trainer factory (`federation.trainer`) is refused unless the client's
  operator is the run's operator (a simulation): a server never makes a client import code. A client
  runs its own factory (`hf_flower.main(make_trainer)`, `hf-flower client --trainer`) or a built-in task;
- `model.trust-remote-code` is refused unless the client's own operator allowed remote code
  (`hf-flower client --trust_remote_code`);
- models and tokenizers: any Hub id by default, never a local path (a folder on the client's
  machine) unless `--allowed_models` lists it; with `--allowed_models`, only what it lists. A
  revision under `refs/pr/` (a pull request, which anyone can open on the Hub) only where an entry
  pins it;
- the data set a partition-mode client reads (`data.dataset`): any Hub data set and the packaged
  offline ones by default, never a local file or folder unless `--allowed_data` lists it (or a
  folder above it); with `--allowed_data`, only what it lists. A client with its own `--data_path`
  never reads the run's data set;
- the columns: a client that pins its columns (`--text_column`, `--label_column`, ...) reads those
  and no others. Its pins replace the run config's names for the same settings (the run's names
  describe the server's data set, a client's own file has its own), and a run whose task reads a
  column setting the client did not pin is refused;
- Hub downloads a run causes send no token (`HF_HUB_DISABLE_IMPLICIT_TOKEN`, `hub_downloads`): the
  client's own token reaches only repositories its operator meant, unless `--use_hub_token`;
- `TrainingArguments` fields are an allowlist (`SERVER_SETTABLE_TRAINING_FIELDS`): what to compute
  and how fast (learning rate, schedule, batch sizes, steps, precision, seeds, logging, ...).
  Hub and secret fields, paths the client would read or write, checkpoints to resume from and the
  client's own process setup (DeepSpeed, FSDP, DDP backend, data loader workers beyond its cores)
  are refused, each with the reason. `report_to` is the server's own tracking (the ServerApp reads
  the same key): a built-in task on a client always runs with `report_to="none"`, so no run logs to
  the client's W&B or MLflow accounts or writes `./wandb` or `./mlruns` on its machine;
- precision is the client's device's: a run's bf16 (`--precision bf16`, `training.bf16`) or fp16 that
  the client would emulate, several times slower, gives way to what its device computes in natively
  (`own_precision`), so a server's config tuned on an AMX CPU does not stall an AVX2 client.

The policy reaches the ClientApp through the environment of the client's process (`to_env`,
`HF_FLOWER_*`): the long-lived client sets it from its flags, the simulation launcher from the
operator's own run config (there the operator is every client, and everything is allowed), and a
plain `flower-supernode` passes its environment to the `flwr-clientapp` it starts.
A refusal is a `RunRefused` error; the ClientApp reports it to the server as this client's failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .precision import DEVICE_NAMES, DTYPE_NAMES, is_native, log_once, native_precision

if TYPE_CHECKING:
    from . import DataArguments, ModelArguments, RunArguments

logger = logging.getLogger(__name__)

TRUST_REMOTE_CODE_ENV = "HF_FLOWER_TRUST_REMOTE_CODE"
ALLOWED_MODELS_ENV = "HF_FLOWER_ALLOWED_MODELS"
ALLOWED_DATA_ENV = "HF_FLOWER_ALLOWED_DATA"
COLUMNS_ENV = "HF_FLOWER_COLUMNS"
USE_HUB_TOKEN_ENV = "HF_FLOWER_USE_HUB_TOKEN"
OPERATORS_RUN_ENV = "HF_FLOWER_OPERATORS_RUN"
# The data settings that name a column of the data, which a client may pin to its own.
COLUMN_FIELDS = (
    "text_column", "text_pair_column", "label_column", "prompt_column", "completion_column", "messages_column",
)  # fmt: skip
# Hub revisions anyone can create: pull requests (`refs/pr/1`).
PULL_REQUEST_PREFIX = "refs/pr/"

# TrainingArguments a server may set on a client: what to compute and how fast. The fields the
# client replaces with its own values (`client.round_driver.RoundDriver`: output_dir, save and eval
# strategy, best model) are harmless and listed so that every run config passes them.
SERVER_SETTABLE_TRAINING_FIELDS = frozenset(
    {
        # optimisation and schedule
        "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args",
        "optim_target_modules", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
        "label_smoothing_factor", "neftune_noise_alpha", "num_train_epochs", "max_steps",
        # batches, memory and precision
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "average_tokens_across_devices", "auto_find_batch_size", "eval_accumulation_steps",
        "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
        "activation_checkpointing_kwargs", "torch_empty_cache_steps", "use_cache",
        "bf16", "fp16", "bf16_full_eval", "fp16_full_eval", "tf32", "use_cpu",
        # seeds and data order
        "seed", "data_seed", "full_determinism", "train_sampling_strategy", "length_column_name",
        "label_names", "remove_unused_columns", "dataloader_drop_last", "dataloader_num_workers",
        "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "dataloader_in_order",
        # how the ranks of a multi-rank client exchange gradients (their process group is the client's)
        "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
        # logging and evaluation (the client's own logs and metrics)
        "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_level",
        "log_level_replica", "log_on_each_node", "disable_tqdm", "include_num_input_tokens_seen",
        "report_to", "run_name", "project", "prediction_loss_only", "include_for_metrics",
        "batch_eval_metrics", "eval_do_concat_batches", "eval_use_gather_object", "skip_memory_metrics",
        "do_train", "do_eval", "do_predict",
        # replaced or ignored on the client (it saves no checkpoints: `save_strategy` is "no")
        "output_dir", "save_strategy", "eval_strategy", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
    }
)  # fmt: skip

# Why the fields a server might try are refused; any other field outside the allowlist gets
# `NOT_SETTABLE`.
HUB = "clients never push to the Hub, and tokens never travel in a run config"
IO = "it writes files on the client's machine, which a server does not decide"
RESUME = "it resumes from a checkpoint on the client's machine; clients train from the server's weights"
PROCESS_SETUP = "how the client's processes and devices are set up is its operator's choice"
REFUSED_TRAINING_FIELDS = {
    **dict.fromkeys(
        ("push_to_hub", "hub_token", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push",
         "hub_revision", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"),
        HUB,
    ),
    **dict.fromkeys(("enable_jit_checkpoint",), IO),
    **dict.fromkeys(("resume_from_checkpoint", "ignore_data_skip", "restore_callback_states_from_checkpoint"), RESUME),
    **dict.fromkeys(
        ("deepspeed", "fsdp", "fsdp_config", "accelerator_config", "parallelism_config", "ddp_backend",
         "ddp_timeout", "local_rank", "torch_compile", "torch_compile_backend", "torch_compile_mode",
         "use_liger_kernel", "liger_kernel_config", "dataloader_multiprocessing_context"),
        PROCESS_SETUP,
    ),
}  # fmt: skip
NOT_SETTABLE = "it is not one of the training settings a server may make on a client"


class RunRefused(ValueError):
    """The run config asks this client for something its operator has not allowed."""


@dataclass(frozen=True)
class ClientPolicy:
    """What this client's operator allows a run to do here.

    Args:
        trust_remote_code: Let a run load models whose repository ships its own Python code.
        allowed_models: Model ids or local folders this client may load, each optionally pinned to
            a revision (`id@revision`); empty: any Hub model, no local folder.
        allowed_data: Data sets (Hub ids, local files or folders; a folder admits what is under
            it) a partition-mode client may read; empty: any Hub or packaged data set, no local path.
        columns: This client's own column names, `(setting, column)` pairs (`("label_column",
            "sentiment")`): it reads these columns and no others, whatever the run config names.
        use_hub_token: Send this machine's Hugging Face token with the Hub downloads a run causes.
        operators_run: The run config is this client's operator's own (a simulation): everything
            is allowed, the Trainer factory it names included, and failures are reported in full.
    """

    trust_remote_code: bool = False
    allowed_models: tuple[str, ...] = ()
    allowed_data: tuple[str, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()
    use_hub_token: bool = False
    operators_run: bool = False

    @classmethod
    def from_flags(
        cls,
        trust_remote_code: bool = False,
        allowed_models: str | None = None,
        allowed_data: str | None = None,
        columns: Mapping[str, str | None] | None = None,
        use_hub_token: bool = False,
    ) -> ClientPolicy:
        """The policy of `hf-flower client`'s flags: `--trust_remote_code`, `--allowed_models
        id[@revision],...`, `--allowed_data name,...`, the pinned columns (`--text_column`, ...) and
        `--use_hub_token`."""
        pinned = {name: column for name, column in (columns or {}).items() if column is not None}
        unknown = sorted(set(pinned) - set(COLUMN_FIELDS))
        if unknown:
            raise ValueError(f"Unknown column settings {unknown}; a client pins {list(COLUMN_FIELDS)}.")
        for name, column in pinned.items():
            if not column.strip():
                raise ValueError(f"--{name} is empty: give the name of a column of this client's data.")
        return cls(
            trust_remote_code=trust_remote_code,
            allowed_models=_entries(allowed_models, "--allowed_models", pins_revisions=True),
            allowed_data=_entries(allowed_data, "--allowed_data", pins_revisions=False),
            columns=tuple((name, pinned[name]) for name in COLUMN_FIELDS if name in pinned),
            use_hub_token=use_hub_token,
        )

    @classmethod
    def of_operator(cls, run_config: Mapping[str, Any]) -> ClientPolicy:
        """In simulation the operator is every client: remote code exactly when its own run allows
        it, and everything else its run config names."""
        return cls(trust_remote_code=run_config.get("model.trust-remote-code") is True, operators_run=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientPolicy:
        """The policy this process was started with (`to_env`); the defaults when unset."""
        environ = os.environ if environ is None else environ
        policy = cls.from_flags(
            environ.get(TRUST_REMOTE_CODE_ENV, "") == "1",
            environ.get(ALLOWED_MODELS_ENV) or None,
            environ.get(ALLOWED_DATA_ENV) or None,
            json.loads(environ.get(COLUMNS_ENV) or "{}"),
            environ.get(USE_HUB_TOKEN_ENV, "") == "1",
        )
        return dataclasses.replace(policy, operators_run=environ.get(OPERATORS_RUN_ENV, "") == "1")

    def to_env(self) -> dict[str, str]:
        """The environment that carries this policy to the ClientApp of this process and its children."""
        return {
            TRUST_REMOTE_CODE_ENV: "1" if self.trust_remote_code else "0",
            ALLOWED_MODELS_ENV: ",".join(self.allowed_models),
            ALLOWED_DATA_ENV: ",".join(self.allowed_data),
            COLUMNS_ENV: json.dumps(dict(self.columns)),
            USE_HUB_TOKEN_ENV: "1" if self.use_hub_token else "0",
            OPERATORS_RUN_ENV: "1" if self.operators_run else "0",
        }

    def check(self, model_args: ModelArguments, training_kwargs: Mapping[str, Any]) -> None:
        """Raise `RunRefused` naming every setting of the run this client will not follow.

        `model_args`: the run's `ModelArguments`; `training_kwargs`: the `TrainingArguments` keyword
        arguments the run config carries, before anything is built from them.
        """
        refusals = self._model_refusals(model_args) + training_refusals(training_kwargs)
        if refusals:
            raise RunRefused("This client refuses the run config: " + "; ".join(refusals) + ".")

    def restrict(
        self,
        run_args: RunArguments,
        columns_read: Callable[[DataArguments], Mapping[str, str]],
        reads_dataset: bool,
    ) -> RunArguments:
        """`run_args` (a built-in task's, from the run config) as this client runs them: its pinned
        columns in place of the run's, a precision its device computes in natively
        (`own_precision`), and `report_to="none"`. Raises `RunRefused` when the run
        would read a column the client did not pin (`columns_read(data_args)`: the task's column
        settings, by name), or, `reads_dataset` (a partition-mode client), a local data set its
        operator did not allow."""
        if self.operators_run:
            return run_args
        refusals = []
        if reads_dataset and not self.allows_data(run_args.data.dataset):
            refusals.append(
                f"data set {run_args.data.dataset!r} "
                + (
                    f"is not in this client's --allowed_data {list(self.allowed_data)}"
                    if self.allowed_data
                    else "is a path on this machine; this client reads local data sets only when its "
                    "operator lists them in --allowed_data"
                )
            )
        if self.columns:
            run_args.data = dataclasses.replace(run_args.data, **dict(self.columns))
            unpinned = [name for name in columns_read(run_args.data) if name not in dict(self.columns)]
            if unpinned:
                refusals.append(
                    f"the run reads {', '.join(f'--{name}' for name in unpinned)}, which this client does not "
                    f"pin; it reads only its pinned columns ({', '.join(f'--{n} {c}' for n, c in self.columns)})"
                )
        if refusals:
            raise RunRefused("This client refuses the run config: " + "; ".join(refusals) + ".")
        run_args = own_precision(run_args)
        if run_args.training.report_to:
            logger.info(
                "The run's report_to %s is the server's tracking; this client reports to none.",
                run_args.training.report_to,
            )
            run_args.training.report_to = []
        return run_args

    @contextlib.contextmanager
    def hub_downloads(self) -> Iterator[None]:
        """Within: Hub requests send no token unless a call passes one explicitly, unless the
        operator allowed it (`--use_hub_token`, a simulation). The client's token then never reaches
        a repository only the run config named. huggingface_hub reads `HF_HUB_DISABLE_IMPLICIT_TOKEN`
        once, at import, and its constant on every request (`utils/_headers.get_token_to_send`)."""
        if self.use_hub_token or self.operators_run:
            yield
            return
        import huggingface_hub.constants

        previous = huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN
        huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
        try:
            yield
        finally:
            huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = previous

    def _model_refusals(self, model_args: ModelArguments) -> list[str]:
        refusals = []
        if model_args.trust_remote_code and not self.trust_remote_code:
            refusals.append(
                "model.trust-remote-code=true would run Python code from the model's repository on this "
                "machine; this client allows it only when started with --trust_remote_code"
            )
        if self.operators_run:
            return refusals
        names = [model_args.model_name_or_path]
        if model_args.tokenizer_name_or_path not in (None, model_args.model_name_or_path):
            names.append(model_args.tokenizer_name_or_path)
        revision = model_args.revision
        for name in names:
            if self.allows(name, revision):
                continue
            if self.allowed_models:
                refusals.append(
                    f"model {name!r} (revision {revision!r}) is not in this client's "
                    f"--allowed_models {list(self.allowed_models)}"
                )
            elif is_local_path(name):
                refusals.append(
                    f"model {name!r} is a path on this machine; this client loads local models only when "
                    "its operator lists them in --allowed_models"
                )
            else:
                refusals.append(
                    f"model {name!r} at revision {revision!r} is a Hub pull request, which anyone can open; "
                    f"this client loads it only when an --allowed_models entry pins it ({name}@{revision})"
                )
        return refusals

    def allows(self, name: str, revision: str) -> bool:
        """Whether this client loads model (or tokenizer) `name` at `revision`: an `--allowed_models`
        entry admits it, or without the flag, it is a Hub id. A pull request's revision only where an
        entry pins it."""
        pull_request = revision.startswith(PULL_REQUEST_PREFIX)
        if not self.allowed_models:
            return not is_local_path(name) and not pull_request
        for entry in self.allowed_models:
            model, pinned = _pinned(entry)
            if _same_source(model, name) and (pinned == revision or (not pinned and not pull_request)):
                return True
        return False

    def allows_data(self, name: str) -> bool:
        """Whether a partition-mode client reads data set `name`: an `--allowed_data` entry admits
        it, or without the flag, it is not a local path (a Hub or packaged data set)."""
        if not self.allowed_data:
            return not is_local_path(name)
        return any(_same_source(entry, name) for entry in self.allowed_data)


def is_local_path(name: str) -> bool:
    """Whether `name` means a file or folder on this machine, not a Hub id: it exists here, or can
    only be a path (`hub.hub_id`)."""
    from ..hub import hub_id

    return "\\" in name or hub_id(name) is None


def _entries(value: str | None, flag: str, pins_revisions: bool) -> tuple[str, ...]:
    """The comma-separated entries of an allowlist flag, checked."""
    if value is None:
        return ()
    entries = tuple(part.strip() for part in value.split(","))
    if not all(entries):
        raise ValueError(
            f"{flag} {value!r} has an empty entry; give names or paths separated by commas, e.g. "
            + ("`org/model,org/other@v1.0`." if pins_revisions else "`org/data,/data/reviews.csv`.")
        )
    if pins_revisions:
        for entry in entries:
            if not all(_pinned(entry)) and "@" in entry:
                raise ValueError(f"{flag} entry {entry!r} must be `id` or `id@revision`.")
    return entries


def _pinned(entry: str) -> tuple[str, str]:
    """`id@revision` as (id, revision); a plain `id` as (id, "")."""
    model, _, revision = entry.rpartition("@")
    return (model, revision) if model else (entry, "")


def _same_source(allowed: str, name: str) -> bool:
    """The same Hub id, or a local path that is the allowed one or under it (links resolved, so a
    link under an allowed folder to a file outside it is not under it)."""
    if allowed == name and not is_local_path(name):
        return True
    if not (is_local_path(allowed) and is_local_path(name)):
        return False
    allowed_path, path = Path(allowed).expanduser().resolve(), Path(name).expanduser().resolve()
    return allowed_path.exists() and (path == allowed_path or allowed_path in path.parents)


def unsettable_training_fields(names) -> list[str]:
    """One line per `TrainingArguments` field in `names` that no client lets a server set."""
    return [
        f"training setting {name!r} is refused: {REFUSED_TRAINING_FIELDS.get(name, NOT_SETTABLE)}"
        for name in sorted(names)
        if name not in SERVER_SETTABLE_TRAINING_FIELDS
    ]


def training_refusals(training_kwargs: Mapping[str, Any]) -> list[str]:
    """One line per `TrainingArguments` setting a server may not make on this client."""
    refusals = unsettable_training_fields(training_kwargs)
    workers = training_kwargs.get("dataloader_num_workers")
    cores = os.cpu_count() or 1
    if isinstance(workers, int) and workers > cores:
        refusals.append(
            f"training setting 'dataloader_num_workers' is refused: {workers} workers exceed this "
            f"machine's {cores} CPU cores"
        )
    return refusals


def own_precision(run_args: RunArguments) -> RunArguments:
    """A deployed client's `run_args` (from the server's run config) in a precision its own device
    computes in: the run's (`--precision`, or its `--bf16`/`--fp16`) where that is native here, else
    the device's native one (`--precision auto`), with a warning. A server never makes a client
    emulate bf16, several times slower than float32."""
    training = run_args.training
    asked = run_args.model.precision or ("bf16" if training.bf16 else "fp16" if training.fp16 else None)
    device_type = training.device.type
    if asked in (None, "auto") or is_native(asked, device_type):
        return run_args
    native = native_precision(device_type)
    log_once(
        logging.WARNING,
        f"The run asks for {DTYPE_NAMES[asked]}, which this client's {DEVICE_NAMES.get(device_type, device_type)} "
        f"would emulate, several times slower: it trains in {native.dtype} ({native.reason}).",
    )
    run_args.model.precision = "auto"
    run_args.training = dataclasses.replace(training, bf16=False, fp16=False)
    return run_args
