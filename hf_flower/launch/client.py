"""A long-lived Flower client: one SuperNode, and this process (or all ranks of an Accelerate launch)
running hf-flower's ClientApp for every message it receives.

This module starts and stops what such a client needs: the SuperNode (`--isolation process`,
through `transport/supernode.py`), and on the way out the other ranks; the polling for tasks and
the handling of each message is `transport/client_loop.py`. Under `accelerate launch`, rank 0
hands every job to the other ranks (`client/ranks.py`) and all ranks run the same `Trainer`
together; rank 0 replies.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message

from ..arguments.policy import ClientPolicy
from ..client import client_app, failures, ranks, session
from ..factory import load_factory
from ..transport import client_loop, supernode
from .flower import flower_env
from .processes import LOOPBACK, ManagedProcess, Stopped, free_port, port_is_open, stop_signals_raise

# In the client's --work_dir: every failure it reported to the server, in full, by reference.
FAILURES_LOG = "failures.log"


@dataclass
class ClientOptions:
    """How this client reaches the SuperLink, which data it serves and what it lets a run do.

    TLS: `root_certificates` (the CA that signed the SuperLink's certificate), or else the system's
    trusted CAs; plaintext only with `insecure`.
    """

    superlink: str
    node_config: dict
    work_dir: Path
    # The client's own Trainer factory (`factory_ref`), the function itself when the caller holds it
    # (a script's `hf_flower.main`), and its settings; without it, the built-in task a run names.
    trainer: str | None = None
    factory: Callable | None = None
    trainer_config: dict = field(default_factory=dict)
    root_certificates: str | None = None
    insecure: bool = False
    policy: ClientPolicy = field(default_factory=ClientPolicy)
    auth_private_key: str | None = None
    superlink_timeout: float = 120.0
    # The SuperNode's wait between requests for work (`supernode.py`); Flower's own is 3 s.
    pull_interval: float = supernode.DEFAULT_PULL_INTERVAL
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


def run_everywhere(message: Message, context: Context) -> Message:
    """Rank 0's message, run by every rank; rank 0's reply."""
    ranks.send_job(message, context)
    return client_app.app(message=message, context=context)


def follower_loop() -> None:
    """Ranks other than 0: run every job rank 0 hands over, until it says stop."""
    while (job := ranks.receive_job()) is not None:
        message, context = job
        client_app.app(message=message, context=context)


def run_client(options: ClientOptions) -> int:
    """Serve the federation until the run ends, the SuperLink is gone too long, or a signal."""
    # The ClientApp runs in this process (every rank) and reads its policy from the environment.
    os.environ.update(options.policy.to_env())
    if options.trainer is not None:
        session.use_factory(
            options.trainer, options.factory or load_factory(options.trainer), options.trainer_config
        )
    if not ranks.is_main_process():
        follower_loop()
        ranks.shutdown()
        return 0

    runtime_port = free_port()
    runtime_address = f"{LOOPBACK}:{runtime_port}"
    env = flower_env(options.work_dir / ".flwr")
    log_path = options.work_dir / "supernode.log"
    # What failed here, in full, under the reference the server gets (`client/failures.py`).
    options.work_dir.mkdir(parents=True, exist_ok=True)
    failures.log_to(options.work_dir / FAILURES_LOG)
    try:
        with (
            stop_signals_raise(),
            ManagedProcess(
                supernode_command(options, runtime_port), log_path, env=env, cwd=str(options.work_dir)
            ) as supernode,
        ):
            supernode.wait_for_port(runtime_port)
            print(
                f"Client connected to {options.superlink} (SuperNode log: {log_path}; failures: "
                f"{options.work_dir / FAILURES_LOG})",
                flush=True,
            )
            watch = SuperLinkWatch(options.superlink, options.superlink_timeout)
            client_loop.serve_tasks(
                runtime_address,
                run_everywhere,
                failures.failure_reply,
                keep_going=lambda: supernode.running() and watch.alive(),
                poll_interval=options.poll_interval,
                poll_retry_seconds=options.poll_retry_seconds,
                # The other ranks hear from this one at least that often.
                on_idle=ranks.send_idle,
                idle_seconds=ranks.IDLE_NOTICE_SECONDS,
            )
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
        ranks.send_stop()
        ranks.shutdown()
