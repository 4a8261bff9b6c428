"""Certificates and keys for a secure deployment: TLS for the SuperLink, keys for SuperNode authentication.

What Flower's own `generate.sh` and `ssh-keygen -t ecdsa -b 384` make, written with the `cryptography`
package (no openssl or ssh-keygen needed):

- a certificate authority (`ca.crt`, `ca.key`) the clients trust (`--root_certificates ca.crt`);
- a server certificate (`server.pem`, `server.key`) signed by that CA, valid for the names and IP
  addresses the clients connect to (its subject alternative names) and always for 127.0.0.1 and
  localhost, which the server's own launcher uses to reach its SuperLink;
- ECDSA P-384 key pairs in OpenSSH format (`client-0`, `client-0.pub`, ...): each SuperNode keeps its
  private key, the server registers the public ones (`--authorized_keys`).

These are for a self-managed federation; a certificate from a public CA works as well for the server.
Files are created, never written through: an existing file is refused unless `overwrite` (then
replaced, not followed if it is a symlink), and private keys are created with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What a launcher uses to reach its own SuperLink (`launch/server.py` connects to 127.0.0.1 when
# the SuperLink listens on 0.0.0.0): every server certificate is valid for these names too.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
RSA_KEY_SIZE = 4096  # what Flower's generate.sh uses for its CA and server keys
TLS_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")

CertAndKey = tuple[x509.Certificate, rsa.RSAPrivateKey]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hf-flower"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    check_days(days)
    now = datetime.datetime.now(datetime.UTC)
    # Back-date a little so a peer whose clock is slightly behind accepts the certificate.
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def check_days(days: int) -> None:
    """Refuse a validity that would make a certificate expired (or expiring at once) when written."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"Certificates must be valid for at least 1 day, got --days {days!r}.")


def server_hosts(hosts: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`hosts`, then the loopback names the launcher itself connects to, each once."""
    return list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))


def subject_alt_names(hosts: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    """An IP SAN for every IP address in `hosts`, a DNS SAN for every other name."""
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _key_usage(**enabled: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the named usages on."""
    usages = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{usage: enabled.get(usage, False) for usage in usages})


def make_ca(common_name: str = "hf-flower CA", days: int = DEFAULT_DAYS) -> CertAndKey:
    """A self-signed certificate authority: its certificate and private key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
    not_before, not_after = _validity(days)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    hosts: list[str] | tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
) -> CertAndKey:
    """A TLS server certificate signed by the CA, and its private key. Its SANs are `hosts` and the
    loopback names (`server_hosts`); its common name is the first of them."""
    hosts = server_hosts(hosts)
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_supernode_key_pair(comment: str = "") -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384 -N ""` writes it:
    (private key file content, public key line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    return private, public + b"\n"


def refuse_existing(paths: list[Path], overwrite: bool = False) -> None:
    """Refuse to replace files (a CA above all: certificates it signed would stop verifying)."""
    existing = [str(path) for path in paths if os.path.lexists(path)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(
            f"{existing[0]} already exists{more}; certificates and keys are never replaced silently "
            "(a new CA invalidates every certificate the old one signed). Choose another folder, or "
            "pass --overwrite to replace them."
        )


def _create(path: Path, data: bytes, mode: int, overwrite: bool) -> Path:
    """Write `data` to a new file `path` with `mode`, never through a symlink or into an existing file.

    With `overwrite`, an existing entry (a symlink itself, not its target) is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_existing([path], overwrite)
    if os.path.lexists(path):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # exactly `mode`, whatever the umask
        f.write(data)
    return path


def write_private(path: Path, data: bytes, overwrite: bool = False) -> Path:
    """Write a private key to a new file readable by its owner only (mode 0600)."""
    return _create(path, data, 0o600, overwrite)


def _write_public(path: Path, data: bytes, overwrite: bool = False) -> Path:
    return _create(path, data, 0o644, overwrite)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_tls_files(
    out_dir: Path,
    hosts: list[str] | tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write `ca.crt`, `ca.key`, `server.pem`, `server.key` to `out_dir`; their paths by name.

    The server certificate is valid for `hosts` and the loopback names. Existing files are refused
    before anything is written, unless `overwrite`.
    """
    out_dir = Path(out_dir)
    check_days(days)
    refuse_existing([out_dir / name for name in TLS_FILES], overwrite)
    ca_cert, ca_key = make_ca(days=days)
    server_cert, server_key = make_server_cert(ca_cert, ca_key, hosts, days)
    pem = serialization.Encoding.PEM
    return {
        "ca.crt": _write_public(out_dir / "ca.crt", ca_cert.public_bytes(pem), overwrite),
        "ca.key": write_private(out_dir / "ca.key", _key_pem(ca_key), overwrite),
        "server.pem": _write_public(out_dir / "server.pem", server_cert.public_bytes(pem), overwrite),
        "server.key": write_private(out_dir / "server.key", _key_pem(server_key), overwrite),
    }


def supernode_key_paths(keys_dir: Path, count: int, prefix: str = "client") -> list[tuple[Path, Path]]:
    """Where `write_supernode_keys` puts each pair: (private, public) paths."""
    return [(Path(keys_dir) / f"{prefix}-{i}", Path(keys_dir) / f"{prefix}-{i}.pub") for i in range(count)]


def write_supernode_keys(
    keys_dir: Path, count: int, prefix: str = "client", overwrite: bool = False
) -> list[tuple[Path, Path]]:
    """Write `count` SuperNode key pairs `<prefix>-i` / `<prefix>-i.pub`; (private, public) paths.

    Existing files are refused before anything is written, unless `overwrite`."""
    paths = supernode_key_paths(keys_dir, count, prefix)
    refuse_existing([path for pair in paths for path in pair], overwrite)
    for private_path, public_path in paths:
        private, public = make_supernode_key_pair(comment=private_path.name)
        write_private(private_path, private, overwrite)
        _write_public(public_path, public, overwrite)
    return paths
