"""Training and evaluating `--task causal-lm` affordably: gradient checkpointing with LoRA adapters,
and a cap on the held-out prompts generated per round (loss and perplexity still on every row)."""

import json

import pytest
import torch
from conftest import run_config_of, sft_flags, trainer_for

from hf_flower.tasks import causal_lm
from hf_flower.tasks.sft_metrics import generation_subset
from hf_flower.tasks.sft_tokens import sft_collator

# A tiny model is fastest on one thread, and on a shared machine much faster than on several.
pytestmark = pytest.mark.usefixtures("one_thread")


# --- Gradient checkpointing -------------------------------------------------------------------


def lora_b(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}


def without_transformers_input_grads(monkeypatch):
    """Transformers as affected by huggingface/transformers#42489 (reported on 5.0): the Trainer turns
    checkpointing on without making the frozen embeddings' output require a gradient (5.24 does)."""
    from transformers import PreTrainedModel

    enable = PreTrainedModel._activation_checkpointing_enable

    def enable_only_checkpointing(self, *args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(PreTrainedModel, "enable_input_require_grads", lambda model: None)
            enable(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_activation_checkpointing_enable", enable_only_checkpointing)


# `--gradient_checkpointing` is a deprecated alias in transformers 5.24, the name users know.
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing")
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize(
    "reentrant, transformers_prepares_inputs", [(True, True), (False, True), (True, False)]
)
def test_one_lora_step_with_gradient_checkpointing_trains_the_adapters(
    tmp_path, tiny_chat_model_dir, chat_jsonl, monkeypatch, reentrant, transformers_prepares_inputs
):
    """The built-in task's client Trainer with `--gradient_checkpointing` and LoRA: one step moves
    every LoRA B matrix from zero. With frozen embeddings, reentrant checkpointing gives the adapters
    a gradient only if the embeddings' output requires one: the task sees to it, whatever the
    transformers version does."""
    if not transformers_prepares_inputs:
        without_transformers_input_grads(monkeypatch)
    run_config = run_config_of(
        sft_flags(
            tmp_path, tiny_chat_model_dir, chat_jsonl, "--max_steps", "1",
            "--gradient_checkpointing", "true",
            "--gradient_checkpointing_kwargs", json.dumps({"use_reentrant": reentrant}),
        )
    )  # fmt: skip
    trainer = trainer_for(run_config, role="client", partition_id=0, num_partitions=2)
    start = lora_b(trainer.model)
    assert start and all(not b.any() for b in start.values())  # LoRA starts from B = 0
    trainer.train()
    assert any(getattr(module, "gradient_checkpointing", False) for module in trainer.model.modules())
    moved = lora_b(trainer.model)
    assert all(moved[name].any() for name in start), [name for name in start if not moved[name].any()]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing")
@pytest.mark.parametrize("checkpointing", [True, False])
def test_qlora_base_is_prepared_for_the_runs_gradient_checkpointing(
    tmp_path, tiny_chat_model_dir, monkeypatch, checkpointing
):
    """`prepare_model_for_kbit_training` checkpoints as the run's TrainingArguments say, with their
    kwargs (it was always told not to, whatever `--gradient_checkpointing` said)."""
    import functools

    import peft
    from transformers import TrainingArguments

    from hf_flower import modeling
    from hf_flower.arguments import ModelArguments, PeftArguments

    calls = []

    @functools.wraps(peft.prepare_model_for_kbit_training)
    def recording_prepare(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", recording_prepare)
    # bitsandbytes needs a CUDA GPU: the base loads in full precision here, the rest is QLoRA's path.
    monkeypatch.setattr(modeling, "quantization_kwargs", lambda model_args: {"dtype": torch.float32})
    model_args = ModelArguments(model_name_or_path=str(tiny_chat_model_dir), load_in_4bit=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    model = modeling.load_causal_lm(model_args, PeftArguments(peft="lora"), quantize=True, training_args=args)
    [kwargs] = calls
    assert kwargs["use_gradient_checkpointing"] is checkpointing
    assert kwargs.get("activation_checkpointing_kwargs") == (
        {"use_reentrant": True} if checkpointing else None
    )
    assert lora_b(model)  # the adapters come after the k-bit preparation


# --- Generation cap ---------------------------------------------------------------------------


def test_generation_subset_is_fixed_and_spread_over_the_split():
    assert generation_subset(10, 3) == [0, 3, 6]
    assert generation_subset(10, 3) == generation_subset(10, 3)  # every round the same prompts
    assert generation_subset(4, 128) == generation_subset(4, None) == [0, 1, 2, 3]
    assert generation_subset(10, 0) == []
    with pytest.raises(ValueError, match="0 \\(no generation\\) or more"):
        generation_subset(10, -1)


def test_generation_is_capped_and_the_loss_covers_every_row(
    tmp_path, tiny_chat_model_dir, chat_jsonl, monkeypatch
):
    run_config = run_config_of(
        sft_flags(tmp_path, tiny_chat_model_dir, chat_jsonl, "--max_generate_samples", "3")
    )
    assert run_config["data.max-generate-samples"] == 3  # travels in the run config
    trainer = trainer_for(run_config)  # the server's: central evaluation on 8 held-out rows
    assert len(trainer.eval_dataset) == 8
    generated = []

    def recording_generate(model, tokenizer, prompts, max_new_tokens, batch_size=8):
        generated.append(list(prompts))
        return ["positive"] * len(prompts)

    monkeypatch.setattr(causal_lm, "generate_completions", recording_generate)
    capped = trainer.evaluate()
    every_prompt = trainer.eval_dataset[causal_lm.PROMPT_IDS]
    assert generated == [[every_prompt[i] for i in (0, 2, 5)]]  # one call, 3 prompts spread evenly
    assert "eval_exact_match" in capped

    # The loss is the model's loss on all 8 rows (one batch of 8: --per_device_eval_batch_size 8).
    rows = trainer.eval_dataset.remove_columns(list(causal_lm.GENERATION_COLUMNS))
    batch = sft_collator(trainer.processing_class)(list(rows))
    with torch.no_grad():
        full_loss = trainer.model.eval()(**batch).loss.item()
    assert capped["eval_loss"] == pytest.approx(full_loss, rel=1e-5)

    generated.clear()
    trainer.max_generate_samples = 0  # --max_generate_samples 0: no generation, same loss
    off = trainer.evaluate()
    assert generated == [] and "eval_exact_match" not in off
    assert off["eval_loss"] == pytest.approx(capped["eval_loss"])
