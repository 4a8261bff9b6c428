"""`--precision`: each process trains in what its own device computes natively, says so once, and a
Trainer that asks for bf16 on a CPU that would emulate it is warned about (never rewritten)."""

import logging
from pathlib import Path

import pytest
import torch
from conftest import run_config_of, sft_flags, tiny_run_flags, trainer_for
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from hf_flower.arguments import parse_args
from hf_flower.arguments import precision as precision_lib
from hf_flower.arguments.policy import ALLOWED_DATA_ENV, ALLOWED_MODELS_ENV, OPERATORS_RUN_ENV
from hf_flower.arguments.precision import apply_precision, choose, cpu_flags, native_precision
from hf_flower.arguments.run_config import from_run_config
from hf_flower.context import TrainerContext
from hf_flower.factory import build_trainer
from hf_flower.tasks import resolve

ROOT = Path(__file__).resolve().parents[1]
AMX_CPU = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX2_CPU = {"avx2", "fma"}  # an AMD EPYC of 2020: no native bfloat16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Every test a process that has logged nothing yet, on a CPU it is told of."""
    monkeypatch.delenv(precision_lib.NO_NATIVE_BF16_ENV, raising=False)
    precision_lib.log_once.cache_clear()
    yield
    precision_lib.log_once.cache_clear()


def cpu(monkeypatch, flags):
    monkeypatch.setattr(precision_lib, "cpu_flags", lambda: set(flags))


def precision_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision: ")]


def test_cpu_flags_are_read_from_proc_cpuinfo_on_linux(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    monkeypatch.setattr(precision_lib, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(precision_lib.sys, "platform", "linux")
    assert cpu_flags() == {"fpu", "sse2", "avx2", "avx512_bf16", "amx_tile"}
    assert native_precision("cpu").precision == "bf16"
    # Elsewhere (macOS, Windows), what torch detects.
    monkeypatch.setattr(precision_lib.sys, "platform", "darwin")
    monkeypatch.setattr(
        torch.cpu, "get_capabilities", lambda: {"neon": True, "bf16": False, "sve_max_length": 0}
    )
    assert cpu_flags() == {"neon"}
    assert native_precision("cpu").precision == "fp32"


@pytest.mark.parametrize(
    ("flags", "env", "expected", "reason"),
    [
        (AMX_CPU, None, "bf16", "this CPU has AVX512-BF16/AMX"),
        ({"avx512_bf16"}, None, "bf16", "this CPU has AVX512-BF16/AMX"),
        (AVX2_CPU, None, "fp32", "no native bfloat16; bf16 would be emulated and several times slower"),
        (AMX_CPU, "1", "fp32", "HF_FLOWER_NO_NATIVE_BF16=1: this CPU counts as one without bfloat16"),
    ],
)
def test_a_cpu_trains_in_bf16_only_with_native_support(monkeypatch, flags, env, expected, reason):
    cpu(monkeypatch, flags)
    if env:
        monkeypatch.setenv(precision_lib.NO_NATIVE_BF16_ENV, env)
    choice = native_precision("cpu")
    assert choice.precision == expected and reason in choice.reason


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_a_cuda_gpu_trains_in_its_own_choice(monkeypatch, bf16, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return bf16 or including_emulation  # a pre-Ampere GPU emulates bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cpu(monkeypatch, AVX2_CPU)  # the CPU beside the GPU does not matter
    assert native_precision("cuda").precision == expected
    assert asked == {"including_emulation": False}
    assert choose("auto", "cuda").precision == expected
    assert native_precision("mps").precision == "fp32"  # a device hf-flower knows nothing of


def test_auto_sets_bf16_only_where_native_and_logs_one_line_per_process(monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    given = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert apply_precision(given, None) is given  # unset: the TrainingArguments as given

    cpu(monkeypatch, AMX_CPU)
    args = apply_precision(given, "auto")
    # transformers accepts bf16 on a CPU only with use_cpu, which changes nothing else here.
    assert (args.bf16, args.fp16, args.use_cpu, args.mixed_precision) == (True, False, True, "bf16")
    apply_precision(given, "auto")
    assert precision_lines(caplog) == ["precision: bfloat16 (this CPU has AVX512-BF16/AMX)"]

    precision_lib.log_once.cache_clear()  # another process
    cpu(monkeypatch, AVX2_CPU)
    args = apply_precision(given, "auto")
    assert (args.bf16, args.fp16, args.mixed_precision) == (False, False, "no")
    assert precision_lines(caplog)[-1] == (
        "precision: float32 (this CPU has no native bfloat16; bf16 would be emulated and several times slower)"
    )


def test_explicit_bf16_is_honoured_and_says_what_it_costs(monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    cpu(monkeypatch, AVX2_CPU)
    args = apply_precision(TrainingArguments(output_dir=str(tmp_path), report_to=[]), "bf16")
    assert args.bf16 and args.use_cpu
    assert precision_lines(caplog) == [
        "precision: bfloat16 (--precision bf16; this CPU emulates bfloat16, several times slower)"
    ]
    cpu(monkeypatch, AMX_CPU)
    assert not apply_precision(
        TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True), "fp32"
    ).bf16


def test_precision_and_bf16_together_are_refused():
    with pytest.raises(
        ValueError, match="--precision auto and --bf16 both set the mixed precision: drop --bf16"
    ):
        resolve(parse_args(["--precision", "auto", "--bf16", "true", "--use_cpu", "true"]))
    run_config = {**run_config_of(["--output_dir", "out"]), "model.precision": "bfloat16"}
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'bf16', 'fp16', 'fp32'\]"):
        from_run_config(run_config)


@pytest.mark.parametrize("config", ["sft_quickstart.yaml", "sft_skills.yaml"])
def test_the_sft_configs_let_each_machine_choose(config):
    run_args = resolve(parse_args(["--config", str(ROOT / "configs" / config)]))
    assert run_args.model.precision == "auto"
    assert not run_args.training.bf16 and not run_args.training.use_cpu  # a GPU machine uses its GPU
    assert run_config_of(["--config", str(ROOT / "configs" / config)])["model.precision"] == "auto"


@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
@pytest.mark.parametrize(("flags", "bf16"), [(AMX_CPU, True), (AVX2_CPU, False)])
def test_the_builtin_tasks_train_in_bf16_only_where_native(
    monkeypatch, tmp_path, tiny_model_dir, reviews_csv, tiny_chat_model_dir, chat_jsonl, task, flags, bf16
):
    cpu(monkeypatch, flags)
    if task == "causal-lm":
        command = sft_flags(tmp_path, tiny_chat_model_dir, chat_jsonl, "--precision", "auto")
    else:
        command = tiny_run_flags(tmp_path, tiny_model_dir, reviews_csv, "--precision", "auto")
    run_config = run_config_of(command)
    assert run_config["training.bf16"] is False  # the launcher's machine decides nothing for the others
    trainer = trainer_for(run_config)
    assert (trainer.args.bf16, trainer.args.fp16) == (bf16, False)


def test_a_deployed_client_trains_in_its_own_native_precision(
    monkeypatch, caplog, tmp_path, tiny_model_dir, reviews_csv
):
    caplog.set_level(logging.INFO)
    cpu(monkeypatch, AVX2_CPU)
    monkeypatch.setenv(OPERATORS_RUN_ENV, "0")  # a deployed client, not a simulation's
    monkeypatch.setenv(ALLOWED_MODELS_ENV, str(tiny_model_dir))
    monkeypatch.setenv(ALLOWED_DATA_ENV, str(reviews_csv))
    client = {
        "role": "client",
        "partition_id": 0,
        "num_partitions": 2,
        "label_names": ("negative", "positive"),
    }
    # The server asks for bf16, which this client's CPU would emulate: it trains in float32.
    run_config = run_config_of(tiny_run_flags(tmp_path, tiny_model_dir, reviews_csv, "--precision", "bf16"))
    assert not trainer_for(run_config, **client).args.bf16
    assert (
        "The run asks for bfloat16, which this client's CPU would emulate, several times slower: it trains "
        "in float32 (this CPU has no native bfloat16; bf16 would be emulated and several times slower)."
    ) in caplog.messages
    # A client whose CPU has it follows the run; in a simulation the operator's choice is honoured.
    cpu(monkeypatch, AMX_CPU)
    assert trainer_for(run_config, **client).args.bf16
    cpu(monkeypatch, AVX2_CPU)
    monkeypatch.setenv(OPERATORS_RUN_ENV, "1")
    assert trainer_for(run_config, **client).args.bf16


def test_a_users_bf16_trainer_on_a_cpu_without_it_is_warned_once_and_kept(
    monkeypatch, caplog, tmp_path, tiny_model_dir
):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)

    def make_trainer(context):
        args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[])
        return Trainer(model=model, args=args)

    cpu(monkeypatch, AVX2_CPU)
    for _ in range(2):
        trainer = build_trainer(make_trainer, TrainerContext(role="client"))
    assert trainer.args.bf16  # the user's TrainingArguments are never rewritten
    warnings = [r.getMessage() for r in caplog.records if r.name == "flwr" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "TrainingArguments ask for bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it is "
        "emulated, several times slower than float32. Set bf16=False on this machine"
    )
    precision_lib.log_once.cache_clear()
    caplog.clear()
    cpu(monkeypatch, AMX_CPU)
    build_trainer(make_trainer, TrainerContext(role="client"))
    assert not [r for r in caplog.records if r.name == "flwr" and r.levelno == logging.WARNING]
