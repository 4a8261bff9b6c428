"""The ClientApp of `update_bound.py`: hf-flower's own train/evaluate, one client made hostile.

The benchmark copies this file into a Flower app folder beside a `plan.json` that names the hostile
partition and the factor: that client trains honestly, then replies `sent + factor * (trained - sent)`.
A benchmark-only mod, like `tests/flower_test_app.py`: the library has no such flag.
"""

import json
from pathlib import Path

from flwr.clientapp import ClientApp

from hf_flower.client import client_app as hf_client
from hf_flower.weights import decode_arrays, state_dict_to_arrays

PLAN = json.loads((Path(__file__).parent / "plan.json").read_text())


def scale_update(msg, context, call_next):
    """Partition `hostile_partition`: its training update times `factor`."""
    hostile = PLAN.get("hostile_partition")
    if (
        hostile is None
        or msg.metadata.message_type != "train"
        or int(context.node_config["partition-id"]) != hostile
    ):
        return call_next(msg, context)
    sent = {name: tensor.clone() for name, tensor in decode_arrays(msg.content["arrays"]).items()}
    reply = call_next(msg, context)
    if reply.has_content():
        trained = decode_arrays(reply.content["arrays"])
        factor = float(PLAN["factor"])
        reply.content["arrays"] = state_dict_to_arrays(
            {name: sent[name] + factor * (value - sent[name]) for name, value in trained.items()}
        )
    return reply


app = ClientApp(mods=[scale_update])
app.train()(hf_client.train)
app.evaluate()(hf_client.evaluate)
