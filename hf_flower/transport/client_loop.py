"""The long-lived client's side of the protocol: asking its SuperNode for tasks, and handling each
as `flwr-clientapp` would, in a process that keeps the model loaded.

The SuperNode runs with `--isolation process`: it starts no `flwr-clientapp` of its own. This
loop polls the SuperNode's runtime API for tasks (`serve_tasks`) and does what `flwr-clientapp`
does for one message (Flower's `run_clientapp`: pull the input, run the app, push the reply and
the task output, `handle_task`), but in a process that keeps torch, transformers, the model and
the tokenised data loaded across rounds. Around the app (`serve`), received weights are unpacked
(`wire`) or filled in from those the client holds (`HeldWeights`), and the reply is packed and
says which weights the client holds. Starting the SuperNode and the other ranks is
`launch/client.py`'s job.

As `flwr-clientapp` does, the loop answers whatever it cannot handle with an error reply (the
caller's `fail`: a message it cannot read, one the app raises on) and keeps serving: no message
ends the client. A task that fails before it has a message to answer is logged and skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import Context, Error, Message

from ..constants import (
    ARRAYS_HELD_KEY,
    ARRAYS_ID_KEY,
    ARRAYS_KEY,
    ARRAYS_NOT_HELD_CODE,
    CLIENT_KEY,
    CONFIG_KEY,
)
from . import wire
from .flwr_compat import (
    AcquireTaskRequest,
    HeartbeatSender,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    TaskType,
    make_simple_http_retry_invoker,
    make_task_heartbeat_fn_http,
    pull_task_input,
    push_message,
    push_task_output,
    retry_object_pulls_sooner,
)

logger = logging.getLogger(__name__)

# What runs one message: `run(message, context)` returns the reply.
RunMessage = Callable[[Message, Context], Message]
# The error reply to a message that failed: `fail(message, context, error)`.
FailMessage = Callable[[Message, Context, Exception], Message]


class UnreadableWeightsError(ValueError):
    """The weights of a message cannot be unpacked: its packed layout is not one `wire.pack` writes."""


class HeldWeights:
    """The weights of the last message that carried them, so the server can send their id alone.

    The evaluate message of round N and the train message of round N+1 carry the same aggregate:
    a client that says it holds them (`announce`) saves one full download per round.
    """

    def __init__(self):
        self.arrays_id: str | None = None
        self.arrays = None

    def complete(self, message: Message) -> bool:
        """Fill in the weights a message names by id; False if they are not the ones held."""
        config = message.content.config_records.get(CONFIG_KEY) if message.has_content() else None
        if config is None or ARRAYS_ID_KEY not in config:
            return True
        if ARRAYS_KEY in message.content.array_records:
            self.arrays_id, self.arrays = str(config[ARRAYS_ID_KEY]), message.content[ARRAYS_KEY]
            return True
        if config[ARRAYS_ID_KEY] != self.arrays_id:
            return False
        message.content[ARRAYS_KEY] = self.arrays
        return True

    def bases(self) -> dict:
        """The weights held, by id: what weights sent by rows complete (`wire.unpack`)."""
        return {self.arrays_id: self.arrays} if self.arrays_id else {}

    def announce(self, reply: Message) -> None:
        """Tell the server, in the reply, which weights this client holds."""
        if self.arrays_id and reply.has_content() and CLIENT_KEY in reply.content.config_records:
            reply.content[CLIENT_KEY][ARRAYS_HELD_KEY] = self.arrays_id


def _runtime_client(
    address: str, component: str, token: str | None = None, max_time: float | None = None
) -> RuntimeHttpClient:
    retry_invoker = make_simple_http_retry_invoker()
    retry_invoker.max_time = max_time
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's runtime API listens on loopback only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry_invoker,
    )


def handle_task(
    runtime_address: str, token: str, held: HeldWeights, run: RunMessage, fail: FailMessage | None = None
) -> None:
    """Run the ClientApp for one task, as `flwr-clientapp` would, in this process."""
    task_client = _runtime_client(runtime_address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(task_client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "hf-flower client failed"
    try:
        message, context, _, _ = pull_task_input(task_client)
        reply = serve(message, context, held, run, fail)
        push_message(task_client, reply, context)
        status, details = SubStatus.COMPLETED, ""
    finally:
        push_task_output(task_client, context, status, details)
        heartbeat.stop()
        task_client.close()


def serve(
    message: Message, context: Context, held: HeldWeights, run: RunMessage, fail: FailMessage | None = None
) -> Message:
    """One message as this client handles it: its weights unpacked (`wire`, rows completed from
    the weights `held`) or filled in from `held`, `run(message, context)`, and the reply packed
    (against the weights held) and announcing the weights held.

    With `fail`, whatever raises is answered with `fail(message, context, error)` (weights that
    cannot be unpacked as an `UnreadableWeightsError`); without, it raises."""
    try:
        try:
            if message.has_content():
                wire.unpack(message.content, held.bases())
            holds_them = held.complete(message)
        except wire.BaseNotHeldError:
            holds_them = False
        except Exception as err:
            raise UnreadableWeightsError(f"the message's weights cannot be unpacked: {err}") from err
        if not holds_them:
            reason = "this client no longer holds the weights the server named; send them in full"
            return Message(Error(code=ARRAYS_NOT_HELD_CODE, reason=reason), reply_to=message)
        reply = run(message, context)
        if reply.has_content():
            # Rows of the weights that training left as they were stay out (`wire.pack_arrays`).
            wire.pack(reply.content, base_id=held.arrays_id, base=held.arrays)
        held.announce(reply)
        return reply
    except Exception as err:
        if fail is None:
            raise
        return fail(message, context, err)


def serve_tasks(
    runtime_address: str,
    run: RunMessage,
    fail: FailMessage,
    keep_going: Callable[[], bool],
    poll_interval: float,
    poll_retry_seconds: float,
    on_idle: Callable[[], None],
    idle_seconds: float,
) -> None:
    """Ask the SuperNode at `runtime_address` for tasks and handle each with `run` (failures
    answered by `fail`), while `keep_going()`; `on_idle()` every `idle_seconds` without a task."""
    # Bounded retries, so the loop keeps checking whether it should keep going.
    poller = _runtime_client(runtime_address, "SuperExec", max_time=poll_retry_seconds)
    # A task is announced before its SuperNode has its weights: pull them as they arrive.
    retry_object_pulls_sooner("clientapp")
    held = HeldWeights()
    last_job = time.monotonic()  # when `on_idle` or a task last ran
    while keep_going():
        if time.monotonic() - last_job >= idle_seconds:
            on_idle()
            last_job = time.monotonic()
        try:
            response = poller.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception as err:  # noqa: BLE001 - a SuperNode without SuperLink answers errors
            logger.debug("AcquireTask failed: %s", err)
            time.sleep(poll_interval)
            continue
        if response.HasField("task") and response.token:
            try:
                handle_task(runtime_address, response.token, held, run, fail)
            except Exception:  # noqa: BLE001 - no message to answer (pulling or pushing it failed)
                logger.exception("A task failed before its reply reached the SuperNode; serving the next.")
            last_job = time.monotonic()
        else:
            time.sleep(poll_interval)
