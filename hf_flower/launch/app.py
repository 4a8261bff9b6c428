"""The Flower app folder a launcher submits with `flwr run`, written from the imported package.

`flwr run DIR` needs a folder holding a `pyproject.toml` with `[project]` (name, version),
`[tool.flwr.app]` (publisher, components, and a `config` table that names every run-config key
`--run-config` may set) and the app's code: Flower zips the folder into a FAB, and the SuperLink
unpacks it and imports the components with the folder first on `sys.path`. An installed wheel has
no repository root to point at, so every launch writes such a folder into the run's `FLWR_HOME`:
a copy of the `hf_flower` package that is imported here (source and package data; in a checkout
that is the checkout's) and a pyproject.toml whose config table is this run's own config.
A checkout keeps its root `pyproject.toml` for `flwr run .` by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import tomli_w

from ..constants import VERSION

APP_DIRNAME = "hf-flower-app"
PUBLISHER = "hf-flower"
COMPONENTS = {"serverapp": "hf_flower.server.server_app:app", "clientapp": "hf_flower.client.client_app:app"}
# What the app needs of the package: its modules and its package data (pyproject
# `[tool.setuptools.package-data]`). Flower's FAB keeps only .py/.toml/.md/.yaml/.json files.
PACKAGE_FILES = ("**/*.py", "templates/*.md")


def package_dir() -> Path:
    """The folder of the imported `hf_flower` package (site-packages, or a checkout)."""
    return Path(__file__).resolve().parents[1]


def app_pyproject(run_config: dict[str, Any]) -> dict[str, Any]:
    """pyproject.toml of the app: our components, `run_config` as the config defaults.

    No `[project].dependencies`: the launchers start the SuperLink with
    `--disable-runtime-dependency-installation`, the app runs in the environment that holds
    hf-flower already.
    """
    return {
        "project": {
            "name": "hf-flower",
            "version": VERSION,
            "description": "Federated fine-tuning of Hugging Face models with Flower (hf-flower)",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "fab-include": [f"hf_flower/{pattern}" for pattern in PACKAGE_FILES],
                    "components": dict(COMPONENTS),
                    "config": dict(run_config),
                }
            }
        },
    }


def write_app_dir(parent: Path, run_config: dict[str, Any]) -> Path:
    """Write the app folder under `parent` (replacing an earlier one) and return its path.

    `run_config` is the run's flat config (`RunPlan.run_config`): the launcher passes the same
    keys with `--run-config`, and Flower accepts only keys the app's config table declares.
    """
    app_dir = Path(parent) / APP_DIRNAME
    if app_dir.exists():
        shutil.rmtree(app_dir)
    source = package_dir()
    files = sorted({path for pattern in PACKAGE_FILES for path in source.glob(pattern)})
    for path in files:
        relative = path.relative_to(source)
        if "__pycache__" in relative.parts:
            continue
        target = app_dir / "hf_flower" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(run_config)))
    return app_dir


def write_app_with(
    app_dir: Path, run_config: dict[str, Any], modules: dict[str, Path], files: dict[str, str] | None = None
) -> Path:
    """Write a Flower app folder at `app_dir` whose components are ours except those `modules` names
    by role (`"serverapp"`, `"clientapp"`: a module file whose `app` takes that role, copied in), for
    tests and benchmarks that wrap or replace one side (a recording ClientApp, a hostile
    ServerApp). `files`: further files written beside them by name (their plan). The installed
    `hf_flower` serves the rest: no copy of the package goes in."""
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    components = dict(COMPONENTS)
    for role, module in modules.items():
        shutil.copyfile(module, app_dir / module.name)
        components[role] = f"{module.stem}:app"
    for name, text in (files or {}).items():
        (app_dir / name).write_text(text)
    pyproject = {
        # Flower's app names: a letter, then letters, digits and hyphens, 32 at most.
        "project": {
            "name": f"{PUBLISHER}-{'-'.join(modules)}",
            "version": "1.0.0",
        },
        "tool": {
            "flwr": {"app": {"publisher": PUBLISHER, "components": components, "config": dict(run_config)}}
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app_dir
