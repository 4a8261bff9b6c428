"""What a launcher keeps of a run: plain values, prepared in a child process that then exits.

Parsing the arguments (`TrainingArguments` imports torch) and the pre-flight checks (they load the
data set and the model's config) cost a launcher about 400 MB that it would hold for the whole
run while it only starts processes and prints rounds. `prepare_in_child` does both in a
short-lived process and hands back a `RunPlan`: the launcher itself never imports torch.

The output folder's `run_lock` is the launcher's, held for the whole run: as soon as the child
knows the folder it asks the launcher to lock it (`claim`), and touches it only once the launcher
holds the lock, so a second run on the folder is refused before it deletes or writes anything.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..checkpoint import OutputDirError
from ..checkpoint import lock as run_lock
from .processes import Stopped, stop_signals_raise

# `claim(output_dir)`: make sure this run may use the folder (lock it) before anything touches it.
Claim = Callable[[str], None]


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
    # Whether the ServerApp runs under the launcher's processes, so the launcher's lock covers it.
    # Not when `server.py --superlink` submits to a SuperLink started elsewhere: the ServerApp
    # locks the folder itself, and the launcher must not hold it against it.
    serverapp_under_launcher: bool = True

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], options: Any = None) -> RunPlan:
        """The plan of a run given as Flower's run config (its output folder already absolute)."""
        from ..arguments import FederationArguments
        from ..arguments.run_config import group_from_run_config

        federation = group_from_run_config(FederationArguments, run_config)
        return cls(
            run_config=dict(run_config),
            output_dir=federation.output_dir,
            num_rounds=federation.num_rounds,
            num_clients=federation.num_clients,
            min_available_clients=federation.min_available_clients,
            client_num_cpus=federation.client_num_cpus,
            client_num_gpus=float(federation.client_num_gpus),
            options=options,
            serverapp_under_launcher=getattr(options, "superlink", None) is None,
        )


def uses_own_trainer(argv: list[str]) -> bool:
    """Whether a launcher's command line (or its `--config` YAML) names a Trainer factory
    (`--trainer`): then it takes only the groups of every run, not those of the built-in tasks."""
    from ..arguments import ARGUMENT_GROUPS, load_yaml_config

    if any(arg == "--trainer" or arg.startswith("--trainer=") for arg in argv):
        return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        return bool(load_yaml_config(argv[argv.index("--config") + 1], ARGUMENT_GROUPS).get("trainer"))
    return False


def parse_run(
    argv: list[str], extra_groups: tuple = (), trainer: str | None = None
) -> tuple[dict[str, Any], tuple]:
    """A launcher's command line as Flower's run config, and its `extra_groups` (its own options).

    A run of a Trainer factory (`--trainer`, or `trainer` fixed by a script's `hf_flower.main`)
    takes the groups of every run (`FederationArguments`, `HubArguments`); a run of a built-in task
    takes the task's groups too (model, data, adapters, `TrainingArguments`). The output folder is
    made absolute: every process of the run sees the same one.
    """
    from ..arguments import (
        ARGUMENT_GROUPS,
        RUN_GROUPS,
        FederationArguments,
        HfFlowerParser,
        RunArguments,
        finalize,
    )
    from ..arguments.run_config import groups_to_run_config, to_run_config
    from ..factory import factory_ref
    from ..tasks import resolve

    own = trainer is not None or uses_own_trainer(argv)
    parser = HfFlowerParser(tuple(extra_groups), groups=RUN_GROUPS if own else ARGUMENT_GROUPS)
    parsed = parser.parse_args_and_config(argv)
    groups, extras = parsed[: len(parsed) - len(extra_groups)], parsed[len(parsed) - len(extra_groups) :]
    federation = next(g for g in groups if isinstance(g, FederationArguments))
    if trainer is not None and federation.trainer:
        raise ValueError(
            "--trainer: this script's own make_trainer is the run's Trainer factory; drop the flag."
        )
    changes = {"output_dir": str(Path(federation.output_dir).resolve())}
    if own:
        changes["trainer"] = factory_ref(trainer or federation.trainer)
    groups = [dataclasses.replace(g, **changes) if g is federation else g for g in groups]
    if own:
        return groups_to_run_config(*groups), tuple(extras)
    # ARGUMENT_GROUPS are in `RunArguments`' order.
    run_args = with_absolute_paths(resolve(finalize(RunArguments(*groups))))
    return to_run_config(run_args), tuple(extras)


# Settings that may name a file or folder of this machine, by argument group. Flower's processes
# run the apps in a working folder of their own, where a relative path names nothing.
LOCAL_PATH_SETTINGS = {
    "model": ("model_name_or_path", "tokenizer_name_or_path"),
    "data": ("dataset", "chat_template"),
}


def with_absolute_paths(run_args):
    """`run_args` with every setting that names an existing file or folder relative to this working
    folder made absolute (`--dataset reviews.csv`, `--model_name_or_path ./my-bert`); Hub ids and
    absolute paths stay as given."""
    for group_name, names in LOCAL_PATH_SETTINGS.items():
        group = getattr(run_args, group_name)
        changes = {}
        for name in names:
            value = getattr(group, name)
            if isinstance(value, str) and value and _is_relative_local_path(value):
                changes[name] = str(Path(value).expanduser().resolve())
        if changes:
            setattr(run_args, group_name, dataclasses.replace(group, **changes))
    return run_args


def _is_relative_local_path(value: str) -> bool:
    path = Path(value).expanduser()
    try:
        return not path.is_absolute() and path.exists()
    except OSError:  # a name too long for a path: a chat template's text, say
        return False


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The child's answer: a plan, or the exit code and message to stop with."""

    plan: RunPlan | None = None
    exit_code: int = 0
    error: str = ""


def run_prepare(
    prepare: Callable[..., RunPlan], argv: list[str] | None, claim: Claim = run_lock.ensure_not_in_use
) -> Prepared:
    """`prepare(argv, claim)` here, its refusals turned into an exit code and one `error:` line.

    The default `claim` only refuses a folder another run holds: preparing in this process (as
    tests do) takes no lock."""
    from ..hub import HubError

    if not sys.stderr.isatty():  # one-off bars (datasets' first read of a file) would flood a log with \r
        import datasets
        import huggingface_hub

        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    try:
        return Prepared(plan=prepare(argv, claim))
    except (ValueError, OSError, HubError) as err:
        return Prepared(exit_code=2, error=f"error: {err}")
    except SystemExit as exit_:  # --help, or argparse's own usage errors (already printed)
        return Prepared(exit_code=exit_.code if isinstance(exit_.code, int) else 2)


def prepare_in_child(
    prepare: Callable[..., RunPlan], argv: list[str] | None
) -> tuple[Prepared, run_lock.RunLock | None]:
    """`prepare(argv)` in a fresh child process (spawned, so nothing of it stays here).

    When the child claims the output folder, the lock is taken here, in the launcher, and the
    child goes on only once it is held. Returns the child's answer and that lock (None when the
    child failed before claiming a folder); the caller releases it.
    """
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_prepare_and_answer, args=(prepare, argv, theirs))
    child.start()
    theirs.close()
    lock = None
    try:
        while True:
            try:
                kind, value = ours.recv()
            except EOFError:  # it died without answering; its traceback is on stderr
                child.join()
                error = f"error: preparing the run failed: its process exited with code {child.exitcode}"
                return Prepared(exit_code=1, error=error), lock
            if kind == "done":
                return value, lock
            try:
                lock = run_lock.RunLock(value)
                ours.send(None)
            except OutputDirError as refused:
                ours.send(str(refused))
    except BaseException:  # Ctrl-C or a stop signal while preparing: nothing of the run is left
        child.terminate()
        if lock is not None:
            lock.release()
        raise
    finally:
        child.join()


def _prepare_and_answer(prepare: Callable[..., RunPlan], argv: list[str] | None, launcher) -> None:
    """The child's side of `prepare_in_child`: claims go to the launcher, the answer goes back."""

    def claim(output_dir: str) -> None:
        launcher.send(("claim", output_dir))
        refusal = launcher.recv()
        if refusal is not None:
            raise OutputDirError(refusal)

    launcher.send(("done", run_prepare(prepare, argv, claim)))


def launch(prepare: Callable[..., RunPlan], run: Callable[[RunPlan], int], argv) -> int:
    """A launcher's whole life: `prepare(argv)` in a child, then `run(plan)` here; its exit code.

    The output folder stays locked from the child's claim until `run` has stopped every process
    it started (with `--superlink`, until preparing is done: the ServerApp then locks it)."""
    prepared, lock = prepare_in_child(prepare, argv)
    if lock is not None and (prepared.plan is None or not prepared.plan.serverapp_under_launcher):
        lock.release()
        lock = None
    if prepared.plan is None:
        if prepared.error:
            print(prepared.error, file=sys.stderr)
        return prepared.exit_code
    try:
        with lock or nullcontext(), stop_signals_raise():
            return run(prepared.plan)
    except KeyboardInterrupt:  # every Flower process is already stopped by then
        _mark_interrupted(prepared.plan, "KeyboardInterrupt")
        print("Interrupted; the rounds saved so far are kept.", file=sys.stderr)
        return 130
    except Stopped as stop:
        _mark_interrupted(prepared.plan, f"Stopped by {stop}")
        print(
            f"Stopped by {stop}; every Flower process is stopped, the rounds saved so far are kept.",
            file=sys.stderr,
        )
        return stop.exit_code


def _mark_interrupted(plan: RunPlan, reason: str) -> None:
    """history.json says the run was interrupted, when the ServerApp stopped with the launcher."""
    if plan.serverapp_under_launcher:
        checkpoint.mark_interrupted(plan.output_dir, f"{reason}: the launcher stopped the run")
