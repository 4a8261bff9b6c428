"""Continuing an interrupted run (`--resume`): from the latest complete round on disk to where the
ServerApp starts again.

A run is continued from its latest complete `round-N` folder (a half-written round is a hidden
temporary folder, never a `round-N`), or from the round `--resume_from_round` names: its weights
become the initial weights, its `strategy_state.safetensors` restores the strategy's own state,
and the history is rebuilt from history.json's records of every complete round up to it, or that
round's `metrics.json` where history.json has none (so a crash between saving a round and
rewriting history.json loses nothing). An adapter round (`--peft lora`) continues the same way:
its adapter weights are loaded into the run's PEFT model. The round is checked against its
checksums, and the folder must belong to the same model, adapter setup and labels: all that is
checked before anything in it is touched. Rounds after the one continued from are moved aside
(`set_aside_later_rounds`), never deleted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from .. import checkpoint
from ..checkpoint import OutputDirError
from ..constants import LABEL_NAMES_KEY, MODEL_CLASS_KEY

logger = logging.getLogger(__name__)

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


def find_resume_point(output_dir: str | os.PathLike, from_round: int | None = None) -> ResumePoint:
    """Round `from_round` (default: the latest complete round) in `output_dir`, checked against its
    checksums, and the records of every complete round up to it.

    A damaged round raises `OutputDirError` naming the file and the latest intact round before it.
    """
    complete = checkpoint.list_rounds(output_dir)
    if not complete:
        raise OutputDirError(
            f"--resume: output_dir {output_dir} holds no complete round to continue from; check "
            "--output_dir, or drop --resume to start a new run there"
        )
    if from_round is not None and from_round not in complete:
        raise OutputDirError(
            f"--resume_from_round {from_round}: output_dir {output_dir} holds no complete round "
            f"{from_round}; its complete rounds are {complete}"
        )
    done = complete[-1] if from_round is None else from_round
    folder = checkpoint.round_dir(output_dir, done)
    try:
        checkpoint.verify_round(folder)
    except checkpoint.DamagedRoundError as err:
        advice = _earlier_round_advice(output_dir, complete, done)
        raise OutputDirError(f"--resume: {err}. {advice}") from None
    return ResumePoint(done, folder, _round_records(output_dir, [n for n in complete if n <= done]))


def _earlier_round_advice(output_dir, complete: list[int], damaged: int) -> str:
    """How to continue when round `damaged` cannot be: from the latest intact round before it."""
    for candidate in reversed([n for n in complete if n < damaged]):
        try:
            checkpoint.verify_round(checkpoint.round_dir(output_dir, candidate))
        except checkpoint.DamagedRoundError:
            continue
        return (
            f"Round {candidate} is the latest intact round before it: continue from there with "
            f"--resume_from_round {candidate} (the later rounds are then moved into "
            f"{checkpoint.SET_ASIDE_PREFIX}<time>/, not deleted)."
        )
    return "No earlier round is intact: start a new run (--overwrite_output_dir, or another --output_dir)."


def _round_records(output_dir, round_nums: list[int]) -> list[dict]:
    """Each round's record: history.json's (with the per-client details that metrics.json leaves
    out), or the round's metrics.json when history.json has none for it."""
    try:
        history = checkpoint.read_history(output_dir).get("rounds")
    except (FileNotFoundError, OutputDirError):
        history = None
    recorded = {r.get("round"): r for r in history or [] if isinstance(r, dict)}
    return [recorded.get(n) or checkpoint.read_round_metrics(output_dir, n) for n in round_nums]


def set_aside_later_rounds(output_dir: str | os.PathLike, round_num: int) -> None:
    """Move the rounds after `round_num` out of the way of a run that continues from it, saying so."""
    moved, target = checkpoint.set_aside_rounds_after(output_dir, round_num)
    if moved:
        logger.warning(
            "Resuming from round %s: moved %s to %s, as this run trains those rounds again. Nothing was "
            "deleted: delete that folder once you no longer need them.",
            round_num, ", ".join(f"round-{n}" for n in moved), target,
        )  # fmt: skip


def check_round_to_resume(output_dir: str | os.PathLike, federation) -> ResumePoint:
    """The round a resumed run continues from (`--resume_from_round`, else the latest), checked
    against its checksums, with rounds left to train (`federation` is the run's
    `FederationArguments`). Reads no model: `check_resumable` compares the round with the model
    once the server has built it."""
    point = find_resume_point(output_dir, federation.resume_from_round)
    if point.round >= federation.num_rounds:
        raise OutputDirError(
            f"--resume: output_dir {output_dir} already holds round {point.round} and --num_rounds is "
            f"{federation.num_rounds}: nothing to continue. Raise --num_rounds to train more rounds."
        )
    return point


def check_resumable(point: ResumePoint, model, output_dir: str | os.PathLike) -> None:
    """Refuse to continue `point` with a `model` of another kind: full weights against adapters, another
    architecture (the config's shape keys), base model or LoRA setup, or other classes. Raises
    `OutputDirError` naming the difference and the fix; the weights themselves are checked when they
    load (`load_round_arrays`)."""
    from ..adapters import is_adapter_model
    from ..factory import label_names_of, model_facts

    adapter_round = (point.folder / checkpoint.ADAPTER_CONFIG_FILE).is_file()
    if adapter_round != is_adapter_model(model):
        saved_kind, run_kind = (
            ("LoRA adapters", "every weight") if adapter_round else ("every weight", "adapters")
        )
        raise OutputDirError(
            f"--resume: {point.folder} holds {saved_kind} and this run's model trains {run_kind}. Resume "
            "with the adapter setup the run started with."
        )
    if adapter_round:
        differs = _adapter_differences(point.folder, model)
    else:
        saved = json.loads((point.folder / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
        ours = model.config.to_dict()
        differs = [
            f"{key}: saved {saved[key]!r}, this run {ours[key]!r}"
            for key in ARCHITECTURE_KEYS
            if key in saved and key in ours and saved[key] != ours[key]
        ]
    facts = model_facts(model)
    saved_facts = _history_model(output_dir)
    if not adapter_round and saved.get("id2label"):
        saved_facts[LABEL_NAMES_KEY] = label_names_of(saved["id2label"])
    for key, what in ((MODEL_CLASS_KEY, "model class"), (LABEL_NAMES_KEY, "labels")):
        if key in saved_facts and key in facts and saved_facts[key] != facts[key]:
            differs.append(f"{what}: saved {saved_facts[key]!r}, this run {facts[key]!r}")
    if differs:
        raise OutputDirError(
            f"--resume: {point.folder} was trained with another model, adapter setup or label set ("
            + "; ".join(differs)
            + "). Resume with the model, adapters and data the run started with, or choose another "
            "--output_dir."
        )


def _adapter_differences(folder: Path, model) -> list[str]:
    """How the adapter round in `folder` differs from the run's PEFT model (base model, LoRA rank and
    scale; the target modules are checked with the weights)."""
    saved = json.loads((folder / checkpoint.ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    config = model.peft_config["default"]
    ours = {
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
    }
    return [
        f"{key}: saved {saved.get(key)!r}, this run {value!r}"
        for key, value in ours.items()
        if saved.get(key) != value
    ]


def _history_model(output_dir) -> dict:
    """What history.json recorded of the run's model (`factory.model_facts`), {} when nothing."""
    try:
        history = checkpoint.read_history(output_dir)
    except (FileNotFoundError, OutputDirError):
        return {}
    model = history.get("model")
    return model if isinstance(model, dict) else {}


def load_round_arrays(folder: Path, model):
    """Load the weights saved in a round folder into `model`; return what the strategy starts from.

    A full round is read with the model's own class (`from_pretrained`), an adapter round's
    `adapter_model.safetensors` into the adapters of `model` (a PEFT model). The saved weights are
    checked against the model first (a foreign folder changes nothing); the return value is the
    model's trainable part in float32, as for round 0.
    """
    from ..weights import get_weights, state_dict_to_arrays, validate_arrays

    adapter_round = (folder / checkpoint.ADAPTER_CONFIG_FILE).is_file()
    if adapter_round:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = load_file(folder / checkpoint.ADAPTER_WEIGHTS_FILE)
        reference = get_peft_model_state_dict(model)
    else:
        saved = type(model).from_pretrained(folder).state_dict()
        reference = model.state_dict()
    try:
        validate_arrays(state_dict_to_arrays(saved), reference)
    except ValueError as err:
        raise OutputDirError(
            f"--resume: the weights in {folder} do not fit this run's model: {err}"
        ) from None
    if adapter_round:
        set_peft_model_state_dict(model, saved)
    else:
        model.load_state_dict(saved)
    return get_weights(model, "float32")
