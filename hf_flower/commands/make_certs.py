"""Certificates and keys for a secure deployment (TLS + SuperNode authentication), no openssl needed.

For trying things out on this machine (SANs 127.0.0.1 and localhost) with keys for two clients:

    hf-flower make-certs certs --supernode-keys 2

For a server that clients reach as myserver.example.org or 10.0.0.1:

    hf-flower make-certs certs --host myserver.example.org --host 10.0.0.1 --supernode-keys 2

Then start the server with the certificate and the clients' public keys:

    hf-flower server --config configs/quickstart.yaml --host 0.0.0.0 --port 9092 \
        --ssl_certfile certs/server.pem --ssl_keyfile certs/server.key --ssl_ca_certfile certs/ca.crt \
        --authorized_keys certs/keys/client-0.pub certs/keys/client-1.pub

and each client with the CA certificate and its own private key (copy only these two files, and the
`.pub` beside the key, to the client's machine; `ca.key` stays with whoever signs certificates):

    hf-flower client --superlink myserver.example.org:9092 --root_certificates certs/ca.crt \
        --auth_private_key certs/keys/client-0 --partition_id 0 --num_partitions 2

Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key and, with --supernode-keys N,
OUT_DIR/keys/client-0 ... client-(N-1) with their .pub files (OpenSSH ECDSA P-384, as
`ssh-keygen -t ecdsa -b 384 -N ""` makes them). Private keys get mode 0600. Existing files are
overwritten.
"""

import argparse
import sys
from pathlib import Path

from ..launch.certs import DEFAULT_DAYS, DEFAULT_HOSTS, write_supernode_keys, write_tls_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="Folder to write the files to (created if missing).")
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        help="Name or IP address clients use to reach the server; repeat for several "
        f"(default: {' and '.join(DEFAULT_HOSTS)}).",
    )
    parser.add_argument(
        "--supernode-keys", type=int, default=0, metavar="N", help="Also write N SuperNode key pairs."
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="Validity of the certificates.")
    args = parser.parse_args(argv)
    if args.supernode_keys < 0:
        parser.error("--supernode-keys must be >= 0.")

    written = list(write_tls_files(args.out_dir, args.hosts or DEFAULT_HOSTS, args.days).values())
    for private, public in write_supernode_keys(args.out_dir / "keys", args.supernode_keys):
        written += [private, public]
    print(f"Server certificate for: {', '.join(args.hosts or DEFAULT_HOSTS)}")
    for path in written:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
