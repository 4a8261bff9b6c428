"""The commands of the `hf-flower` console script, one module each, each with a `main(argv)`.

`hf-flower COMMAND ...` (hf_flower/cli.py), `python -m hf_flower.commands.COMMAND ...` and the
checkout's `scripts/COMMAND.py` all run the same `main`.
"""
