"""`PeftArguments`: what is trained: the whole model, or LoRA adapters (`auto` picks per task)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import split_names

PEFT_METHODS = ("auto", "none", "lora")


@dataclass
class PeftArguments:
    """Parameter-efficient fine-tuning: train small adapters instead of the whole model.

    With `peft: lora`, every client trains LoRA adapters (`peft.LoraConfig`) plus the modules in
    `modules_to_save`; only those travel and are averaged, and each round is saved as a PEFT
    adapter folder (`adapter_model.safetensors`, `adapter_config.json`).

    Args:
        peft: `none` (train every weight), `lora`, or `auto` (the default): the task's usual choice,
            `none` for text-classification, `lora` for causal-lm.
        lora_r: Rank of the LoRA update matrices.
        lora_alpha: LoRA scaling numerator (the update is scaled by `lora_alpha / lora_r`).
        lora_dropout: Dropout on the LoRA branch.
        lora_target_modules: Modules that get adapters, by name suffix (`query value`). Default:
            peft's choice for the model type (`query`, `value` for BERT; `q_lin`, `v_lin` for
            DistilBERT).
        modules_to_save: Modules trained in full beside the adapters. Default: the modules that
            `from_pretrained` initialised fresh, i.e. the classification head (`classifier`;
            `pre_classifier` and `classifier` for DistilBERT).
    """

    peft: str = field(default="auto", metadata={"help": "Adapter method.", "choices": PEFT_METHODS})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get LoRA adapters; default: peft's for the model type."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full; default: the freshly initialised head."}
    )

    def __post_init__(self):
        if self.peft not in PEFT_METHODS:
            raise ValueError(
                f"Unknown peft method {self.peft!r}; choose one of {list(PEFT_METHODS)} "
                "(`none` trains the whole model)."
            )
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be at least 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        self.lora_target_modules = split_names(self.lora_target_modules)
        self.modules_to_save = split_names(self.modules_to_save)
