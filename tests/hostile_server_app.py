"""A hostile ServerApp for tests/test_hostile_server.py: what a curious server sends a client.

The test copies this file into a Flower app folder and submits it twice, on one SuperLink, to one
long-lived `hf-flower client` serving a file with a private column. The run config says which
attack to run (`hostile.mode`) and where the plan is (`hostile.plan`: the private values the server
tries to read back, the weights of the final honest message, where to write what it received):

- `data` (issue 22 points 1 and 7): the label column points at the private column, and the class
  list grows by every private value a refusal names (3 tries); then a query message, a message
  whose packed weights have no layout, one with an action the client has no handler for, and at
  last an honest training message, which a client that is still alive answers with weights;
- `paths` (point 6): the run names a model folder and a tokenizer file of the client's machine
  that its operator did not allow.

Every reply (its error reason, or whether it carried content) goes to `<out>-<mode>.json` as it
arrives, and `"done": true` once the attack is over.
"""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

MODEL_CLASS = "BertForSequenceClassification"
app = ServerApp()


def config(server_round: int, label_names: list[str]) -> ConfigRecord:
    return ConfigRecord(
        {"server-round": server_round, "model-class": MODEL_CLASS, "label-names": label_names}
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = json.loads(Path(str(context.run_config["hostile.plan"])).read_text())
    mode = str(context.run_config["hostile.mode"])
    deadline = time.monotonic() + 60
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.2)
    node = nodes[0]
    received = {}
    out = Path(f"{plan['out']}-{mode}.json")

    def send(name: str, content: RecordDict, kind: str = MessageType.TRAIN) -> str:
        # `Grid.send_and_receive`, polling every 0.1 s where Flower's waits 3 s between pulls.
        ids = list(grid.push_messages([Message(content=content, dst_node_id=node, message_type=kind)]))
        reply, deadline = None, time.monotonic() + 60
        while reply is None and time.monotonic() < deadline:
            reply = next(iter(grid.pull_messages(ids)), None)
            time.sleep(0.1)
        reason = reply.error.reason if reply is not None and reply.has_error() else ""
        received[name] = {"reply": reply is not None, "error": reason}
        received[name]["content"] = reply is not None and reply.has_content()
        out.write_text(json.dumps(received, indent=1))  # as it goes: a client may die on the next
        return reason

    if mode == "paths":
        send("local-paths", RecordDict({"arrays": ArrayRecord(), "config": config(1, ["0", "1"])}))
    else:
        names = ["0", "1"]
        for attempt in range(3):
            reason = send(
                f"label-attack-{attempt}", RecordDict({"arrays": ArrayRecord(), "config": config(1, names)})
            )
            leaked = [value for value in plan["private"] if value in reason and value not in names]
            if not leaked:
                break
            names += leaked
        send("query", RecordDict({"config": config(1, names)}), MessageType.QUERY)
        malformed = RecordDict(
            {
                "packed-arrays": ArrayRecord({"flat": Array(np.zeros(3, dtype=np.float32))}),
                "config": config(1, names),
            }
        )
        send("malformed-layout", malformed)
        send("unknown-action", RecordDict({"config": config(1, names)}), "train.other")
        weights = np.load(plan["weights"])
        arrays = ArrayRecord({name: Array(weights[name]) for name in plan["weight_names"]})
        send("honest", RecordDict({"arrays": arrays, "config": config(2, sorted(plan["private"]))}))
    out.write_text(json.dumps({**received, "done": True}, indent=1))
