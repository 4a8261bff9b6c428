"""Durable writes and safe JSON: the building blocks every checkpoint file is written and read with."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .layout import OutputDirError


def unique_suffix() -> str:
    """`<pid>-<random>`: unique per process and call, so concurrent writers never collide."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def remove_entry(path: Path) -> None:
    """Delete a file, link or folder tree (a link is removed, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to disk before it is renamed into place."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable enough for us.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_safe(value: Any, where: str) -> Any:
    """`value` with non-finite floats as None, tuples as lists and numpy/torch scalars as Python."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _json_safe(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy and 0-d torch scalars
        try:
            return _json_safe(value.item(), where)
        except (TypeError, ValueError):
            pass
    raise TypeError(
        f"{where} is a {type(value).__name__}, which cannot be saved as JSON; pass a number or string"
    )


def dumps_json(value: Any, what: str) -> str:
    """JSON text of `value`: sorted keys, indent 2, non-finite floats as null."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return json.dumps(_json_safe(value, what), sort_keys=True, indent=2, allow_nan=False) + "\n"


def load_json_object(path: Path) -> dict:
    """The JSON object in `path`, or OutputDirError saying the file is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputDirError(
            f"{path} is not valid JSON ({e}); it was edited or damaged: restore or delete it"
        ) from e
    if not isinstance(data, dict):
        raise OutputDirError(f"{path} holds a {type(data).__name__}, not a JSON object; restore or delete it")
    return data


def dotted_get(data: Any, dotted: str) -> Any:
    """`data[a][b]` for `dotted` "a.b", or None when any step is missing."""
    for key in dotted.split("."):
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data
