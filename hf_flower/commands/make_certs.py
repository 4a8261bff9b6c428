"""Certificates and keys for a secure deployment (TLS + SuperNode authentication), no openssl needed.

For trying things out on this machine (SANs 127.0.0.1 and localhost) with keys for two clients:

    hf-flower make-certs certs --supernode-keys 2

For a server that clients reach as myserver.example.org or 10.0.0.1 (the certificate is also valid
for 127.0.0.1 and localhost, which the server's launcher uses to reach its own SuperLink):

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
`ssh-keygen -t ecdsa -b 384 -N ""` makes them). Private keys get mode 0600. Files that already
exist are refused, and nothing is written, unless --overwrite; no file is written through a symlink.
"""

import argparse
import sys
from pathlib import Path

from ..launch.certs import (
    DEFAULT_DAYS,
    LOOPBACK_HOSTS,
    TLS_FILES,
    refuse_existing,
    server_hosts,
    supernode_key_paths,
    write_supernode_keys,
    write_tls_files,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="Folder to write the files to (created if missing).")
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        default=[],
        help="Name or IP address clients use to reach the server; repeat for several "
        f"({' and '.join(LOOPBACK_HOSTS)} are always included).",
    )
    parser.add_argument(
        "--supernode-keys", type=int, default=0, metavar="N", help="Also write N SuperNode key pairs."
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help="Validity of the certificates in days (at least 1)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace files already in OUT_DIR (a new CA, new keys)."
    )
    args = parser.parse_args(argv)
    if args.supernode_keys < 0:
        parser.error("--supernode-keys must be >= 0.")
    if args.days < 1:
        parser.error(f"--days must be at least 1, got {args.days}: the certificates would expire at once.")
    keys_dir = args.out_dir / "keys"
    targets = [args.out_dir / name for name in TLS_FILES]
    targets += [path for pair in supernode_key_paths(keys_dir, args.supernode_keys) for path in pair]
    try:
        refuse_existing(targets, args.overwrite)  # all of them before anything is written
    except FileExistsError as err:
        parser.error(str(err))

    written = list(write_tls_files(args.out_dir, args.hosts, args.days, args.overwrite).values())
    for private, public in write_supernode_keys(keys_dir, args.supernode_keys, overwrite=args.overwrite):
        written += [private, public]
    print(f"Server certificate for: {', '.join(server_hosts(args.hosts))}")
    for path in written:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
