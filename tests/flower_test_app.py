"""A ClientApp for integration tests: hf-flower's own train/evaluate, wrapped in recording mods.

Tests copy this file into a temporary Flower app folder beside a `plan.json`, which says where to
record the weights each client replies with and which client should misbehave in which round.
"""

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

from hf_flower.client import client_app as hf_client
from hf_flower.weights import decode_arrays

PLAN = json.loads((Path(__file__).parent / "plan.json").read_text())


def _round(msg) -> int:
    return int(msg.content["config"]["server-round"])


def _should(action: str, msg, context) -> bool:
    """Whether the plan names this client and round for `action` (one rule or a list of them)."""
    rules = PLAN.get(action) or []
    rules = [rules] if isinstance(rules, dict) else rules
    partition = int(context.node_config["partition-id"])
    return msg.metadata.message_type == "train" and any(
        partition == rule["partition"] and _round(msg) == rule["round"] for rule in rules
    )


def misbehave(msg, context, call_next):
    """Break one client in one round, as the plan says."""
    if _should("drop_key", msg, context):
        # The client receives weights of another architecture: its training must fail, named.
        arrays = msg.content["arrays"]
        del arrays[next(iter(arrays.keys()))]
    reply = call_next(msg, context)
    if _should("nan_update", msg, context) and reply.has_content():
        arrays = reply.content["arrays"]
        key = next(iter(arrays.keys()))
        arrays[key] = Array(np.full_like(arrays[key].numpy(), np.nan))
    return reply


def record(msg, context, call_next):
    """Save every successful training reply: the weights and the number of examples."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == "train" and reply.has_content() and PLAN.get("record_dir"):
        folder = Path(PLAN["record_dir"]) / f"round-{_round(msg)}"
        folder.mkdir(parents=True, exist_ok=True)
        arrays: ArrayRecord = reply.content["arrays"]
        num_examples = reply.content["metrics"]["num-examples"]
        save_file(
            decode_arrays(arrays),  # as sent: bfloat16 too, which numpy cannot hold
            folder / f"partition-{context.node_config['partition-id']}.safetensors",
            metadata={"num_examples": str(num_examples)},
        )
    return reply


# misbehave wraps record, so a NaN update is recorded before it is spoiled (the server rejects it).
app = ClientApp(mods=[misbehave, record])
app.train()(hf_client.train)
app.evaluate()(hf_client.evaluate)
