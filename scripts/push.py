"""Push the rounds of a finished run to the Hub: `hf-flower push`, run from a checkout.

    python scripts/push.py outputs/quickstart --hub_model_id alice/minilm-imdb-federated

The command lives in the library (`hf_flower/commands/push.py`, whose docstring has more
examples); `python scripts/push.py --help` lists its flags.
"""

import sys

from hf_flower.commands.push import main

if __name__ == "__main__":
    sys.exit(main())
