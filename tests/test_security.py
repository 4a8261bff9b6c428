"""TLS and SuperNode authentication on loopback: `scripts/server.py` with a certificate from
`hf_flower.launch.certs` and two registered keys, two registered clients that complete a round, an
unregistered client the SuperLink refuses, and a client without TLS that cannot connect.

One deployment (module fixture) serves every test here; all its processes are stopped before the
tests look at what it left.
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
from hf_flower.launch import certs
from hf_flower.launch.processes import ManagedProcess, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
OURS = (
    "flower-superlink",
    "flower-supernode",
    "hf_flower.launch.supernode",
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
    if tls:
        command += ["--root_certificates", str(d.certs["ca.crt"])]
    if key is not None:
        command += ["--auth_private_key", str(key)]
    return command


def wait_for_text(proc: ManagedProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log_path.read_text(errors="replace"):
        if not proc.running():
            pytest.fail(f"{proc.command[1]} exited before printing {text!r}:\n{proc.tail(40)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} within {timeout:.0f} s:\n{proc.tail(40)}")
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
    d = Deployment(
        tmp=tmp,
        port=free_port(),
        certs=certs.write_tls_files(tmp / "certs"),
        keys=certs.write_supernode_keys(tmp / "certs" / "keys", 3),
    )
    d.seconds["certs"] = time.monotonic() - started
    before = our_processes(d.port, tmp)
    clients = {
        # name: (partition, TLS, private key)
        "client-0": (0, True, d.keys[0][0]),
        "client-1": (1, True, d.keys[1][0]),
        "unregistered": (0, True, d.keys[2][0]),
        "insecure": (1, False, None),
    }
    with ManagedProcess(server_command(d, tiny_model_dir, reviews_csv), tmp / "server.log") as server:
        # Printed once the SuperLink listens and the keys are registered; a SuperNode that
        # starts earlier would be refused.
        wait_for_text(server, "waiting for 2 clients", timeout=90)
        d.seconds["server ready"] = time.monotonic() - started
        procs = {
            name: ManagedProcess(client_command(d, name, *spec), tmp / f"{name}.log").__enter__()
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


def test_certificates_and_keys_are_what_flower_expects(tmp_path):
    files = certs.write_tls_files(tmp_path, hosts=["127.0.0.1", "myserver.example.org"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["myserver.example.org"]
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
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]


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


def test_unregistered_client_is_refused(deployment):
    d = deployment
    log = d.supernode_log("unregistered")
    assert REFUSED in log, log[-3000:]
    assert d.client_codes["unregistered"] not in (0, None), d.log("unregistered.log")[-3000:]


def test_client_without_tls_cannot_connect(deployment):
    d = deployment
    log = d.supernode_log("insecure")
    assert CONNECTION_FAILED in log, log[-3000:]
    # It never got an answer from the SuperLink, so not even a refusal.
    assert "[code: " not in log, log[-3000:]
    assert d.client_codes["insecure"] not in (0, None), d.log("insecure.log")[-3000:]


def test_no_process_left_behind(deployment):
    assert not deployment.left_behind, deployment.left_behind
