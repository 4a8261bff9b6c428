"""Causal-LM supervised fine-tuning: formats, checks, completion-only labels, truncation, the cache,
the collator, generation and the answer metrics, on a tiny Llama with a word-level tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, build_tiny_llama, build_tokenizer
from datasets import ClassLabel, Dataset, Features, Value
from transformers import AutoTokenizer

from hf_flower.arguments import DataArguments
from hf_flower.data import DataError, chat_prompt_completion
from hf_flower.tasks import sft_data, sft_tokens
from hf_flower.tasks.sft_data import (
    check_sft_columns,
    load_sft_splits,
    sft_format,
)
from hf_flower.tasks.sft_metrics import (
    exact_match,
    first_label,
    generate_completions,
    label_accuracy,
    label_words,
    perplexity,
)
from hf_flower.tasks.sft_tokens import (
    IGNORE_INDEX,
    SFTDataCollator,
    generation_prompts,
    sft_collator,
    tokenize_sft,
)

# A tiny model is fastest on one thread, and on a shared machine much faster than on several.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-tokenizer")
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer_dir):
    return build_tiny_llama(AutoTokenizer.from_pretrained(tokenizer_dir))


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained(row) -> list[int]:
    """The tokens of a tokenised row that carry loss."""
    return [t for t in row["labels"] if t != IGNORE_INDEX]


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def plain_pc(**kwargs):
    return DataArguments(prompt_column="prompt", completion_column="completion", **kwargs)


PLAIN_ROWS = Dataset.from_dict(
    {
        "prompt": ["the movie was good . sentiment :", "boring plot . sentiment :"],
        "completion": [" positive", " negative"],
    }
)
CHAT_ROWS = Dataset.from_list(
    [
        {"prompt": [user("the movie was good")], "completion": "positive"},
        {
            "prompt": [{"role": "system", "content": "you are a critic"}, user("boring plot")],
            "completion": "negative",
        },
    ]
)
CONVERSATIONS = Dataset.from_list(
    [
        {"messages": [user("hello"), assistant("hi"), user("the film was fun"), assistant("positive")]},
        {
            "messages": [
                {"role": "system", "content": "you are a critic"},
                user("bad plot"),
                assistant("negative"),
            ]
        },
    ]
)


# --- Formats and checks -----------------------------------------------------------------------


def test_format_follows_the_columns():
    assert sft_format(DataArguments()) == "text"
    assert sft_format(plain_pc()) == "prompt-completion"
    assert sft_format(DataArguments(messages_column="messages")) == "messages"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_column": "prompt"}, "--prompt_column prompt is set without --completion_column"),
        ({"completion_column": "answer"}, "--completion_column answer is set without --prompt_column"),
        (
            {"messages_column": "m", "prompt_column": "p"},
            "--messages_column m and --prompt_column p are both set",
        ),
        ({"prompt_column": "x", "completion_column": "x"}, "both 'x'"),
    ],
)
def test_inconsistent_flags(kwargs, message):
    with pytest.raises(DataError, match=message):
        sft_format(DataArguments(**kwargs))


@pytest.mark.parametrize(
    "data, data_args, message",
    [
        (PLAIN_ROWS, DataArguments(prompt_column="prompt", completion_column="answer"), r"Column 'answer' not found.*Set --completion_column"),
        (PLAIN_ROWS, DataArguments(text_column="body"), r"Column 'body' not found.*Set --text_column"),
        (PLAIN_ROWS, DataArguments(messages_column="prompt"), r"'prompt'.*not chat messages.*--messages_column"),
        (Dataset.from_dict({"text": [1, 2]}), DataArguments(), r"holds Value\('int64'\), not text.*--text_column"),
        (CONVERSATIONS, DataArguments(text_column="messages"), r"chat messages, not text.*--messages_column messages"),
        (Dataset.from_dict({"prompt": ["a", None], "completion": ["b", "c"]}), plain_pc(), r"'prompt'.*1 empty values.*--prompt_column"),
        (
            Dataset.from_list([{"prompt": "hi", "completion": [assistant("hello")]}]),
            plain_pc(),
            r"'completion'.*holds chat messages but the prompt column 'prompt' holds text",
        ),
    ],
)  # fmt: skip
def test_column_errors_name_the_column_and_flag(data, data_args, message):
    with pytest.raises(DataError, match=message):
        check_sft_columns(data, data_args)


def test_chat_data_needs_a_chat_template(tokenizer):
    tokenizer.chat_template = None
    for rows, data_args in [
        (CONVERSATIONS, DataArguments(messages_column="messages")),
        (CHAT_ROWS, plain_pc()),
    ]:
        with pytest.raises(DataError, match="has no chat template.*instruct/chat model.*chat_template"):
            tokenize_sft(rows, tokenizer, data_args)
    # Plain prompt/completion strings need no template.
    assert len(tokenize_sft(PLAIN_ROWS, tokenizer, plain_pc())) == 2


def test_conversation_without_assistant_is_refused(tokenizer):
    rows = Dataset.from_list([{"messages": [user("hello")]}])
    with pytest.raises(DataError, match="no assistant message.*--completion_only_loss false"):
        tokenize_sft(rows, tokenizer, DataArguments(messages_column="messages"))
    everything = tokenize_sft(
        rows, tokenizer, DataArguments(messages_column="messages", completion_only_loss=False)
    )
    assert everything[0]["labels"] == everything[0]["input_ids"]


# --- Tokens and labels ------------------------------------------------------------------------


def test_plain_prompt_completion_trains_on_the_completion_and_eos(tokenizer):
    rows = tokenize_sft(PLAIN_ROWS, tokenizer, plain_pc())
    assert rows.column_names == ["input_ids", "attention_mask", "labels"]
    row = rows[0]
    prompt = [tokenizer.bos_token_id] + ids_of(tokenizer, "the movie was good . sentiment :")
    completion = ids_of(tokenizer, "positive") + [tokenizer.eos_token_id]
    assert row["input_ids"] == prompt + completion
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    # Plain strings stay plain although the tokenizer has a chat template.
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in row["input_ids"]


def test_chat_prompt_completion_is_rendered_and_trains_on_the_answer(tokenizer):
    rows = tokenize_sft(CHAT_ROWS, tokenizer, plain_pc())
    row = rows[1]
    assert tokenizer.decode(row["input_ids"]) == (
        "<|im_start|> system you are a critic <|im_end|> <|im_start|> user boring plot <|im_end|> "
        "<|im_start|> assistant negative <|im_end|>"
    )
    # The answer and the end-of-turn token (EOS here) that teaches the model to stop; no BOS is
    # added and no second EOS appended to chat data.
    assert trained(row) == ids_of(tokenizer, "negative <|im_end|>")
    assert row["input_ids"].count(tokenizer.eos_token_id) == 3
    assert tokenizer.bos_token_id not in row["input_ids"]


def test_chat_trains_on_every_assistant_turn(tokenizer):
    rows = tokenize_sft(CONVERSATIONS, tokenizer, DataArguments(messages_column="messages"))
    row = rows[0]
    assert tokenizer.decode(row["input_ids"]) == (
        "<|im_start|> user hello <|im_end|> <|im_start|> assistant hi <|im_end|> "
        "<|im_start|> user the film was fun <|im_end|> <|im_start|> assistant positive <|im_end|>"
    )
    kept = [tokenizer.decode([t]) if t != IGNORE_INDEX else "_" for t in row["labels"]]
    assert " ".join(kept) == "_ _ _ _ _ _ hi <|im_end|> _ _ _ _ _ _ _ _ _ positive <|im_end|>"
    assert trained(rows[1]) == ids_of(tokenizer, "negative <|im_end|>")


@pytest.mark.parametrize(
    "rows, data_args",
    [
        (PLAIN_ROWS, plain_pc(completion_only_loss=False)),
        (CHAT_ROWS, plain_pc(completion_only_loss=False)),
        (CONVERSATIONS, DataArguments(messages_column="messages", completion_only_loss=False)),
        (Dataset.from_dict({"text": ["the movie was fun", "boring"]}), DataArguments()),
    ],
)
def test_without_completion_only_loss_every_token_trains(tokenizer, rows, data_args):
    for row in tokenize_sft(rows, tokenizer, data_args):
        assert row["labels"] == row["input_ids"]


def test_text_gets_bos_and_eos(tokenizer):
    rows = tokenize_sft(Dataset.from_dict({"text": ["the movie was fun"]}), tokenizer, DataArguments())
    assert rows[0]["input_ids"] == [tokenizer.bos_token_id] + ids_of(
        tokenizer, "the movie was fun <|im_end|>"
    )


# --- Truncation -------------------------------------------------------------------------------


def test_truncation_cuts_the_start_of_a_long_prompt(tokenizer):
    long = Dataset.from_list([{"prompt": [user("the movie " * 20 + "was good")], "completion": "positive"}])
    row = tokenize_sft(long, tokenizer, plain_pc(max_length=10))[0]
    assert len(row["input_ids"]) == 10
    # The end of the prompt (the generation prompt) and the whole answer survive.
    assert tokenizer.decode(row["input_ids"]).endswith(
        "was good <|im_end|> <|im_start|> assistant positive <|im_end|>"
    )
    assert trained(row) == ids_of(tokenizer, "positive <|im_end|>")


def test_truncation_of_a_completion_longer_than_max_length(tokenizer):
    rows = Dataset.from_dict({"prompt": ["sentiment :"], "completion": [" good" * 20]})
    row = tokenize_sft(rows, tokenizer, plain_pc(max_length=6))[0]
    # BOS, then the start of the completion.
    assert row["input_ids"] == [tokenizer.bos_token_id] + ids_of(tokenizer, "good") * 5
    assert row["labels"] == [IGNORE_INDEX] + ids_of(tokenizer, "good") * 5


def test_truncation_keeps_bos_the_system_header_and_the_completion(tokenizer):
    """The middle of a long prompt is cut: BOS (or the system prompt and headers of chat data) and
    the end of the prompt with the whole completion are kept."""
    plain = Dataset.from_dict({"prompt": ["the movie " * 20 + "sentiment :"], "completion": [" positive"]})
    row = tokenize_sft(plain, tokenizer, plain_pc(max_length=5))[0]
    assert row["input_ids"] == [tokenizer.bos_token_id] + ids_of(tokenizer, "sentiment : positive <|im_end|>")
    assert trained(row) == ids_of(tokenizer, "positive <|im_end|>")

    system = {"role": "system", "content": "you are a critic"}
    chat = Dataset.from_list(
        [{"prompt": [system, user("the movie " * 20 + "was good")], "completion": "positive"}]
    )
    row = tokenize_sft(chat, tokenizer, plain_pc(max_length=18))[0]
    assert tokenizer.decode(row["input_ids"]) == (
        "<|im_start|> system you are a critic <|im_end|> <|im_start|> user "
        "the movie was good <|im_end|> <|im_start|> assistant positive <|im_end|>"
    )
    assert trained(row) == ids_of(tokenizer, "positive <|im_end|>")


def test_truncation_of_text_and_conversations(tokenizer):
    text = tokenize_sft(
        Dataset.from_dict({"text": ["hello " + "fun " * 20]}), tokenizer, DataArguments(max_length=4)
    )
    assert text[0]["input_ids"] == [tokenizer.bos_token_id] + ids_of(tokenizer, "hello fun fun")
    chat = tokenize_sft(CONVERSATIONS, tokenizer, DataArguments(messages_column="messages", max_length=5))
    # The header of the first user turn, then the end of the conversation.
    assert tokenizer.decode(chat[0]["input_ids"]) == "<|im_start|> user assistant positive <|im_end|>"
    assert trained(chat[0]) == ids_of(tokenizer, "positive <|im_end|>")


def test_max_length_beyond_the_model_is_refused(tokenizer):
    tokenizer.model_max_length = 64
    with pytest.raises(DataError, match="--max_length 256 exceeds the tokenizer's model_max_length 64"):
        tokenize_sft(PLAIN_ROWS, tokenizer, plain_pc())


# --- Cache ------------------------------------------------------------------------------------


def test_tokenised_data_is_cached(tmp_path, tokenizer_dir, monkeypatch):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": [user(f"the movie was {w}")], "completion": w, "id": i}
        for i, w in enumerate(["good", "bad"] * 4)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data_args = plain_pc(dataset=str(path), max_length=32)
    used = AutoTokenizer.from_pretrained(tokenizer_dir)
    # No `label` column: classification's checks are not applied to SFT data.
    train, test = load_sft_splits(data_args)
    assert test is None and len(train) == 8
    first = tokenize_sft(train, used, data_args)

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache file")

    monkeypatch.setattr(sft_tokens, "_tokenize_rows", fail)
    # A later round (the same tokenizer) and a new process (a fresh one) read the cache file.
    for tokenizer in (used, AutoTokenizer.from_pretrained(tokenizer_dir)):
        again = tokenize_sft(load_sft_splits(data_args)[0], tokenizer, data_args)
        assert again.cache_files == first.cache_files
        assert again["labels"] == first["labels"]
    # Settings that change the tokens get a cache file of their own.
    for changed in (
        plain_pc(dataset=str(path), max_length=32, completion_only_loss=False),
        plain_pc(dataset=str(path), max_length=8),
    ):
        with pytest.raises(AssertionError, match="tokenised again"):
            tokenize_sft(load_sft_splits(changed)[0], used, changed)
    used.chat_template = CHAT_TEMPLATE.replace("<|im_start|>assistant ", "<|im_start|>assistant : ")
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_sft(train, used, data_args)


def test_load_sft_splits_checks_the_sft_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    with pytest.raises(
        DataError, match=r"Column 'prompt' not found.*\['question', 'answer'\].*--prompt_column"
    ):
        load_sft_splits(plain_pc(dataset=str(path)))


# --- Chat rows for classification data ---------------------------------------------------------


def test_chat_prompt_completion_from_a_classification_data_set(tokenizer):
    reviews = Dataset.from_dict(
        {"text": ["the movie was really fun and good", "boring"], "label": [1, 0]},
        features=Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])}),
    )
    rows = chat_prompt_completion(reviews, system_prompt="you are a critic", max_words=3)
    assert rows.column_names == ["prompt", "completion"]
    assert rows[0]["completion"] == "positive" and rows[1]["completion"] == "negative"
    assert rows[0]["prompt"] == [
        {"role": "system", "content": "you are a critic"},
        user("the movie was\n\nIs the sentiment of this review positive or negative? Answer with one word."),
    ]
    # Ready for --prompt_column prompt --completion_column completion, with a stable fingerprint.
    assert trained(tokenize_sft(rows, tokenizer, plain_pc())[0]) == ids_of(tokenizer, "positive <|im_end|>")
    assert (
        chat_prompt_completion(reviews, system_prompt="you are a critic", max_words=3)._fingerprint
        == rows._fingerprint
    )
    plain = Dataset.from_dict({"text": ["fun"], "label": ["good"]})
    assert chat_prompt_completion(plain, prompt_template="{text} ?")[0] == {
        "prompt": [user("fun ?")],
        "completion": "good",
    }


# --- Generation prompts -----------------------------------------------------------------------


def test_generation_prompts(tokenizer):
    prompts, references = generation_prompts(CHAT_ROWS, tokenizer, plain_pc())
    assert references == ["positive", "negative"]
    assert (
        tokenizer.decode(prompts[0])
        == "<|im_start|> user the movie was good <|im_end|> <|im_start|> assistant"
    )
    # They are the prompts the model trained on: the training rows continue them.
    for ids, row in zip(prompts, tokenize_sft(CHAT_ROWS, tokenizer, plain_pc())):
        assert row["input_ids"][: len(ids)] == ids and row["labels"][len(ids)] != IGNORE_INDEX

    prompts, references = generation_prompts(
        CONVERSATIONS, tokenizer, DataArguments(messages_column="messages")
    )
    assert references == ["positive", "negative"]
    assert tokenizer.decode(prompts[0]).endswith("user the film was fun <|im_end|> <|im_start|> assistant")

    prompts, references = generation_prompts(PLAIN_ROWS, tokenizer, plain_pc())
    assert prompts[0] == [tokenizer.bos_token_id] + ids_of(tokenizer, "the movie was good . sentiment :")
    assert references == [" positive", " negative"]

    assert generation_prompts(Dataset.from_dict({"text": ["a"]}), tokenizer, DataArguments()) == ([], [])
    # A long prompt keeps its last max_length - eval_max_new_tokens tokens.
    whole = generation_prompts(CHAT_ROWS, tokenizer, plain_pc())[0]
    short = generation_prompts(CHAT_ROWS, tokenizer, plain_pc(max_length=8, eval_max_new_tokens=4))[0]
    assert len(whole[0]) > 4 and short[0] == whole[0][-4:]


# --- Collator ---------------------------------------------------------------------------------


def test_collator_pads_on_the_right(tokenizer):
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        {"input_ids": [9, 10]},
    ]
    batch = sft_collator(tokenizer)(examples)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad], [9, 10, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert SFTDataCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)["input_ids"].shape == (3, 4)
    tokenizer.pad_token = None
    assert sft_collator(tokenizer).pad_token_id == tokenizer.eos_token_id


# --- Metrics ----------------------------------------------------------------------------------


def test_exact_match():
    assert (
        exact_match([" positive\n", "negative", "Positive"], ["positive", " negative ", "positive"]) == 2 / 3
    )
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_label_accuracy():
    references = ["positive", "negative", "positive", "negative", "positive"]
    predictions = [
        "The sentiment of this review is Positive.",  # case and punctuation aside
        "not positive: negative",  # the first label named counts
        "positively",  # not a whole word
        "",
        "positive",
    ]
    assert label_words(references) == ["negative", "positive"]
    assert label_accuracy(predictions, references) == 2 / 5
    assert label_accuracy(["Negative!"], ["negative"], labels=["positive", "negative"]) == 1.0
    assert first_label("very good indeed", ["good", "very good"]) == "very good"
    assert first_label("c++ it is", ["c", "c++"]) == "c++"
    # Free text: too many distinct references to be labels, no label accuracy.
    many = [f"answer {i}" for i in range(21)]
    assert label_words(many) is None and label_accuracy(many, many) is None


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert math.isfinite(perplexity(1e6)) and perplexity(float("inf")) > 1e300
    assert math.isnan(perplexity(float("nan")))


# --- Generation -------------------------------------------------------------------------------


GEN_PROMPTS = [
    "the movie was good",
    "boring plot and bad story , really awful",
    "fun",
    "the film was great fun and the story was good",
    "bad",
]


def test_generation_is_greedy_batch_size_invariant_and_new_tokens_only(tiny_llama, tokenizer):
    tiny_llama.train()
    one = generate_completions(tiny_llama, tokenizer, GEN_PROMPTS, max_new_tokens=6, batch_size=1)
    three = generate_completions(tiny_llama, tokenizer, GEN_PROMPTS, max_new_tokens=6, batch_size=3)
    assert one == three and all(one)
    # The model's mode and the tokenizer are left as they were.
    assert tiny_llama.training and tokenizer.padding_side == "right"
    # The answer is the decoded continuation alone, cut at the first EOS.
    ids = tokenizer(GEN_PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = tiny_llama.eval().generate(
            ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert one[1] == tokenizer.decode(new, skip_special_tokens=True)
    # Token ids and strings (with the tokenizer's special tokens) are the same prompts.
    token_ids = [tokenizer(p)["input_ids"] for p in GEN_PROMPTS]
    assert generate_completions(tiny_llama, tokenizer, token_ids, max_new_tokens=6, batch_size=2) == one


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft
def test_generation_through_wrappers(tiny_llama, tokenizer):
    from peft import LoraConfig, get_peft_model

    expected = generate_completions(tiny_llama, tokenizer, GEN_PROMPTS[:3], max_new_tokens=4)
    # DataParallel stands in for DDP (both are unwrapped); a fresh LoRA adapter changes nothing.
    wrapped = torch.nn.DataParallel(tiny_llama)
    assert generate_completions(wrapped, tokenizer, GEN_PROMPTS[:3], max_new_tokens=4) == expected
    lora = get_peft_model(build_tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert generate_completions(lora, tokenizer, GEN_PROMPTS[:3], max_new_tokens=4) == expected


def test_a_fine_tuned_model_answers_with_the_completion_and_stops(tokenizer):
    """End to end: chat rows, completion-only labels, the collator, training, greedy answers, metrics."""
    reviews = Dataset.from_list(
        [
            {"prompt": [user(text)], "completion": label}
            for text, label in [
                ("the movie was good", "positive"),
                ("boring plot", "negative"),
                ("the film was fun", "positive"),
                ("bad story", "negative"),
            ]
        ]
    )
    data_args = plain_pc(max_length=32)
    rows = tokenize_sft(reviews, tokenizer, data_args)
    batch = sft_collator(tokenizer)(list(rows))
    model = build_tiny_llama(tokenizer, seed=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    prompts, references = generation_prompts(reviews, tokenizer, data_args)
    answers = generate_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    assert answers == references
    assert exact_match(answers, references) == 1.0 and label_accuracy(answers, references) == 1.0


# --- TRL's conventions ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # SFTConfig
def test_same_tokens_labels_and_batches_as_trl(tmp_path, tokenizer, tiny_llama):
    """hf_flower's SFT data is what TRL's SFTTrainer prepares (TRL is a test dependency, `.[test]`)."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    def trl_rows(rows, **config):
        args = SFTConfig(
            output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=64, **config
        )
        trainer = SFTTrainer(model=tiny_llama, args=args, train_dataset=rows, processing_class=tokenizer)
        return trainer.train_dataset

    # TRL takes chat completions as messages only; hf_flower also takes a plain string there.
    chat_rows = CHAT_ROWS.map(lambda row: {"completion": [assistant(row["completion"])]})
    cases = [
        (PLAIN_ROWS, plain_pc(max_length=64), {}),
        (chat_rows, plain_pc(max_length=64), {}),
        (chat_rows, plain_pc(max_length=64, completion_only_loss=False), {"completion_only_loss": False}),
        (
            CONVERSATIONS,
            DataArguments(messages_column="messages", max_length=64),
            {"assistant_only_loss": True},
        ),
        (Dataset.from_dict({"text": ["the movie was fun", "boring"]}), DataArguments(max_length=64), {}),
    ]
    assert (
        tokenize_sft(chat_rows, tokenizer, plain_pc())["labels"]
        == tokenize_sft(CHAT_ROWS, tokenizer, plain_pc())["labels"]
    )
    for rows, data_args, config in cases:
        ours = tokenize_sft(rows, tokenizer, data_args)
        theirs = trl_rows(rows, **config)
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]
        examples = list(ours)
        ours_batch = sft_collator(tokenizer)(examples)
        theirs_batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(ours_batch[key], theirs_batch[key]), key


def test_offline_imdb_chat_is_sentiment_instructions():
    """`--dataset offline-imdb-chat`: the offline reviews as chat prompts (the question after the
    review's last words), completions the label names; the same rows and order as offline-imdb."""
    from hf_flower.data import OFFLINE_CHAT_MAX_WORDS, load_offline_imdb

    args = DataArguments(dataset="offline-imdb-chat", prompt_column="prompt", completion_column="completion")
    chat, test = sft_data.load_sft_splits(args)
    reviews = load_offline_imdb()
    assert test is None and len(chat) == len(reviews) == 25_000
    assert chat.column_names == ["prompt", "completion"]
    for row in (0, 24_999):
        (turn,) = chat[row]["prompt"]
        assert turn["role"] == "user" and turn["content"].endswith("Answer with one word.")
        words = reviews[row]["text"].split()[-OFFLINE_CHAT_MAX_WORDS:]
        assert turn["content"].startswith(" ".join(words) + "\n\n")
        assert chat[row]["completion"] == ["negative", "positive"][reviews[row]["label"]]


# --- Masking on real chat templates -----------------------------------------------------------

TEMPLATES = Path(__file__).parent / "chat_templates"
# Each fixture template's BOS and EOS token (None: the template writes no BOS).
TEMPLATE_TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2_5": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "mistral_v0_3": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
}
TEMPLATE_SPECIAL = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
    "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
]  # fmt: skip


def byte_tokenizer(template: str):
    """A tokenizer of single bytes (no merges) with `template`'s special tokens and chat template:
    it tokenises any text, and decodes it back as it was."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    bos, eos = TEMPLATE_TOKENS[template]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>"
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in TEMPLATE_SPECIAL if t not in (bos, eos)]}
    )
    tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    return tokenizer


def trained_pieces(tokenizer, row) -> list[str]:
    """The runs of trained tokens of a tokenised row, decoded."""
    pieces, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            pieces, run = [*pieces, tokenizer.decode(run)], []
    return pieces + ([tokenizer.decode(run)] if run else [])


def test_assistant_turns_are_masked_right_on_real_chat_templates():
    """Each assistant turn trains on its content and its end-of-turn token, on the templates of
    Llama 3, Qwen2.5, Qwen3 (which adds a <think> block to the last turn only), Mistral v0.3 (which
    moves the system prompt into the last user turn), Gemma and SmolLM2."""
    system = {"role": "system", "content": "Be brief."}
    turns = [user("What is 2+2?"), assistant("4"), user("And 3+3?"), assistant("It is 6.")]
    for template, (_, eos) in TEMPLATE_TOKENS.items():
        tokenizer = byte_tokenizer(template)
        messages = turns if template == "gemma" else [system, *turns]  # Gemma has no system role
        row = tokenize_sft(
            Dataset.from_dict({"messages": [messages]}), tokenizer, DataArguments(messages_column="messages")
        )[0]
        assert (
            row["input_ids"]
            == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )
        end = "<end_of_turn>" if template == "gemma" else eos
        # Qwen3's last turn starts with the empty <think> block its generation prompt leaves to the model.
        think = "<think>\n\n</think>\n\n" if template == "qwen3" else ""
        assert trained_pieces(tokenizer, row) == [f"4{end}", f"{think}It is 6.{end}"], template


@pytest.mark.parametrize(
    "assistant_turn",
    [
        "{{ m['content'] | upper }}",  # not the content as written
        "{% if loop.last %}{{ m['content'] }}{% endif %}",  # earlier turns dropped
    ],
)
def test_a_template_that_cannot_be_masked_is_refused(tokenizer, assistant_turn):
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} "
        "{% if m['role'] == 'assistant' %}" + assistant_turn + "{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    with pytest.raises(
        DataError, match="Cannot tell the assistant's tokens apart.*--completion_only_loss false"
    ):
        tokenize_sft(CONVERSATIONS, tokenizer, DataArguments(messages_column="messages"))
    # Trained on every token, the template is fine.
    everything = tokenize_sft(
        CONVERSATIONS, tokenizer, DataArguments(messages_column="messages", completion_only_loss=False)
    )
    assert everything[0]["labels"] == everything[0]["input_ids"]


# --- Alpaca, ShareGPT and --chat_template -----------------------------------------------------

ALPACA_ROWS = Dataset.from_dict(
    {
        "instruction": ["what is the sentiment of this review", "answer with one word"],
        "input": ["the movie was fun", ""],
        "output": ["positive", "hello"],
    }
)


def test_alpaca_rows_are_rendered_with_the_chat_template(tokenizer):
    rows = tokenize_sft(
        ALPACA_ROWS, tokenizer, DataArguments(sft_format="alpaca", system_prompt="you are a critic")
    )
    assert tokenizer.decode(rows[0]["input_ids"]) == (
        "<|im_start|> system you are a critic <|im_end|> <|im_start|> user what is the sentiment of this "
        "review the movie was fun <|im_end|> <|im_start|> assistant positive <|im_end|>"
    )
    assert trained(rows[0]) == ids_of(tokenizer, "positive <|im_end|>")
    # An empty input adds nothing to the instruction.
    assert "user answer with one word <|im_end|>" in tokenizer.decode(rows[1]["input_ids"])
    prompts, references = generation_prompts(ALPACA_ROWS, tokenizer, DataArguments(sft_format="alpaca"))
    assert references == ["positive", "hello"]
    assert (
        tokenizer.decode(prompts[1])
        == "<|im_start|> user answer with one word <|im_end|> <|im_start|> assistant"
    )
    with pytest.raises(
        DataError, match=r"needs the columns 'instruction' and 'output'.*lacks \['output'\].*rename"
    ):
        check_sft_columns(ALPACA_ROWS.remove_columns("output"), DataArguments(sft_format="alpaca"))
    with pytest.raises(DataError, match="--sft_format alpaca reads the columns.*--prompt_column prompt"):
        sft_format(DataArguments(sft_format="alpaca", prompt_column="prompt", completion_column="completion"))


def test_sharegpt_conversations_are_read_as_messages(tokenizer):
    def sharegpt(messages):
        speakers = {"user": "human", "assistant": "gpt", "system": "system"}
        return [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]

    conversations = Dataset.from_dict({"conversations": [sharegpt(m) for m in CONVERSATIONS["messages"]]})
    ours = tokenize_sft(conversations, tokenizer, DataArguments(sft_format="sharegpt"))
    expected = tokenize_sft(CONVERSATIONS, tokenizer, DataArguments(messages_column="messages"))
    assert ours["input_ids"] == expected["input_ids"] and ours["labels"] == expected["labels"]
    prompts, references = generation_prompts(conversations, tokenizer, DataArguments(sft_format="sharegpt"))
    assert references == ["positive", "negative"]


def test_chat_template_flag_gives_or_replaces_the_template(tmp_path, tokenizer):
    from conftest import CHAT_TEMPLATE

    from hf_flower.tasks.sft_data import with_chat_template

    tokenizer.chat_template = None
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    for given in (str(tmp_path / "chat.jinja"), CHAT_TEMPLATE):
        assert (
            with_chat_template(tokenizer, DataArguments(chat_template=given)).chat_template == CHAT_TEMPLATE
        )
    with pytest.raises(DataError, match="neither a .jinja file nor a Jinja template"):
        with_chat_template(tokenizer, DataArguments(chat_template=str(tmp_path / "missing.jinja")))


# --- Rows without trained tokens, EOS ---------------------------------------------------------


def test_rows_with_nothing_left_to_train_are_dropped_and_counted(tokenizer, caplog):
    from hf_flower.tasks.sft_tokens import drop_untrained

    # The answer of the first conversation comes before a long question that truncation keeps.
    rows = Dataset.from_dict(
        {
            "messages": [
                [user("hello"), assistant("hi"), user("the movie " * 10)],
                CONVERSATIONS[1]["messages"],
            ]
        }
    )
    tokenized = tokenize_sft(rows, tokenizer, DataArguments(messages_column="messages", max_length=12))
    assert trained(tokenized[0]) == [] and trained(tokenized[1]) != []
    with caplog.at_level("WARNING"):
        kept, dropped = drop_untrained(tokenized, "training rows")
    assert dropped == 1 and kept["input_ids"] == tokenized[1:]["input_ids"]
    assert "Dropped 1 of 2 training rows" in caplog.text


def test_no_second_eos_with_a_tokenizer_that_adds_eos(tokenizer_dir):
    from tokenizers import processors

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|im_end|>", special_tokens=[("<s>", bos), ("<|im_end|>", eos)]
    )
    for rows, data_args in (
        (PLAIN_ROWS, plain_pc()),
        (Dataset.from_dict({"text": ["the movie was fun"]}), DataArguments()),
    ):
        ids = tokenize_sft(rows, tokenizer, data_args)[0]["input_ids"]
        assert ids[-1] == eos and ids[-2] != eos
