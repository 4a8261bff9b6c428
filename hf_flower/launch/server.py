"""Run the server of a real deployment: a SuperLink that SuperNodes on other machines join.

Starts `flower-superlink` (or uses one already running at `--superlink`), registers the public
keys of authorised SuperNodes, submits our ServerApp with the run config, prints each round as it
is saved, and stops what it started when the run ends or on Ctrl-C.

Who can reach the SuperLink's port is decided here, before anything starts. Flower 1.42 serves its
Fleet API (SuperNodes), Control API (`flwr run`, `flwr ls`, `flwr stop`) and ServerAppIo API on
that one port, and its open-source distribution authenticates no caller of the Control API
(account login is Flower Enterprise only; `--control-api-address` no longer moves the Control API
off the port). A submitted run's ServerApp executes on this machine and drives every client, so a
SuperLink on a non-loopback `--host` is refused unless `--expose_control_api` says that is meant.
"""

from __future__ import annotations

import ipaddress
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
            join; giving any turns SuperNode authentication on. Without them, any SuperNode that
            reaches the port joins as a client (TLS authenticates the server, not the clients).
        expose_control_api: Start the SuperLink on a non-loopback `--host` although Flower's
            Control API on its port authenticates no one: whoever reaches the port can submit a run
            whose ServerApp executes code on this machine and drives every connected client.
            Refused without it; with it, admit only the clients' addresses to the port (firewall,
            security group, VPN).
    """

    host: str = LOOPBACK
    port: int = 9092
    superlink: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certfile: str | None = None
    insecure: bool = field(default=False, metadata={"help": "Run without TLS, on purpose (plaintext)."})
    authorized_keys: list[str] = field(default_factory=list)
    expose_control_api: bool = field(
        default=False,
        metadata={
            "help": "Start the SuperLink on a non-loopback --host although anyone who reaches its port "
            "can submit a run that executes on this machine (Flower's Control API authenticates no one)."
        },
    )

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
        if self.authorized_keys and not all(tls):
            raise ValueError(
                "--authorized_keys needs TLS (Flower authenticates SuperNodes only over TLS): give "
                "--ssl_certfile, --ssl_keyfile and --ssl_ca_certfile instead of --insecure."
            )
        if self.starts_superlink and not self.loopback_only and not self.expose_control_api:
            raise ValueError(
                f"--host {self.host} would let other machines reach the SuperLink's Control API, which "
                "authenticates no one in open-source Flower: anyone who reaches its port could submit a "
                "run whose ServerApp executes code on this machine and drives every client (TLS and "
                "--authorized_keys do not stop this). Admit only your clients' addresses to the port "
                "(firewall, security group or VPN) and pass --expose_control_api, or keep --host "
                "127.0.0.1 and bring the clients in over a tunnel."
            )
        for path in [p for p in tls if p] + list(self.authorized_keys):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path} does not exist.")

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def starts_superlink(self) -> bool:
        """Whether this launcher starts the SuperLink (not with `--superlink`: one runs already)."""
        return self.superlink is None

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can reach the SuperLink's port."""
        if self.host in LOOPBACK_HOSTS:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name other than localhost: assume other machines resolve it too
            return False


def exposure_warnings(options: ServerOptions) -> list[str]:
    """What a SuperLink that other machines reach leaves open, one warning each (none on loopback)."""
    if not options.starts_superlink or options.loopback_only:
        return []
    where = f"the SuperLink listens on {options.host}"
    warnings = [
        f"warning: {where} and its Control API authenticates no one (--expose_control_api): anyone "
        "who reaches the port can submit a run whose ServerApp executes code on this machine and "
        "drives every connected client. Admit only your clients' addresses to the port."
    ]
    if options.insecure:
        warnings.append(
            f"warning: {where} without TLS (--insecure): weights and run configs cross the network in "
            "plaintext. Use it only on a network you control."
        )
    if not options.authorized_keys:
        warnings.append(
            f"warning: {where} without --authorized_keys: any SuperNode that reaches the port joins as "
            "a client, receives the weights every round and sends updates (TLS authenticates the "
            "server, not the clients). Register your clients' public keys with --authorized_keys "
            "(`hf-flower make-certs --supernode-keys N` writes key pairs)."
        )
    return warnings


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
    for warning in exposure_warnings(options):
        print(warning, file=sys.stderr)
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
