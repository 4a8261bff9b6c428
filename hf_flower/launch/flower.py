"""What every launcher shares: Flower's executables, environment, connection, and run watching."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from .. import checkpoint
from ..progress import lines as progress
from ..progress import live as live_progress
from ..progress.view import ProgressView
from .plan import RunPlan
from .processes import ManagedProcess

CONNECTION = "local"
FLWR_HOME_DIRNAME = ".flwr"
LOGS_DIRNAME = "logs"
PROGRESS_DIRNAME = "progress"  # inside logs/: what the ServerApp and local clients report mid-round
COMPLETED = "finished:completed"


def flower_executable(name: str) -> str:
    """Flower's console script next to this Python, so a venv works without being activated."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def write_connection(flwr_home: Path, address: str, root_certificates: str | None = None) -> None:
    """The `local` SuperLink connection in Flower's config.toml (TLS when a CA is given)."""
    connection: dict = {"address": address}
    if root_certificates:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        connection["insecure"] = True
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def flower_env(flwr_home: Path, progress_dir: Path | None = None) -> dict[str, str]:
    """Environment of Flower's processes: our FLWR_HOME, this Python's scripts first on PATH (the
    SuperLink starts `flower-superexec` and `flwr-simulation` by name), the launcher's folder on
    PYTHONPATH. With `progress_dir`,
    the ServerApp and the clients it reaches (Ray's workers inherit it) report progress there."""
    env = dict(os.environ)
    env.pop(live_progress.PROGRESS_DIR_ENV, None)
    if progress_dir is not None:
        env[live_progress.PROGRESS_DIR_ENV] = str(progress_dir)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The launcher's working folder first on the import path, as it is for the launcher: a
    # `--trainer my_module:make_trainer` imports in the ServerApp and the clients too.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Ray would otherwise print its dashboard/usage notices and try to reach the network.
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def run_status(flwr_home: Path, env: dict) -> str:
    """Flower's status of the (only) run on this SuperLink, e.g. `finished:completed`."""
    result = flwr_cli(["ls", CONNECTION, "--format", "json"], env, flwr_home)
    try:
        runs = json.loads(result.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return f"unknown ({result.stdout.strip() or result.stderr.strip()})"
    return " - ".join(filter(None, [runs[0]["status"], runs[0].get("status-details", "").replace("N/A", "")]))


class RoundPrinter:
    """Print each round once, as soon as the ServerApp has written it to history.json."""

    def __init__(self, output_dir: Path, num_rounds: int, write=None):
        self.output_dir = output_dir
        self.num_rounds = num_rounds
        self.printed = 0
        self.write = write or (lambda line: print(line, flush=True))

    def poll(self) -> dict | None:
        try:
            history = checkpoint.read_history(self.output_dir)
        except (FileNotFoundError, ValueError):
            return None
        for record in history["rounds"][self.printed :]:
            self.write(progress.format_round(record, self.num_rounds))
            self.printed += 1
        return history


def flwr_cli(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `flwr <args>` against the `local` connection."""
    return subprocess.run(
        [flower_executable("flwr"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def submit_and_watch(
    plan: RunPlan,
    superlink: ManagedProcess | None,
    app_dir: Path,
    flwr_home: Path,
    env: dict,
    submit_options: list[str] = (),
    poll_seconds: float = 1.0,
) -> int:
    """Submit our app to a running SuperLink, print rounds as they are saved (and, inside a round,
    what `ProgressView` reads of the clients and replies); 0 when all completed."""
    output_dir = Path(plan.output_dir)
    logs = output_dir / LOGS_DIRNAME
    run_config_file = flwr_home / "run_config.toml"
    run_config_file.write_text(tomli_w.dumps(plan.run_config))
    submit_cmd = [
        flower_executable("flwr"), "run", str(app_dir), CONNECTION,
        "--run-config", str(run_config_file), *submit_options, "--stream",
    ]  # fmt: skip
    progress_dir = env.get(live_progress.PROGRESS_DIR_ENV)
    if progress_dir:
        live_progress.prepare_dir(Path(progress_dir))
    view = ProgressView(Path(progress_dir) if progress_dir else None, plan.num_rounds)
    printer = RoundPrinter(output_dir, plan.num_rounds, write=view.write)
    started = time.time()
    with view, ManagedProcess(submit_cmd, logs / "run.log", env=env, cwd=str(flwr_home)) as submission:
        while submission.running():
            view.poll()
            printer.poll()
            if superlink is not None and not superlink.running():
                view.close()
                print(f"The SuperLink stopped unexpectedly:\n{superlink.tail()}", file=sys.stderr)
                return 1
            time.sleep(poll_seconds)
        submitted_ok = submission.process.returncode == 0
        submission_tail = submission.tail()
        view.poll()
    history = printer.poll()
    status = run_status(flwr_home, env) if submitted_ok else "not submitted"

    print(f"Finished in {time.time() - started:.1f} s; Flower run status: {status}")
    if history is not None:
        print(progress.format_summary(history, str(output_dir)))
    if not submitted_ok:
        print(f"Submitting the run failed:\n{submission_tail}", file=sys.stderr)
    succeeded = status.startswith(COMPLETED) and history is not None and history["status"] == "completed"
    if not succeeded:
        print(f"The run did not complete; see {logs / 'run.log'}.", file=sys.stderr)
    return 0 if succeeded else 1
