"""Hand each Flower job from rank 0 to the other ranks of an `accelerate launch`.

A job is the message's small parts as JSON (metadata, config, run and node config) and its
weights as tensors, broadcast with `torch.distributed` one by one: nothing is pickled. In a plain
single process every function here is a no-op.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import PartialState
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from ..constants import ARRAYS_KEY, CONFIG_KEY
from ..weights import decode_arrays, state_dict_to_arrays

# How long a rank waits in a collective for the others: torch's default for gloo. Idle ranks wait
# in a broadcast for rank 0's next job for as long as the federation takes, so rank 0 sends them an
# idle notice every `IDLE_NOTICE_SECONDS` while it has no job: ranks wait without end only while
# rank 0 is alive, and leave with an error within the timeout when it hangs.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
IDLE_NOTICE_SECONDS = 60.0
STOP = "stop"
IDLE = "idle"


def state() -> PartialState:
    """Accelerate's process state; it joins the process group `accelerate launch` set up.

    Without a GPU the ranks train on CPU, and a `TrainingArguments` that the user's `make_trainer`
    builds later in this process must know it to join the same process group (gloo) rather than
    train alone on each rank: `ACCELERATE_USE_CPU` tells it, as `accelerate launch --cpu` does.
    """
    use_cpu = not torch.cuda.is_available()
    if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return PartialState(cpu=use_cpu, timeout=COLLECTIVE_TIMEOUT)


def is_distributed() -> bool:
    return state().num_processes > 1


def is_main_process() -> bool:
    return state().is_main_process


def collective_device() -> torch.device:
    """Where a tensor in a collective must be: NCCL needs CUDA tensors; gloo works on the CPU."""
    return state().device if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast_bytes(payload: bytes | None) -> bytes:
    length = torch.tensor(
        [len(payload) if payload is not None else 0], dtype=torch.long, device=collective_device()
    )
    dist.broadcast(length, src=0)
    buffer = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(collective_device())
        if payload is not None
        else torch.empty(int(length.item()), dtype=torch.uint8, device=collective_device())
    )
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().numpy())


def send_job(message: Message, context: Context) -> None:
    """Rank 0: broadcast one message and its context to every other rank."""
    if not is_distributed():
        return
    # As sent (bfloat16 included): the other ranks rebuild the very same message.
    weights = decode_arrays(message.content[ARRAYS_KEY])
    header = {
        "kind": message.metadata.message_type,
        "group_id": message.metadata.group_id,
        "created_at": message.metadata.created_at,
        "ttl": message.metadata.ttl,
        "config": dict(message.content[CONFIG_KEY]),
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
        "weights": [[key, str(t.dtype).removeprefix("torch."), list(t.shape)] for key, t in weights.items()],
    }
    _broadcast_bytes(json.dumps(header).encode())
    for tensor in weights.values():
        dist.broadcast(tensor.contiguous().to(collective_device()), src=0)


def send_idle() -> None:
    """Rank 0: tell every other rank there is no job yet (their wait starts again)."""
    if is_distributed():
        _broadcast_bytes(json.dumps({"kind": IDLE}).encode())


def send_stop() -> None:
    """Rank 0: tell every other rank to leave its loop."""
    if is_distributed():
        _broadcast_bytes(json.dumps({"kind": STOP}).encode())


def shutdown() -> None:
    """All ranks: leave together and close the process group before the interpreter exits.

    A rank that exits with its gloo group still open can abort in C++ ("terminate called without
    an active exception") while the other rank is still in the last broadcast.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def receive_job() -> tuple[Message, Context] | None:
    """Other ranks: wait for rank 0's next job; None when it says stop."""
    header = {"kind": IDLE}
    while header["kind"] == IDLE:
        header = json.loads(_broadcast_bytes(None))
    if header["kind"] == STOP:
        return None
    weights = {}
    for key, dtype, shape in header["weights"]:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=collective_device())
        dist.broadcast(tensor, src=0)
        weights[key] = tensor.cpu()
    content = RecordDict(
        {ARRAYS_KEY: state_dict_to_arrays(weights), CONFIG_KEY: ConfigRecord(header["config"])}
    )
    metadata = Metadata(
        run_id=header["run_id"],
        message_id=f"rank-copy-{time.time_ns()}",
        src_node_id=0,
        dst_node_id=header["node_id"],
        reply_to_message_id="",
        group_id=header["group_id"],
        created_at=header["created_at"],  # rank 0's deadline (`callbacks.TaskDeadline`)
        ttl=header["ttl"],
        message_type=header["kind"],
    )
    context = Context(
        run_id=header["run_id"],
        node_id=header["node_id"],
        node_config=header["node_config"],
        state=RecordDict(),
        run_config=header["run_config"],
    )
    return Message(metadata=metadata, content=content), context
