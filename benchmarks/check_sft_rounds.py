"""Load every round of an SFT run as a user would, and ask the last one held-out reviews.

For each `round-N` of OUTPUT_DIR: `PeftModel.from_pretrained(base, round-N)` on the base model,
and `round-N/merged/` with `AutoModelForCausalLM.from_pretrained` and `pipeline("text-generation")`;
the adapter and merged models must agree on the next token of a prompt. Then the merged last round
answers `--reviews` reviews of the run's central test split (which no client trained on) through
`pipeline("text-generation")` with the chat template, and the answers are printed beside the labels.

Command (after `configs/sft_quickstart.yaml` has run; the note of issue 10 quotes its output):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/check_sft_rounds.py outputs/sft_quickstart --reviews 8
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--reviews", type=int, default=8, help="Held-out reviews the last round answers.")
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from hf_flower import checkpoint
    from hf_flower.arguments.run_config import from_run_config
    from hf_flower.data import prepare_splits
    from hf_flower.modeling import resolve_model_path
    from hf_flower.tasks.sft_data import check_sft_columns

    history = checkpoint.read_history(args.output_dir)
    run_args = from_run_config(history["run_config"])
    base_path = resolve_model_path(run_args.model.model_name_or_path)
    rounds = checkpoint.list_rounds(args.output_dir)
    for round_num in rounds:
        folder = checkpoint.round_dir(args.output_dir, round_num)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder).eval()
        merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
        pipeline("text-generation", model=merged, tokenizer=tokenizer)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Is this review positive or negative? A wonderful film."}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            same = adapter(prompt).logits[0, -1].argmax() == merged(prompt).logits[0, -1].argmax()
        print(f"round {round_num}: PeftModel and merged/ load; same next token: {bool(same)}")

    last = checkpoint.round_dir(args.output_dir, rounds[-1])
    generator = pipeline("text-generation", model=str(last / "merged"))
    test = prepare_splits(run_args.data, run_args.training.seed, check_sft_columns).test
    right, pairs = 0, Counter()
    for row in test.select(range(min(args.reviews, len(test)))):
        answer = generator(row[run_args.data.prompt_column], max_new_tokens=8, do_sample=False)
        reply = answer[0]["generated_text"][-1]["content"].strip()
        right += reply == row[run_args.data.completion_column]
        pairs[(row[run_args.data.completion_column], reply)] += 1
        review = row[run_args.data.prompt_column][-1]["content"].split("\n\n")[0]
        print(f"label {row[run_args.data.completion_column]:>8} | answer {reply!r:12} | {review[:70]}...")
    print(
        f"round {rounds[-1]} merged: {right}/{min(args.reviews, len(test))} held-out reviews answered right"
    )
    print("(label, answer): count", dict(pairs.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
