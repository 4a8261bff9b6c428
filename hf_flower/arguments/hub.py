"""`HubArguments`: pushing saved rounds to the Hugging Face Hub, and TrainingArguments' own Hub
fields, which are never flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
class HubArguments:
    """Pushing every saved round to the Hugging Face Hub (the server does it, in the background).

    The token is never an argument: it comes from the `HF_TOKEN` environment variable or the
    login saved by `hf auth login`, and it is checked before round 1.

    Args:
        push_to_hub: Push rounds to `hub_model_id`: round N to branch `round-N`, and `main` moved
            to the latest round.
        hub_model_id: `OWNER/NAME` of the model repo (created when missing). A bare `NAME` goes
            under the token's user.
        hub_private: Create the repo private (the default; `--hub_private false` creates it public).
            An existing repo keeps its visibility.
        hub_strategy: `every_round` (push each round as it is saved) or `end` (push the last
            round once training ends).
        hub_allow_push_failure: Exit 0 even when an upload failed after its retries (the
            failure is still reported; the rounds are always kept locally).
        hub_license: License in the model card's metadata (a Hub license id such as
            `apache-2.0`); that of the base model and data is yours to check. Omitted when unset.
        hub_dataset: Hub id of the data set the model was trained on, for the model card's
            metadata (`datasets:`). The built-in tasks fill it from `--dataset` when it is a Hub id.
    """

    push_to_hub: bool = field(default=False, metadata={"help": "Push every round to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "OWNER/NAME of the Hub model repo (created when missing)."}
    )
    hub_private: bool = field(
        default=True,
        metadata={"help": "Create the Hub repo private (default); `false` creates it public."},
    )
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
    hub_dataset: str | None = field(
        default=None, metadata={"help": "Hub id of the training data set, named in the model card."}
    )

    def __post_init__(self):
        if self.hub_strategy not in HUB_STRATEGIES:
            raise ValueError(
                f"Unknown hub_strategy {self.hub_strategy!r}; choose one of {list(HUB_STRATEGIES)}."
            )
        self.hub_model_id = self.hub_model_id or None
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id OWNER/NAME (the model repo to push to).")
