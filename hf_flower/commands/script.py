"""`hf_flower.main(make_trainer)`: a user's own Trainer script as hf-flower's command line.

A script that builds its Trainer in `make_trainer(context)` and ends with

    if __name__ == "__main__":
        hf_flower.main(make_trainer)

runs as

    python my_script.py train                      # the plain single-machine run, as before
    python my_script.py simulate --num_clients 2 --num_rounds 3 --output_dir outputs/mine
    python my_script.py server --insecure --port 9092 --num_rounds 3
    accelerate launch my_script.py client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2

`simulate`, `server` and `client` take the flags of `hf-flower simulate|server|client` but
`--trainer`: the script's own `make_trainer` is the Trainer factory of every process (the server and
the simulated clients import the script by its path, without running this block).
`--trainer_config '{"key": "value"}'` becomes `context.config`. `python my_script.py SUBCOMMAND
--help` lists the flags.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import pick

SUBCOMMANDS = {
    "train": "Train on this machine alone: the script as it was before federating it.",
    "simulate": "Federate it on this machine (Flower's simulation engine).",
    "server": "Serve a real deployment: a SuperLink and the ServerApp.",
    "client": "Join a deployment as one client (every GPU under `accelerate launch`).",
}


@dataclass
class TrainArguments:
    """A plain single-machine run of the script's Trainer.

    Args:
        trainer_config: Settings of make_trainer (`context.config`), a JSON object.
    """

    trainer_config: str | None = field(
        default=None, metadata={"help": "Settings of make_trainer (context.config), a JSON object."}
    )


def run(make_trainer, argv: list[str]) -> int:
    """Run `argv` (a subcommand and its flags) for `make_trainer`; the exit code."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "my_script.py"
    picked = pick(argv, prog, SUBCOMMANDS, "subcommand")
    if isinstance(picked, int):
        return picked
    name, args = picked
    from ..factory import FactoryError, factory_ref

    try:
        ref = factory_ref(make_trainer)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.argv[0] = f"{prog} {name}"  # argparse names the program after it in usage and errors
    if name == "train":
        return train(make_trainer, args)
    if name == "client":
        from . import client

        return client.main(args, factory=make_trainer)
    from ..launch.plan import launch

    if name == "simulate":
        from ..launch.simulation import prepare_simulation, run_simulation

        return launch(functools.partial(prepare_simulation, trainer=ref), run_simulation, args)
    from ..launch.server import prepare_server, run_server

    return launch(functools.partial(prepare_server, trainer=ref), run_server, args)


def train(make_trainer, argv: list[str]) -> int:
    """The plain run: `make_trainer(TrainerContext(role="local"))`, trained, evaluated and saved in its
    `output_dir`, as a single-machine script does (also under `accelerate launch`)."""
    from transformers import HfArgumentParser

    from ..arguments import parse_trainer_config
    from ..context import LOCAL, TrainerContext
    from ..factory import build_trainer

    (args,) = HfArgumentParser(TrainArguments).parse_args_into_dataclasses(argv)
    config = parse_trainer_config(args.trainer_config)
    trainer = build_trainer(make_trainer, TrainerContext(role=LOCAL, config=config))
    trainer.train()
    if trainer.eval_dataset is not None:
        trainer.log_metrics("eval", trainer.evaluate())
    trainer.save_model()
    return 0


def main(make_trainer, argv: list[str] | None = None, exit: bool = True) -> int:
    """Make a Trainer script hf-flower's command line (`train`, `simulate`, `server`, `client`).

    Args:
        make_trainer: `make_trainer(context: TrainerContext) -> transformers.Trainer`, a function at
            the top level of the script.
        argv: The subcommand and its flags (default: the command line).
        exit: Exit the process with the subcommand's status (as `unittest.main` does); False returns it.
    """
    code = run(make_trainer, list(sys.argv[1:] if argv is None else argv))
    if exit:
        sys.exit(code)
    return code
