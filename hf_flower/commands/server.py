"""The server of a real deployment: a SuperLink, our ServerApp, every round saved.

Start it, then start clients (`hf-flower client`) on the machines that hold the data. Without
TLS files it refuses to start unless `--insecure` says plaintext is meant (trying things out on
this machine; clients then pass `--insecure` too):

    hf-flower server --config configs/quickstart.yaml --port 9092 --insecure

With TLS and SuperNode authentication (see `hf-flower make-certs`), for clients on other machines:

    hf-flower server --config configs/quickstart.yaml --host 0.0.0.0 --port 9092 \
        --ssl_certfile certs/server.pem --ssl_keyfile certs/server.key --ssl_ca_certfile certs/ca.crt \
        --authorized_keys keys/client-0.pub keys/client-1.pub --expose_control_api

A non-loopback `--host` is refused without `--expose_control_api`: the SuperLink's port also serves
Flower's Control API, which authenticates no one in open-source Flower, so anyone who reaches the
port can submit a run that executes on this machine. Admit only the clients' addresses to it.

Your own Trainer: `--trainer my_script.py:make_trainer` (its clients run `python my_script.py client ...`).
"""

import sys

from ..launch.plan import launch
from ..launch.server import prepare_server, run_server


def main(argv: list[str] | None = None) -> int:
    return launch(prepare_server, run_server, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
