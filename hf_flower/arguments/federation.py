"""`FederationArguments`: clients, rounds, the strategy and how weights travel between them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# hf_flower.weights.TRANSFER_DTYPES, named here so parsing arguments needs no torch.
TRANSFER_DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEFAULT_OUTPUT_DIR = "outputs/hf-flower"
# How far a client's learning-rate schedule reaches: the whole federated training, or one round.
SCHEDULE_SCOPES = ("global", "round")


@dataclass
class FederationArguments:
    """How the federation runs: the Trainer, rounds, clients, strategy and where the server saves rounds.

    Args:
        trainer: The Trainer factory every process calls, `make_trainer(context) -> Trainer`:
            `module:function` or `path/to/script.py:function`. Empty: the built-in task of `--task`.
        trainer_config: Settings of that factory, a JSON object (or a mapping): `context.config`.
            In a simulation every process gets these; a deployed client passes its own.
        output_dir: Where the server saves every round (`round-N/`), history.json and its logs.
        num_rounds: Aggregation rounds.
        num_clients: Clients (data partitions; in simulation also virtual SuperNodes).
        local_epochs: Local epochs per round. `TrainingArguments` describe the whole federated
            training, as they describe one `trainer.train()`, and each round trains `1/num_rounds`
            of it (`num_train_epochs`, or `max_steps` when set); `local_epochs` sets
            `num_train_epochs = local_epochs * num_rounds` instead. Unset: the Trainer's own.
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
            has an L2 norm above this, as that client's failure. 0 (default): no fixed bound.
        update_clip_factor: Clip (scale down, not refuse) every training update whose L2 norm is
            above this many times the round's median update norm, so that one client cannot move
            the aggregate further than a few honest clients do (norm clipping, Sun et al. 2019,
            "Can You Really Backdoor Federated Learning?"). Logged and noted in the round's record.
            3 (default; `benchmarks/update_bound.py`); 0: off. Applies with `max_update_norm` too.
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
            next round trains, so clients never wait for the server. That thread runs at the
            lowest CPU priority (Linux: `SCHED_IDLE`), so it takes only the CPU that clients
            sharing the machine leave (simulation), and while they train it uses the torch
            threads of the cores they do not (at least one; every thread after the last round).
            `false` evaluates between rounds with every thread. The run's log says which.
        save_merged: Also save each round of an adapter model (PEFT) with the adapters merged in,
            in `round-N/merged/` (a plain `from_pretrained` folder; needs no peft to load).
        fast_transport: Send each round through hf-flower's fast exchange
            (`hf_flower.transport`: weights a client holds sent by id, packed weights, replies
            polled every 0.2 s, training replies averaged as they arrive). `false`: Flower's own
            public path (`Grid.send_and_receive`, every reply kept until the strategy averages
            them), the fallback when a Flower upgrade breaks the fast one. Replies are validated
            and counted the same way on both, and both save the same aggregates.
    """

    trainer: str = field(
        default="",
        metadata={"help": "Trainer factory `module:function` or `script.py:function` (default: --task)."},
    )
    trainer_config: dict | str | None = field(
        default_factory=dict,
        metadata={"help": "Settings of the Trainer factory (context.config), a JSON object."},
    )
    output_dir: str = field(
        default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the server saves the rounds."}
    )
    num_rounds: int = field(default=3, metadata={"help": "Aggregation rounds."})
    num_clients: int = field(default=2, metadata={"help": "Clients (data partitions)."})
    local_epochs: float | None = field(
        default=None, metadata={"help": "Local epochs per round (default: num_train_epochs / num_rounds)."}
    )
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
        default=0.0, metadata={"help": "Reject training updates with a larger L2 norm (0: no fixed bound)."}
    )
    update_clip_factor: float = field(
        default=3.0,
        metadata={
            "help": "Clip training updates to this many times the round's median update norm (0: off)."
        },
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
    save_merged: bool = field(
        default=False,
        metadata={"help": "Also save each adapter round with adapters merged, in round-N/merged/."},
    )
    fast_transport: bool = field(
        default=True,
        metadata={"help": "hf-flower's fast round exchange; false: Flower's own Grid.send_and_receive."},
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
        self.strategy_kwargs = parse_json_object(
            self.strategy_kwargs, "strategy_kwargs", '{"proximal_mu": 0.1}'
        )
        self.trainer_config = parse_trainer_config(self.trainer_config)
        if not self.output_dir:
            raise ValueError("output_dir must name a folder, got an empty string.")
        for name in ("num_rounds", "num_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.local_epochs is not None and self.local_epochs <= 0:
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
        if not (
            math.isfinite(self.update_clip_factor)
            and (self.update_clip_factor == 0 or self.update_clip_factor >= 1)
        ):
            raise ValueError(
                f"update_clip_factor must be 0 (off) or a finite factor of at least 1 (the round's median "
                f"update itself), got {self.update_clip_factor}."
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

    def epochs_per_round(self, num_train_epochs: float) -> float:
        """The epochs of one round when `TrainingArguments.num_train_epochs` are the whole training's:
        `--local_epochs`, or that share of them."""
        return self.local_epochs or num_train_epochs / self.num_rounds


def parse_json_object(value: dict | str | None, flag: str, example: str) -> dict:
    """`--<flag>` as a dict: a mapping (from YAML or Python) or a JSON object (from the command line
    or the run config); anything else is an error naming the flag and an `example`."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"--{flag} must be a JSON object (e.g. '{example}'): {err}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"--{flag} must be a JSON object of names and values (e.g. '{example}'), "
            f"not a {type(value).__name__}: {json.dumps(value, default=str)[:100]}"
        )
    return dict(value)


def parse_trainer_config(value: dict | str | None) -> dict:
    """`--trainer_config` (the settings of a Trainer factory, `context.config`) as a dict."""
    return parse_json_object(value, "trainer_config", '{"model_name_or_path": "..."}')
