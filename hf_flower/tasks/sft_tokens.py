"""Tokens and batches of supervised fine-tuning (SFT) data, in the formats of `sft_data`.

Tokenised prompt and completion are matched on tokens as TRL does: the completion starts where the
tokens of the prompt alone and of the prompt followed by its completion first differ.

Truncation to `--max_length`, decided per format so the part that is learnt survives:

- `text`: the end is cut (the start of a document is kept).
- `prompt-completion`: the *start of the prompt* is cut, so the completion stays whole and keeps
  the end of its prompt (with a chat prompt: the question and the generation prompt). When the
  completion alone is longer than `max_length - 1`, one prompt token and the start of the
  completion are kept. Put the question after a long document in the prompt (as
  `chat_prompt_completion` does), or shorten documents beforehand.
- `messages`: the start of the conversation is cut (the last turns are kept).

TRL is not a dependency: `SFTTrainer` prepares its data set each time it is built, while a
federated client builds one `Trainer` per round on data tokenised once per process. The few pieces
of TRL that would fit (its collator, its prompt/completion prefix matching) are a few lines each and
live in modules of TRL whose interfaces changed between releases; they are written here to TRL's
behaviour instead, and tests/test_sft.py compares the two when TRL is installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher

from ..arguments import DataArguments
from ..data import DataError, tokenize_once, tokenized_fingerprint
from .sft_data import (
    SFTFormat,
    check_sft_columns,
    check_sft_tokenizer,
    is_chat_column,
    sft_format,
)

IGNORE_INDEX = -100  # label of tokens without loss (PyTorch's cross-entropy ignore_index)
SFT_COLUMNS = ("input_ids", "attention_mask", "labels")
# Part of the tokenisation fingerprint: bump it whenever `_tokenize_rows` changes its output.
SFT_TOKENIZE_VERSION = "1"


# --- Tokenisation -----------------------------------------------------------------------------


def tokenize_sft(dataset: Dataset, tokenizer, data_args: DataArguments) -> Dataset:
    """`input_ids`, `attention_mask` and `labels` of every row, once: later calls reuse the cache file.

    Labels are the input ids, with -100 on the prompt (or non-assistant) tokens when
    `completion_only_loss` (formats and EOS: `sft_data`'s docstring; truncation: this module's). One row out
    per row in, in order, so row numbers of the raw data set select the same rows here. Not padded:
    `SFTDataCollator` pads each batch. Like `hf_flower.data.tokenize`, the fingerprint is computed
    from the inputs (not by hashing the tokenizer object), so a later round or process finds the
    cache file of a data set loaded from disk.
    """
    check_sft_columns(dataset, data_args)
    check_sft_tokenizer(tokenizer, dataset, data_args)
    fmt = sft_format(data_args)
    chat_prompt = fmt == "prompt-completion" and is_chat_column(dataset, data_args.prompt_column)
    fingerprint = sft_fingerprint(dataset, tokenizer, data_args)

    def tokenize_batch(batch):
        # Looked up at call time so tests can check that a cache hit never tokenises again.
        return _tokenize_rows(batch, tokenizer, data_args, fmt, chat_prompt)

    return tokenize_once(dataset, tokenize_batch, fingerprint, tokenizer)


def sft_fingerprint(dataset: Dataset, tokenizer, data_args: DataArguments) -> str:
    """The datasets fingerprint of `tokenize_sft(dataset, ...)`: a hash of all that shapes its output."""
    return Hasher.hash(
        [
            "sft",
            SFT_TOKENIZE_VERSION,
            # The data set, the tokenizer's name, vocabulary and rules, max_length.
            tokenized_fingerprint(dataset, tokenizer, data_args, []),
            getattr(tokenizer, "chat_template", None),
            tokenizer.eos_token,
            tokenizer.bos_token,
            sft_format(data_args),
            data_args.prompt_column,
            data_args.completion_column,
            data_args.messages_column,
            data_args.completion_only_loss,
        ]
    )


def _tokenize_rows(
    batch: dict, tokenizer, data_args: DataArguments, fmt: SFTFormat, chat_prompt: bool
) -> dict:
    if fmt == "text":
        eos = tokenizer.eos_token
        texts = [text if text.endswith(eos) else text + eos for text in batch[data_args.text_column]]
        # Cut while tokenising: the same as cutting the end afterwards, without tokenising it.
        encoded = tokenizer(texts, truncation=True, max_length=data_args.max_length)
        rows = [(ids, []) for ids in encoded["input_ids"]]
    elif fmt == "prompt-completion":
        prompts, completions = batch[data_args.prompt_column], batch[data_args.completion_column]
        if chat_prompt:
            rows = [_chat_prompt_completion_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
        else:
            rows = _plain_prompt_completion_ids(tokenizer, prompts, completions)
    else:
        rows = [_conversation_ids(tokenizer, messages) for messages in batch[data_args.messages_column]]
        if data_args.completion_only_loss and not all(spans for _, spans in rows):
            raise DataError(
                f"A conversation in column {data_args.messages_column!r} has no assistant message: with "
                "--completion_only_loss (the default) it has nothing to train on. Drop such rows, or set "
                "--completion_only_loss false to train on every token."
            )
    out = {column: [] for column in SFT_COLUMNS}
    for ids, spans in rows:
        ids, trained = _truncate(ids, spans, data_args.max_length, fmt)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        if fmt == "text" or not data_args.completion_only_loss:
            out["labels"].append(list(ids))
        else:
            out["labels"].append([t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)])
    return out


def _plain_prompt_completion_ids(tokenizer, prompts: list[str], completions: list[str]):
    """(ids, [(completion start, end)]) of plain prompt/completion pairs, EOS appended (TRL's way)."""
    eos = tokenizer.eos_token
    completions = [c if c.endswith(eos) else c + eos for c in completions]
    prompt_ids = tokenizer(prompts)["input_ids"]
    full_ids = tokenizer([p + c for p, c in zip(prompts, completions)])["input_ids"]
    return [(full, [(common_prefix_length(p, full), len(full))]) for p, full in zip(prompt_ids, full_ids)]


def _chat_prompt_completion_ids(tokenizer, prompt: list[dict], completion: list[dict] | str):
    """(ids, [(completion start, end)]) of a chat prompt and its completion (TRL's way)."""
    prompt = _messages(prompt)
    prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)
    full = _render(tokenizer, prompt + _completion_messages(completion))
    return full, [(common_prefix_length(prompt_ids, full), len(full))]


def _conversation_ids(tokenizer, messages: list[dict]):
    """(ids, spans of the assistant turns) of a conversation.

    A turn's span runs from the end of the conversation before it, rendered with the generation
    prompt, to the end of the conversation up to and including it (its end-of-turn tokens).
    """
    messages = _messages(messages)
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = common_prefix_length(_render(tokenizer, messages[:i], add_generation_prompt=True), full)
        end = (
            common_prefix_length(_render(tokenizer, messages[: i + 1]), full)
            if i + 1 < len(messages)
            else len(full)
        )
        spans.append((start, end))
    return full, spans


def _messages(messages: list[dict]) -> list[dict]:
    # datasets fills keys that other rows have with None (e.g. `tool_calls`): drop them, so the
    # template sees each message as it was written.
    return [{k: v for k, v in message.items() if v is not None} for message in messages]


def _completion_messages(completion: list[dict] | str) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return _messages(completion)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The token ids of `messages` rendered with the tokenizer's chat template."""
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """Leading tokens `ids` and `other_ids` have in common (trl.data_utils.common_prefix_length).

    A completion starts after this prefix rather than after the tokenised prompt: chat templates may
    render a prompt alone differently, and tokens may merge across the prompt/completion boundary.
    """
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def _truncate(ids: list[int], spans: list[tuple[int, int]], max_length: int, fmt: SFTFormat):
    """(ids, trained flags) cut to `max_length` as the module docstring says, per format."""
    trained = [False] * len(ids)
    for start, end in spans:
        trained[start:end] = [True] * (end - start)
    if len(ids) <= max_length:
        return ids, trained
    if fmt == "text":
        keep = slice(0, max_length)
    elif fmt == "messages":
        keep = slice(len(ids) - max_length, len(ids))
    else:
        start = spans[0][0]
        completion = len(ids) - start
        kept_completion = min(completion, max_length - min(start, 1))
        kept_prompt = max_length - kept_completion
        keep = slice(start - kept_prompt, start + kept_completion)
    return ids[keep], trained[keep]


# --- Generation prompts -----------------------------------------------------------------------


def generation_prompts(
    dataset: Dataset, tokenizer, data_args: DataArguments
) -> tuple[list[list[int]], list[str]]:
    """Token ids of the prompts of held-out rows, and the completions a perfect model would write.

    The prompts are tokenised exactly as in training (chat prompts with the generation prompt), so
    `sft_metrics.generate_completions` continues them as the model learnt to. With chat data the
    prompt is the conversation before its last assistant message and the reference is that
    message's content; conversations without an assistant message are skipped. Text data has no
    completions: both lists are empty. A prompt longer than `max_length - eval_max_new_tokens`
    tokens keeps its end (as training keeps it).
    """
    fmt = sft_format(data_args)
    if fmt == "text":
        return [], []
    check_sft_columns(dataset, data_args)
    check_sft_tokenizer(tokenizer, dataset, data_args)
    prompts, references = [], []
    if fmt == "prompt-completion":
        rows = dataset.select_columns([data_args.prompt_column, data_args.completion_column])
        if is_chat_column(dataset, data_args.prompt_column):
            for row in rows:
                prompts.append(
                    _render(tokenizer, _messages(row[data_args.prompt_column]), add_generation_prompt=True)
                )
                references.append(_content(row[data_args.completion_column]))
        else:
            prompts = tokenizer(list(rows[data_args.prompt_column]))["input_ids"]
            references = list(rows[data_args.completion_column])
    else:
        for conversation in list(dataset[data_args.messages_column]):
            conversation = _messages(conversation)
            last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
            if last is None:
                continue
            prompts.append(_render(tokenizer, conversation[:last], add_generation_prompt=True))
            references.append(conversation[last]["content"])
    budget = max(1, data_args.max_length - data_args.eval_max_new_tokens)
    return [list(ids[-budget:]) for ids in prompts], references


def _content(completion: list[dict] | str) -> str:
    """The text of a completion: a string, or the content of its assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] or "" for m in completion if m.get("role") == "assistant")


# --- Batches ----------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTDataCollator:
    """Pads `input_ids` (with `pad_token_id`), `attention_mask` (0) and `labels` (-100) on the right,
    to the longest example of the batch (or a multiple of `pad_to_multiple_of`), as TRL's
    `DataCollatorForLanguageModeling` does. Examples without `labels` train on every token."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {column: torch.empty(len(examples), length, dtype=torch.long) for column in SFT_COLUMNS}
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        for column, value in fill.items():
            batch[column].fill_(value)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            size = len(ids)
            batch["input_ids"][row, :size] = torch.as_tensor(ids)
            batch["attention_mask"][row, :size] = torch.as_tensor(example.get("attention_mask", [1] * size))
            batch["labels"][row, :size] = torch.as_tensor(example.get("labels", ids))
        return batch


def sft_collator(tokenizer, pad_to_multiple_of: int | None = None) -> SFTDataCollator:
    """The collator of SFT batches: pads with the tokenizer's pad token, or EOS when it has none (as
    TRL does; padded positions are masked and have label -100, so which token pads is moot)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError(
            f"The tokenizer of {tokenizer.name_or_path!r} has neither a pad nor an EOS token to pad batches "
            "with. Set `tokenizer.pad_token` and save it with the model."
        )
    return SFTDataCollator(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)
