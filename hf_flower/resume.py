"""Continuing an interrupted run (`--resume`): from the latest complete round on disk to where the
ServerApp starts again.

A run is continued from its latest complete `round-N` folder (a half-written round is a hidden
temporary folder, never a `round-N`): its weights become the initial weights, its
`strategy_state.safetensors` restores the strategy's own state, and the history is rebuilt from
the `metrics.json` of every complete round (so a crash between saving a round and rewriting
history.json loses nothing). The folder must belong to the same model and labels: that is checked
before anything in it is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from . import checkpoint
from .checkpoint import OutputDirError

# Config keys that fix the shapes of the weights: a round whose config differs in any of them
# belongs to another model.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "dim",
    "n_layers",
)


@dataclasses.dataclass
class ResumePoint:
    """Where a resumed run starts: the last complete round, its folder, and the history so far."""

    round: int
    folder: Path
    rounds: list[dict]


def find_resume_point(output_dir: str | os.PathLike) -> ResumePoint:
    """The latest complete round in `output_dir` and the metrics of every complete round up to it."""
    done = checkpoint.latest_round(output_dir)
    if done is None:
        raise OutputDirError(
            f"--resume: output_dir {output_dir} holds no complete round to continue from; check "
            "--output_dir, or drop --resume to start a new run there"
        )
    rounds = [checkpoint.read_round_metrics(output_dir, n) for n in checkpoint.list_rounds(output_dir)]
    return ResumePoint(done, checkpoint.round_dir(output_dir, done), rounds)


def check_resumable(
    output_dir: str | os.PathLike, num_rounds: int, model_config, label_names: list[str] | None
) -> int:
    """Refuse to resume a folder of another model or label set, or one with nothing left to do.

    Reads only the latest round's config.json; returns that round's number. Raises
    `OutputDirError` naming the difference and the fix.
    """
    point = find_resume_point(output_dir)
    if not (point.folder / checkpoint.CONFIG_FILE).is_file():
        raise OutputDirError(
            f"--resume: {point.folder} is an adapter round (--peft); resuming adapter runs is not "
            "supported yet. Start a new run, or resume a full fine-tuning run."
        )
    if point.round >= num_rounds:
        raise OutputDirError(
            f"--resume: output_dir {output_dir} already holds round {point.round} and --num_rounds is "
            f"{num_rounds}: nothing to continue. Raise --num_rounds to train more rounds."
        )
    saved = json.loads((point.folder / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
    ours = model_config.to_dict()
    differs = [
        f"{key}: saved {saved[key]!r}, this run {ours[key]!r}"
        for key in ARCHITECTURE_KEYS
        if key in saved and key in ours and saved[key] != ours[key]
    ]
    saved_labels = [
        label for _, label in sorted((int(i), v) for i, v in (saved.get("id2label") or {}).items())
    ]
    if label_names is not None and saved_labels != list(label_names):
        differs.append(f"labels: saved {saved_labels}, this run's data {list(label_names)}")
    if differs:
        raise OutputDirError(
            f"--resume: {point.folder} was trained with another model or label set ("
            + "; ".join(differs)
            + "). Resume with the --model_name_or_path and data the run started with, or choose "
            "another --output_dir."
        )
    return point.round


def load_round_arrays(folder: Path, model, auto_model_class):
    """Load the weights saved in a round folder into `model`; return what the strategy starts from.

    The saved weights are checked against the whole model first (a foreign folder changes
    nothing); the return value is the model's trainable part in float32, as for round 0.
    """
    from .weights import get_weights, state_dict_to_arrays, validate_arrays

    saved = auto_model_class.from_pretrained(folder).state_dict()
    try:
        validate_arrays(state_dict_to_arrays(saved), model.state_dict())
    except ValueError as err:
        raise OutputDirError(
            f"--resume: the weights in {folder} do not fit this run's model: {err}"
        ) from None
    model.load_state_dict(saved)
    return get_weights(model, "float32")
