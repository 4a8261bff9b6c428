"""Draw a run's accuracy and loss per round: `hf-flower plot`, run from a checkout.

    python scripts/plot.py outputs/quickstart

The command lives in the library (`hf_flower/commands/plot.py`, whose docstring has more
examples); `python scripts/plot.py --help` lists its flags.
"""

import sys

from hf_flower.commands.plot import main

if __name__ == "__main__":
    sys.exit(main())
