"""File names that come from files (manifests, gallery headers), resolved without trusting them.

An artifact directory or a saved gallery may have been made by someone else. Every file
name read from its manifest or header is a plain name of one entry *inside* that directory:
no ``/``, no ``..``, not absolute, not a symbolic link. And every file it lists carries a
sha256 that is checked before the file is used: a missing hash is an error, not a skip.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from xmr.errors import ArtifactError, XmrError

FORBIDDEN_CHARACTERS = ("/", "\\", "\0")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inside(directory: Path, name: object, what: str, error: type[XmrError] = ArtifactError) -> Path:
    """``directory / name`` for a plain entry name read from an untrusted file.

    Refused (``error``): anything but a non-empty string, path separators, ``.``/``..``, and
    an entry that is a symbolic link (it could point anywhere)."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in FORBIDDEN_CHARACTERS):
        raise error(f"{what}: {name!r} is not a plain file name inside {directory} (refused: paths that could "
                    f"point outside it)")
    path = directory / name
    if path.is_symlink():
        raise error(f"{what}: {path} is a symbolic link; xmr reads only regular files inside {directory}")
    return path


def checked_file(directory: Path, entry: object, what: str, listed_in: Path,
                 error: type[XmrError] = ArtifactError) -> Path:
    """The regular file an entry ``{"file": name, "sha256": hex}`` of ``listed_in`` names,
    inside ``directory``, after checking that it is there and has that sha256."""
    if not isinstance(entry, dict):
        raise error(f"{listed_in}: the entry for {what} must be an object with 'file' and 'sha256', got {entry!r}")
    path = inside(directory, entry.get("file"), f"{listed_in}: {what}", error)
    expected = entry.get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise error(f"{listed_in}: {what} {path.name} has no sha256 to check it against; re-create the directory")
    if not path.is_file():
        raise error(f"{what} {path.name} is listed in {listed_in} but missing or not a regular file")
    if file_sha256(path) != expected:
        raise error(f"{path} does not match the sha256 in {listed_in} (changed or damaged after it was written)")
    return path


def require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str,
            error: type[XmrError] = ArtifactError) -> Any:
    """``mapping[key]`` if ``mapping`` is a dict holding a ``kind`` there; else one clear ``error``."""
    if not isinstance(mapping, dict):
        raise error(f"{where} must be a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise error(f"{where} lacks {key!r}")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise error(f"{where}: {key!r} must be {names}, got {value!r}"[:300])
    return value
