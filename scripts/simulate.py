"""Federated fine-tuning on this machine: `hf-flower simulate`, run from a checkout.

    python scripts/simulate.py --config configs/quickstart.yaml

The command lives in the library (`hf_flower/commands/simulate.py`, whose docstring has more
examples); `python scripts/simulate.py --help` lists its flags.
"""

import sys

from hf_flower.commands.simulate import main

if __name__ == "__main__":
    sys.exit(main())
