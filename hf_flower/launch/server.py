"""Run the server of a real deployment: a SuperLink that SuperNodes on other machines join.

Starts `flower-superlink` (or uses one already running at `--superlink`), registers the public
keys of authorised SuperNodes, submits our ServerApp with the run config, prints each round as it
is saved, and stops what it started when the run ends or on Ctrl-C.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from .app import write_app_dir
from .flower import (
    CONNECTION,
    FLWR_HOME_DIRNAME,
    LOGS_DIRNAME,
    PROGRESS_DIRNAME,
    flower_env,
    flower_executable,
    flwr_cli,
    submit_and_watch,
    write_connection,
)
from .plan import Claim, RunPlan, parse_run
from .processes import LOOPBACK, ManagedProcess, free_port

LOOPBACK_HOSTS = (LOOPBACK, "localhost", "::1")


@dataclass
class ServerOptions:
    """Where the SuperLink listens and how it secures its connections.

    Args:
        host / port: Address of the SuperLink's one HTTP(S) port (Fleet, Control and ServerApp
            APIs). Use `--host 0.0.0.0` so other machines can connect. Port 0 picks a free one.
        superlink: Address of a SuperLink that is already running; then none is started.
        ssl_certfile / ssl_keyfile / ssl_ca_certfile: TLS certificate, key and CA
            (`hf-flower make-certs`). The certificate must be valid for 127.0.0.1, the address
            this launcher uses to reach its own SuperLink.
        insecure: Run without TLS, on purpose: anyone on the network can read the weights and
            talk to the port. Without TLS files the server refuses to start unless this is set.
        authorized_keys: Public keys (`ssh-keygen -t ecdsa -b 384`) of the SuperNodes allowed to
            join; giving any turns SuperNode authentication on.
    """

    host: str = LOOPBACK
    port: int = 9092
    superlink: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certfile: str | None = None
    insecure: bool = field(default=False, metadata={"help": "Run without TLS, on purpose (plaintext)."})
    authorized_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        tls = [self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile]
        if any(tls) and not all(tls):
            raise ValueError("TLS needs all of --ssl_certfile, --ssl_keyfile and --ssl_ca_certfile.")
        if self.insecure and all(tls):
            raise ValueError("--insecure turns TLS off: give it or the --ssl_* files, not both.")
        if not self.insecure and not all(tls):
            where = "" if self.loopback_only else f" on {self.host}, where other machines can reach it,"
            raise ValueError(
                f"The SuperLink would run without TLS{where} and anyone who reaches its port could read "
                "the weights. Give --ssl_certfile, --ssl_keyfile and --ssl_ca_certfile (`hf-flower "
                "make-certs` writes them), or pass --insecure to run unencrypted on purpose."
            )
        for path in [p for p in tls if p] + list(self.authorized_keys):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path} does not exist.")

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can reach the SuperLink's port."""
        return self.host in LOOPBACK_HOSTS


def prepare_server(argv: list[str] | None, claim: Claim, trainer: str | None = None) -> RunPlan:
    """A server's command line (the run's groups and `ServerOptions`), parsed and checked (the output
    folder claimed, then made ready). `trainer`: the factory a script fixed (`hf_flower.main`)."""
    from ..server.preflight import check_run

    run_config, (options,) = parse_run(list(argv or []), (ServerOptions,), trainer=trainer)
    plan = RunPlan.from_run_config(run_config, options)
    claim(plan.output_dir)
    check_run(run_config, prepare_output=True)
    return plan


def superlink_command(options: ServerOptions, port: int) -> list[str]:
    command = [
        flower_executable("flower-superlink"),
        "--disable-runtime-dependency-installation",
        "--host", options.host,
        "--port", str(port),
    ]  # fmt: skip
    if options.tls:
        command += [
            "--ssl-certfile", options.ssl_certfile,
            "--ssl-keyfile", options.ssl_keyfile,
            "--ssl-ca-certfile", options.ssl_ca_certfile,
        ]  # fmt: skip
    else:
        command += ["--insecure"]
    if options.authorized_keys:
        command += ["--enable-supernode-auth"]
    return command


def register_supernodes(keys: list[str], flwr_home: Path, env: dict) -> None:
    """`flwr supernode register` each public key, so only those SuperNodes may join."""
    for key in keys:
        result = flwr_cli(["supernode", "register", str(Path(key).resolve()), CONNECTION], env, flwr_home)
        if result.returncode != 0:
            raise RuntimeError(f"Registering {key} failed:\n{result.stdout}\n{result.stderr}")


def run_server(plan: RunPlan, app_dir: Path | None = None) -> int:
    """Serve one run (`plan.options` are its `ServerOptions`) to the SuperNodes that join; 0 when
    every round completed. `app_dir`: the Flower app to submit; by default one written from the
    imported package."""
    options: ServerOptions = plan.options
    if options.insecure and not options.loopback_only:
        print(
            f"warning: the SuperLink listens on {options.host} without TLS (--insecure): weights and "
            "run configs cross the network in plaintext. Use it only on a network you control.",
            file=sys.stderr,
        )
    output_dir = Path(plan.output_dir)
    flwr_home = output_dir / FLWR_HOME_DIRNAME
    env = flower_env(flwr_home, output_dir / LOGS_DIRNAME / PROGRESS_DIRNAME)
    port = options.port or free_port()
    connect_host = LOOPBACK if options.host in ("0.0.0.0", "::") else options.host
    address = options.superlink or f"{connect_host}:{port}"
    write_connection(flwr_home, address, options.ssl_ca_certfile)
    app_dir = app_dir or write_app_dir(flwr_home, plan.run_config)
    superlink = (
        nullcontext()
        if options.superlink
        else ManagedProcess(
            superlink_command(options, port),
            output_dir / LOGS_DIRNAME / "superlink.log",
            env=env,
            cwd=str(flwr_home),
        )
    )
    with superlink as process:
        if process is not None:
            process.wait_for_port(port, host=connect_host)
        register_supernodes(options.authorized_keys, flwr_home, env)
        print(
            f"SuperLink at {address}; waiting for {plan.min_available_clients} clients.",
            flush=True,
        )
        try:
            return submit_and_watch(plan, process, app_dir, flwr_home, env)
        except KeyboardInterrupt:
            print("Interrupted; the rounds saved so far are kept.", file=sys.stderr)
            return 130
