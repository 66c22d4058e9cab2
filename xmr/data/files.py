"""Input paths the user names: present, and a file (or a directory) as expected."""

from __future__ import annotations

from pathlib import Path

from xmr.errors import MissingFileError, XmrError


def require_file(path: str | Path, what: str, error: type[XmrError]) -> Path:
    """``path`` if it is a regular file: ``MissingFileError`` ("{what} not found: path") when
    nothing is there, ``error`` when it is a directory or something else."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}")
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file")
    return path


def require_dir(path: str | Path, what: str, error: type[XmrError]) -> Path:
    """``path`` if it is a directory: ``MissingFileError`` when nothing is there, ``error``
    when it is a file."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}")
    if not path.is_dir():
        raise error(f"{what} {path} is a file, not a directory")
    return path


def read_text(path: Path, what: str, error: type[XmrError], max_bytes: int | None = None) -> str:
    """The UTF-8 text of the regular file ``path`` (``error`` naming it if it is not UTF-8,
    unreadable, or larger than ``max_bytes``: a wrong path must not fill the memory)."""
    require_file(path, what, error)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise error(f"{what} {path} is {path.stat().st_size} bytes, more than the {max_bytes} a {what} can be; "
                    "is it the right file?")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})") from e
