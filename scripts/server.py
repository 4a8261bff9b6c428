"""The server of a real deployment: `hf-flower server`, run from a checkout.

    python scripts/server.py --config configs/quickstart.yaml --host 0.0.0.0 --port 9092 \
        --ssl_certfile certs/server.pem --ssl_keyfile certs/server.key --ssl_ca_certfile certs/ca.crt \
        --authorized_keys certs/keys/client-0.pub certs/keys/client-1.pub --expose_control_api
    python scripts/server.py --config configs/quickstart.yaml --port 9092 --insecure  # this machine only

The command lives in the library (`hf_flower/commands/server.py`, whose docstring has more
examples); `python scripts/server.py --help` lists its flags.
"""

import sys

from hf_flower.commands.server import main

if __name__ == "__main__":
    sys.exit(main())
