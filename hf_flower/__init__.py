"""hf-flower: federated fine-tuning of Hugging Face models with Flower and `transformers.Trainer`.

The public API, all of it: a user writes `make_trainer(context) -> transformers.Trainer` once, and

- `main(make_trainer)` makes the script a command line: `python my_script.py train|simulate|server|client`
  (`accelerate launch my_script.py client ...` on several GPUs);
- `simulate(make_trainer, ...)` runs a federation of it on this machine from Python;
- `TrainerContext` is what `make_trainer` receives: who calls it, for which round, with which data.

Names are imported on first use, so `import hf_flower` stays light (no torch) for the launchers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .constants import VERSION as __version__

if TYPE_CHECKING:
    from .arguments import FederationArguments, HubArguments
    from .commands.script import main
    from .context import TrainerContext
    from .factory import FactoryError
    from .launch.simulation import simulate

# Public name -> the module that defines it.
_EXPORTS = {
    "TrainerContext": "hf_flower.context",
    "FactoryError": "hf_flower.factory",
    "FederationArguments": "hf_flower.arguments",
    "HubArguments": "hf_flower.arguments",
    "main": "hf_flower.commands.script",
    "simulate": "hf_flower.launch.simulation",
}

__all__ = [
    "FactoryError",
    "FederationArguments",
    "HubArguments",
    "TrainerContext",
    "__version__",
    "main",
    "simulate",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_flower' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
