"""Bytes per client per round: the seed's full fp32 state_dict against ours (full, bf16, LoRA).

Counts the serialised array data (`.npy` headers included) of real messages built by our code,
with no training: `get_weights(model, transfer_dtype)` for ours, and for the seed approach
`ArrayRecord([v.cpu().numpy() for v in model.state_dict().values()])`. A client's round moves
three copies: the global weights down for training, its update up, the global weights down
again for federated evaluation.

Models: all-MiniLM-L6-v2 (the packaged copy, as the quickstart loads it) and a DistilBERT-sized
classifier built from `DistilBertConfig()` (random weights; the byte counts only depend on
shapes). LoRA as `--peft lora --lora_r 8`: peft's default targets (query/value; q_lin/v_lin)
plus the freshly initialised head (classifier; pre_classifier + classifier for DistilBERT).

Command (the table in benchmarks/README.md, a few seconds):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/message_bytes.py --output benchmarks/results/message_bytes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import ArrayRecord  # noqa: E402

from hf_flower import adapters  # noqa: E402
from hf_flower.arguments import OFFLINE_MODEL, ModelArguments, PeftArguments  # noqa: E402
from hf_flower.modeling import load_model  # noqa: E402
from hf_flower.weights import arrays_nbytes, get_weights  # noqa: E402

MB = 1e6
# Messages per client per round: train (down), its reply (up), evaluate (down).
MESSAGES_PER_ROUND = 3


def minilm(peft: str):
    return load_model(
        ModelArguments(model_name_or_path=OFFLINE_MODEL), ["neg", "pos"], PeftArguments(peft=peft)
    )


def distilbert(peft: str):
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
    # What from_pretrained("distilbert-base-uncased") reports as freshly initialised.
    fresh = ["pre_classifier", "classifier"]
    model_args = ModelArguments(model_name_or_path="distilbert-base-uncased")
    return adapters.prepare_trainable(model, model_args, PeftArguments(peft=peft), fresh)


def measure(build) -> dict:
    full = build("none")
    seed = ArrayRecord([v.cpu().numpy() for v in full.state_dict().values()])
    rows = {
        "seed: full state_dict, fp32 (list of numpy)": arrays_nbytes(seed),
        "ours: full, fp32": arrays_nbytes(get_weights(full)),
        "ours: full, --transfer_dtype bfloat16": arrays_nbytes(get_weights(full, "bfloat16")),
    }
    lora = build("lora")
    rows["ours: --peft lora (r=8), fp32"] = arrays_nbytes(get_weights(lora))
    rows["ours: --peft lora (r=8), bfloat16"] = arrays_nbytes(get_weights(lora, "bfloat16"))
    parameters = sum(p.numel() for p in full.parameters())
    trainable_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    base = rows["seed: full state_dict, fp32 (list of numpy)"]
    return {
        "parameters": parameters,
        "lora_trainable_parameters": trainable_lora,
        "rows": {
            name: {
                "bytes_per_message": n,
                "mb_per_client_per_round": round(MESSAGES_PER_ROUND * n / MB, 3),
                "percent_of_seed": round(100 * n / base, 3),
            }
            for name, n in rows.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "message_bytes.json"))
    args = parser.parse_args(argv)
    results = {"all-MiniLM-L6-v2": measure(minilm), "DistilBERT-sized": measure(distilbert)}
    for model, result in results.items():
        print(
            f"\n{model}: {result['parameters']:,} parameters, LoRA trains {result['lora_trainable_parameters']:,}"
        )
        print(f"{'message':48} {'MB/message':>11} {'MB/round':>9} {'% of seed':>10}")
        for name, row in result["rows"].items():
            print(
                f"{name:48} {row['bytes_per_message'] / MB:11.3f} {row['mb_per_client_per_round']:9.2f} "
                f"{row['percent_of_seed']:9.2f}%"
            )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
