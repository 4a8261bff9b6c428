"""Where the memory of an SFT client worker and of the ServerApp goes, stage by stage.

Each side runs in a fresh process of its own, without Ray or Flower's runtime, through the code a
simulation runs:

- `client`: the ClientApp's own `train` and `evaluate` handlers (`hf_flower.client.client_app`),
  called with messages as the server sends them, for `--rounds` rounds of `--steps` training steps
  each. The run's Trainer is built the way a simulated client builds it (`session.session_for`,
  the task's `make_trainer`); its stages are marked by wrapping the functions it calls.
- `server`: the server's Trainer (`make_trainer` with the server's role), its central evaluation
  (`rounds.central_metrics`: the loss, then greedy generation) and the files of a saved round
  (`adapters.save_model`, with `merged/` when the config asks for it), for round 0 and each round.

After every stage the process's resident memory (VmRSS) and the highest it reached during the stage
(VmHWM, reset at the start of each stage through /proc/self/clear_refs) are recorded, with what
glibc's malloc holds free in its arenas (`mallinfo2`). The last stage returns that free memory to
the system (`malloc_trim`) and shows how much of the resident memory it was.

`conversion` (`--sides conversion`) measures the one-time conversion of the offline SmolLM2 (GGUF to
safetensors) that the first process needing the model runs.

Command (both sides of configs/sft_quickstart.yaml, 4 steps per round; about 5 minutes on 2 CPU
cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_stages.py

Messages go through the ClientApp's `freed_memory_released` mod and rounds end with the server's
`release_freed_memory`, as in a run, where the code has them. `--malloc fixed-threshold` runs both
sides with glibc's mmap threshold fixed at its default (`MALLOC_MMAP_THRESHOLD_=131072`), which
lowers the peaks further at a cost in speed (README: memory). Flags of the run go after `--`, e.g.
`-- --per_device_train_batch_size 4`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import run_facts

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sft_quickstart.yaml"
MB = 2**20


# --- Readings -----------------------------------------------------------------------------------


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux 4.0+); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )  # fmt: skip
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def malloc_free_mb() -> float | None:
    """Bytes glibc's malloc holds free in its arenas (all threads' arenas), in MiB; None without glibc."""
    if not hasattr(_libc, "mallinfo2"):
        return None
    _libc.mallinfo2.restype = MallInfo2
    return _libc.mallinfo2().fordblks / MB


class Stages:
    """The stages of one process, each with its RSS at the end, its peak RSS and its seconds."""

    def __init__(self):
        self.rows: list[dict] = []
        self.prefix = ""  # the round the stages belong to, e.g. "round 1: "
        self.peak_resets = reset_peak()
        self.started = time.monotonic()

    def mark(self, name: str) -> None:
        """End the stage `name` here and start the next one."""
        rss, peak = proc_status_mb("VmRSS"), proc_status_mb("VmHWM")
        free = malloc_free_mb()
        row = {"stage": name, "rss_mb": round(rss), "peak_mb": round(peak)}
        row["malloc_free_mb"] = None if free is None else round(free)
        row["seconds"] = round(time.monotonic() - self.started, 1)
        self.rows.append(row)
        print(f"  {name:<42} rss {rss:7.0f} MiB  peak {peak:7.0f} MiB  ({row['seconds']} s)", flush=True)
        self.peak_resets = reset_peak() and self.peak_resets
        self.started = time.monotonic()

    def returned_to_system(self) -> None:
        """The last stage: free memory handed back to the system (`gc.collect` and `malloc_trim`)."""
        gc.collect()
        if hasattr(_libc, "malloc_trim"):
            _libc.malloc_trim(0)
        self.prefix = ""
        self.mark("after gc.collect + malloc_trim(0)")

    def summary(self) -> dict:
        return {
            "peak_mb": max(r["peak_mb"] for r in self.rows),
            "peak_resets": self.peak_resets,
            "stages": self.rows,
        }


@contextlib.contextmanager
def marked(stages: Stages, module, name: str, before: str | None = None, after: str | None = None):
    """`module.name` wrapped: the stage `before` ends when it is called, `after` when it returns
    (either prefixed with the round measured, `stages.round`)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        if before:
            stages.mark(stages.prefix + before)
        result = original(*args, **kwargs)
        if after:
            stages.mark(stages.prefix + after)
        return result

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def run_config_of(config: str, overrides: list[str]) -> dict:
    from hf_flower.arguments import parse_args
    from hf_flower.arguments.run_config import to_run_config
    from hf_flower.tasks import resolve

    return to_run_config(resolve(parse_args(["--config", config, *overrides])))


def stage_hooks(stages: Stages, data_loader: str):
    """The stages inside the task's `make_trainer`, and the generation inside its evaluation."""
    from hf_flower import modeling
    from hf_flower.tasks import causal_lm

    hooks = contextlib.ExitStack()
    hooks.enter_context(
        marked(stages, causal_lm, "load_tokenizer", before="run arguments", after="tokenizer")
    )
    hooks.enter_context(marked(stages, modeling.adapters, "prepare_trainable", before="model load"))
    hooks.enter_context(marked(stages, causal_lm, "load_causal_lm", after="PEFT wrap"))
    hooks.enter_context(marked(stages, causal_lm, data_loader, after="data load + tokenization"))
    hooks.enter_context(marked(stages, causal_lm, "generate_completions", before="evaluation loss"))
    return hooks


# --- The two sides ------------------------------------------------------------------------------


def client_side(args) -> dict:
    """One simulated client worker's work: the Trainer built, then `--rounds` rounds of training
    (`--steps` each) and evaluation through the ClientApp's handlers."""
    stages = Stages()
    import torch
    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
    from transformers import TrainerCallback

    from hf_flower.arguments.policy import ClientPolicy
    from hf_flower.client import client_app, session
    from hf_flower.weights import get_weights

    torch.set_num_threads(args.threads)
    stages.mark("imports (torch, transformers, flwr, hf_flower)")

    # `--steps` per round: the run's max_steps is shared out over its rounds (`round_driver.round_share`).
    num_rounds = int(run_config_of(args.config, args.overrides)["federation.num-rounds"])
    run_config = run_config_of(args.config, ["--max_steps", str(args.steps * num_rounds), *args.overrides])
    os.environ.update(ClientPolicy.of_operator(run_config).to_env())  # as the launcher gives Ray's workers
    node = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
        run_config=run_config,
    )  # fmt: skip

    def message(arrays, kind, server_round):
        content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
        if arrays is not None:
            content["arrays"] = arrays
        metadata = Metadata(
            run_id=1, message_id=f"{kind}-{server_round}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
            group_id=str(server_round), created_at=time.time(), ttl=3600, message_type=kind,
        )  # fmt: skip
        return Message(metadata=metadata, content=content)

    class FirstStep(TrainerCallback):
        def __init__(self, server_round):
            self.server_round = server_round

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == 1:
                stages.mark(f"round {self.server_round}: first train step")

    with stage_hooks(stages, "client_datasets"):
        trainer = session.session_for(message(None, MessageType.TRAIN, 1), node).driver.trainer
        released = getattr(client_app, "freed_memory_released", None)  # the ClientApp's mod

        def handle(handler, msg):
            return released(msg, node, handler) if released else handler(msg, node)

        stages.mark("Trainer built")
        # What the server sends: the same initial adapters (the same seed), in float32.
        weights = get_weights(trainer.model, "float32")
        for server_round in range(1, args.rounds + 1):
            stages.prefix = f"round {server_round}: "
            first_step = FirstStep(server_round)
            trainer.add_callback(first_step)
            reply = handle(client_app.train, message(weights, MessageType.TRAIN, server_round))
            trainer.remove_callback(first_step)
            if reply.has_error():
                raise RuntimeError(f"training round {server_round} failed: {reply.error.reason}")
            stages.mark(f"round {server_round}: rest of training + reply")
            weights = reply.content["arrays"]
            reply = handle(client_app.evaluate, message(weights, MessageType.EVALUATE, server_round))
            if reply.has_error():
                raise RuntimeError(f"evaluation round {server_round} failed: {reply.error.reason}")
            stages.mark(f"round {server_round}: evaluation generation")
    stages.returned_to_system()
    return stages.summary()


def server_side(args) -> dict:
    """The ServerApp's work: the server's Trainer, then for round 0 and each round its central
    evaluation and the files of the saved round."""
    stages = Stages()
    import torch

    from hf_flower import adapters, modeling
    from hf_flower.arguments import FederationArguments
    from hf_flower.arguments.run_config import group_from_run_config
    from hf_flower.context import SERVER, TrainerContext
    from hf_flower.factory import build_trainer, load_factory
    from hf_flower.server.rounds import central_metrics
    from hf_flower.tasks import trainer_ref
    from hf_flower.weights import get_weights, set_weights

    release_freed_memory = getattr(modeling, "release_freed_memory", None)
    torch.set_num_threads(args.threads)
    stages.mark("imports (torch, transformers, flwr, hf_flower)")

    run_config = run_config_of(args.config, list(args.overrides))
    federation = group_from_run_config(FederationArguments, run_config)
    ref = trainer_ref(federation, run_config)
    context = TrainerContext(
        role=SERVER, config=federation.trainer_config, num_rounds=federation.num_rounds, run_config=run_config
    )
    with stage_hooks(stages, "central_test_set"), tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(load_factory(ref), context, ref)
        stages.mark("Trainer built")
        weights = get_weights(trainer.model, "float32")
        stages.mark("initial weights (float32 ArrayRecord)")
        for server_round in range(0, args.rounds + 1):
            stages.prefix = f"round {server_round}: "
            set_weights(trainer.model, weights)
            central_metrics(trainer, server_round)
            stages.mark(f"round {server_round}: evaluation generation")
            adapters.save_model(
                trainer.model,
                trainer.processing_class,
                Path(out) / f"round-{server_round}",
                federation.save_merged,
            )
            if release_freed_memory is not None:  # what the server does at the end of a round
                release_freed_memory()
            stages.mark(
                f"round {server_round}: save round" + (" (+ merged)" if federation.save_merged else "")
            )
    stages.returned_to_system()
    return stages.summary()


def conversion_side(args) -> dict:
    """The one-time conversion of the packaged SmolLM2 GGUF to a safetensors folder
    (`offline_models.convert_gguf`), which the first process that needs the model runs (a launcher's
    pre-flight check, before any client or server starts)."""
    stages = Stages()
    import torch

    from hf_flower import offline_models

    torch.set_num_threads(args.threads)
    stages.mark("imports (torch, transformers, hf_flower)")
    model = offline_models.PACKAGED_MODELS[offline_models.SMOLLM2_INSTRUCT]
    with tempfile.TemporaryDirectory() as out:
        offline_models.convert_gguf(model.package_dir() / offline_models.SMOLLM2_GGUF, Path(out))
        stages.mark("GGUF -> safetensors folder")
    stages.returned_to_system()
    return stages.summary()


SIDES = {"client": client_side, "server": server_side, "conversion": conversion_side}


# --- Driver -------------------------------------------------------------------------------------


# `--malloc fixed-threshold`: glibc's mmap threshold fixed at its default instead of growing.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_side(side: str, args) -> dict:
    """`side` measured in a fresh process (its imports and memory are its own)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [
            sys.executable, __file__, "--worker", side, "--result", result.name, "--steps", str(args.steps),
            "--rounds", str(args.rounds), "--threads", str(args.threads), "--config", args.config, "--",
            *args.overrides,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if args.malloc == "fixed-threshold":
            env.update(FIXED_MMAP_THRESHOLD)
        print(f"=== {side}", flush=True)
        started = time.monotonic()
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        return {
            **json.loads(Path(result.name).read_text()),
            "wall_seconds": round(time.monotonic() - started, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=["client", "server"])
    parser.add_argument(
        "--config", default=str(CONFIG), help="The run's YAML config (default: the SFT quickstart's)."
    )
    parser.add_argument("--steps", type=int, default=4, help="Training steps per round (default 4).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds measured (default 2, the config's).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument(
        "--malloc",
        choices=["glibc", "fixed-threshold"],
        default="glibc",
        help="glibc: glibc's own settings (its mmap threshold grows as blocks are freed; default); "
        "fixed-threshold: MALLOC_MMAP_THRESHOLD_=131072.",
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "memory_stages.json"))
    parser.add_argument("--label", default="current", help="The key the results are kept under.")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="Flags of the run, after `--` (e.g. -- --per_device_train_batch_size 4)."
    )
    args = parser.parse_args(argv)

    if args.worker:
        Path(args.result).write_text(json.dumps(SIDES[args.worker](args)))
        return 0
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    run = {
        "malloc": args.malloc,
        **run_facts("benchmarks/memory_stages.py", argv if argv is not None else sys.argv[1:]),
    }
    for side in args.sides:
        run[side] = run_side(side, args)
    results[args.label] = run
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    for side in args.sides:
        print(f"{side}: peak {run[side]['peak_mb']} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
