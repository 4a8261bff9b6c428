"""`hf-flower`: one console script, one subcommand per task, each a module of this package with a
`main(argv)` (`python -m hf_flower.commands.COMMAND ...` and the checkout's `scripts/COMMAND.py`
run the same `main`).

    hf-flower simulate --config configs/quickstart.yaml     # a federation on this machine
    hf-flower server --config configs/quickstart.yaml --port 9092 --insecure   # TLS: see make-certs
    hf-flower client --superlink 127.0.0.1:9092 --insecure --data_path my_reviews.csv
    hf-flower push outputs/quickstart --hub_model_id alice/minilm-imdb-federated
    hf-flower plot outputs/quickstart
    hf-flower make-certs certs --supernode-keys 2

`hf-flower COMMAND --help` lists a command's flags. Each command's module is imported only when it runs (the launchers never import torch). A client
on several GPUs runs that module under Accelerate:
`accelerate launch --config_file CONFIG.yaml -m hf_flower.commands.client --superlink ...`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping

from ..constants import VERSION

# name -> (module in hf_flower.commands, one line for `hf-flower --help`)
COMMANDS = {
    "simulate": ("simulate", "Federated fine-tuning on this machine (Flower's simulation engine)."),
    "server": ("server", "The server of a real deployment: a SuperLink and the ServerApp."),
    "client": ("client", "One client of a real deployment: a SuperNode and a long-lived trainer."),
    "push": ("push", "Push the rounds of a finished run to the Hugging Face Hub."),
    "plot": ("plot", "Draw the accuracy and loss per round of a run as a PNG."),
    "make-certs": ("make_certs", "TLS certificates and SuperNode keys for a secure deployment."),
}
PROG = "hf-flower"
DESCRIPTION = "Federated fine-tuning of Hugging Face models with Flower and transformers.Trainer."


def usage(prog: str, summaries: Mapping[str, str], kind: str, description: str = "", more: str = "") -> str:
    """The help of a program whose first argument is one of `summaries` (a `kind`: command, subcommand)."""
    width = max(map(len, summaries))
    lines = [f"usage: {prog} {kind.upper()} [ARGS...]", ""]
    lines += [description, ""] if description else []
    lines += [f"{kind}s:", *(f"  {name:<{width}}  {summary}" for name, summary in summaries.items())]
    lines += ["", f"`{prog} {kind.upper()} --help` lists the flags of a {kind}{more}."]
    return "\n".join(lines)


def pick(
    argv: list[str], prog: str, summaries: Mapping[str, str], kind: str, **usage_text
) -> tuple[str, list[str]] | int:
    """(name, its arguments) of the `kind` that `argv` starts with; an exit code instead when `argv`
    asks for help (printed) or names none of `summaries` (said on stderr)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, summaries, kind, **usage_text), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in summaries:
        print(f"{prog}: unknown {kind} {argv[0]!r}; choose one of {list(summaries)}.", file=sys.stderr)
        return 2
    return argv[0], argv[1:]


def main(argv: list[str] | None = None) -> int:
    """Run `hf-flower COMMAND ARGS...`; return the command's exit code."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"{PROG} {VERSION}")
        return 0
    summaries = {name: summary for name, (_, summary) in COMMANDS.items()}
    more = f"; `{PROG} --version` the version"
    picked = pick(argv, PROG, summaries, "command", description=DESCRIPTION, more=more)
    if isinstance(picked, int):
        return picked
    name, args = picked
    if from_command_line:
        # argparse names the program after sys.argv[0]: usage and errors then say `hf-flower push`.
        sys.argv[0] = f"{PROG} {name}"
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
