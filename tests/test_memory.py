"""What a client and the server hold in memory (`benchmarks/memory_stages.py` measures it): the
causal-LM loss computes the vocabulary-sized logits only where it reads them, with the same loss and
gradients as with all of them; what a round freed goes back to the system."""

import gc
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from hf_flower import adapters
from hf_flower.tasks.causal_lm import GeneratingTrainer, labelled_logits

pytestmark = pytest.mark.usefixtures("one_thread")

IGNORE = -100


def sft_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Three right-padded rows of different lengths whose last 2 tokens are the trained completion."""
    generator = torch.Generator().manual_seed(0)
    lengths, width = [12, 9, 16], 16
    input_ids = torch.randint(5, vocab_size, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        labels[row, length - 2 : length] = input_ids[row, length - 2 : length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lora_model():
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer).train()
    return get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ), tokenizer


def loss_and_grads(loss, model):
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("num_items", [None, 6])  # the Trainer's mean, or its count over the batch
def test_the_loss_computes_only_the_logits_it_reads(tmp_path, num_items):
    model, tokenizer = lora_model()
    for _, p in model.named_parameters():  # LoRA's B starts at zero: give the adapters a gradient path
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = GeneratingTrainer(model=model, args=args, processing_class=tokenizer)
    batch = sft_batch(len(tokenizer))
    items = None if num_items is None else torch.tensor(num_items)

    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=items)
    # The completions end at different places: 2 trained tokens each, predicted from 6 positions.
    assert outputs.logits.shape[:2] == (3, 6)
    kept_loss, kept_grads = loss_and_grads(loss, model)
    full = model(**batch, **({} if items is None else {"num_items_in_batch": items}))
    assert full.logits.shape[:2] == (3, 16)
    full_loss, full_grads = loss_and_grads(full.loss, model)
    torch.testing.assert_close(kept_loss, full_loss)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, msg=name)


def test_logits_are_kept_whole_where_they_are_used_or_nothing_is_trained(tmp_path):
    model, tokenizer = lora_model()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    batch = sft_batch(len(tokenizer))
    scored = GeneratingTrainer(
        model=model, args=args, processing_class=tokenizer, compute_metrics=lambda p: {}
    )
    _, outputs = scored.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == (3, 16)  # compute_metrics reads every position's logits
    assert labelled_logits(torch.full((2, 5), IGNORE)) == {}


# A process that frees 256 blocks of 1 MiB after glibc raised its mmap threshold above them (by
# freeing a 16 MiB block), keeping a 257th above them so the heap's top cannot shrink by itself;
# its resident MiB after the free and after `release_freed_memory`.
FREED_BLOCKS = """
import ctypes, ctypes.util
from hf_flower.modeling import release_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
libc.free(libc.malloc(16 << 20))
blocks = [libc.malloc(1 << 20) for _ in range(257)]
for block in blocks:
    libc.memset(block, 1, 1 << 20)
kept = blocks.pop()
for block in blocks:
    libc.free(block)
freed = resident_mib()
release_freed_memory()
print(freed, resident_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_memory_a_round_freed_goes_back_to_the_system():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", FREED_BLOCKS], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    freed, released = map(int, done.stdout.split())
    assert freed - released >= 200, (freed, released)  # glibc kept the 256 MiB until asked


def test_the_client_gives_freed_memory_back_after_every_message(monkeypatch):
    from hf_flower.client import client_app

    def fail():
        raise RuntimeError("the handler failed")

    calls = []
    monkeypatch.setattr(client_app, "release_freed_memory", lambda: calls.append("released"))
    with pytest.raises(RuntimeError):
        client_app.freed_memory_released(None, None, lambda msg, context: calls.append("handled") or fail())
    assert calls == ["handled", "released"]


def test_a_merged_round_leaves_no_copy_of_the_model_behind(tmp_path):
    model, tokenizer = lora_model()
    # What accelerate's mixed precision does to a model the Trainer prepared: an instance `forward`
    # bound to the model, a reference cycle that every copy of the model has too.
    model.base_model.model.forward = types.MethodType(
        type(model.base_model.model).forward, model.base_model.model
    )

    def llamas():
        return sum(type(o).__name__ == "LlamaForCausalLM" for o in gc.get_objects())

    gc.collect()
    gc.disable()  # the copy must go when the round is saved, not at Python's next collection
    try:
        before = llamas()
        adapters.save_model(model, tokenizer, tmp_path / "round-1", save_merged=True)
        assert llamas() == before
    finally:
        gc.enable()
    assert (tmp_path / "round-1" / adapters.MERGED_DIR / "model.safetensors").is_file()
