"""Weights conversion time, both directions, against a plain memory copy of the same bytes.

A DistilBERT-sized classifier (`DistilBertConfig()`, 67M parameters, 268 MB in float32). Each
path is timed `--repeats` times after one warm-up; the table gives medians, in seconds:

  to message    state_dict -> ArrayRecord
    ours        `hf_flower.weights.state_dict_to_arrays(state_dict[, "bfloat16"])`
    flower      `ArrayRecord(state_dict)` (Flower's torch path: `np.save` per tensor)
    seed        `ArrayRecord([v.cpu().numpy() for v in state_dict.values()])`
  into model    ArrayRecord -> the model's parameters
    ours        `hf_flower.weights.set_weights(model, arrays)` (validates names, shapes, finite)
    flower      `model.load_state_dict(arrays.to_torch_state_dict())`
    seed        `model.load_state_dict(OrderedDict(zip(keys, map(torch.tensor, arrays.to_numpy_ndarrays()))))`
  memory copy   the same tensors copied once: `t.clone()` (into new memory, as every message
                needs) and `dst.copy_(t)` (into memory allocated and touched before)

Torch runs on one thread (`torch.set_num_threads(1)`), as a simulated client does with one CPU:
every path then copies on one core.

Command (the table in benchmarks/README.md):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/weights_conversion.py --output benchmarks/results/weights_conversion.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from transformers import DistilBertConfig, DistilBertForSequenceClassification  # noqa: E402

from hf_flower.weights import arrays_nbytes, set_weights, state_dict_to_arrays  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, lazy imports
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
        del result
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "weights_conversion.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    keys = list(state_dict)
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    preallocated = {k: torch.empty_like(v).fill_(1) for k, v in state_dict.items()}

    def copy_into():
        for k, t in state_dict.items():
            preallocated[k].copy_(t)

    ours = state_dict_to_arrays(state_dict)
    ours_bf16 = state_dict_to_arrays(state_dict, "bfloat16")
    flower = ArrayRecord(state_dict)
    seed = ArrayRecord([v.cpu().numpy() for v in state_dict.values()])
    assert arrays_nbytes(ours) == arrays_nbytes(flower)

    def seed_back():
        params = seed.to_numpy_ndarrays()
        model.load_state_dict(OrderedDict((k, torch.tensor(v)) for k, v in zip(keys, params)), strict=True)

    r = args.repeats
    results = {
        "bytes": nbytes,
        "repeats": r,
        "load_average_at_start": os.getloadavg()[0],
        "memory copy: clone (new memory)": timed(lambda: [t.clone() for t in state_dict.values()], r),
        "memory copy: copy_ (preallocated)": timed(copy_into, r),
        "to message: ours fp32": timed(lambda: state_dict_to_arrays(state_dict), r),
        "to message: ours bfloat16": timed(lambda: state_dict_to_arrays(state_dict, "bfloat16"), r),
        "to message: flower ArrayRecord(state_dict)": timed(lambda: ArrayRecord(state_dict), r),
        "to message: seed list of numpy": timed(
            lambda: ArrayRecord([v.cpu().numpy() for v in state_dict.values()]), r
        ),
        "into model: ours fp32 (set_weights)": timed(lambda: set_weights(model, ours), r),
        "into model: ours bfloat16 (set_weights)": timed(lambda: set_weights(model, ours_bf16), r),
        "into model: flower to_torch_state_dict + load_state_dict": timed(
            lambda: model.load_state_dict(flower.to_torch_state_dict()), r
        ),
        "into model: seed to_numpy_ndarrays + load_state_dict": timed(seed_back, r),
    }
    clone, copy_into_time = (
        results["memory copy: clone (new memory)"],
        results["memory copy: copy_ (preallocated)"],
    )
    print(
        f"{nbytes / 1e6:.1f} MB, median of {r}, torch threads 1, load {results['load_average_at_start']:.2f}"
    )
    print(f"{'path':58} {'seconds':>8} {'x clone':>8} {'x copy_':>8}")
    for name, value in results.items():
        if isinstance(value, float) and ":" in name:
            print(f"{name:58} {value:8.3f} {value / clone:8.2f} {value / copy_into_time:8.2f}")
    # A message is new memory (compare with clone); loading writes into the model's existing
    # parameters (compare with copy_ into preallocated memory).
    round_trip = results["to message: ours fp32"] + results["into model: ours fp32 (set_weights)"]
    results["round trip ours fp32 / (clone + copy_)"] = round_trip / (clone + copy_into_time)
    for path in ("flower", "seed"):
        to = next(v for k, v in results.items() if k.startswith(f"to message: {path}"))
        back = next(v for k, v in results.items() if k.startswith(f"into model: {path}"))
        results[f"round trip {path} / (clone + copy_)"] = (to + back) / (clone + copy_into_time)
    for name, value in results.items():
        if name.startswith("round trip"):
            print(f"{name}: {value:.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
