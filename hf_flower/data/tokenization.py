"""Tokenisation of classification examples, once: a fingerprint names every input, so datasets'
cache file is reused by every later round and process instead of tokenising again.
"""

from __future__ import annotations

import hashlib

from datasets import Dataset
from datasets.fingerprint import Hasher

from ..arguments import DataArguments
from .columns import DataError
from .labels import encode_labels, label_names

TOKENIZER_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
LABELS_COLUMN = "labels"  # the name Trainer and DataCollatorWithPadding expect
# Part of the tokenisation fingerprint: bump it whenever `_tokenize_batch` changes its output, so
# cache files written by an older version are not reused.
TOKENIZE_VERSION = "1"


def tokenize(
    dataset: Dataset, tokenizer, data_args: DataArguments, names: list[str] | None = None
) -> Dataset:
    """Tokenise the text (and text pair) and encode the labels, once: later calls reuse the cache file.

    Truncates to `max_length` and does not pad (`DataCollatorWithPadding` pads each batch). The result
    has `input_ids`, `attention_mask` (`token_type_ids` when the tokenizer makes them) and integer
    `labels`; other columns are dropped. `names` are the class names the labels are encoded against
    (pass the train split's, so every split agrees); by default this dataset's own `label_names`.

    The fingerprint is computed from the inputs rather than by hashing the tokenizer object (which is
    not stable across processes), so a second process or round finds the same cache file.
    """
    check_max_length(tokenizer, data_args)
    names = label_names(dataset, data_args.label_column) if names is None else list(names)
    fingerprint = tokenized_fingerprint(dataset, tokenizer, data_args, names)

    def tokenize_batch(batch):
        # Looked up at call time so tests can check that a cache hit never tokenises again.
        return _tokenize_batch(batch, tokenizer, data_args, names)

    return tokenize_once(dataset, tokenize_batch, fingerprint, tokenizer)


def tokenize_once(dataset: Dataset, tokenize_batch, fingerprint: str, tokenizer) -> Dataset:
    """`dataset` mapped by `tokenize_batch` (its columns replaced), cached under `fingerprint`: a
    later call with the same fingerprint, in any process, reads the cache file instead.

    A fast tokenizer's call sets its truncation and padding to the call's own; `tokenizer`'s are put
    back afterwards, so what a round saves of it never depends on whether its data came from the
    cache (all-MiniLM-L6-v2's tokenizer.json pads to 128, and keeps doing so).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    truncation, padding = (backend.truncation, backend.padding) if backend is not None else (None, None)
    try:
        return dataset.map(
            tokenize_batch,
            batched=True,
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            desc="Tokenizing",
        )
    finally:
        if backend is not None:
            backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
            backend.no_padding() if padding is None else backend.enable_padding(**padding)


def tokenized_fingerprint(dataset: Dataset, tokenizer, data_args: DataArguments, names: list[str]) -> str:
    """The datasets fingerprint of `tokenize(dataset, ...)`: a hash of everything that shapes its output."""
    return Hasher.hash(
        [
            TOKENIZE_VERSION,
            dataset._fingerprint,
            type(tokenizer).__name__,
            tokenizer.name_or_path,
            len(tokenizer),
            tokenizer.truncation_side,
            _tokenizer_content(tokenizer),
            data_args.max_length,
            data_args.text_column,
            data_args.text_pair_column,
            data_args.label_column,
            list(names),
        ]
    )


def _tokenizer_content(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and rules: two tokenizers with one name may still differ."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(sorted(tokenizer.get_vocab().items()))
    # Every call sets truncation and padding to its own arguments: they describe the last call,
    # not the tokenizer, so hash a copy without them (about 20 ms, in Rust).
    copy = type(backend).from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return hashlib.sha256(copy.to_str().encode()).hexdigest()


def _tokenize_batch(batch: dict, tokenizer, data_args: DataArguments, names: list[str]) -> dict:
    pairs = batch[data_args.text_pair_column] if data_args.text_pair_column else None
    encoded = tokenizer(batch[data_args.text_column], pairs, truncation=True, max_length=data_args.max_length)
    out = {key: encoded[key] for key in TOKENIZER_COLUMNS if key in encoded}
    labels = encode_labels(batch[data_args.label_column], names, data_args.label_column)
    out[LABELS_COLUMN] = labels.tolist()
    return out


def check_max_length(tokenizer, data_args: DataArguments) -> None:
    """Longer inputs than the model's positions crash in the middle of training: refuse them now."""
    model_max = getattr(tokenizer, "model_max_length", None)
    # Tokenizers that do not know their limit report a huge sentinel (about 1e30).
    if model_max and model_max < 1_000_000 and data_args.max_length > model_max:
        raise DataError(
            f"--max_length {data_args.max_length} exceeds the tokenizer's model_max_length "
            f"{model_max} ({tokenizer.name_or_path}). Set --max_length to {model_max} or less."
        )
