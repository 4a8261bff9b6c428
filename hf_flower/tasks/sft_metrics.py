"""Metrics of a fine-tuned causal language model: greedy answers to held-out prompts, scored offline.

- `generate_completions`: batched greedy generation (left padding, no sampling) of the new tokens.
- `generation_subset`: which held-out prompts a round generates from when they are capped
  (`--max_generate_samples`): the same rows every round, spread over the whole split.
- `exact_match`: the answer equals the reference completion, both stripped of surrounding whitespace;
  case counts (it is *exact*: `label_accuracy` is the lenient score).
- `label_accuracy`: when the references are a few labels (at most `MAX_LABEL_WORDS` distinct, e.g.
  `positive`/`negative`), the first of them the answer names, as a whole word and in any case,
  is the reference: "The sentiment is Positive." scores for `positive`.
- `perplexity`: `exp(eval_loss)`, finite (history and checkpoints refuse infinities).

Everything runs without a network (no `evaluate.load`).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence

import torch
from accelerate.utils import extract_model_from_parallel

# More distinct references than this and they are free text, not labels: no label accuracy.
MAX_LABEL_WORDS = 20
# The largest loss whose exp is a finite float.
MAX_LOG = math.log(sys.float_info.max)


# --- Generation -------------------------------------------------------------------------------


def generate_completions(
    model, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """The greedy continuation of each prompt, decoded: only the new tokens, up to the first EOS.

    Prompts are token ids (as `sft_tokens.generation_prompts` returns them) or strings, tokenised with
    the tokenizer's special tokens (pass ids for chat-rendered prompts: their text already holds the
    template's special tokens). Prompts of similar length share a batch, padded on the left so
    every row's new tokens start in the same column: the answers do not depend on `batch_size`
    (up to floating-point rounding in low precision). The padding is done here and the tokenizer's
    `padding_side` is never changed, so a tokenizer shared with another thread (the server's
    background evaluation) is safe. Generation stops at the tokenizer's EOS and at the model's
    `generation_config.eos_token_id`. Models wrapped by DDP or DataParallel are unwrapped; PEFT
    models generate with their adapters. Runs under `torch.inference_mode` and leaves the model in
    the train/eval mode it had.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if not prompts:
        return []
    model = extract_model_from_parallel(model)
    ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = _greedy_config(model, max_new_tokens, pad_id, eos_ids)
    # Longest first, so similar lengths share a batch (little padding) and memory peaks at once.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    answers: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = _left_pad([ids[i] for i in rows], pad_id, _device(model))
                output = model.generate(**batch, generation_config=config)
                new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
                for i, tokens in zip(rows, new_tokens):
                    answers[i] = tokenizer.decode(_until_eos(tokens, eos_ids), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def generation_subset(num_rows: int, max_samples: int | None) -> list[int]:
    """The rows of an eval split whose prompts are generated from: all `num_rows`, or `max_samples`
    of them spread evenly over the split (rows 0, n/k, 2n/k, ... for k of n).

    No random draw: every round scores the same prompts, so its exact match compares with the last
    round's, and a split sorted by kind (one skill or source after another) is sampled across all of
    its kinds. `max_samples` None means no cap; 0 means no generation.
    """
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be 0 (no generation) or more, got {max_samples}.")
    if max_samples is None or max_samples >= num_rows:
        return list(range(num_rows))
    return [i * num_rows // max_samples for i in range(max_samples)]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in [configured] if isinstance(configured, int) else configured or []:
        if token not in ids:
            ids.append(token)
    if not ids:
        raise ValueError(
            f"Neither the tokenizer of {tokenizer.name_or_path!r} nor the model's generation config has an "
            "EOS token: generation could not stop before max_new_tokens. Set `tokenizer.eos_token`."
        )
    return ids


def _greedy_config(model, max_new_tokens: int, pad_id: int, eos_ids: list[int]):
    """The model's generation config made greedy: sampling settings it may carry are cleared."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    config.update(
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        max_length=None,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )
    return config


def _left_pad(batch: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of a batch, padded on the left to its longest prompt."""
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, -len(ids) :] = torch.as_tensor(ids)
            attention_mask[row, -len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position]
    return tokens


# --- Scores -----------------------------------------------------------------------------------


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not references:
        raise ValueError("No predictions to score.")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference once both are stripped of surrounding whitespace
    (case-sensitive)."""
    _check_pairs(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def label_words(references: Sequence[str], max_labels: int = MAX_LABEL_WORDS) -> list[str] | None:
    """The distinct references (stripped, lowercased, sorted) when they look like labels: at most
    `max_labels` of them, none empty. Otherwise None: the references are free text."""
    labels = sorted({r.strip().lower() for r in references})
    if not labels or len(labels) > max_labels or "" in labels:
        return None
    return labels


def first_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label that `answer` names first, as a whole word and in any case (the longer label when two
    start at the same place, e.g. "very good" before "good"); None when it names none."""
    found = []
    for label in labels:
        # Whole words: no letter, digit or underscore right before or after (unlike \b, this also
        # works for labels that start or end with punctuation, e.g. "c++").
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", answer, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), -len(label), label))
    return min(found)[2] if found else None


def label_accuracy(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> float | None:
    """Share of answers whose first label word (see `first_label`) is their reference, case aside.

    `labels` default to `label_words(references)`; None (not reported) when the references are too
    many distinct strings to be labels.
    """
    _check_pairs(predictions, references)
    labels = label_words(references) if labels is None else [label.strip().lower() for label in labels]
    if not labels:
        return None
    hits = sum(
        (first_label(p, labels) or "").lower() == r.strip().lower() for p, r in zip(predictions, references)
    )
    return hits / len(references)


def perplexity(eval_loss: float) -> float:
    """`exp(eval_loss)`, the model's perplexity on the tokens with labels; the largest finite float
    instead of an overflow, nan for a nan loss."""
    loss = float(eval_loss)
    if math.isnan(loss):
        return float("nan")
    return math.exp(min(loss, MAX_LOG))
