"""Tiny assets for `examples/token_classification.py`: a tiny BERT token classifier with a word-level
fast tokenizer, and synthetic CoNLL-style sentences whose entity words give away their tags.

Names are persons (`B-PER`, surnames `I-PER`), cities locations (`B-LOC`, "York" of "New York"
`I-LOC`), companies organisations (`B-ORG`, "Corp" `I-ORG`); every other word is `O`. So each
word's tag follows from the word alone and a tiny model learns it within a few steps.
"Microsoft" is two word pieces ("micro", "##soft"), so the first-sub-token alignment is exercised.
"""

import json
import pathlib
import random

LABEL_NAMES = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
FIRST_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank"]
SURNAMES = ["Smith", "Jones", "Brown"]
CITIES = [["Paris"], ["London"], ["Berlin"], ["Tokyo"], ["Rome"], ["New", "York"]]
COMPANIES = [["Google"], ["Siemens"], ["Microsoft"], ["Acme", "Corp"]]
TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} flew to {LOC} on Monday .",
    "{ORG} opened an office in {LOC} .",
    "{PER} met {PER} at {ORG} .",
    "the office of {ORG} is in {LOC} .",
    "{PER} said {LOC} is great .",
]
WORDS = (
    "works for in flew to on monday opened an office met at the of is said great ."
    " alice bob carol david emma frank smith jones brown paris london berlin tokyo rome new york"
    " google siemens micro ##soft acme corp"
).split()


def entity(kind: str, rng: random.Random) -> tuple[list[str], list[str]]:
    """The words of one random entity of `kind` (PER, LOC or ORG) and their BIO tags."""
    if kind == "PER":
        words = [rng.choice(FIRST_NAMES)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
    else:
        words = list(rng.choice(CITIES if kind == "LOC" else COMPANIES))
    return words, [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


def make_sentence(rng: random.Random) -> dict:
    """One conll-format row: `tokens` (words) and `ner_tags` (ids into `LABEL_NAMES`)."""
    tokens, tags = [], []
    for slot in rng.choice(TEMPLATES).split():
        if slot.startswith("{"):
            words, word_tags = entity(slot.strip("{}"), rng)
        else:
            words, word_tags = [slot], ["O"]
        tokens += words
        tags += word_tags
    return {"tokens": tokens, "ner_tags": [LABEL_NAMES.index(tag) for tag in tags]}


def write_conll(folder: pathlib.Path, sizes: dict[str, int], seed: int = 0) -> pathlib.Path:
    """Write `{split}.json` (JSON lines) with `sizes[split]` synthetic sentences each into `folder`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in sizes.items():
        with open(folder / f"{split}.json", "w") as f:
            for _ in range(size):
                f.write(json.dumps(make_sentence(rng)) + "\n")
    return folder


def build_tiny_token_classifier(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Save a tiny randomly initialised BERT token classifier and its fast WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(LABEL_NAMES),
    )
    torch.manual_seed(seed)
    BertForTokenClassification(config).save_pretrained(folder)
    return folder


def build(folder: pathlib.Path) -> dict:
    """Write the tiny model and data into `folder`; return the example's `trainer_config`.

    96 training sentences (48 per client of 2), 32 validation (16 per client) and 32 test sentences;
    with batches of 8 and 2 epochs, each of 2 rounds is 6 optimizer steps per client.
    """
    model = build_tiny_token_classifier(folder / "model")
    data = write_conll(folder / "data", {"train": 96, "validation": 32, "test": 32})
    return {
        "model_name_or_path": str(model),
        "dataset": str(data),
        "label_names": LABEL_NAMES,
        "max_length": 32,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 2,
        "output_dir": str(folder / "outputs"),
    }
