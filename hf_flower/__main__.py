"""`python -m hf_flower COMMAND ...` is `hf-flower COMMAND ...` (see hf_flower/commands/)."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
