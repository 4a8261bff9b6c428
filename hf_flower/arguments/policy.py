"""What a client lets a run config make it do: its operator's policy, not the server's.

A client executes whatever run the SuperLink hands it, and whoever reaches the SuperLink's port can
submit a run. So the run config is untrusted input on the client, checked when it is read (before
any model, data or `TrainingArguments` is built from it):

- a run config that names a Trainer factory (`federation.trainer`) is refused unless the client's
  operator is the run's operator (a simulation): a server never makes a client import code. A client
  runs its own factory (`hf_flower.main(make_trainer)`, `hf-flower client --trainer`) or a built-in task;
- `model.trust-remote-code` is refused unless the client's own operator allowed remote code
  (`hf-flower client --trust_remote_code`);
- with `--allowed_models`, any other model (or revision, or tokenizer) is refused;
- `TrainingArguments` fields are an allowlist (`SERVER_SETTABLE_TRAINING_FIELDS`): what to compute
  and how fast (learning rate, schedule, batch sizes, steps, precision, seeds, logging, ...).
  Hub and secret fields, paths the client would read or write, checkpoints to resume from and the
  client's own process setup (DeepSpeed, FSDP, DDP backend, data loader workers beyond its cores)
  are refused, each with the reason.

The policy reaches the ClientApp through the environment of the client's process
(`HF_FLOWER_TRUST_REMOTE_CODE`, `HF_FLOWER_ALLOWED_MODELS`): the long-lived client sets them from
its flags, the simulation launcher from the operator's own run config (there the operator is the
client), and a plain `flower-supernode` passes its environment to the `flwr-clientapp` it starts.
A refusal is a `RunRefused` error; the ClientApp sends it to the server as this client's failure.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import ModelArguments

TRUST_REMOTE_CODE_ENV = "HF_FLOWER_TRUST_REMOTE_CODE"
ALLOWED_MODELS_ENV = "HF_FLOWER_ALLOWED_MODELS"
RUN_CONFIG_TRAINER_ENV = "HF_FLOWER_RUN_CONFIG_TRAINER"

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
        allowed_models: Model ids or folders this client may load, each optionally pinned to a
            revision (`id@revision`); empty: any model.
        run_config_trainer: Import the Trainer factory the run config names (a simulation, whose
            run config is its operator's own).
    """

    trust_remote_code: bool = False
    allowed_models: tuple[str, ...] = ()
    run_config_trainer: bool = False

    @classmethod
    def from_flags(cls, trust_remote_code: bool, allowed_models: str | None) -> ClientPolicy:
        """The policy of `--trust_remote_code` and `--allowed_models id[@revision],...`."""
        if allowed_models is None:
            return cls(trust_remote_code)
        entries = tuple(part.strip() for part in allowed_models.split(","))
        if not all(entries):
            raise ValueError(
                f"--allowed_models {allowed_models!r} has an empty entry; give model ids or folders "
                "separated by commas, e.g. `org/model,org/other@v1.0`."
            )
        for entry in entries:
            if not all(_pinned(entry)) and "@" in entry:
                raise ValueError(f"--allowed_models entry {entry!r} must be `id` or `id@revision`.")
        return cls(trust_remote_code, entries)

    @classmethod
    def of_operator(cls, run_config: Mapping[str, Any]) -> ClientPolicy:
        """In simulation the operator is every client: remote code exactly when its own run allows
        it, and the Trainer factory its run config names."""
        return cls(
            trust_remote_code=run_config.get("model.trust-remote-code") is True, run_config_trainer=True
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientPolicy:
        """The policy this process was started with (`to_env`); nothing allowed when unset."""
        environ = os.environ if environ is None else environ
        allowed = environ.get(ALLOWED_MODELS_ENV, "")
        policy = cls.from_flags(environ.get(TRUST_REMOTE_CODE_ENV, "") == "1", allowed or None)
        return dataclasses.replace(policy, run_config_trainer=environ.get(RUN_CONFIG_TRAINER_ENV, "") == "1")

    def to_env(self) -> dict[str, str]:
        """The environment that carries this policy to the ClientApp of this process and its children."""
        return {
            TRUST_REMOTE_CODE_ENV: "1" if self.trust_remote_code else "0",
            ALLOWED_MODELS_ENV: ",".join(self.allowed_models),
            RUN_CONFIG_TRAINER_ENV: "1" if self.run_config_trainer else "0",
        }

    def check(self, model_args: ModelArguments, training_kwargs: Mapping[str, Any]) -> None:
        """Raise `RunRefused` naming every setting of the run this client will not follow.

        `model_args`: the run's `ModelArguments`; `training_kwargs`: the `TrainingArguments` keyword
        arguments the run config carries, before anything is built from them.
        """
        refusals = self._model_refusals(model_args) + training_refusals(training_kwargs)
        if refusals:
            raise RunRefused("This client refuses the run config: " + "; ".join(refusals) + ".")

    def _model_refusals(self, model_args: ModelArguments) -> list[str]:
        refusals = []
        if model_args.trust_remote_code and not self.trust_remote_code:
            refusals.append(
                "model.trust-remote-code=true would run Python code from the model's repository on this "
                "machine; this client allows it only when started with --trust_remote_code"
            )
        if self.allowed_models:
            names = [model_args.model_name_or_path]
            if model_args.tokenizer_name_or_path not in (None, model_args.model_name_or_path):
                names.append(model_args.tokenizer_name_or_path)
            for name in names:
                if not self.allows(name, model_args.revision):
                    refusals.append(
                        f"model {name!r} (revision {model_args.revision!r}) is not in this client's "
                        f"--allowed_models {list(self.allowed_models)}"
                    )
        return refusals

    def allows(self, name: str, revision: str) -> bool:
        """Whether `--allowed_models` admits model (or tokenizer) `name` at `revision`."""
        for entry in self.allowed_models:
            model, pinned = _pinned(entry)
            if _same_model(model, name) and pinned in ("", revision):
                return True
        return False


def _pinned(entry: str) -> tuple[str, str]:
    """`id@revision` as (id, revision); a plain `id` as (id, "")."""
    model, _, revision = entry.rpartition("@")
    return (model, revision) if model else (entry, "")


def _same_model(allowed: str, name: str) -> bool:
    """The same Hub id, or two spellings of one local folder."""
    if allowed == name:
        return True
    allowed_path, path = Path(allowed).expanduser(), Path(name).expanduser()
    return allowed_path.exists() and path.exists() and allowed_path.resolve() == path.resolve()


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
