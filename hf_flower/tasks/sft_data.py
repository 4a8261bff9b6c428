"""Data of supervised fine-tuning (SFT) of a causal language model: formats, checks, tokens, batches.

Three formats, chosen by the columns that are set (`sft_format`), with TRL's conventions:

- `text` (`--text_column`): plain text; the loss is on every token. EOS is appended.
- `prompt-completion` (`--prompt_column` + `--completion_column`): the loss is on the completion
  only (prompt tokens get label -100) unless `--completion_only_loss false`.
  * Plain strings stay plain, whatever the tokenizer: `prompt + completion + EOS`, joined as they
    are (end the prompt or start the completion with a space or newline), tokenised with the
    tokenizer's special tokens (BOS), as TRL does for non-conversational data.
  * A prompt column holding chat messages (lists of `{"role", "content"}`) is rendered with the
    tokenizer's chat template, the prompt with the generation prompt, as TRL does for
    conversational prompt/completion data. The completion is then either messages too, or a plain
    string, taken as the content of one assistant message (so `{"prompt": [user message],
    "completion": "positive"}` rows need nothing else; `chat_prompt_completion` builds such rows
    from a classification data set). No EOS is appended to chat data: the template's end-of-turn
    marker follows the answer and is trained on, so the model learns to stop there.
- `messages` (`--messages_column`): whole conversations rendered with the chat template; the loss is
  on the assistant turns only (each turn's content and the template's tokens that close it) unless
  `--completion_only_loss false`. The turns are found by rendering each conversation's prefixes,
  so any chat template works (TRL's `assistant_only_loss` needs `{% generation %}` markers in it).

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
from typing import Any, Literal

import torch
from datasets import ClassLabel, Dataset, LargeList, List
from datasets.fingerprint import Hasher

from hf_flower.arguments import DataArguments
from hf_flower.data import (
    DataError,
    check_max_length,
    is_string_feature,
    load_raw_splits,
    require_column,
    source_name,
    tokenize_once,
    tokenized_fingerprint,
)

SFTFormat = Literal["text", "prompt-completion", "messages"]
IGNORE_INDEX = -100  # label of tokens without loss (PyTorch's cross-entropy ignore_index)
SFT_COLUMNS = ("input_ids", "attention_mask", "labels")
# Part of the tokenisation fingerprint: bump it whenever `_tokenize_rows` changes its output.
SFT_TOKENIZE_VERSION = "1"
# The prompt of `chat_prompt_completion`: the question follows the document, so cutting the start of
# a long prompt (see the module docstring) keeps the question.
SENTIMENT_PROMPT = "{text}\n\nIs the sentiment of this review positive or negative? Answer with one word."


# --- Formats and checks -----------------------------------------------------------------------


def sft_format(data_args: DataArguments) -> SFTFormat:
    """`text`, `prompt-completion` or `messages`, from the columns set in `data_args`."""
    prompt, completion = data_args.prompt_column, data_args.completion_column
    messages = data_args.messages_column
    if messages is not None:
        if prompt is not None or completion is not None:
            set_flags = [
                f"--{name} {value}"
                for name, value in (("prompt_column", prompt), ("completion_column", completion))
                if value is not None
            ]
            raise DataError(
                f"--messages_column {messages} and {' and '.join(set_flags)} are both set: a data set is "
                "either chat conversations (--messages_column) or prompt/completion pairs "
                "(--prompt_column and --completion_column). Drop one of them."
            )
        return "messages"
    if prompt is not None and completion is None:
        raise DataError(
            f"--prompt_column {prompt} is set without --completion_column: prompt/completion data needs "
            "both. Set --completion_column to the column of the answers (or drop --prompt_column to train "
            "on --text_column)."
        )
    if completion is not None and prompt is None:
        raise DataError(
            f"--completion_column {completion} is set without --prompt_column: prompt/completion data needs "
            "both. Set --prompt_column to the column of the prompts."
        )
    if prompt is not None:
        if prompt == completion:
            raise DataError(
                f"--prompt_column and --completion_column are both {prompt!r}. Set them to two columns."
            )
        return "prompt-completion"
    return "text"


def sft_columns(data_args: DataArguments) -> dict[str, str]:
    """The columns an SFT data set needs, as flag -> column name."""
    fmt = sft_format(data_args)
    if fmt == "messages":
        return {"--messages_column": data_args.messages_column}
    if fmt == "prompt-completion":
        return {
            "--prompt_column": data_args.prompt_column,
            "--completion_column": data_args.completion_column,
        }
    return {"--text_column": data_args.text_column}


def is_chat_column(dataset: Dataset, column: str) -> bool:
    """Whether `column` holds chat messages: lists of `{"role": str, "content": str, ...}`."""
    feature = dataset.features[column]
    if not isinstance(feature, (List, LargeList)):
        return False
    inner = feature.feature
    return (
        isinstance(inner, dict)
        and is_string_feature(inner.get("role"))
        and is_string_feature(inner.get("content"))
    )


def check_sft_columns(dataset: Dataset, data_args: DataArguments, split: str | None = None) -> None:
    """Check that the format's columns exist, have no gaps and hold text or chat messages.

    `text` must be text; `messages` must be chat messages; a prompt may be either, its completion
    text or (with a chat prompt) messages.
    """
    source = source_name(data_args, split)
    for flag, column in sft_columns(data_args).items():
        require_column(dataset, column, flag, source)
        feature = dataset.features[column]
        chat, text = is_chat_column(dataset, column), is_string_feature(feature)
        if flag == "--messages_column" and not chat:
            raise DataError(
                f"Column {column!r} of {source} holds {feature}, not chat messages (lists of "
                '{"role": ..., "content": ...}). Set --messages_column to a column of conversations, or use '
                "--text_column / --prompt_column and --completion_column for text."
            )
        if flag in ("--text_column", "--completion_column", "--prompt_column") and not (text or chat):
            kinds = "text" if flag == "--text_column" else "text or chat messages"
            raise DataError(
                f"Column {column!r} of {source} holds {feature}, not {kinds}. Set {flag} to a column of {kinds}."
            )
        if flag == "--text_column" and chat:
            raise DataError(
                f"Column {column!r} of {source} holds chat messages, not text. Pass it as --messages_column "
                f"{column} instead of --text_column."
            )
    if sft_format(data_args) == "prompt-completion":
        prompt_chat = is_chat_column(dataset, data_args.prompt_column)
        if is_chat_column(dataset, data_args.completion_column) and not prompt_chat:
            raise DataError(
                f"Column {data_args.completion_column!r} of {source} holds chat messages but the prompt "
                f"column {data_args.prompt_column!r} holds text: both must be chat messages (a text "
                "completion after a chat prompt is fine). Set --prompt_column to a column of messages."
            )


def uses_chat_template(dataset: Dataset, data_args: DataArguments) -> bool:
    """Whether the data is rendered with the tokenizer's chat template (messages, or a chat prompt)."""
    fmt = sft_format(data_args)
    return fmt == "messages" or (
        fmt == "prompt-completion" and is_chat_column(dataset, data_args.prompt_column)
    )


def check_sft_tokenizer(tokenizer, dataset: Dataset, data_args: DataArguments) -> None:
    """Refuse a tokenizer that cannot prepare this data: no chat template for chat data, no EOS
    for text data (the model would never learn to stop), or a `max_length` beyond the model's."""
    check_max_length(tokenizer, data_args)
    name = tokenizer.name_or_path or type(tokenizer).__name__
    if uses_chat_template(dataset, data_args):
        if not getattr(tokenizer, "chat_template", None):
            column = data_args.messages_column or data_args.prompt_column
            raise DataError(
                f"Column {column!r} holds chat messages, but the tokenizer of {name!r} has no chat template "
                "to render them. Fine-tune an instruct/chat model (its tokenizer has one), set a template "
                "(`tokenizer.chat_template = ...`, then save it with the model: it is read from "
                "chat_template.jinja or tokenizer_config.json), or use plain-text data "
                "(--text_column, or --prompt_column/--completion_column holding strings)."
            )
    elif tokenizer.eos_token_id is None:
        raise DataError(
            f"The tokenizer of {name!r} has no EOS token: appended to every example, it is what teaches "
            "the model to stop. Set `tokenizer.eos_token` and save it with the model."
        )


def load_sft_splits(data_args: DataArguments) -> tuple[Dataset, Dataset | None]:
    """`hf_flower.data.load_raw_splits` for SFT: the train split and the test split (or None), with
    the SFT columns checked (`check_sft_columns`) instead of classification's text and label columns.
    `hf_flower.data.prepare_splits(data_args, seed, check_sft_columns)` cuts them the same way."""
    sft_format(data_args)  # inconsistent flags fail before loading anything
    return load_raw_splits(data_args, check_sft_columns)


# --- Building chat rows -----------------------------------------------------------------------


def chat_prompt_completion(
    dataset: Dataset,
    *,
    text_column: str = "text",
    label_column: str = "label",
    prompt_template: str = SENTIMENT_PROMPT,
    system_prompt: str | None = None,
    max_words: int | None = None,
    keep: Literal["start", "end"] = "start",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
) -> Dataset:
    """A classification data set as chat prompt/completion rows, e.g. for the SFT quickstart.

    Each row becomes `prompt`: `[{"role": "system", ...}?, {"role": "user", "content":
    prompt_template.format(text=...)}]` and `completion`: the label's name (a `ClassLabel`'s name,
    or the label as a string). Train on them with `--prompt_column prompt --completion_column
    completion`. `max_words` cuts each text to its first words first (`keep="end"`: its last
    words), so prompts stay short. Other columns are dropped.
    """
    if "{text}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{text}}', got {prompt_template!r}.")
    if keep not in ("start", "end"):
        raise ValueError(f"keep must be 'start' or 'end', got {keep!r}.")
    feature = dataset.features[label_column]
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    # A module-level function and plain arguments: datasets gives the result a stable fingerprint,
    # so tokenising it later reuses the cache file in every process.
    return dataset.map(
        _chat_row,
        fn_kwargs={
            "text_column": text_column,
            "label_column": label_column,
            "names": names,
            "prompt_template": prompt_template,
            "system_prompt": system_prompt,
            "max_words": max_words,
            "keep": keep,
            "prompt_column": prompt_column,
            "completion_column": completion_column,
        },
        remove_columns=dataset.column_names,
        desc="Building chat prompts",
    )


def _chat_row(
    row,
    text_column,
    label_column,
    names,
    prompt_template,
    system_prompt,
    max_words,
    keep,
    prompt_column,
    completion_column,
):
    text = row[text_column]
    if max_words is not None:
        words = text.split()
        text = " ".join(words[:max_words] if keep == "start" else words[-max_words:])
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt_template.format(text=text)})
    label = row[label_column]
    return {prompt_column: messages, completion_column: names[label] if names is not None else str(label)}


# --- Tokenisation -----------------------------------------------------------------------------


def tokenize_sft(dataset: Dataset, tokenizer, data_args: DataArguments) -> Dataset:
    """`input_ids`, `attention_mask` and `labels` of every row, once: later calls reuse the cache file.

    Labels are the input ids, with -100 on the prompt (or non-assistant) tokens when
    `completion_only_loss` (see the module docstring for formats, EOS and truncation). One row out
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

    return tokenize_once(dataset, tokenize_batch, fingerprint)


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
