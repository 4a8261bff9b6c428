"""`python -m hf_flower COMMAND ...` is `hf-flower COMMAND ...` (see hf_flower/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
