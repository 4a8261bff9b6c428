"""Chat rows from other layouts: a classification data set as prompt/completion rows (instructions
whose answer is the label), ShareGPT conversations and Alpaca rows as messages.

The SFT quickstart's data (`offline-imdb-chat`) is built from the IMDB reviews by
`chat_prompt_completion`; any data set with a text and a label column can be turned into SFT rows
with it. `from_sharegpt` and `alpaca_messages` are what `--sft_format sharegpt|alpaca` read rows with.
"""

from __future__ import annotations

from typing import Literal

from datasets import ClassLabel, Dataset

# The prompt of `chat_prompt_completion`: the question follows the document, so cutting the start of
# a long prompt (see `tasks.sft_tokens` on truncation) keeps the question.
SENTIMENT_PROMPT = "{text}\n\nIs the sentiment of this review positive or negative? Answer with one word."


# ShareGPT's roles and their chat-template names (TRL's `maybe_convert_to_chatml` renames the keys only).
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


def from_sharegpt(messages: list[dict]) -> list[dict]:
    """ShareGPT messages (`{"from": "human"|"gpt"|"system", "value": ...}`) as chat messages
    (`{"role": "user"|"assistant"|"system", "content": ...}`); messages that have a role are kept."""
    converted = []
    for message in messages:
        if message.get("role") is not None:
            converted.append(message)
            continue
        speaker = message.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(
                f"ShareGPT message from {speaker!r}: the speakers read are {sorted(SHAREGPT_ROLES)}. Rename "
                "it, or convert the conversations to messages with roles yourself."
            )
        rest = {k: v for k, v in message.items() if k not in ("from", "value")}
        converted.append({"role": SHAREGPT_ROLES[speaker], "content": message.get("value"), **rest})
    return converted


def alpaca_messages(instruction: str, input: str | None, output: str) -> tuple[list[dict], str]:
    """An Alpaca row as a chat prompt (one user message: the instruction, and the input after a blank
    line when there is one) and its completion (the output)."""
    content = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    return [{"role": "user", "content": content}], output


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
