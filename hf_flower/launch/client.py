"""A long-lived Flower client: one SuperNode, and this process (or all ranks of an Accelerate launch)
running hf-flower's ClientApp for every message it receives.

The SuperNode runs with `--isolation process`: it starts no `flwr-clientapp` of its own. Rank 0
polls the SuperNode's runtime API for tasks and does what `flwr-clientapp` does for one message
(`flwr.supernode.runtime.run_clientapp`: pull the input, run the app, push the reply and the
task output), but in a process that keeps torch, transformers, the model and the tokenised data
loaded across rounds. Under `accelerate launch`, rank 0 hands every job to the other ranks
(`distributed.py`) and all ranks run the same `Trainer` together; rank 0 replies.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from .. import client_app, wire
from ..client_policy import ClientPolicy
from ..constants import (
    ARRAYS_HELD_KEY,
    ARRAYS_ID_KEY,
    ARRAYS_KEY,
    ARRAYS_NOT_HELD_CODE,
    CLIENT_KEY,
    CONFIG_KEY,
)
from . import distributed, supernode
from .processes import LOOPBACK, ManagedProcess, Stopped, free_port, port_is_open, stop_signals_raise
from .simulation import flower_env

logger = logging.getLogger(__name__)


@dataclass
class ClientOptions:
    """How this client reaches the SuperLink, which data it serves and what it lets a run do.

    TLS: `root_certificates` (the CA that signed the SuperLink's certificate), or else the system's
    trusted CAs; plaintext only with `insecure`.
    """

    superlink: str
    node_config: dict
    work_dir: Path
    root_certificates: str | None = None
    insecure: bool = False
    policy: ClientPolicy = field(default_factory=ClientPolicy)
    auth_private_key: str | None = None
    superlink_timeout: float = 120.0
    # The SuperNode's wait between requests for work (`supernode.py`); Flower's own is 3 s.
    pull_interval: float = 0.5
    # Seconds between the SuperNode's heartbeats (`supernode.py`); None keeps Flower's 30 s.
    heartbeat_interval: float | None = None
    poll_interval: float = 0.2
    poll_retry_seconds: float = 5.0

    def __post_init__(self):
        if self.heartbeat_interval is not None:
            supernode.check_heartbeat_interval(self.heartbeat_interval)
        if self.insecure and self.root_certificates:
            raise ValueError("--insecure turns TLS off: give it or --root_certificates, not both.")
        for path in filter(None, [self.root_certificates, self.auth_private_key]):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path} does not exist.")


class SuperLinkWatch:
    """Whether the SuperLink has answered a TCP connection within the last `timeout` seconds.

    A SuperNode whose SuperLink is gone gives up reconnecting but keeps running, so the client
    watches the SuperLink itself (a plain connect, no Flower internals) to know when to leave.
    """

    def __init__(self, address: str, timeout: float, every: float = 2.0):
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.timeout, self.every = timeout, every
        self.last_seen = self.last_check = time.monotonic()

    def alive(self) -> bool:
        now = time.monotonic()
        if now - self.last_check >= self.every:
            self.last_check = now
            if port_is_open(self.host, self.port):
                self.last_seen = now
        return now - self.last_seen < self.timeout


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

    def announce(self, reply: Message) -> None:
        """Tell the server, in the reply, which weights this client holds."""
        if self.arrays_id and reply.has_content() and CLIENT_KEY in reply.content.config_records:
            reply.content[CLIENT_KEY][ARRAYS_HELD_KEY] = self.arrays_id


def supernode_command(options: ClientOptions, runtime_port: int) -> list[str]:
    """`flower-supernode` with process isolation, its runtime API on a free loopback port.

    Without `--root-certificates` or `--insecure`, the SuperNode verifies the SuperLink with the
    system's trusted CAs (Flower's default), so a server with a public certificate needs no flag.
    """
    node_config = " ".join(f"{k}={_toml_value(v)}" for k, v in options.node_config.items())
    command = [
        sys.executable, "-m", supernode.__name__, supernode.PULL_INTERVAL_FLAG, str(options.pull_interval),
        "--superlink", options.superlink,
        "--isolation", "process",
        "--host", LOOPBACK,
        "--port", str(runtime_port),
        "--node-config", node_config,
        "--max-wait-time", str(options.superlink_timeout),
    ]  # fmt: skip
    if options.heartbeat_interval is not None:
        command += [supernode.HEARTBEAT_INTERVAL_FLAG, str(options.heartbeat_interval)]
    if options.root_certificates:
        command += ["--root-certificates", options.root_certificates]
    elif options.insecure:
        command += ["--insecure"]
    if options.auth_private_key:
        command += ["--auth-supernode-private-key", options.auth_private_key]
    return command


def _toml_value(value) -> str:
    return (
        f'"{value}"'
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


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


def handle_task(runtime_address: str, token: str, held: HeldWeights) -> None:
    """Run the ClientApp for one task, as `flwr-clientapp` would, in this process."""
    task_client = _runtime_client(runtime_address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(task_client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "hf-flower client failed"
    try:
        message, context, _, _ = pull_task_input(task_client)
        reply = serve(message, context, held, run_everywhere)
        push_message(task_client, reply, context)
        status, details = SubStatus.COMPLETED, ""
    finally:
        push_task_output(task_client, context, status, details)
        heartbeat.stop()
        task_client.close()


def serve(message: Message, context: Context, held: HeldWeights, run) -> Message:
    """One message as this client handles it: its weights unpacked (`wire`) or filled in from
    `held`, `run(message, context)`, and the reply packed and announcing the weights held."""
    if message.has_content():
        wire.unpack(message.content)
    if not held.complete(message):
        reason = "this client no longer holds the weights the server named; send them in full"
        return Message(Error(code=ARRAYS_NOT_HELD_CODE, reason=reason), reply_to=message)
    reply = run(message, context)
    if reply.has_content():
        wire.pack(reply.content)
    held.announce(reply)
    return reply


def run_everywhere(message: Message, context: Context) -> Message:
    """Rank 0's message, run by every rank; rank 0's reply."""
    distributed.send_job(message, context)
    return client_app.app(message=message, context=context)


def follower_loop() -> None:
    """Ranks other than 0: run every job rank 0 hands over, until it says stop."""
    while (job := distributed.receive_job()) is not None:
        message, context = job
        client_app.app(message=message, context=context)


def run_client(options: ClientOptions) -> int:
    """Serve the federation until the run ends, the SuperLink is gone too long, or a signal."""
    # The ClientApp runs in this process (every rank) and reads its policy from the environment.
    os.environ.update(options.policy.to_env())
    if not distributed.is_main_process():
        follower_loop()
        distributed.shutdown()
        return 0

    runtime_port = free_port()
    runtime_address = f"{LOOPBACK}:{runtime_port}"
    env = flower_env(options.work_dir / ".flwr")
    log_path = options.work_dir / "supernode.log"
    try:
        with (
            stop_signals_raise(),
            ManagedProcess(
                supernode_command(options, runtime_port), log_path, env=env, cwd=str(options.work_dir)
            ) as supernode,
        ):
            supernode.wait_for_port(runtime_port)
            # Bounded retries, so the loop keeps checking whether the SuperLink is still there.
            poller = _runtime_client(runtime_address, "SuperExec", max_time=options.poll_retry_seconds)
            print(f"Client connected to {options.superlink} (SuperNode log: {log_path})", flush=True)
            watch = SuperLinkWatch(options.superlink, options.superlink_timeout)
            held = HeldWeights()
            last_job = time.monotonic()  # when the other ranks last heard from this one
            while supernode.running() and watch.alive():
                if time.monotonic() - last_job >= distributed.IDLE_NOTICE_SECONDS:
                    distributed.send_idle()
                    last_job = time.monotonic()
                try:
                    response = poller.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                    )
                except Exception as err:  # noqa: BLE001 - a SuperNode without SuperLink answers errors
                    logger.debug("AcquireTask failed: %s", err)
                    time.sleep(options.poll_interval)
                    continue
                if response.HasField("task") and response.token:
                    handle_task(runtime_address, response.token, held)
                    last_job = time.monotonic()
                else:
                    time.sleep(options.poll_interval)
            if supernode.running():
                print(
                    f"SuperLink {options.superlink} unreachable for {options.superlink_timeout:.0f} s: exiting."
                )
                return 0
            code = supernode.process.returncode
            print(f"SuperNode exited with code {code}; it may have been refused:\n{supernode.tail(5)}")
            return 1
    except (Stopped, KeyboardInterrupt) as reason:
        print(f"Client stopping ({reason or 'interrupted'}).", flush=True)
        return 0
    finally:
        distributed.send_stop()
        distributed.shutdown()
