"""Which weights train: frozen modules and PEFT adapters (LoRA), and how adapter rounds are saved.

Everything with ``requires_grad`` after `prepare_trainable` is what clients train, send and the
server averages (`hf_flower.weights`); everything else stays where it is on both sides. Server
and clients call the same function on the same pretrained model, so they agree on the split.

An adapter round is a PEFT folder (``adapter_config.json``, ``adapter_model.safetensors``): it
loads with ``AutoPeftModelForSequenceClassification.from_pretrained(folder)`` or
``PeftModel.from_pretrained(base, folder)``; ``adapter_config.json`` names the base model as the
user gave it (the Hub id, not a local cache path). With ``--save_merged`` the round also holds
``merged/``, the base model with the adapters merged in, a plain ``from_pretrained`` folder.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterable
from pathlib import Path

import torch

from .arguments import ModelArguments, PeftArguments

MERGED_DIR = "merged"

# LoRA targets for model types peft has no default for (peft's own table covers BERT, RoBERTa...).
EXTRA_LORA_TARGET_MODULES = {"distilbert": ["q_lin", "v_lin"]}


class AdapterError(ValueError):
    """The trainable part cannot be set up as asked; the message names the fix."""


def prepare_trainable(
    model: torch.nn.Module,
    model_args: ModelArguments,
    peft_args: PeftArguments,
    fresh_modules: Iterable[str] = (),
    peft_task_type: str = "SEQ_CLS",
) -> torch.nn.Module:
    """Freeze `--freeze_modules`, then add adapters for `--peft`; return the model to train.

    `fresh_modules` are the modules ``from_pretrained`` initialised (the classification head):
    the default `modules_to_save` of an adapter model, so the new head trains in full.
    `peft_task_type` is peft's `TaskType` name for the model (`SEQ_CLS`, `CAUSAL_LM`).
    """
    if model_args.freeze_modules:
        for name in model_args.freeze_modules:
            for module in find_modules(model, name, "freeze_modules").values():
                module.requires_grad_(False)
    if peft_args.peft == "none":
        return model
    return add_lora(model, model_args, peft_args, fresh_modules, peft_task_type)


def add_lora(
    model: torch.nn.Module,
    model_args: ModelArguments,
    peft_args: PeftArguments,
    fresh_modules: Iterable[str] = (),
    peft_task_type: str = "SEQ_CLS",
) -> torch.nn.Module:
    """Wrap ``model`` in a peft model of `peft_task_type` (e.g. ``PeftModelForSequenceClassification``)
    with LoRA adapters."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = lora_config(model, model_args, peft_args, fresh_modules)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType[peft_task_type], **config))
    # What loaders read back: the name the user gave (a Hub id), not the local folder it was
    # loaded from (e.g. the packaged copy of all-MiniLM-L6-v2).
    saved = peft_model.peft_config["default"]
    saved.base_model_name_or_path = model_args.model_name_or_path
    if model_args.revision != "main":
        saved.revision = model_args.revision
    return peft_model


def lora_config(
    model: torch.nn.Module,
    model_args: ModelArguments,
    peft_args: PeftArguments,
    fresh_modules: Iterable[str] = (),
) -> dict:
    """``LoraConfig`` keyword arguments, every module name checked against ``model``."""
    targets = peft_args.lora_target_modules or default_target_modules(model)
    for name in targets:
        find_modules(model, name, "lora_target_modules", linear_only=True)
    to_save = peft_args.modules_to_save or sorted(set(fresh_modules))
    for name in to_save:
        find_modules(model, name, "modules_to_save")
    return {
        "r": peft_args.lora_r,
        "lora_alpha": peft_args.lora_alpha,
        "lora_dropout": peft_args.lora_dropout,
        "target_modules": list(targets),
        "modules_to_save": list(to_save) or None,
    }


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """peft's LoRA targets for the model's type (attention query and value projections)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = PEFT_DEFAULTS.get(model_type) or EXTRA_LORA_TARGET_MODULES.get(model_type)
    if not targets:
        raise AdapterError(
            f"No default LoRA target modules for model type {model_type!r}. Name them with "
            f"--lora_target_modules; this model's linear layers are: {', '.join(linear_layer_names(model))}."
        )
    return list(targets)


def fresh_modules_of(missing_keys: Iterable[str]) -> list[str]:
    """Modules whose weights ``from_pretrained`` reported missing, i.e. initialised fresh."""
    return sorted({key.rpartition(".")[0] for key in missing_keys if "." in key})


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct last name parts of the model's ``nn.Linear`` layers (candidates for LoRA)."""
    names = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def find_modules(
    model: torch.nn.Module, name: str, flag: str, linear_only: bool = False
) -> dict[str, torch.nn.Module]:
    """Modules whose dotted name is ``name`` or ends with ``.name``; an error naming the fix if none."""
    found = {
        qualified: module
        for qualified, module in model.named_modules()
        if qualified and (qualified == name or qualified.endswith("." + name))
    }
    if linear_only:
        found = {qualified: m for qualified, m in found.items() if isinstance(m, torch.nn.Linear)}
    if not found:
        if linear_only:
            known = f"its linear layers are: {', '.join(linear_layer_names(model))}"
        else:
            top = sorted({q.split(".")[0] for q, _ in model.named_modules() if q})
            known = f"its top-level modules are: {', '.join(top)} (any dotted name or suffix works)"
        raise AdapterError(f"--{flag} {name!r} matches no module of {type(model).__name__}; {known}.")
    return found


def prepare_gradient_checkpointing(model: torch.nn.Module, training_args) -> None:
    """Let `--gradient_checkpointing` train a model whose input embeddings are frozen: LoRA adapters
    (peft freezes the base), a QLoRA base, or `--freeze_modules` that include the embeddings.

    A checkpointed layer is recomputed in the backward pass from its saved inputs, and reentrant
    checkpointing (`--gradient_checkpointing_kwargs '{"use_reentrant": true}'`) gives its weights
    gradients only when one of those inputs requires a gradient. Frozen embeddings output none: the
    backward pass fails ("element 0 of tensors does not require grad"), or, when something outside
    the checkpointed layers trains (`--modules_to_save`), the adapters silently get no gradient.
    The embeddings' output is made to require a gradient here, as TRL's `SFTTrainer` does: the
    Trainer does it too when it turns checkpointing on in transformers 5.24, not in the versions
    affected by huggingface/transformers#42489 (reported on 5.0), which hf-flower also supports.
    """
    checkpointing = getattr(training_args, "gradient_checkpointing", False)
    if checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def is_adapter_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (its rounds are saved as adapter folders)."""
    return hasattr(model, "peft_config")


def save_model(model: torch.nn.Module, tokenizer, folder: str | Path, save_merged: bool = False) -> None:
    """Save a round: a full model folder, or a PEFT adapter folder (+ ``merged/`` if asked).

    Merging works on a copy, so the model the server keeps aggregating stays an adapter model.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if save_merged and is_adapter_model(model):
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(folder / MERGED_DIR)
        tokenizer.save_pretrained(folder / MERGED_DIR)
        # The copy of a model the Trainer prepared for mixed precision is a reference cycle
        # (accelerate's autocast `forward` holds its model): freed only by a collection, each
        # round's copy stayed (0.5 GB a round for SmolLM2-135M on the server).
        del merged
        gc.collect()
