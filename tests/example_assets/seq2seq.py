"""Tiny assets for `examples/seq2seq.py`: a tiny T5, its word-level tokenizer and synthetic news.

Each document is a few filler words around two keywords of one topic; its summary is
"report on <topic> today". The template is learnt in a few steps (the loss falls, ROUGE rises) and
the topic word from the keywords soon after.
"""

import json
import pathlib
import random

SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0 (also the decoder start), eos 1, unk 2
PREFIX = "summarize:"
TOPICS = {
    "sports": ["match", "goal", "team", "coach"],
    "music": ["band", "song", "album", "concert"],
    "weather": ["rain", "storm", "snow", "wind"],
    "politics": ["vote", "minister", "election", "party"],
}
FILLERS = ["the", "a", "on", "in", "after", "said", "people", "city", "new", "local", "week", "late"]
TEMPLATE = ["report", "on", "today"]
SPLITS = {"train": 64, "validation": 32, "test": 32}


def build_tokenizer():
    """A word-level tokenizer with T5's special tokens that appends `</s>` to every sequence, as T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [PREFIX, *TOPICS, *(w for keywords in TOPICS.values() for w in keywords), *FILLERS, *TEMPLATE]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(SPECIAL + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_t5(tokenizer, seed: int = 0):
    """A tiny randomly initialised T5 (~30k parameters) whose special ids match `tokenizer`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def make_example(rng: random.Random) -> dict:
    topic = rng.choice(list(TOPICS))
    words = [rng.choice(FILLERS) for _ in range(rng.randint(4, 8))] + rng.sample(TOPICS[topic], 2)
    rng.shuffle(words)
    return {"document": " ".join(words), "summary": f"report on {topic} today"}


def build(folder: pathlib.Path) -> dict:
    """Write the tiny T5 and the train/validation/test JSON lines into `folder`; return the example's config."""
    model_dir, data_dir = folder / "tiny-t5", folder / "news"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_tiny_t5(tokenizer).save_pretrained(model_dir)

    rng = random.Random(0)
    for split, num_rows in SPLITS.items():
        with open(data_dir / f"{split}.jsonl", "w") as f:
            for _ in range(num_rows):
                f.write(json.dumps(make_example(rng)) + "\n")

    return {
        "model_name_or_path": str(model_dir),
        "dataset": str(data_dir),
        "dataset_config": None,
        "text_column": "document",
        "summary_column": "summary",
        "max_source_length": 32,
        "max_target_length": 8,
        "learning_rate": 1e-2,
        "num_train_epochs": 2,
        "per_device_train_batch_size": 8,
        "output_dir": str(folder / "outputs"),
    }
