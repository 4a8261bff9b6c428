"""The server of a real deployment: a SuperLink, our ServerApp, every round saved.

Start it, then start clients (`scripts/client.py`) on the machines that hold the data:

    python scripts/server.py --config configs/quickstart.yaml --host 0.0.0.0 --port 9092

With TLS and SuperNode authentication (see `scripts/make_certs.py`):

    python scripts/server.py --config configs/quickstart.yaml --host 0.0.0.0 --port 9092 \
        --ssl_certfile certs/server.pem --ssl_keyfile certs/server.key --ssl_ca_certfile certs/ca.crt \
        --authorized_keys keys/client-0.pub keys/client-1.pub
"""

import sys

from hf_flower.arguments import HfFlowerParser, RunArguments, finalize
from hf_flower.hub import HubError
from hf_flower.launch.server import ServerOptions, run_server
from hf_flower.preflight import check_run


def main(argv: list[str] | None = None) -> int:
    try:
        *groups, server = HfFlowerParser((ServerOptions,)).parse_args_and_config(argv)
        run_args = finalize(RunArguments(*groups))
        check_run(run_args, prepare_output=True)
    except (ValueError, OSError, HubError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_server(run_args, server)


if __name__ == "__main__":
    sys.exit(main())
