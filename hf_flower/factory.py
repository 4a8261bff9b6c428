"""A user's `make_trainer` by reference, so that every process of a run calls the same function.

A simulation's clients run in Flower's worker processes and the server in its ServerApp process:
neither can receive a Python function, so the factory travels as a reference that each process
imports, `module:function` or `path/to/script.py:function` (`factory_ref` makes one from a function,
`load_factory` imports it). A script's file is imported under a module name of its own, so its
`if __name__ == "__main__":` block does not run again. `build_trainer` calls the factory and refuses
what hf-flower cannot federate, with the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import LABEL_NAMES_KEY, MAX_LABELS, MODEL_CLASS_KEY

if TYPE_CHECKING:
    from transformers import Trainer

    from .context import TrainerContext

TrainerFactory = Callable[["TrainerContext"], "Trainer"]
SCRIPT_SUFFIX = ".py"
# Module names under which script files are imported: `hf_flower_script_<name>_<hash of the path>`.
SCRIPT_MODULE_PREFIX = "hf_flower_script_"


class FactoryError(ValueError):
    """The Trainer factory cannot be used as given; the message says why and what to do."""


def factory_ref(factory: TrainerFactory | str) -> str:
    """The reference other processes import `factory` by: `module:function`, or
    `/abs/path/script.py:function` for a function of a script run as `__main__` or named by a
    relative path. A reference given as a string is checked and made absolute.

    Refused: lambdas, functions defined inside other functions (closures), and functions of a
    `__main__` without a file (an interactive session, a notebook, `python -c`), which no other
    process can import.
    """
    if isinstance(factory, str):
        location, name = split_ref(factory)
        if location.endswith(SCRIPT_SUFFIX):
            location = str(Path(location).resolve())
        return f"{location}:{name}"
    name = getattr(factory, "__qualname__", None) or getattr(factory, "__name__", None)
    module = getattr(factory, "__module__", None)
    if name is None or module is None or not callable(factory):
        raise FactoryError(
            f"make_trainer must be a function, got {type(factory).__name__}: define "
            "`def make_trainer(context): ... return Trainer(...)` at the top level of your script."
        )
    if "<lambda>" in name or "<locals>" in name:
        kind = "a lambda" if "<lambda>" in name else "defined inside another function"
        raise FactoryError(
            f"make_trainer {name!r} is {kind}: Flower's simulation workers and the ServerApp run in "
            "other processes and import it by name, so define it with `def` at the top level of a "
            "module or script."
        )
    if module.startswith(SCRIPT_MODULE_PREFIX):  # a script `load_factory` imported by its path
        return f"{sys.modules[module].__file__}:{name}"
    if module == "__main__":
        script = getattr(sys.modules.get("__main__"), "__file__", None)
        if not script:
            raise FactoryError(
                f"make_trainer {name!r} belongs to a __main__ without a file (an interactive session, "
                "a notebook or `python -c`), which other processes cannot import: put it in a .py file "
                "and pass that file's function, e.g. `my_script.py:make_trainer`."
            )
        return f"{Path(script).resolve()}:{name}"
    return f"{module}:{name}"


def split_ref(ref: str) -> tuple[str, str]:
    """`module:function` or `script.py:function` as (module or path, function name)."""
    location, sep, name = ref.rpartition(":")
    if not sep or not location or not name.isidentifier():
        raise FactoryError(
            f"--trainer {ref!r} is not `module:function` or `path/to/script.py:function` (e.g. "
            "`my_script.py:make_trainer`)."
        )
    return location, name


def load_factory(ref: str) -> TrainerFactory:
    """Import the function `ref` names (a `factory_ref`)."""
    location, name = split_ref(ref)
    module = _import_script(location) if location.endswith(SCRIPT_SUFFIX) else _import_module(location)
    factory = getattr(module, name, None)
    if factory is None:
        raise FactoryError(f"{location} defines no {name!r}: --trainer names a function at its top level.")
    if not callable(factory):
        raise FactoryError(f"{ref} is a {type(factory).__name__}, not a function taking the context.")
    return factory


def _import_module(name: str):
    """Module `name`, found as `python -m` would find it: from the working folder too (a console
    script such as `hf-flower` does not put it on the path; the launchers pass it to Flower's
    processes on PYTHONPATH)."""
    for attempt in range(2):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name and not name.startswith(f"{err.name}."):
                raise  # the module exists; one of its own imports is missing
            if attempt == 0 and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
                continue
            raise FactoryError(
                f"Cannot import module {name!r} of the Trainer factory: run from the folder that holds "
                "it, add that folder to PYTHONPATH, or name the file instead (`path/to/script.py:make_trainer`)."
            ) from None


def _import_script(path: str):
    """A script's module, imported once per process under a name of its own (not `__main__`)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise FactoryError(f"The Trainer factory's script {path} does not exist.")
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:12]
    module_name = f"{SCRIPT_MODULE_PREFIX}{file.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    # The script's own folder first, as `python script.py` would have it (its sibling modules).
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def check_signature(factory: TrainerFactory, ref: str) -> None:
    """Refuse a factory that cannot be called with the context alone."""
    try:
        inspect.signature(factory).bind(object())
    except TypeError:
        raise FactoryError(
            f"{ref} cannot be called as make_trainer(context): give it exactly one parameter, the "
            "TrainerContext (further parameters need defaults)."
        ) from None
    except ValueError:  # a callable without a signature (a builtin): trust it
        pass


def build_trainer(factory: TrainerFactory, context: TrainerContext, ref: str = "make_trainer") -> Trainer:
    """`factory(context)`, checked: a `transformers.Trainer` hf-flower can federate, with a warning
    when its TrainingArguments ask for bf16 on a CPU that emulates it."""
    from transformers import Trainer

    from .arguments.precision import warn_if_emulated

    trainer = factory(context)
    if not isinstance(trainer, Trainer):
        raise FactoryError(
            f"{ref} returned {_describe(trainer)}, not a transformers.Trainer: return the Trainer (or "
            "Seq2SeqTrainer, TRL trainer, subclass) you would call .train() on, without calling it."
        )
    check_supported(trainer, ref)
    warn_if_emulated(trainer.args)
    return trainer


def check_supported(trainer: Trainer, ref: str = "make_trainer") -> None:
    """Refuse the Trainer settings hf-flower cannot federate."""
    args = trainer.args
    sharded = [name for name in ("deepspeed", "fsdp") if getattr(args, name, None)]
    if sharded:
        raise FactoryError(
            f"{ref} returned a Trainer with TrainingArguments {', '.join(f'{n}={getattr(args, n)!r}' for n in sharded)}: "
            "hf-flower exchanges each round's full trainable weights, which DeepSpeed ZeRO and FSDP "
            "shard across ranks. Drop them: a client on several GPUs trains with DDP "
            "(`accelerate launch --config_file accelerate_configs/multi_gpu.yaml ...`); for models "
            "too large for one GPU, train LoRA adapters (peft) or load the base in 4 bits."
        )
    if trainer.model_init is not None:
        raise FactoryError(
            f"{ref} returned a Trainer built with model_init, which builds a new model on every "
            "train(): pass the model itself (`Trainer(model=...)`), so the weights the server sends stay in it."
        )


def _describe(value: Any) -> str:
    return "None (no return statement?)" if value is None else f"a {type(value).__name__}"


def model_facts(model) -> dict[str, Any]:
    """What the server tells clients of its model with every message: its class and its classes
    (`config.id2label`, in id order), so a client can build the same head and check its own model."""
    facts: dict[str, Any] = {MODEL_CLASS_KEY: type(model).__name__}
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if id2label:
        facts[LABEL_NAMES_KEY] = label_names_of(id2label)
    return facts


def label_names_of(id2label: Mapping) -> list[str]:
    """A config's `id2label` as class names in id order (its keys are ints, or strings in a config.json)."""
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


def server_model(config: Mapping[str, Any]) -> dict[str, Any]:
    """`model_facts` as a server's message carries them, checked: on a client they are untrusted input."""
    facts: dict[str, Any] = {}
    model_class = config.get(MODEL_CLASS_KEY)
    if model_class is not None:
        if not isinstance(model_class, str) or not model_class.isidentifier():
            raise ValueError(
                f"The server sent {MODEL_CLASS_KEY!r} = {str(model_class)[:100]!r}: not a class name."
            )
        facts[MODEL_CLASS_KEY] = model_class
    names = config.get(LABEL_NAMES_KEY)
    if names is not None:
        if (
            not isinstance(names, list)
            or not 1 <= len(names) <= MAX_LABELS
            or not all(isinstance(name, str) and name for name in names)
            or len(set(names)) != len(names)
        ):
            raise ValueError(
                f"The server sent {LABEL_NAMES_KEY!r} = {str(names)[:200]}: expected 1 to {MAX_LABELS} "
                "distinct, non-empty class names."
            )
        facts[LABEL_NAMES_KEY] = tuple(names)
    return facts


def check_same_model(model, server: Mapping[str, Any], ref: str = "make_trainer") -> None:
    """Refuse a client's model of another class or label set than the server's (`server_model`)."""
    ours = model_facts(model)
    differences = []
    if MODEL_CLASS_KEY in server and server[MODEL_CLASS_KEY] != ours[MODEL_CLASS_KEY]:
        differences.append(
            f"model class: the server's {server[MODEL_CLASS_KEY]}, this client's {ours[MODEL_CLASS_KEY]}"
        )
    if LABEL_NAMES_KEY in server and tuple(server[LABEL_NAMES_KEY]) != tuple(ours.get(LABEL_NAMES_KEY, ())):
        differences.append(
            f"classes: the server's {list(server[LABEL_NAMES_KEY])}, this client's {list(ours.get(LABEL_NAMES_KEY, []))}"
        )
    if differences:
        raise FactoryError(
            f"{ref} built another model than the server's ({'; '.join(differences)}). Server and clients "
            "must build the same architecture, labels and adapters: run one make_trainer with the same "
            "settings on both sides (on a client, `context.label_names` are the server's classes)."
        )
