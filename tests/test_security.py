"""TLS and SuperNode authentication on loopback, as the README's recipe does it: certificates from
`make_certs.py --host server.example.org`, `scripts/server.py` with them and two registered keys,
two registered clients (connecting to 127.0.0.1) that complete a round, an unregistered client the
SuperLink refuses, and a plaintext (`--insecure`) client that cannot connect.

One deployment (module fixture) serves the slow tests here; all its processes are stopped before
the tests look at what it left. The fast tests check the certificates, `make_certs.py`'s refusals
and the TLS options of both launchers without starting anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tomli
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from transformers import AutoModelForSequenceClassification

from hf_flower import checkpoint
from hf_flower.commands import client as client_command_module
from hf_flower.commands import make_certs
from hf_flower.launch import certs
from hf_flower.launch.client import ClientOptions, supernode_command
from hf_flower.launch.plan import run_prepare
from hf_flower.launch.processes import ManagedProcess, free_port
from hf_flower.launch.server import ServerOptions, exposure_warnings, prepare_server, superlink_command

ROOT = Path(__file__).resolve().parents[1]
OURS = (
    "flower-superlink",
    "flower-supernode",
    "hf_flower.transport.supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
    "scripts/client.py",
    "scripts/server.py",
)
# What a SuperNode whose key was not registered logs before it exits (flwr 1.42:
# ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, code 2004, reported through flwr_exit).
REFUSED = "[code: 2004] Failed to activate SuperNode."
CONNECTION_FAILED = "Failed to initialize the connection to the SuperLink."
# The name the README's recipe makes the certificate for; clients here still connect to 127.0.0.1.
SERVER_NAME = "server.example.org"
SUPERLINK_TIMEOUT = 15
SERVER_TIMEOUT = 150


def our_processes(port: int, tmp_root: Path) -> set[int]:
    """Flower and hf-flower processes of this deployment: their command line names its port or
    folder (so processes of tests running beside this one do not count)."""
    mine = re.compile(rf"(?<!\d){port}(?!\d)|{re.escape(str(tmp_root))}")
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(name in cmdline for name in OURS) and mine.search(cmdline):
            found.add(proc.pid)
    return found


@dataclass
class Deployment:
    tmp: Path
    port: int
    certs: dict[str, Path]
    keys: list[tuple[Path, Path]]
    server_code: int | None = None
    client_codes: dict[str, int | None] = field(default_factory=dict)
    left_behind: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return self.tmp / "run"

    def log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace") if path.exists() else f"({path} missing)"

    def supernode_log(self, client: str) -> str:
        return self.log(f"{client}/supernode.log")


def server_command(d: Deployment, model_dir: Path, csv: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "scripts" / "server.py"),
        "--model_name_or_path", str(model_dir), "--dataset", str(csv), "--max_length", "32",
        "--test_size", "40", "--num_rounds", "1", "--output_dir", str(d.output_dir),
        "--port", str(d.port),
        "--ssl_certfile", str(d.certs["server.pem"]), "--ssl_keyfile", str(d.certs["server.key"]),
        "--ssl_ca_certfile", str(d.certs["ca.crt"]),
        "--authorized_keys", str(d.keys[0][1]), str(d.keys[1][1]),
    ]  # fmt: skip


def client_command(d: Deployment, name: str, partition_id: int, tls: bool, key: Path | None) -> list[str]:
    command = [
        sys.executable, str(ROOT / "scripts" / "client.py"), "--superlink", f"127.0.0.1:{d.port}",
        "--partition_id", str(partition_id), "--num_partitions", "2",
        "--superlink_timeout", str(SUPERLINK_TIMEOUT), "--work_dir", str(d.tmp / name),
    ]  # fmt: skip
    command += ["--root_certificates", str(d.certs["ca.crt"])] if tls else ["--insecure"]
    if key is not None:
        command += ["--auth_private_key", str(key)]
    return command


def wait_for_file(proc: ManagedProcess, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not proc.running():
            pytest.fail(f"{proc.command[1]} exited before writing {path}:\n{proc.tail(40)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path} within {timeout:.0f} s:\n{proc.tail(40)}")
        time.sleep(0.2)


def wait_all(procs: dict[str, ManagedProcess], timeout: float) -> dict[str, int | None]:
    """Exit codes of the processes, None for those still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(p.running() for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {name: p.process.poll() for name, p in procs.items()}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir, reviews_csv) -> Deployment:
    tmp = tmp_path_factory.mktemp("secure")
    started = time.monotonic()
    # The README's step 1: `make_certs.py certs --host server.example.org --supernode-keys N`.
    assert make_certs.main([str(tmp / "certs"), "--host", SERVER_NAME, "--supernode-keys", "3"]) == 0
    d = Deployment(
        tmp=tmp,
        port=free_port(),
        certs={name: tmp / "certs" / name for name in certs.TLS_FILES},
        keys=certs.supernode_key_paths(tmp / "certs" / "keys", 3),
    )
    d.seconds["certs"] = time.monotonic() - started
    before = our_processes(d.port, tmp)
    # The run's model and data set are paths on this machine: clients read them only when allowed.
    allowed = ["--allowed_models", str(tiny_model_dir), "--allowed_data", str(reviews_csv)]
    clients = {
        # name: (partition, TLS, private key)
        "client-0": (0, True, d.keys[0][0]),
        "client-1": (1, True, d.keys[1][0]),
        "unregistered": (0, True, d.keys[2][0]),
        "insecure": (1, False, None),
    }
    with ManagedProcess(server_command(d, tiny_model_dir, reviews_csv), tmp / "server.log") as server:
        # The ServerApp writes the run's history (round 0) once the SuperLink listens and the keys
        # are registered; a SuperNode that starts earlier would be refused.
        wait_for_file(server, d.output_dir / checkpoint.HISTORY_FILE, timeout=120)
        d.seconds["server ready"] = time.monotonic() - started
        procs = {
            name: ManagedProcess(client_command(d, name, *spec) + allowed, tmp / f"{name}.log").__enter__()
            for name, spec in clients.items()
        }
        try:
            d.server_code = wait_all({"server": server}, SERVER_TIMEOUT)["server"]
            d.seconds["server exit"] = time.monotonic() - started
            # The server stopped its SuperLink: clients leave within --superlink_timeout.
            d.client_codes = wait_all(procs, SUPERLINK_TIMEOUT + 30)
            d.seconds["clients exit"] = time.monotonic() - started
        finally:
            for proc in procs.values():
                proc.stop()
    deadline = time.monotonic() + 20  # the SuperExec leaves shortly after its SuperLink
    while (left := our_processes(d.port, tmp) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            d.left_behind.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.NoSuchProcess:
            pass
    d.seconds["total"] = time.monotonic() - started
    print(f"\nsecure deployment timings (s): { {k: round(v, 1) for k, v in d.seconds.items()} }")
    return d


def server_names(server_pem: Path) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a server certificate is valid for."""
    server = x509.load_pem_x509_certificate(server_pem.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    return sans.get_values_for_type(x509.DNSName), ips


def test_certificates_and_keys_are_what_flower_expects(tmp_path):
    files = certs.write_tls_files(tmp_path, hosts=["10.0.0.1", "myserver.example.org"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    x509.load_pem_x509_certificate(files["server.pem"].read_bytes()).verify_directly_issued_by(ca)
    # The names clients use, and always the loopback names the server's launcher connects to.
    names = (["myserver.example.org", "localhost"], ["10.0.0.1", "127.0.0.1"])
    assert server_names(files["server.pem"]) == names
    ((private, public),) = certs.write_supernode_keys(tmp_path / "keys", 1)
    assert (private.name, public.name) == ("client-0", "client-0.pub")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    for path in (files["ca.key"], files["server.key"], private):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_make_certs_script(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_certs.py"), str(tmp_path), "--supernode-keys", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert names == {
        "ca.crt", "ca.key", "server.pem", "server.key",
        "keys/client-0", "keys/client-0.pub", "keys/client-1", "keys/client-1.pub",
    }  # fmt: skip
    assert server_names(tmp_path / "server.pem") == (["localhost"], ["127.0.0.1"])


@pytest.mark.parametrize("days", ["0", "-1"])
def test_make_certs_refuses_an_expired_validity_and_writes_nothing(tmp_path, days, capsys):
    with pytest.raises(SystemExit) as exit_:
        make_certs.main([str(tmp_path / "certs"), "--days", days])
    assert exit_.value.code == 2
    assert f"--days must be at least 1, got {days}" in capsys.readouterr().err
    assert not (tmp_path / "certs").exists()


def test_make_certs_never_replaces_a_ca_unless_told(tmp_path, capsys):
    (tmp_path / "ca.crt").write_text("the federation's CA")
    with pytest.raises(SystemExit) as exit_:
        make_certs.main([str(tmp_path), "--supernode-keys", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ca.crt'} already exists" in err and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt"]  # nothing written
    assert (tmp_path / "ca.crt").read_text() == "the federation's CA"


def test_key_writes_never_follow_a_symlink(tmp_path):
    target = tmp_path / "victim"
    target.write_text("not a key")
    link = tmp_path / "ca.key"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match=f"{link} already exists"):
        certs.write_private(link, b"secret")
    certs.write_private(link, b"secret", overwrite=True)  # replaces the link, not its target
    assert target.read_text() == "not a key"
    assert not link.is_symlink() and link.read_bytes() == b"secret"
    assert link.stat().st_mode & 0o777 == 0o600


def test_a_plaintext_server_needs_insecure(tmp_path):
    with pytest.raises(ValueError, match=r"would run without TLS and .* or pass --insecure"):
        ServerOptions()
    with pytest.raises(ValueError, match=r"without TLS on 0\.0\.0\.0, where other machines can reach it"):
        ServerOptions(host="0.0.0.0")
    assert "--insecure" in superlink_command(ServerOptions(insecure=True), 9092)
    # The command line says so before anything starts: exit 2 and one `error:` line.
    prepared = run_prepare(prepare_server, ["--output_dir", str(tmp_path / "run"), "--host", "0.0.0.0"])
    assert prepared.plan is None and prepared.exit_code == 2
    assert prepared.error.startswith("error: The SuperLink would run without TLS on 0.0.0.0")


def test_server_tls_files_turn_tls_on(tmp_path):
    files = {name: tmp_path / name for name in ("server.pem", "server.key", "ca.crt")}
    for path in files.values():
        path.write_text("")
    tls = dict(ssl_certfile=str(files["server.pem"]), ssl_keyfile=str(files["server.key"]))
    options = ServerOptions(
        host="0.0.0.0", ssl_ca_certfile=str(files["ca.crt"]), expose_control_api=True, **tls
    )
    command = superlink_command(options, 9092)
    assert "--insecure" not in command and command[command.index("--ssl-certfile") + 1] == tls["ssl_certfile"]
    with pytest.raises(ValueError, match="--insecure turns TLS off"):
        ServerOptions(insecure=True, ssl_ca_certfile=str(files["ca.crt"]), **tls)


def tls_files(tmp_path) -> dict[str, str]:
    """Empty stand-ins for the three TLS files (their content is read only by the SuperLink)."""
    files = {"ssl_certfile": "server.pem", "ssl_keyfile": "server.key", "ssl_ca_certfile": "ca.crt"}
    for name in files.values():
        (tmp_path / name).write_text("")
    return {option: str(tmp_path / name) for option, name in files.items()}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "server.example.org"])
def test_a_superlink_other_machines_reach_needs_expose_control_api(tmp_path, host):
    tls = tls_files(tmp_path)
    refusal = rf"--host {re.escape(host)} would let other machines reach the SuperLink's Control API"
    with pytest.raises(ValueError, match=refusal) as err:
        ServerOptions(host=host, **tls)
    assert (
        "anyone who reaches its port could submit a run whose ServerApp executes code on this machine"
        in str(err.value)
    )
    with pytest.raises(ValueError, match=refusal):
        ServerOptions(host=host, insecure=True)
    # Said on purpose, it starts, and says what stays open every time.
    exposed = ServerOptions(host=host, expose_control_api=True, **tls)
    (control,) = exposure_warnings(exposed)[:1]
    assert "Control API authenticates no one (--expose_control_api)" in control
    # Loopback needs no flag, nor does a SuperLink started elsewhere (`--superlink`).
    for options in (
        ServerOptions(host="127.0.0.1", **tls),
        ServerOptions(host="127.0.0.2", insecure=True),
        ServerOptions(host="localhost", **tls),
        ServerOptions(host=host, superlink="10.0.0.5:9092", **tls),
    ):
        assert exposure_warnings(options) == []


def test_what_a_public_superlink_leaves_open_is_said(tmp_path):
    tls = tls_files(tmp_path)
    key = tmp_path / "client-0.pub"
    key.write_text("")
    public = dict(host="0.0.0.0", expose_control_api=True)
    # TLS without --authorized_keys: any TLS peer joins as a client.
    warnings = exposure_warnings(ServerOptions(**public, **tls))
    assert (
        len(warnings) == 2
        and "without --authorized_keys: any SuperNode that reaches the port joins" in warnings[1]
    )
    assert len(exposure_warnings(ServerOptions(**public, authorized_keys=[str(key)], **tls))) == 1
    plaintext = exposure_warnings(ServerOptions(**public, insecure=True))
    assert [w.split(":")[1].strip() for w in plaintext] == [
        "the SuperLink listens on 0.0.0.0 and its Control API authenticates no one (--expose_control_api)",
        "the SuperLink listens on 0.0.0.0 without TLS (--insecure)",
        "the SuperLink listens on 0.0.0.0 without --authorized_keys",
    ]
    # Flower authenticates SuperNodes over TLS only: said before it would exit on it.
    with pytest.raises(ValueError, match="--authorized_keys needs TLS"):
        ServerOptions(insecure=True, authorized_keys=[str(key)])


@pytest.mark.slow
def test_hf_flower_server_refuses_a_public_host_before_starting_anything(tmp_path, no_leftover_processes):
    output_dir = tmp_path / "run"
    argv = [
        "server",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        "--insecure",
        "--output_dir",
        str(output_dir),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "hf_flower", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(
        "error: --host 0.0.0.0 would let other machines reach the SuperLink's Control API"
    )
    assert "pass --expose_control_api" in result.stderr
    assert not output_dir.exists()  # refused before the output folder (or any Flower process) was touched
    assert "SuperLink at" not in result.stdout


def test_a_client_uses_tls_with_the_system_roots_unless_told_otherwise(tmp_path):
    def command(**options) -> list[str]:
        client = ClientOptions(superlink=f"{SERVER_NAME}:9092", node_config={}, work_dir=tmp_path, **options)
        return supernode_command(client, 9094)

    default = command()
    assert "--insecure" not in default and "--root-certificates" not in default  # Flower: system CAs
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    with_ca = command(root_certificates=str(ca))
    assert with_ca[with_ca.index("--root-certificates") + 1] == str(ca) and "--insecure" not in with_ca
    assert "--insecure" in command(insecure=True)
    argv = ["--superlink", "h:1", "--partition_id", "0", "--num_partitions", "1", "--insecure"]
    assert client_command_module.main([*argv, "--root_certificates", str(ca)]) == 2


@pytest.mark.slow
def test_registered_clients_complete_the_run_over_tls(deployment):
    d = deployment
    assert d.server_code == 0, d.log("server.log")[-4000:]
    for name in ("client-0", "client-1"):
        assert d.client_codes[name] == 0, d.log(f"{name}.log")[-3000:]
    assert checkpoint.list_rounds(d.output_dir) == [0, 1]
    history = checkpoint.read_history(d.output_dir)
    assert history["status"] == "completed"
    assert history["rounds"][1]["clients"]["train_succeeded"] == 2
    AutoModelForSequenceClassification.from_pretrained(d.output_dir / "round-1")
    assert "round 1/1 | clients 2/2" in d.log("server.log")
    # The SuperLink served HTTPS with authentication on, and only the two registered nodes joined.
    superlink_log = d.log("run/logs/superlink.log")
    assert "Uvicorn running on https://" in superlink_log
    assert superlink_log.count("[ControlServicer.RegisterNode] Created node_id") == 2
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id") == 2
    # `flwr supernode register` and `flwr run` reached it through a TLS connection.
    connection = tomli.loads((d.output_dir / ".flwr" / "config.toml").read_text())["superlink"]["local"]
    assert connection["root-certificates"] == str(d.certs["ca.crt"])
    assert "insecure" not in connection
    # The certificate of the README's recipe names the server, and the launcher's 127.0.0.1 too.
    assert server_names(d.certs["server.pem"]) == ([SERVER_NAME, "localhost"], ["127.0.0.1"])


@pytest.mark.slow
def test_unregistered_client_is_refused(deployment):
    d = deployment
    log = d.supernode_log("unregistered")
    assert REFUSED in log, log[-3000:]
    assert d.client_codes["unregistered"] not in (0, None), d.log("unregistered.log")[-3000:]


@pytest.mark.slow
def test_client_without_tls_cannot_connect(deployment):
    d = deployment
    log = d.supernode_log("insecure")
    assert CONNECTION_FAILED in log, log[-3000:]
    # It never got an answer from the SuperLink, so not even a refusal.
    assert "[code: " not in log, log[-3000:]
    assert d.client_codes["insecure"] not in (0, None), d.log("insecure.log")[-3000:]


@pytest.mark.slow
def test_no_process_left_behind(deployment):
    assert not deployment.left_behind, deployment.left_behind
