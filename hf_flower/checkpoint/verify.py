"""Round folders checked before anything loads them: checksums.json written with each round, and
`verify_round` against it (or, for older rounds, each file's own format); `checked_files`, the
files of a round that may leave this machine.

A round folder holds plain files only: `save_round` refuses to record a link, and `verify_round`
refuses a folder that holds one, so nothing that reads a round (resume, the Hub push) ever follows
a link out of it. The names in checksums.json are checked too: each is a relative path inside the
round folder, never absolute and never through `..`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath

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
    OutputDirError,
    has_round_files,
)


def verify_round(folder: str | os.PathLike) -> None:
    """Check that the files of a round folder are the ones `save_round` wrote, before loading it.

    The folder must hold no link (symlink) anywhere. With checksums.json, every file it lists
    must exist as a plain file inside the folder with its recorded size and sha256 (a listed name
    that is absolute or climbs out with `..` is refused). Rounds saved before checksums existed
    are checked for what can be checked without them: each safetensors file's header and length,
    and that each JSON file parses. Raises `DamagedRoundError` naming the first damaged file. A
    folder verified before in this process whose entries kept their sizes and times is not read
    again (the ServerApp's pre-flight and its loading of the resumed round check the same folder).
    """
    folder = Path(folder)
    signature = _files_signature(folder)
    if _VERIFIED.get(folder.resolve()) == signature:
        return
    _verify_files(folder)
    _VERIFIED[folder.resolve()] = signature


def checked_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The files of a round folder that its checksums.json lists, by their names in it, once
    `verify_round` found every one as it was saved: what may leave this machine (the Hub push).

    Files the list does not name are left out, and a round without checksums.json (saved before
    checksums existed) has no checked files: `DamagedRoundError` says so, as it names a damaged
    file or a link.
    """
    folder = Path(folder)
    verify_round(folder)
    if not (folder / CHECKSUMS_FILE).is_file():
        raise DamagedRoundError(
            f"{folder} has no {CHECKSUMS_FILE} (it was saved by an hf-flower before checksums), so none of its "
            "files can be checked against what the run saved"
        )
    return {name: folder / name for name in sorted(_recorded(folder))}


def _recorded(folder: Path) -> dict[str, dict]:
    """checksums.json's `{name: {"size", "sha256"}}`, each name checked to stay inside `folder`."""
    checksums = folder / CHECKSUMS_FILE
    recorded = load_json_object(checksums).get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise DamagedRoundError(f"{checksums} lists no files; it was edited or damaged")
    for name in recorded:
        if not _is_inside_name(name):
            raise DamagedRoundError(
                f"{checksums} lists {name!r}, which is not a file inside {folder} (absolute, or "
                "through '..'); it was edited: restore the round or leave it out"
            )
    return {name: value if isinstance(value, dict) else {} for name, value in recorded.items()}


def _is_inside_name(name: object) -> bool:
    """Whether `name` is a relative path of plain parts, as `write_checksums` writes them."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return (
        not path.is_absolute()
        and name == path.as_posix()
        and all(p not in ("", ".", "..") for p in path.parts)
    )


def _links(folder: Path) -> list[Path]:
    """`folder` if it is a link itself, and every link under it (`rglob` lists a linked folder
    without entering it)."""
    links = sorted(path for path in folder.rglob("*") if path.is_symlink())
    return [folder, *links] if folder.is_symlink() else links


def _verify_files(folder: Path) -> None:
    """`verify_round`'s checks, reading every file."""
    links = _links(folder)
    if links:
        raise DamagedRoundError(
            f"{links[0]} is a link (to {os.readlink(links[0])}); a round folder holds plain files only, and "
            "nothing that reads a round follows a link out of it. Remove the link, or restore the round"
        )
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
    for name, expected in sorted(_recorded(folder).items()):
        path = folder / name
        if not stat.S_ISREG(_lstat_mode(path)):
            raise DamagedRoundError(f"{path} is missing (listed in {CHECKSUMS_FILE})")
        size, saved_size = path.stat().st_size, expected.get("size")
        if size != saved_size:
            cut = " (cut short)" if isinstance(saved_size, int) and size < saved_size else ""
            raise DamagedRoundError(f"{path} is damaged: {size} bytes where {saved_size} were saved{cut}")
        if _sha256(path) != expected.get("sha256"):
            raise DamagedRoundError(f"{path} is damaged: its sha256 differs from the one saved with it")


# Round folders `verify_round` found intact in this process, with the signature of their files.
_VERIFIED: dict[Path, tuple] = {}


def _lstat_mode(path: Path) -> int:
    """The mode of `path` itself (a link is a link, not what it points to); 0 when it is absent."""
    try:
        return path.lstat().st_mode
    except OSError:
        return 0


def _files_signature(folder: Path) -> tuple:
    """Each entry's path, kind, size and modification time (of the entry itself, links not
    followed): what changes when a file is written, replaced or a link is planted."""
    if not folder.is_dir():
        return ()
    stats = ((path, path.lstat()) for path in [folder, *folder.rglob("*")])
    return tuple(sorted((str(path), st.st_mode, st.st_size, st.st_mtime_ns) for path, st in stats))


def write_checksums(folder: Path) -> None:
    """checksums.json: the size and sha256 of every file under `folder` (paths relative to it).

    Refuses a folder that holds a link: a round is plain files, and a link recorded here would be
    followed by whatever reads the round later (its target, anywhere on this machine, pushed).
    """
    links = _links(folder)
    if links:
        raise OutputDirError(
            f"{links[0]} is a link (to {os.readlink(links[0])}); a round folder holds plain files only: save "
            "the file itself into the folder"
        )
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
