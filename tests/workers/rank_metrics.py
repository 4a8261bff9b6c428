"""Run one train and one evaluate message through hf-flower's client on every rank; rank 0 writes
its replies' metrics to the JSON file given as argv[2]. argv[1] is a JSON run config; argv[3], if
given, the JSON run facts the server would send (default: the classes of conftest's reviews).

Started by tests/test_deployment.py both as `python` (one process) and under `accelerate launch`
with two ranks, exactly as `scripts/client.py` hands jobs (and idle notices) from rank 0 to the
other ranks.
"""

import json
import sys
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from hf_flower.client import client_app, session
from hf_flower.client import ranks as distributed
from hf_flower.weights import get_weights

REVIEW_FACTS = {"label-names": ["0", "1"]}  # conftest's reviews: integer labels 0 and 1


def instruction(arrays, kind, facts):
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **facts})})
    metadata = Metadata(
        run_id=1, message_id=f"m-{kind}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600, message_type=kind,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


def main(run_config_path: str, output_path: str, facts_json: str | None = None) -> None:
    run_config = json.loads(open(run_config_path).read())
    facts = json.loads(facts_json) if facts_json is not None else REVIEW_FACTS
    if not distributed.is_main_process():
        while (job := distributed.receive_job()) is not None:
            client_app.app(message=job[0], context=job[1])
        distributed.shutdown()
        return
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
        run_config=run_config,
    )  # fmt: skip
    # The weights a server would send: the client's own model as its make_trainer builds it.
    start = get_weights(
        session.session_for(
            instruction(ArrayRecord(), MessageType.TRAIN, facts), context
        ).driver.trainer.model
    )
    results = {}
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        message = instruction(start, kind, facts)
        # What rank 0 of `scripts/client.py` sends while it waits for the server: the other ranks
        # keep waiting for the job.
        distributed.send_idle()
        distributed.send_job(message, context)
        reply = client_app.app(message=message, context=context)
        assert not reply.has_error(), reply.error.reason
        results[kind] = dict(reply.content["metrics"])
        if kind == MessageType.TRAIN:
            weights = reply.content["arrays"].to_torch_state_dict()
            results["weights_l1"] = float(sum(t.double().abs().sum() for t in weights.values()))
            results["start_l1"] = float(
                sum(t.double().abs().sum() for t in start.to_torch_state_dict().values())
            )
    distributed.send_stop()
    distributed.shutdown()
    with open(output_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
