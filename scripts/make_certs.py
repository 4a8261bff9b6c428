"""Certificates and keys for a secure deployment: `hf-flower make-certs`, run from a checkout.

    python scripts/make_certs.py certs --supernode-keys 2

The command lives in the library (`hf_flower/commands/make_certs.py`, whose docstring has more
examples); `python scripts/make_certs.py --help` lists its flags.
"""

import sys

from hf_flower.commands.make_certs import main

if __name__ == "__main__":
    sys.exit(main())
