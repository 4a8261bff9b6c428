"""A `TrainerCallback` that reports a client's training to the launcher watching the run.

Kept apart from `progress/live.py` because it imports transformers (and so torch), which the
launcher never does.
"""

from __future__ import annotations

from flwr.app import Context
from transformers import TrainerCallback

from ..constants import PARTITION_ID_KEY
from . import live as live_progress


class LiveProgressCallback(TrainerCallback):
    """Step, total steps and latest loss of one round's training, into `live_progress`'s files.

    Only the main process of a multi-rank client writes; `TrainingProgress` throttles the writes.
    """

    def __init__(self, progress: live_progress.TrainingProgress):
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress.begin(state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress.update(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss = logs.get("loss", logs.get("train_loss"))
        if state.is_world_process_zero and isinstance(loss, (int, float)):
            self.progress.update(state.global_step, state.max_steps, loss=loss)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress.update(state.global_step, state.max_steps, done=True)


def training_progress(context: Context, server_round: int) -> LiveProgressCallback | None:
    """A `LiveProgressCallback` for this node's round when a launcher asked for progress
    (`HF_FLOWER_PROGRESS_DIR`), else None."""
    directory = live_progress.progress_dir()
    if directory is None:
        return None
    partition_id = context.node_config.get(PARTITION_ID_KEY)
    return LiveProgressCallback(
        live_progress.TrainingProgress(directory, context.node_id, partition_id, server_round)
    )
