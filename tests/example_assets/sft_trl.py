"""Tiny assets for `examples/sft_trl.py`: a tiny Llama with the word-level chat tokenizer of
`conftest` (its template has `{% generation %}` markers) and JSON Lines of short conversations.

The example trains LoRA adapters only, which leave the final norm and the output layer as they were
initialised: with the usual small initialisation (0.02) the tiny model's logits stay near zero and
its loss barely moves, so this Llama starts with larger weights (`initializer_range=0.2`).

Each conversation asks for the sentiment of a one-line review; the assistant answers `positive` or
`negative`, given away by the review's sentiment word. Every third conversation opens with a
greeting turn (`hi` / `hello`), so the user's turns between assistant turns are masked too.
"""

import json
import pathlib
import random

from conftest import REVIEW_WORDS, build_tiny_chat_model

SUBJECTS = ["movie", "film", "plot", "story"]
QUESTIONS = [
    "sentiment of this review ? {review}",
    "{review} what is the sentiment ? answer with one word .",
    "review : {review} sentiment ?",
]


def build_tiny_llama(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Save a tiny randomly initialised Llama (~23k parameters) and the chat tokenizer to `path`."""
    return build_tiny_chat_model(path, seed, hidden_size=32, intermediate_size=64, initializer_range=0.2)


def make_conversation(label: str, rng: random.Random, greet: bool) -> dict:
    review = f"the {rng.choice(SUBJECTS)} was really {rng.choice(REVIEW_WORDS[label])} ."
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] if greet else []
    messages += [
        {"role": "user", "content": rng.choice(QUESTIONS).format(review=review)},
        {"role": "assistant", "content": label},
    ]
    return {"messages": messages}


def write_conversations(path: pathlib.Path, num_rows: int, seed: int) -> pathlib.Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num_rows):
            label = ["negative", "positive"][i % 2]
            f.write(json.dumps(make_conversation(label, rng, greet=i % 3 == 0)) + "\n")
    return path


def build(folder: pathlib.Path) -> dict:
    """Write the tiny model and 64 train / 16 test conversations to `folder`; return the config."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "model_name_or_path": str(build_tiny_llama(folder / "model")),
        "train_file": str(write_conversations(folder / "train.jsonl", 64, seed=0)),
        "test_file": str(write_conversations(folder / "test.jsonl", 16, seed=1)),
        "max_length": 32,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 2,
        "output_dir": str(folder / "outputs"),
    }
