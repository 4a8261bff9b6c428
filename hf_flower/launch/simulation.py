"""Run a federation on this machine with Flower's simulation engine, start to finish.

What it does, in order: write a Flower connection (`FLWR_HOME` inside the run's folder), start a
SuperLink in simulation mode on a free loopback port (no `uv` installs at run time), submit our
app with the run config built from the parsed arguments, print one line per round as the
ServerApp saves it, and stop every process it started, also on error or Ctrl-C.

Three doors lead here: `hf-flower simulate` (`prepare_simulation` parses its flags), a script's
`python my_script.py simulate` (the same, its `make_trainer` fixed), and `simulate(make_trainer, ...)`
from Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..arguments.policy import ClientPolicy
from .app import write_app_dir
from .flower import (
    FLWR_HOME_DIRNAME,
    LOGS_DIRNAME,
    PROGRESS_DIRNAME,
    flower_env,
    flower_executable,
    submit_and_watch,
    write_connection,
)
from .plan import Claim, RunPlan, parse_run
from .processes import LOOPBACK, ManagedProcess, Stopped, free_port, stop_signals_raise


class SimulationError(RuntimeError):
    """A simulation started from Python did not complete; the message says how it ended."""


def prepare_simulation(argv: list[str] | None, claim: Claim, trainer: str | None = None) -> RunPlan:
    """A simulation's command line, parsed and checked (the output folder claimed, then made ready).
    `trainer`: the factory a script fixed (`hf_flower.main(make_trainer)`)."""
    from ..arguments import ModelArguments
    from ..arguments.run_config import group_from_run_config
    from ..modeling import check_4bit_support
    from ..server.preflight import check_run

    run_config, _ = parse_run(list(argv or []), trainer=trainer)
    plan = RunPlan.from_run_config(run_config)
    claim(plan.output_dir)
    check_run(run_config, prepare_output=True)
    check_4bit_support(group_from_run_config(ModelArguments, run_config))  # the clients train on this machine
    return plan


def simulation_config(plan: RunPlan) -> str:
    """`flwr run --federation-config`: virtual SuperNodes and what each may use."""
    return (
        f'num-supernodes={plan.num_clients} backend="ray" '
        f"client-resources-num-cpus={plan.client_num_cpus} "
        f"client-resources-num-gpus={plan.client_num_gpus}"
    )


def run_simulation(plan: RunPlan, app_dir: Path | None = None) -> int:
    """Run the whole federation; return 0 when every round completed, 1 otherwise.

    `app_dir`: the Flower app to submit; by default one written from the imported package."""
    output_dir = Path(plan.output_dir)
    flwr_home = output_dir / FLWR_HOME_DIRNAME
    port = free_port()
    write_connection(flwr_home, f"{LOOPBACK}:{port}")
    app_dir = app_dir or write_app_dir(flwr_home, plan.run_config)
    env = flower_env(flwr_home, output_dir / LOGS_DIRNAME / PROGRESS_DIRNAME)
    # The clients' policy, for Ray's workers (they inherit this environment).
    env.update(ClientPolicy.of_operator(plan.run_config).to_env())
    superlink_cmd = [
        flower_executable("flower-superlink"),
        # Plaintext on purpose: it listens on 127.0.0.1 only and serves this launcher's own run.
        "--insecure",
        "--simulation",
        "--disable-runtime-dependency-installation",
        "--host", LOOPBACK,
        "--port", str(port),
    ]  # fmt: skip
    print(
        f"Simulating {plan.num_clients} clients, logs in {output_dir / LOGS_DIRNAME}",
        flush=True,
    )
    with ManagedProcess(
        superlink_cmd, output_dir / LOGS_DIRNAME / "superlink.log", env=env, cwd=str(flwr_home)
    ) as superlink:
        superlink.wait_for_port(port)
        return submit_and_watch(
            plan, superlink, app_dir, flwr_home, env, ["--federation-config", simulation_config(plan)]
        )


def simulate(
    make_trainer,
    *,
    trainer_config: Mapping[str, Any] | None = None,
    output_dir: str = "outputs/hf-flower",
    **settings,
) -> dict:
    """Federate `make_trainer` on this machine with Flower's simulation engine; the run's history.

    `make_trainer(context) -> transformers.Trainer` is a function at the top level of a module or
    script (each simulated client and the server import it in their own process). `trainer_config`
    becomes `context.config` everywhere; `settings` are `FederationArguments` and `HubArguments`
    fields (`num_clients=2, num_rounds=3, strategy="FedProx", strategy_kwargs={...}`, ...).
    Every round is saved in `output_dir`; the history (history.json: each round's client and central
    metrics) is returned once the run completed, and `SimulationError` raised when it did not.
    """
    from ..arguments import FederationArguments, HubArguments
    from ..arguments.run_config import groups_to_run_config
    from ..checkpoint import lock as run_lock
    from ..factory import factory_ref
    from ..server.preflight import check_run

    fields = {
        group: {f.name for f in dataclasses.fields(group)} for group in (FederationArguments, HubArguments)
    }
    # `trainer`, `trainer_config` and `output_dir` are simulate()'s own parameters.
    known = set().union(*fields.values()) - {"trainer", "trainer_config", "output_dir"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"simulate() got unknown settings {unknown}; it takes {sorted(known)}.")
    federation = FederationArguments(
        trainer=factory_ref(make_trainer),
        trainer_config=dict(trainer_config or {}),
        output_dir=str(Path(output_dir).resolve()),
        **{k: v for k, v in settings.items() if k in fields[FederationArguments]},
    )
    hub_args = HubArguments(**{k: v for k, v in settings.items() if k in fields[HubArguments]})
    run_config = groups_to_run_config(federation, hub_args)
    plan = RunPlan.from_run_config(run_config)
    with run_lock.RunLock(plan.output_dir), stop_signals_raise():
        check_run(run_config, prepare_output=True)
        try:
            code = run_simulation(plan)
        except (KeyboardInterrupt, Stopped) as stop:
            checkpoint.mark_interrupted(plan.output_dir, f"{type(stop).__name__}: the simulation was stopped")
            raise
    log = Path(plan.output_dir) / LOGS_DIRNAME / "run.log"
    try:
        history = checkpoint.read_history(plan.output_dir)
    except FileNotFoundError:
        history = {"status": "failed", "error": None}
    if code != 0:
        raise SimulationError(
            f"The simulation did not complete (status {history.get('status')!r}): "
            f"{history.get('error') or 'the ServerApp stopped before round 0'}; see {log}"
        )
    return history
