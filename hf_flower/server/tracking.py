"""The server's per-round metrics in experiment trackers: TensorBoard always, others when installed.

Each round's aggregated client training metrics (`train/*`), federated evaluation
(`evaluate/*`) and central evaluation (`central/*`) are logged with the round number as the
step, under `<output_dir>/runs` for TensorBoard (`tensorboard --logdir <output_dir>/runs`). A
resumed run appends to the same folder, continuing at its next round. Besides TensorBoard, the
trackers named in `report_to` that are installed (`wandb`, `mlflow`) get the same scalars, best
effort: a tracker that fails is reported once and left out. Clients keep the Trainer's own
`report_to` for their local training.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from .. import checkpoint

# Groups of a round's record that hold metrics, and their names in the trackers.
METRIC_GROUPS = {"train": "train", "evaluate": "evaluate", "central": "central"}
OPTIONAL_TRACKERS = ("wandb", "mlflow")


def round_scalars(record: dict) -> dict[str, float]:
    """`{"central/eval_accuracy": 0.81, ...}`: the numeric metrics of one round's record."""
    scalars = {}
    for group, prefix in METRIC_GROUPS.items():
        for name, value in (record.get(group) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"{prefix}/{name}"] = float(value)
    clients = record.get("clients") or {}
    if "train_succeeded" in clients:
        scalars["clients/train_succeeded"] = float(clients["train_succeeded"])
    return scalars


class RoundTracker:
    """Log each round's scalars to TensorBoard under `<output_dir>/runs` and to installed trackers."""

    def __init__(self, output_dir: str | os.PathLike, report_to: list[str] | str | None, run_name: str = ""):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / checkpoint.TENSORBOARD_DIR))
        names = [report_to] if isinstance(report_to, str) else list(report_to or [])
        self.others = {}
        for name in OPTIONAL_TRACKERS:
            if (name in names or "all" in names) and importlib.util.find_spec(name) is not None:
                try:
                    self.others[name] = _start(name, run_name or Path(output_dir).name)
                except Exception as err:  # noqa: BLE001 - a tracker never stops training
                    log(WARNING, "Starting %s failed (%s); the server logs to TensorBoard only.", name, err)

    def log_round(self, record: dict) -> None:
        step = int(record["round"])
        scalars = round_scalars(record)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()
        for name, module in list(self.others.items()):
            try:
                if name == "wandb":
                    module.log(scalars, step=step)
                else:  # mlflow: metric names may not contain some characters, "/" is fine
                    module.log_metrics(scalars, step=step)
            except Exception as err:  # noqa: BLE001 - a tracker never stops training
                log(WARNING, "Logging to %s failed (%s); it is left out from now on.", name, err)
                del self.others[name]

    def close(self) -> None:
        self.writer.close()
        for name, module in self.others.items():
            try:
                module.finish() if name == "wandb" else module.end_run()
            except Exception as err:  # noqa: BLE001
                log(WARNING, "Closing %s failed: %s", name, err)


def _start(name: str, run_name: str):
    module = importlib.import_module(name)
    if name == "wandb":
        module.init(project=os.environ.get("WANDB_PROJECT", "hf-flower"), name=f"{run_name}-server")
    else:
        module.start_run(run_name=f"{run_name}-server")
    return module
