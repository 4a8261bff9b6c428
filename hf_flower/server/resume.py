"""Continuing an interrupted run (`--resume`): from the latest complete round on disk to where the
ServerApp starts again.

A run is continued from its latest complete `round-N` folder (a half-written round is a hidden
temporary folder, never a `round-N`), or from the round `--resume_from_round` names: its weights
become the initial weights, its `strategy_state.safetensors` restores the strategy's own state,
and the history is rebuilt from history.json's records of every complete round up to it, or that
round's `metrics.json` where history.json has none (so a crash between saving a round and
rewriting history.json loses nothing). An adapter round (`--peft lora`) continues the same way:
its adapter weights are loaded into the run's PEFT model. The round is checked against its
checksums, and the folder must belong to the same model, adapter setup and labels, and its
strategy state to this run (`checked_strategy_state`: moments shaped as the model's trainable
part and finite, a fixed clipping norm equal to the run's): all that is checked before anything
in it is touched. Rounds after the one continued from are moved aside (`set_aside_later_rounds`),
never deleted.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

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


# The strategy state's arrays, by attribute: a dict by weight name (FedAdam, FedYogi, FedAdagrad's
# moments) or a list in the weights' order (FedAvgM's momentum). The second moments are squares.
MOMENT_DICTS = ("m_t", "v_t")
NON_NEGATIVE = ("v_t",)
MOMENT_LISTS = ("momentum_vector",)


def checked_strategy_state(folder: Path, federation, shapes: Mapping[str, tuple]) -> tuple[dict, dict] | None:
    """The strategy state saved in round folder `folder` (`checkpoint.read_strategy_state`), checked
    against this run before anything restores it; None when the round has none.

    `federation` is the run's `FederationArguments` (its strategy is built afresh to restore into);
    `shapes` maps the model's trainable weights (what the strategy aggregates) to their shapes.
    Every moment must name exactly those weights with their shapes and be finite (second moments
    also >= 0). A clipping norm the run config sets (`clipping_norm` of the fixed-clipping DP
    strategies) must equal the run's: an edited one would silently change the privacy guarantee;
    an adaptive one (`initial_clipping_norm`) changes every round and must be finite and > 0.
    Raises `OutputDirError` naming the file, the value and the fix (`StrategyError` for another
    strategy).
    """
    from .strategies import STATE_ATTRIBUTES, build_strategy, set_strategy_state

    state = checkpoint.read_strategy_state(folder)
    if state is None:
        return None
    where = Path(folder) / checkpoint.STRATEGY_STATE_FILE
    fresh, restored = build_strategy(federation), build_strategy(federation)
    try:
        set_strategy_state(restored, *state)
    except (KeyError, TypeError, AttributeError) as err:
        raise OutputDirError(
            f"--resume: {where} is not the state this version saves ({type(err).__name__}: {err}); it "
            "was edited or damaged: restore the round, or resume from an earlier one with --resume_from_round"
        ) from None
    for prefix, part, ours in _strategy_parts(restored, fresh):
        for attr in STATE_ATTRIBUTES:
            if hasattr(part, attr):
                problem = _state_problem(attr, getattr(part, attr), type(part), getattr(ours, attr), shapes)
                if problem:
                    raise OutputDirError(f"--resume: {where}: {prefix}{attr} {problem}")
    return state


def _strategy_parts(restored, fresh) -> list[tuple[str, object, object]]:
    """The restored strategy and, for a DP wrapper, the one it wraps, beside the run's own."""
    from flwr.serverapp.strategy import Strategy

    from .strategies import WRAPPED_STRATEGY_KEY

    parts = [("", restored, fresh)]
    inner = getattr(restored, WRAPPED_STRATEGY_KEY, None)
    if isinstance(inner, Strategy):
        parts.append((f"{WRAPPED_STRATEGY_KEY}.", inner, getattr(fresh, WRAPPED_STRATEGY_KEY)))
    return parts


def _state_problem(attr: str, value, cls: type, ours, shapes: Mapping[str, tuple]) -> str | None:
    """What is wrong with one restored attribute of a strategy of class `cls` (`ours`: the value
    this run's own strategy starts with), or None."""
    if value is None:
        return None
    if attr in MOMENT_DICTS or attr in MOMENT_LISTS:
        return _moments_problem(attr, value, shapes)
    if attr == "clipping_norm":
        return _clipping_norm_problem(value, cls, ours)
    return None


def _moments_problem(attr: str, value, shapes: Mapping[str, tuple]) -> str | None:
    """Moments that do not fit the model's trainable weights (names, shapes), or are not finite."""
    if attr in MOMENT_DICTS:
        if not isinstance(value, dict) or set(value) != set(shapes):
            names = sorted(value) if isinstance(value, dict) else []
            return (
                f"names {_few(names)}, not the model's trainable weights {_few(sorted(shapes))}: it belongs "
                "to another model or was edited. Resume with the model the run started with."
            )
        arrays = [(name, value[name]) for name in shapes]
    else:
        if not isinstance(value, (list, tuple)) or len(value) != len(shapes):
            count = len(value) if isinstance(value, (list, tuple)) else 0
            return (
                f"holds {count} arrays for the model's {len(shapes)} trainable weights: it belongs to "
                "another model or was edited. Resume with the model the run started with."
            )
        arrays = list(zip(shapes, value, strict=True))
    for name, array in arrays:
        array = np.asarray(array)
        if tuple(array.shape) != tuple(shapes[name]):
            return f"of {name} has shape {tuple(array.shape)}, the model's weight {tuple(shapes[name])}."
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            return f"of {name} is not finite floating-point numbers: it was edited or damaged."
        if attr in NON_NEGATIVE and (array < 0).any():
            return f"of {name} holds negative values, which a second moment never has: it was edited."
    return None


def _clipping_norm_problem(value, cls: type, ours) -> str | None:
    """A clipping norm that is no positive number, or that differs from the one the run sets."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        return f"is {value!r}; a clipping norm is a finite number > 0: the file was edited."
    # A constructor argument is the run config's setting (fixed clipping), never state to restore;
    # the adaptive strategies take `initial_clipping_norm` and move it every round.
    if "clipping_norm" in inspect.signature(cls.__init__).parameters and value != ours:
        return (
            f"is {value!r}, and this run's --strategy_kwargs set clipping_norm {ours!r}. The clipping norm "
            "bounds what one client can add to the aggregate, so the differential-privacy guarantee "
            "depends on it: resume with the clipping_norm the run started with, or start a new run to "
            "use another."
        )
    return None


def _few(names: list[str], limit: int = 4) -> str:
    """`names` for a message: the first `limit`, and how many more."""
    shown = ", ".join(repr(name) for name in names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"
