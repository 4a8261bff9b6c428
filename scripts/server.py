"""The server of a real deployment: a SuperLink, our ServerApp, every round saved.

Start it, then start clients (`scripts/client.py`) on the machines that hold the data:

    python scripts/server.py --config configs/quickstart.yaml --host 0.0.0.0 --port 9092

With TLS and SuperNode authentication (see `scripts/make_certs.py`):

    python scripts/server.py --config configs/quickstart.yaml --host 0.0.0.0 --port 9092 \
        --ssl_certfile certs/server.pem --ssl_keyfile certs/server.key --ssl_ca_certfile certs/ca.crt \
        --authorized_keys keys/client-0.pub keys/client-1.pub
"""

import sys

from hf_flower.launch.plan import launch, prepare_server
from hf_flower.launch.server import run_server


def main(argv: list[str] | None = None) -> int:
    return launch(prepare_server, run_server, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
