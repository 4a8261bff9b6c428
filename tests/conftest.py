"""Shared fixtures: an offline, isolated Hugging Face environment, a tiny model and tiny data.

Every test runs with `HF_HUB_OFFLINE=1` and a temporary `HF_HOME`, set at import time (datasets
and huggingface_hub read them when imported), so none touches the network, a user's token or a
user's cache (as huggingface_hub's own conftest does).
"""

import csv
import json
import os
import random
import tempfile

# Set before any test module imports datasets or huggingface_hub: both read these at import.
_HF_HOME = tempfile.mkdtemp(prefix="hf-flower-tests-hf-home-")
os.environ.update(
    {
        "HF_HOME": _HF_HOME,
        "HF_DATASETS_CACHE": os.path.join(_HF_HOME, "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # ClientApps called in-process, and worker scripts tests start, run as the operator's own
        # (as in a simulation: local paths allowed, failures in full). A deployed client's policy
        # is tested where it is set: `hf-flower client` sets its own, tests/test_client_policy.py.
        "HF_FLOWER_OPERATORS_RUN": "1",
    }
)
os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402

POSITIVE_WORDS = ["good", "great", "excellent", "wonderful", "loved", "superb", "fun", "brilliant"]
NEGATIVE_WORDS = ["bad", "awful", "boring", "terrible", "hated", "dull", "worst", "poor"]
# Class names of the reviews `write_reviews_csv` writes (integer labels 0 and 1), as a server sends them.
REVIEW_LABELS = ("0", "1")
# ...and the run facts a client caches its model under (`client_app.facts_key`).
REVIEW_FACTS = '{"label-names": ["0", "1"]}'
# The pid in the names of a dead run's leftovers: above Linux's highest pid_max (2**22), so no
# process ever has it (a real dead pid could be reused by the time a test looks).
NO_SUCH_PID = 2**22 + 1
FILLER_WORDS = ["the", "movie", "film", "was", "plot", "actors", "and", "a", "really", "story"]


@pytest.fixture
def server_identity():
    """What a running ServerApp process has set before it builds any message, through the
    `TaskIdentity` setters Flower's own server code uses (`flwr/server/compat/app.py`)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="session")
def hf_home():
    """The temporary HF_HOME every test (and every process a test starts) uses."""
    return _HF_HOME


def make_review(label: int, rng: random.Random) -> str:
    """A short synthetic review whose sentiment words give away its label."""
    words = POSITIVE_WORDS if label == 1 else NEGATIVE_WORDS
    body = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(4, 12))]
    body += [rng.choice(words) for _ in range(rng.randint(1, 3))]
    rng.shuffle(body)
    return " ".join(body)


def write_reviews_csv(path, num_rows: int = 240, seed: int = 0, text_column="text", label_column="label"):
    """Write a balanced CSV of synthetic reviews and return its path."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([text_column, label_column])
        for i in range(num_rows):
            label = i % 2
            writer.writerow([make_review(label, rng), label])
    return path


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory):
    """240 synthetic labelled reviews (balanced), as a CSV file with `text,label` columns."""
    return write_reviews_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


def make_tiny_bert(num_labels: int = 2, seed: int = 0, vocab_size: int = 50, **config):
    """A tiny randomly initialised BERT classifier (~20k parameters), in eval mode; `config` changes
    its `BertConfig`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 64,
            "num_labels": num_labels,
            **config,
        }
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def build_tiny_model(path, num_labels: int = 2, seed: int = 0, **config):
    """Save a tiny BERT classifier and its word-level tokenizer to `path` (offline, ~20k params);
    `config` changes its `BertConfig`."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE_WORDS + NEGATIVE_WORDS + FILLER_WORDS
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(path)
    make_tiny_bert(num_labels, seed, vocab_size=len(vocab), **config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny randomly initialised BERT classifier (2 labels) and its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


SPECIAL = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "system user assistant you are a critic review the movie film was is good great bad awful boring fun "
    "plot story really and sentiment of this positive negative answer with one word what ? . : hello hi"
).split()
# A ChatML-like template. Its {% generation %} markers let TRL find the assistant tokens for the
# comparison below; hf_flower finds them without (by rendering prefixes).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant {% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %} "
    "{% else %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tokenizer():
    """A word-level tokenizer that adds BOS, with EOS `<|im_end|>` (as SmolLM2) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(tokenizer, seed: int = 0, **config):
    """A tiny randomly initialised Llama (~10k parameters) for `tokenizer`, in eval mode; `config`
    changes its `LlamaConfig`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **config,
        }
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_tiny_chat_model(path, seed: int = 0, **config):
    """Save a tiny Llama and its chat tokenizer to `path`: the causal-lm counterpart of `build_tiny_model`;
    `config` changes its `LlamaConfig`."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    model = build_tiny_llama(tokenizer, seed, **config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """Folder with a tiny randomly initialised Llama and its word-level chat tokenizer."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama"))


def tiny_run_flags(output_dir, tiny_model_dir, reviews_csv, *flags) -> list[str]:
    """Flags of a quick simulated run of the tiny model: 2 clients, 2 rounds; later flags override."""
    return [
        "--model_name_or_path", str(tiny_model_dir),
        "--dataset", str(reviews_csv),
        "--max_length", "32",
        "--test_size", "40",
        "--client_eval_size", "0.2",
        "--num_clients", "2",
        "--num_rounds", "2",
        "--per_device_train_batch_size", "16",
        "--learning_rate", "5e-3",
        "--output_dir", str(output_dir),
        *flags,
    ]  # fmt: skip


REVIEW_WORDS = {"positive": ["good", "great", "fun"], "negative": ["bad", "awful", "boring"]}


def write_sentiment_chat(path, num_rows: int = 48, seed: int = 0):
    """Chat prompt/completion rows in the tiny tokenizer's words: a review, its one-word label."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num_rows):
            label = ["negative", "positive"][i % 2]
            review = f"the movie was really {rng.choice(REVIEW_WORDS[label])} ."
            prompt = [{"role": "user", "content": f"{review} sentiment ? answer with one word ."}]
            f.write(json.dumps({"prompt": prompt, "completion": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    return write_sentiment_chat(tmp_path_factory.mktemp("sft-data") / "reviews.jsonl")


def sft_flags(tmp_path, model_dir, data, *flags):
    return [
        "--task", "causal-lm", "--model_name_or_path", str(model_dir), "--dataset", str(data),
        "--prompt_column", "prompt", "--completion_column", "completion", "--max_length", "48",
        "--test_size", "8", "--client_eval_size", "4", "--eval_max_new_tokens", "3",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "run"), *flags,
    ]  # fmt: skip


def run_config_of(flags) -> dict:
    """The run config a launcher makes of a built-in task's command line (`parse_run` does the same)."""
    from hf_flower.arguments import parse_args
    from hf_flower.arguments.run_config import to_run_config
    from hf_flower.tasks import resolve

    return to_run_config(resolve(parse_args(list(flags))))


def trainer_for(run_config: dict, role: str = "server", **context):
    """The Trainer the run's factory builds for `role` (a `TrainerContext` with `context`)."""
    from hf_flower.arguments import FederationArguments
    from hf_flower.arguments.run_config import group_from_run_config
    from hf_flower.context import TrainerContext
    from hf_flower.factory import build_trainer, load_factory
    from hf_flower.tasks import trainer_ref

    federation = group_from_run_config(FederationArguments, run_config)
    ref = trainer_ref(federation, run_config)
    trainer_context = TrainerContext(
        role=role,
        config=federation.trainer_config,
        num_rounds=federation.num_rounds,
        run_config=run_config,
        **context,
    )
    return build_trainer(load_factory(ref), trainer_context, ref)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models (`pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def processes_of(tmp_path) -> list:
    """Processes that belong to one test: its temporary folder is in their command line or cwd.

    Every process a test starts (and every Flower or Ray process those start) runs in or names
    the test's folder, so concurrent runs elsewhere on the machine are never counted.
    """
    import psutil

    marker = str(tmp_path)
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if proc.pid == os.getpid():
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline or (proc.info["cwd"] or "").startswith(marker):
            found.append(proc)
    return found


@pytest.fixture
def no_leftover_processes(tmp_path):
    """Fail the test if any process it started is still running shortly after it ends."""
    import time

    yield
    deadline = time.monotonic() + 20
    while (left := [p for p in processes_of(tmp_path) if p.is_running()]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {[' '.join(p.cmdline()) for p in left]}"
