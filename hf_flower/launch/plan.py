"""What a launcher keeps of a run: plain values, prepared in a child process that then exits.

Parsing the arguments (`TrainingArguments` imports torch) and the pre-flight checks (they load the
data set and the model's config) cost a launcher about 400 MB that it would hold for the whole
run while it only starts processes and prints rounds. `prepare_in_child` does both in a
short-lived process and hands back a `RunPlan`: the launcher itself never imports torch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .processes import Stopped, stop_signals_raise


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A parsed, checked run as the launchers need it: Flower's run config and a few numbers."""

    run_config: dict[str, Any]
    output_dir: str
    num_rounds: int
    num_clients: int
    min_available_clients: int
    client_num_cpus: int
    client_num_gpus: float
    options: Any = None  # the launcher's own argument group (e.g. `ServerOptions`), if any

    @classmethod
    def from_run_args(cls, run_args, options: Any = None) -> RunPlan:
        """The plan of `run_args` (a `RunArguments`), its output folder made absolute."""
        from ..arguments import to_run_config

        run_args.training.output_dir = str(Path(run_args.training.output_dir).resolve())
        federation = run_args.federation
        return cls(
            run_config=to_run_config(run_args),
            output_dir=run_args.training.output_dir,
            num_rounds=federation.num_rounds,
            num_clients=federation.num_clients,
            min_available_clients=federation.min_available_clients,
            client_num_cpus=federation.client_num_cpus,
            client_num_gpus=float(federation.client_num_gpus),
            options=options,
        )


def prepare_simulation(argv: list[str] | None) -> RunPlan:
    """`scripts/simulate.py`'s arguments, parsed and checked (the output folder made ready)."""
    from ..arguments import parse_args
    from ..modeling import check_4bit_support
    from ..preflight import check_run

    run_args = parse_args(argv)
    check_run(run_args, prepare_output=True)
    check_4bit_support(run_args.model)  # the clients train on this machine
    return RunPlan.from_run_args(run_args)


def prepare_server(argv: list[str] | None) -> RunPlan:
    """`scripts/server.py`'s arguments (the run's and `ServerOptions`), parsed and checked."""
    from ..arguments import HfFlowerParser, RunArguments, finalize
    from ..preflight import check_run
    from .server import ServerOptions

    *groups, options = HfFlowerParser((ServerOptions,)).parse_args_and_config(argv)
    run_args = finalize(RunArguments(*groups))
    check_run(run_args, prepare_output=True)
    return RunPlan.from_run_args(run_args, options)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The child's answer: a plan, or the exit code and message to stop with."""

    plan: RunPlan | None = None
    exit_code: int = 0
    error: str = ""


def run_prepare(prepare: Callable[[list[str] | None], RunPlan], argv: list[str] | None) -> Prepared:
    """`prepare(argv)` here, its refusals turned into an exit code and one `error:` line."""
    from ..hub import HubError

    if not sys.stderr.isatty():  # one-off bars (datasets' first read of a file) would flood a log with \r
        import datasets
        import huggingface_hub

        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    try:
        return Prepared(plan=prepare(argv))
    except (ValueError, OSError, HubError) as err:
        return Prepared(exit_code=2, error=f"error: {err}")
    except SystemExit as exit_:  # --help, or argparse's own usage errors (already printed)
        return Prepared(exit_code=exit_.code if isinstance(exit_.code, int) else 2)


def prepare_in_child(prepare: Callable[[list[str] | None], RunPlan], argv: list[str] | None) -> Prepared:
    """`prepare(argv)` in a fresh child process (spawned, so nothing of it stays here)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as child:
        return child.submit(run_prepare, prepare, argv).result()


def launch(prepare: Callable[[list[str] | None], RunPlan], run: Callable[[RunPlan], int], argv) -> int:
    """A launcher's whole life: `prepare(argv)` in a child, then `run(plan)` here; its exit code."""
    prepared = prepare_in_child(prepare, argv)
    if prepared.plan is None:
        if prepared.error:
            print(prepared.error, file=sys.stderr)
        return prepared.exit_code
    try:
        with stop_signals_raise():
            return run(prepared.plan)
    except KeyboardInterrupt:  # every Flower process is already stopped by then
        print("Interrupted; the rounds saved so far are kept.", file=sys.stderr)
        return 130
    except Stopped as stop:
        print(
            f"Stopped by {stop}; every Flower process is stopped, the rounds saved so far are kept.",
            file=sys.stderr,
        )
        return stop.exit_code
