"""Tokens and batches of supervised fine-tuning (SFT) data, in the formats of `sft_data`.

Which tokens are trained (labels other than -100):

- plain prompt/completion: the completion starts where the tokens of the prompt alone and of the
  prompt followed by its completion first differ (TRL's way).
- chat data (messages, chat prompts, Alpaca rows): each assistant message's content and the
  template's end-of-turn tokens after it (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`),
  and, when the template puts something between the generation prompt and the content (Qwen3's
  empty `<think>` block on the last turn), that too: the model has to write it. A message's content
  is located by rendering the whole conversation a second time with that content replaced by a
  marker: the text before and after the marker must be the text before and after the content in
  the real render. Unlike comparing renders of the conversation's prefixes, this holds where a
  template renders earlier turns differently depending on what comes last (Qwen3's `<think>` block,
  Mistral v0.3's system prompt in the last user turn). A template that does not render a content
  as written, or whose render of one turn depends on another's content, cannot be masked this way:
  tokenising refuses it (`DataError`) rather than train on the wrong tokens.

Truncation to `--max_length`, decided per format so the part that is learnt survives:

- `text`: the end is cut (the start of a document is kept).
- everything else: the *middle* is cut. The head is kept (BOS, and with chat data everything up to
  the first user message's content: the system prompt and headers; at most half of `max_length`),
  and so is the end: the completion whole and the end of its prompt (the question and the
  generation prompt), or the last turns of a conversation. When the completion alone does not fit,
  its start is kept. Rows that keep no trained token are dropped by `drop_untrained`, which says
  how many.

EOS is appended to plain text and completions once: a tokenizer that adds EOS itself
(`add_eos_token`) does not get a second.

Why not TRL (`SFTTrainer`, `trl.data_utils`, `trl.chat_template_utils`): `SFTTrainer` would take
our tokenised rows as they are (it skips rows that have `input_ids`), but its masking of
conversations needs `{% generation %}` markers, which `get_training_chat_template` adds only to the
templates it knows by exact text (Qwen2.5, Qwen3, Llama 3, Gemma among them; not Mistral v0.3 or
SmolLM2's ChatML), and a fine-tuned copy's edited template is no longer known. TRL is no runtime
dependency of hf-flower, and its data utilities moved between modules across releases. So the
masking here works on any template that renders contents as written; where a template has
`{% generation %}` markers, tests/test_sft.py checks that it gives TRL's tokens and labels.
TRL's `maybe_convert_to_chatml` renames ShareGPT's keys but not its roles (`human`, `gpt`), so
`hf_flower.data.chat.from_sharegpt` does both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher

from ..arguments import DataArguments
from ..data import DataError, tokenize_once, tokenized_fingerprint
from ..data.chat import alpaca_messages, from_sharegpt
from .sft_data import (
    ALPACA_INPUT,
    ALPACA_INSTRUCTION,
    ALPACA_OUTPUT,
    SFTFormat,
    check_sft_columns,
    check_sft_tokenizer,
    is_chat_column,
    sft_format,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens without loss (PyTorch's cross-entropy ignore_index)
SFT_COLUMNS = ("input_ids", "attention_mask", "labels")
# Part of the tokenisation fingerprint: bump it whenever `_tokenize_rows` changes its output.
SFT_TOKENIZE_VERSION = "2"
# Stands in for a message's content to find where the template puts it (no template writes it).
CONTENT_MARKER = "\u2063hf-flower-content\u2063"


# --- Tokenisation -----------------------------------------------------------------------------


def tokenize_sft(dataset: Dataset, tokenizer, data_args: DataArguments) -> Dataset:
    """`input_ids`, `attention_mask` and `labels` of every row, once: later calls reuse the cache file.

    Labels are the input ids, with -100 on the prompt (or non-assistant) tokens when
    `completion_only_loss` (formats and EOS: `sft_data`'s docstring; masking and truncation: this
    module's). One row out per row in, in order, so row numbers of the raw data set select the same
    rows here; rows truncation left nothing to train on are dropped afterwards (`drop_untrained`).
    Not padded: `SFTDataCollator` pads each batch. Like `hf_flower.data.tokenize`, the fingerprint
    is computed from the inputs (not by hashing the tokenizer object), so a later round or process
    finds the cache file of a data set loaded from disk.
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


def drop_untrained(dataset: Dataset, what: str = "rows") -> tuple[Dataset, int]:
    """`dataset` (tokenised) without the rows whose labels are all -100, and how many those were:
    truncation cut all their trained tokens, so they would add nothing but a NaN loss. Logged."""
    keep = [i for i, labels in enumerate(dataset["labels"]) if any(t != IGNORE_INDEX for t in labels)]
    dropped = len(dataset) - len(keep)
    if dropped:
        logger.warning(
            "Dropped %d of %d %s: after truncation to --max_length nothing in them is trained. Raise "
            "--max_length, or shorten their prompts.",
            dropped,
            len(dataset),
            what,
        )
        dataset = dataset.select(keep)
    return dataset, dropped


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
            data_args.system_prompt,
            data_args.completion_only_loss,
        ]
    )


def _tokenize_rows(
    batch: dict, tokenizer, data_args: DataArguments, fmt: SFTFormat, chat_prompt: bool
) -> dict:
    masked = data_args.completion_only_loss and fmt != "text"
    system = data_args.system_prompt
    if fmt == "text":
        texts = [_with_eos(text, tokenizer) for text in batch[data_args.text_column]]
        # Cut while tokenising: the same as cutting the end afterwards, without tokenising it.
        encoded = tokenizer(texts, truncation=True, max_length=data_args.max_length)
        rows = [(_one_eos(ids, tokenizer), [], 0) for ids in encoded["input_ids"]]
    elif fmt == "alpaca":
        inputs = batch.get(ALPACA_INPUT) or [None] * len(batch[ALPACA_OUTPUT])
        rows = [
            _chat_prompt_completion_ids(tokenizer, *alpaca_messages(i, x, o), system, masked)
            for i, x, o in zip(batch[ALPACA_INSTRUCTION], inputs, batch[ALPACA_OUTPUT])
        ]
    elif fmt == "prompt-completion":
        prompts, completions = batch[data_args.prompt_column], batch[data_args.completion_column]
        if chat_prompt:
            rows = [
                _chat_prompt_completion_ids(tokenizer, p, c, system, masked)
                for p, c in zip(prompts, completions)
            ]
        else:
            rows = _plain_prompt_completion_ids(tokenizer, prompts, completions)
    else:
        rows = [
            _conversation_ids(tokenizer, _messages(m, system), masked=masked)
            for m in batch[data_args.messages_column]
        ]
        if masked and not all(spans for _, spans, _ in rows):
            raise DataError(
                f"A conversation in column {data_args.messages_column!r} has no assistant message: with "
                "--completion_only_loss (the default) it has nothing to train on. Drop such rows, or set "
                "--completion_only_loss false to train on every token."
            )
    out = {column: [] for column in SFT_COLUMNS}
    for ids, spans, head in rows:
        ids, trained = _truncate(ids, spans, head, data_args.max_length, fmt)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        if not masked:
            out["labels"].append(list(ids))
        else:
            out["labels"].append([t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)])
    return out


def _with_eos(text: str, tokenizer) -> str:
    eos = tokenizer.eos_token
    return text if text.endswith(eos) else text + eos


def _one_eos(ids: list[int], tokenizer) -> list[int]:
    """`ids` with one EOS at the end: a tokenizer that adds EOS itself (`add_eos_token`) would
    otherwise give text that already ends with it a second."""
    eos = tokenizer.eos_token_id
    return ids[:-1] if len(ids) >= 2 and ids[-1] == ids[-2] == eos else ids


def _plain_prompt_completion_ids(tokenizer, prompts: list[str], completions: list[str]):
    """(ids, [(completion start, end)], head) of plain prompt/completion pairs, EOS appended (TRL's way).
    The head kept by truncation is BOS, when the tokenizer adds one."""
    completions = [_with_eos(c, tokenizer) for c in completions]
    prompt_ids = tokenizer(prompts)["input_ids"]
    full_ids = [
        _one_eos(ids, tokenizer)
        for ids in tokenizer([p + c for p, c in zip(prompts, completions)])["input_ids"]
    ]
    rows = []
    for p, full in zip(prompt_ids, full_ids):
        head = 1 if full and full[0] == tokenizer.bos_token_id else 0
        rows.append((full, [(common_prefix_length(p, full), len(full))], head))
    return rows


def _chat_prompt_completion_ids(
    tokenizer,
    prompt: list[dict],
    completion: list[dict] | str,
    system: str | None = None,
    masked: bool = True,
):
    """(ids, [(completion span)], head) of a chat prompt and its completion: the conversation of both,
    trained on the completion's assistant messages."""
    prompt = _messages(prompt, system)
    return _conversation_ids(tokenizer, prompt + _completion_messages(completion), len(prompt), masked)


def _conversation_ids(tokenizer, messages: list[dict], trained_from: int = 0, masked: bool = True):
    """(ids, token spans of the assistant messages from `trained_from` on, head) of a conversation:
    the spans as the module docstring says; the head is the tokens before the first user message's
    content (BOS, the system prompt and headers), which truncation keeps."""
    if not tokenizer.is_fast:
        raise DataError(
            f"The tokenizer of {tokenizer.name_or_path!r} is a slow (Python) tokenizer: telling the tokens of "
            "chat data apart needs the character offsets of a fast one. Load the model's fast tokenizer "
            "(its tokenizer.json), or use plain-text data."
        )
    # apply_chat_template(tokenize=True) tokenises its text the same way, without special tokens.
    text = _render_text(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    spans = []
    if masked:
        for i in range(trained_from, len(messages)):
            if messages[i]["role"] == "assistant":
                start, end = _assistant_chars(tokenizer, messages, i, text)
                spans.append(_token_span(offsets, start, end))
    head_chars = _head_chars(tokenizer, messages, text)
    head = sum(1 for _, end in offsets if end <= head_chars) if head_chars else 0
    return ids, spans, head


def _head_chars(tokenizer, messages: list[dict], text: str) -> int:
    """Where the content of the first user message starts in `text`; 0 where it cannot be found
    (only BOS is then kept, as with plain text)."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return 0
    try:
        return _content_chars(tokenizer, messages, first_user, text)[0]
    except DataError:
        return 0


def _assistant_chars(tokenizer, messages: list[dict], i: int, text: str) -> tuple[int, int]:
    """The characters of `text` (the render of `messages`) that train assistant message `i`: its
    content, what the template puts between the generation prompt and it, and its end of turn."""
    start, end = _content_chars(tokenizer, messages, i, text)
    rendered = text[start:end]
    if rendered.strip() != (messages[i].get("content") or "").strip():
        _refuse(
            tokenizer,
            f"it renders an assistant message's content {messages[i].get('content')!r} as {rendered!r}",
        )
    # The end of the turn: what follows the content both here and where the turn is the last one.
    if i + 1 == len(messages):
        closing = text[end:]
    else:
        alone = _render_text(tokenizer, messages[:i] + [_with_marker(messages[i])])
        closing = _common_prefix(alone.split(CONTENT_MARKER)[-1], text[end:])
    if not closing.strip():
        _refuse(
            tokenizer,
            "it ends an assistant turn with no end-of-turn token, so the model would never learn to stop",
        )
    # Leave the blank after the end-of-turn token to the next turn (as TRL's training templates do).
    end += len(closing.rstrip())
    if i:
        prompt = _render_text(tokenizer, messages[:i], add_generation_prompt=True)
        if text.startswith(prompt) and len(prompt) <= start:
            start = len(prompt)
    return start, end


def _content_chars(tokenizer, messages: list[dict], i: int, text: str) -> tuple[int, int]:
    """Where `text`, the render of `messages`, has the content of message `i`: found by rendering
    them again with that content replaced by `CONTENT_MARKER`."""
    marked = _render_text(tokenizer, messages[:i] + [_with_marker(messages[i])] + messages[i + 1 :])
    if marked.count(CONTENT_MARKER) != 1:
        _refuse(
            tokenizer,
            f"it renders the content of a {messages[i]['role']} message {marked.count(CONTENT_MARKER)} times, "
            "not once as written",
        )
    before, after = marked.split(CONTENT_MARKER)
    end = len(text) - len(after)
    if not (text.startswith(before) and text.endswith(after) and end >= len(before)):
        _refuse(tokenizer, "its render of the other messages depends on a message's content")
    return len(before), end


def _with_marker(message: dict) -> dict:
    return {**message, "content": CONTENT_MARKER}


def _refuse(tokenizer, reason: str):
    name = tokenizer.name_or_path or type(tokenizer).__name__
    raise DataError(
        f"Cannot tell the assistant's tokens apart with the chat template of {name!r}: {reason}. Training "
        "on them would train on the wrong tokens. Give a template that renders each message's content "
        "as written (--chat_template), or set --completion_only_loss false to train on every token."
    )


def _token_span(offsets, start: int, end: int) -> tuple[int, int]:
    """The tokens whose characters overlap `[start, end)`, as (first, last + 1)."""
    inside = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _common_prefix(text: str, other: str) -> str:
    length = 0
    for a, b in zip(text, other):
        if a != b:
            break
        length += 1
    return text[:length]


def _messages(messages: list[dict], system: str | None = None) -> list[dict]:
    # datasets fills keys that other rows have with None (e.g. `tool_calls`): drop them, so the
    # template sees each message as it was written. ShareGPT messages are read as chat messages.
    messages = from_sharegpt([{k: v for k, v in message.items() if v is not None} for message in messages])
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def _completion_messages(completion: list[dict] | str) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return _messages(completion)


def _render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` rendered with the tokenizer's chat template, as text."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


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

    A completion starts after this prefix rather than after the tokenised prompt: tokens may merge
    across the prompt/completion boundary.
    """
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def _truncate(ids: list[int], spans: list[tuple[int, int]], head: int, max_length: int, fmt: SFTFormat):
    """(ids, trained flags) cut to `max_length` as the module docstring says, per format."""
    trained = [False] * len(ids)
    for start, end in spans:
        trained[start:end] = [True] * (end - start)
    n = len(ids)
    if n <= max_length:
        return ids, trained
    if fmt == "text":
        keep = list(range(max_length))
    else:
        head = min(head, max_length // 2)
        budget = max_length - head
        tail_start = n - budget
        if fmt != "messages" and spans and spans[0][0] < tail_start:
            # The completion alone does not fit: keep its start, after one prompt token at least.
            start = spans[0][0]
            tail_start = max(head, start - (1 if head == 0 and start > 0 else 0))
        keep = list(range(head)) + list(range(tail_start, tail_start + budget))
    return [ids[j] for j in keep], [trained[j] for j in keep]


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
    tokens keeps its BOS and its end (as training keeps the head and the end).
    """
    fmt = sft_format(data_args)
    if fmt == "text":
        return [], []
    check_sft_columns(dataset, data_args)
    check_sft_tokenizer(tokenizer, dataset, data_args)
    prompts, references = [], []
    system = data_args.system_prompt
    if fmt == "alpaca":
        inputs = dataset[ALPACA_INPUT] if ALPACA_INPUT in dataset.column_names else [None] * len(dataset)
        for instruction, input, output in zip(dataset[ALPACA_INSTRUCTION], inputs, dataset[ALPACA_OUTPUT]):
            prompt, reference = alpaca_messages(instruction, input, output)
            prompts.append(_render(tokenizer, _messages(prompt, system), add_generation_prompt=True))
            references.append(reference)
    elif fmt == "prompt-completion":
        rows = dataset.select_columns([data_args.prompt_column, data_args.completion_column])
        if is_chat_column(dataset, data_args.prompt_column):
            for row in rows:
                prompts.append(
                    _render(
                        tokenizer, _messages(row[data_args.prompt_column], system), add_generation_prompt=True
                    )
                )
                references.append(_content(row[data_args.completion_column]))
        else:
            prompts = tokenizer(list(rows[data_args.prompt_column]))["input_ids"]
            references = list(rows[data_args.completion_column])
    else:
        for conversation in list(dataset[data_args.messages_column]):
            conversation = _messages(conversation, system)
            last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
            if last is None:
                continue
            prompts.append(_render(tokenizer, conversation[:last], add_generation_prompt=True))
            references.append(conversation[last]["content"])
    budget = max(1, data_args.max_length - data_args.eval_max_new_tokens)
    return [_keep_bos_and_end(list(ids), budget, tokenizer.bos_token_id) for ids in prompts], references


def _keep_bos_and_end(ids: list[int], budget: int, bos: int | None) -> list[int]:
    if len(ids) <= budget:
        return ids
    if budget > 1 and ids[0] == bos:
        return ids[:1] + ids[len(ids) - budget + 1 :]
    return ids[-budget:]


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
