"""A classification data set as chat prompt/completion rows: instructions whose answer is the label.

The SFT quickstart's data (`offline-imdb-chat`) is built this way from the IMDB reviews; any data set
with a text and a label column can be turned into SFT rows with it.
"""

from __future__ import annotations

from typing import Literal

from datasets import ClassLabel, Dataset

# The prompt of `chat_prompt_completion`: the question follows the document, so cutting the start of
# a long prompt (see `tasks.sft_tokens` on truncation) keeps the question.
SENTIMENT_PROMPT = "{text}\n\nIs the sentiment of this review positive or negative? Answer with one word."


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
