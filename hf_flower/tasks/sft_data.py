"""Data of supervised fine-tuning (SFT) of a causal language model: formats, checks, chat rows.

Three formats, chosen by the columns that are set (`sft_format`), with TRL's conventions, and two
common layouts read as one of them (`--sft_format`):

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
  ShareGPT conversations (`from`/`value` messages, roles `human`/`gpt`/`system`) are read as
  messages (`--sft_format sharegpt` sets `--messages_column conversations`).
- `alpaca` (`--sft_format alpaca`): columns `instruction`, `input` (optional, may be empty) and
  `output`, read as a chat prompt (one user message: the instruction, then the input after a blank
  line) and its completion (`output`), so they are rendered with the model's chat template.

`--system_prompt` is put first in chat data whose conversation has no system message;
`--chat_template` (a file or the template text) replaces the tokenizer's chat template, or gives
one to a tokenizer without (`with_chat_template`).

Tokenising, truncating and batching these formats is `sft_tokens`'s job.
"""

from __future__ import annotations

import os
from typing import Literal

from datasets import Dataset, LargeList, List

from ..arguments import DataArguments
from ..data import (
    DataError,
    check_max_length,
    is_string_feature,
    load_raw_splits,
    require_column,
    source_name,
)

SFTFormat = Literal["text", "prompt-completion", "messages", "alpaca"]
# Columns of Alpaca-style data: the instruction, its (optional) input, and the answer.
ALPACA_INSTRUCTION, ALPACA_INPUT, ALPACA_OUTPUT = "instruction", "input", "output"


# --- Formats and checks -----------------------------------------------------------------------


def sft_format(data_args: DataArguments) -> SFTFormat:
    """`text`, `prompt-completion`, `messages` or `alpaca`, from `--sft_format` or the columns set in
    `data_args`."""
    prompt, completion = data_args.prompt_column, data_args.completion_column
    messages = data_args.messages_column
    if data_args.sft_format == "alpaca":
        set_flags = [
            f"--{name} {value}"
            for name, value in (
                ("prompt_column", prompt),
                ("completion_column", completion),
                ("messages_column", messages),
            )
            if value is not None
        ]
        if set_flags:
            raise DataError(
                f"--sft_format alpaca reads the columns {ALPACA_INSTRUCTION!r}, {ALPACA_INPUT!r} and "
                f"{ALPACA_OUTPUT!r}, but {' and '.join(set_flags)} is also set. Drop {set_flags[0].split()[0]}, "
                "or drop --sft_format alpaca to use the columns the flags name."
            )
        return "alpaca"
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
    """The columns an SFT data set needs, as flag -> column name (Alpaca's: `--sft_format alpaca`)."""
    fmt = sft_format(data_args)
    if fmt == "alpaca":
        # Fixed columns: the flag that names them is the format's.
        return {"--sft_format": "alpaca"}
    if fmt == "messages":
        return {"--messages_column": data_args.messages_column}
    if fmt == "prompt-completion":
        return {
            "--prompt_column": data_args.prompt_column,
            "--completion_column": data_args.completion_column,
        }
    return {"--text_column": data_args.text_column}


def is_chat_column(dataset: Dataset, column: str) -> bool:
    """Whether `column` holds chat messages: lists of `{"role": str, "content": str, ...}`, or
    ShareGPT's `{"from": str, "value": str}`."""
    feature = dataset.features[column]
    if not isinstance(feature, (List, LargeList)):
        return False
    inner = feature.feature
    return isinstance(inner, dict) and any(
        is_string_feature(inner.get(role)) and is_string_feature(inner.get(content))
        for role, content in (("role", "content"), ("from", "value"))
    )


def check_sft_columns(dataset: Dataset, data_args: DataArguments, split: str | None = None) -> None:
    """Check that the format's columns exist, have no gaps and hold text or chat messages.

    `text` must be text; `messages` must be chat messages; a prompt may be either, its completion
    text or (with a chat prompt) messages.
    """
    source = source_name(data_args, split)
    if sft_format(data_args) == "alpaca":
        _check_alpaca_columns(dataset, source)
        return
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


def _check_alpaca_columns(dataset: Dataset, source: str) -> None:
    columns = dataset.column_names
    missing = [c for c in (ALPACA_INSTRUCTION, ALPACA_OUTPUT) if c not in columns]
    if missing:
        raise DataError(
            f"--sft_format alpaca needs the columns {ALPACA_INSTRUCTION!r} and {ALPACA_OUTPUT!r} (and "
            f"optionally {ALPACA_INPUT!r}); {source} lacks {missing}, its columns are {columns}. Rename "
            "its columns to these (`Dataset.rename_columns`), or drop --sft_format alpaca and name the "
            "columns with --prompt_column and --completion_column."
        )
    for column in (ALPACA_INSTRUCTION, ALPACA_OUTPUT, ALPACA_INPUT):
        if column not in columns:
            continue
        require_column(dataset, column, "--sft_format alpaca", source)
        if not is_string_feature(dataset.features[column]):
            raise DataError(
                f"Column {column!r} of {source} holds {dataset.features[column]}, not text: Alpaca data "
                f"(--sft_format alpaca) has text in {ALPACA_INSTRUCTION!r}, {ALPACA_INPUT!r} and {ALPACA_OUTPUT!r}."
            )


def uses_chat_template(dataset: Dataset, data_args: DataArguments) -> bool:
    """Whether the data is rendered with the tokenizer's chat template (messages, or a chat prompt)."""
    fmt = sft_format(data_args)
    return fmt in ("messages", "alpaca") or (
        fmt == "prompt-completion" and is_chat_column(dataset, data_args.prompt_column)
    )


def with_chat_template(tokenizer, data_args: DataArguments):
    """`tokenizer`, with `--chat_template` (a .jinja file's text, or the template itself) as its chat
    template when set: a template for a tokenizer without one, or one that replaces its own."""
    template = data_args.chat_template
    if template:
        # Only .jinja files are read: the setting comes with the run config, so a path names a
        # file on each client's machine, and no other file of theirs should become training text.
        if template.endswith(".jinja") and os.path.isfile(template):
            with open(template, encoding="utf-8") as file:
                template = file.read()
        elif "{" not in template:
            raise DataError(
                f"--chat_template {template!r} is neither a .jinja file nor a Jinja template. Set it to the "
                "path of a .jinja file, or to the template text."
            )
        tokenizer.chat_template = template
    return tokenizer


def check_sft_tokenizer(tokenizer, dataset: Dataset, data_args: DataArguments) -> None:
    """Refuse a tokenizer that cannot prepare this data: no chat template for chat data, no EOS
    for text data (the model would never learn to stop), or a `max_length` beyond the model's."""
    check_max_length(tokenizer, data_args)
    name = tokenizer.name_or_path or type(tokenizer).__name__
    if uses_chat_template(dataset, data_args):
        if not getattr(tokenizer, "chat_template", None):
            what = (
                "Alpaca rows (--sft_format alpaca) are rendered as chat turns"
                if sft_format(data_args) == "alpaca"
                else f"Column {data_args.messages_column or data_args.prompt_column!r} holds chat messages"
            )
            raise DataError(
                f"{what}, but the tokenizer of {name!r} has no chat template to render them. Fine-tune "
                "an instruct/chat model (its tokenizer has one), give a template "
                "with --chat_template (a .jinja file or the template text), or use plain-text data "
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
