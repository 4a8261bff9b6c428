"""`--precision`: the mixed precision a built-in task trains in, chosen by each process for its device.

bfloat16 is fast only where the hardware computes in it: CUDA GPUs of compute capability 8.0 and
up, and CPUs with AVX512-BF16 or AMX. Elsewhere PyTorch emulates it, several times slower than
float32: on a 2-core AVX2 EPYC the SFT quickstart, tuned in bf16 on an AMX machine, made no training
step in 11 minutes. A config written on one machine must not decide for another, so with
`--precision auto` every process (the server, each client, each on its own machine) trains in what
its own device does natively (`native_precision`) and logs its choice once. Unset, a task's
`TrainingArguments` stay as given; a user's Trainer is never rewritten, but one that asks for bf16
on a CPU without it gets a warning (`warn_if_emulated`). A deployed client does not follow a run's
precision that its device would emulate (`policy.own_precision`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TrainingArguments

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# "1": treat this CPU as one without native bfloat16, to measure on a machine that has it what
# `auto` does on one that has not.
NO_NATIVE_BF16_ENV = "HF_FLOWER_NO_NATIVE_BF16"
CPUINFO = "/proc/cpuinfo"
# CPU flags of native bfloat16 arithmetic (Linux's names, which torch.cpu.get_capabilities shares).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# How the log names a device (`TrainingArguments.device.type`); others by their type.
DEVICE_NAMES = {"cpu": "CPU", "cuda": "GPU"}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a process trains in (`bf16`, `fp16` or `fp32`) and why, for its log."""

    precision: str
    reason: str

    @property
    def dtype(self) -> str:
        return DTYPE_NAMES[self.precision]

    def describe(self) -> str:
        return f"precision: {self.dtype} ({self.reason})"


def cpu_flags() -> set[str]:
    """This CPU's feature flags: Linux's `/proc/cpuinfo`, elsewhere (macOS, Windows) what torch
    detects (`torch.cpu.get_capabilities`), else none."""
    if sys.platform.startswith("linux"):
        try:
            with open(CPUINFO) as cpuinfo:
                for line in cpuinfo:
                    if line.startswith(("flags", "Features")):  # x86, ARM
                        return set(line.partition(":")[2].split())
        except OSError:
            pass
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return {name for name, value in capabilities().items() if value is True} if capabilities else set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 (AVX512-BF16 or AMX), unless `HF_FLOWER_NO_NATIVE_BF16=1`."""
    if os.environ.get(NO_NATIVE_BF16_ENV) == "1":
        return False
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def native_precision(device_type: str) -> PrecisionChoice:
    """The mixed precision a device (`TrainingArguments.device.type`) computes in natively: a CUDA
    GPU bf16 from compute capability 8.0 (`torch.cuda.is_bf16_supported` without emulation), else
    fp16; a CPU bf16 with AVX512-BF16 or AMX, else fp32; any other device fp32."""
    if device_type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16", "this GPU computes in bfloat16")
        return PrecisionChoice("fp16", "this GPU has no native bfloat16 (compute capability below 8.0)")
    if device_type == "cpu":
        if os.environ.get(NO_NATIVE_BF16_ENV) == "1":
            return PrecisionChoice("fp32", f"{NO_NATIVE_BF16_ENV}=1: this CPU counts as one without bfloat16")
        if cpu_has_native_bf16():
            return PrecisionChoice("bf16", "this CPU has AVX512-BF16/AMX")
        return PrecisionChoice(
            "fp32", "this CPU has no native bfloat16; bf16 would be emulated and several times slower"
        )
    return PrecisionChoice(
        "fp32",
        f"hf-flower knows the native precision of CUDA GPUs and CPUs, not of {device_type}; "
        "--precision bf16 or fp16 chooses one",
    )


def is_native(precision: str, device_type: str) -> bool:
    """Whether `device_type` trains in `precision` at full speed: fp32 anywhere, fp16 on a CUDA
    GPU, bf16 where `native_precision` chooses it."""
    if precision == "fp32" or (precision == "fp16" and device_type == "cuda"):
        return True
    return native_precision(device_type).precision == precision


def choose(precision: str, device_type: str) -> PrecisionChoice:
    """What `--precision` makes a process on `device_type` train in: `auto` its native precision,
    any other value itself (the reason says when the device emulates it)."""
    if precision == "auto":
        return native_precision(device_type)
    reason = f"--precision {precision}"
    if not is_native(precision, device_type):
        device = DEVICE_NAMES.get(device_type, device_type)
        reason += f"; this {device} emulates {DTYPE_NAMES[precision]}, several times slower"
    return PrecisionChoice(precision, reason)


def apply_precision(training: TrainingArguments, precision: str | None) -> TrainingArguments:
    """`training` with the mixed precision `--precision` chooses on this process's device, logged
    once per process; `precision` None: `training` as given.

    On a CPU it also sets `use_cpu`: transformers accepts bf16 on a CPU only with it, and on a
    process whose device is the CPU anyway it changes nothing else (pinned memory stays off)."""
    if precision is None:
        return training
    device_type = training.device.type
    choice = choose(precision, device_type)
    log_once(INFO, choice.describe())
    return dataclasses.replace(
        training,
        bf16=choice.precision == "bf16",
        fp16=choice.precision == "fp16",
        use_cpu=training.use_cpu or device_type == "cpu",
    )


def check_precision(precision: str | None, training: TrainingArguments) -> None:
    """Refuse `--precision` together with `--bf16` or `--fp16`: both would say what to train in."""
    if precision is not None and (training.bf16 or training.fp16):
        flag = "--bf16" if training.bf16 else "--fp16"
        raise ValueError(
            f"--precision {precision} and {flag} both set the mixed precision: drop {flag} (--precision "
            "bf16 asks for it explicitly), or drop --precision to keep the TrainingArguments as given."
        )


def warn_if_emulated(args: TrainingArguments) -> None:
    """Warn once per process when a Trainer's TrainingArguments ask for bf16 on a CPU that would
    emulate it. They are the user's and stay as given; the warning names the cost and the fix."""
    if not (args.bf16 or args.bf16_full_eval) or args.device.type != "cpu" or cpu_has_native_bf16():
        return
    log_once(
        WARNING,
        "TrainingArguments ask for bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it "
        "is emulated, several times slower than float32. Set bf16=False on this machine (bf16 only "
        "where /proc/cpuinfo lists avx512_bf16 or amx_bf16); the built-in tasks choose per machine "
        "with --precision auto.",
    )


@functools.cache
def log_once(level: int, message: str) -> None:
    """Log `message` once per process on Flower's logger, which every process of a run shows in
    the run's log (a simulated client's lines prefixed with its worker)."""
    from flwr.common.logger import log

    log(level, "%s", message)
