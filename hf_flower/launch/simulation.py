"""Run a federation on this machine with Flower's simulation engine, start to finish.

What it does, in order: write a Flower connection (`FLWR_HOME` inside the run's folder), start a
SuperLink in simulation mode on a free loopback port (no `uv` installs at run time), submit our
app with the run config built from the parsed arguments, print one line per round as the
ServerApp saves it, and stop every process it started, also on error or Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path

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
from .plan import RunPlan
from .processes import LOOPBACK, ManagedProcess, free_port


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
