"""Round folders checked before anything loads them: checksums.json written with each round, and
`verify_round` against it (or, for older rounds, each file's own format).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open

from .files import dumps_json, load_json_object
from .layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CHECKSUMS_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    DamagedRoundError,
    has_round_files,
)


def verify_round(folder: str | os.PathLike) -> None:
    """Check that the files of a round folder are the ones `save_round` wrote, before loading it.

    With checksums.json, every file it lists must exist with its recorded size and sha256.
    Rounds saved before checksums existed are checked for what can be checked without them:
    each safetensors file's header and length, and that each JSON file parses. Raises
    `DamagedRoundError` naming the first damaged file. A folder verified before in this process
    whose files kept their sizes and times is not read again (the ServerApp's pre-flight and its
    loading of the resumed round check the same folder).
    """
    folder = Path(folder)
    signature = _files_signature(folder)
    if _VERIFIED.get(folder.resolve()) == signature:
        return
    _verify_files(folder)
    _VERIFIED[folder.resolve()] = signature


def _verify_files(folder: Path) -> None:
    """`verify_round`'s checks, reading every file."""
    if not has_round_files(folder) or not (folder / METRICS_FILE).is_file():
        raise DamagedRoundError(
            f"{folder} is incomplete: it needs {CONFIG_FILE} and {WEIGHTS_FILE} (or {ADAPTER_CONFIG_FILE} "
            f"and {ADAPTER_WEIGHTS_FILE}) and {METRICS_FILE}"
        )
    checksums = folder / CHECKSUMS_FILE
    if not checksums.is_file():
        for path in sorted(folder.rglob("*.safetensors")):
            _check_safetensors(path)
        for path in sorted(folder.rglob("*.json")):
            _check_json(path)
        return
    recorded = load_json_object(checksums).get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise DamagedRoundError(f"{checksums} lists no files; it was edited or damaged")
    for name, expected in sorted(recorded.items()):
        path, expected = folder / name, expected if isinstance(expected, dict) else {}
        if not path.is_file():
            raise DamagedRoundError(f"{path} is missing (listed in {CHECKSUMS_FILE})")
        size, saved_size = path.stat().st_size, expected.get("size")
        if size != saved_size:
            cut = " (cut short)" if isinstance(saved_size, int) and size < saved_size else ""
            raise DamagedRoundError(f"{path} is damaged: {size} bytes where {saved_size} were saved{cut}")
        if _sha256(path) != expected.get("sha256"):
            raise DamagedRoundError(f"{path} is damaged: its sha256 differs from the one saved with it")


# Round folders `verify_round` found intact in this process, with the signature of their files.
_VERIFIED: dict[Path, tuple] = {}


def _files_signature(folder: Path) -> tuple:
    """Each file's path, size and modification time: what changes when a file is written."""
    stats = ((path, path.stat()) for path in folder.rglob("*") if path.is_file())
    return tuple(sorted((str(path), st.st_size, st.st_mtime_ns) for path, st in stats))


def write_checksums(folder: Path) -> None:
    """checksums.json: the size and sha256 of every file under `folder` (paths relative to it)."""
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS_FILE
    }
    (folder / CHECKSUMS_FILE).write_text(dumps_json({"files": files}, what="checksums"), encoding="utf-8")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors end exactly at the end of the file
    (safetensors' own check: a file cut short fails it)."""
    try:
        with safe_open(path, "np"):
            pass
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise DamagedRoundError(f"{path} is damaged: {type(err).__name__}: {err}") from None


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedRoundError(f"{path} is damaged: not valid JSON ({err})") from None
