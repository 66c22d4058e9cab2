"""Writing outputs without losing anything: checked locations, whole-directory installs.

Rules every command follows:

- an output location is checked before any work (not a file where a directory is wanted,
  parent not a file, writable), so minutes of computation never end in "cannot write";
- xmr replaces only what it recognises as its own (``is_ours``: an artifact manifest, a
  gallery header, a checkpoint of its format); anything else that is not empty is refused
  unless the caller says ``overwrite``;
- a directory output is built beside its target (``.NAME.xmr-new-PID-XXXX``) and swapped in
  with one atomic rename (``renameat2(RENAME_EXCHANGE)`` where the system has it), so a kill
  at any moment leaves either the old complete directory or the new one; files are written
  beside and ``os.replace``-d;
- what a killed run left beside its target (its pid no longer alive) is removed by the next
  run that writes there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from xmr.errors import OutputError

NEW, OLD = "xmr-new", "xmr-old"
_RENAME_EXCHANGE = 2


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(target: Path) -> list[Path]:
    """Temporary entries beside ``target`` that runs which died (pid gone) left behind."""
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:{NEW}|{OLD})-(\d+)(?:-.*)?", re.DOTALL)  # NAME.TAG-PID-XXXX
    return [entry for entry in target.parent.iterdir()
            if (match := pattern.fullmatch(entry.name)) and not _pid_alive(int(match[1]))]


def clean_leftovers(target: Path) -> None:
    """Remove what killed runs left beside ``target``; an ``xmr-old`` copy is moved back
    first when ``target`` itself is missing (a run died between the two renames of a
    system without atomic exchange)."""
    for entry in sorted(leftovers(target), key=lambda p: NEW in p.name):
        if OLD in entry.name and not target.exists():
            os.rename(entry, target)
            continue
        _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_parent(path: Path, what: str) -> None:
    """The directory that will hold ``path`` exists (or can be created) and is writable."""
    parent = path.parent
    ancestor = next((a for a in (parent, *parent.parents) if a.exists()), None)  # the nearest that exists
    if ancestor is not None and not ancestor.is_dir():
        raise OutputError(f"{what} {path}: {ancestor} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = _sibling(path, NEW)
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in {parent} ({e.strerror or e})") from e


def check_output_dir(path: Path, is_ours: Callable[[Path], bool], overwrite: bool, what: str) -> None:
    """Fail before any work if ``path`` cannot receive a directory output: a file is there,
    its parent is not writable, or it is a non-empty directory xmr did not write (unless
    ``overwrite``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a directory; choose another path")
    if path.is_symlink():
        raise OutputError(f"{what} {path} is a symbolic link; pass the directory it points to")
    check_parent(path, what)
    if path.is_dir() and any(path.iterdir()) and not overwrite and not is_ours(path):
        raise OutputError(f"{what} {path} is a non-empty directory that xmr did not write; choose another path "
                          f"or pass --overwrite (overwrite=True) to write into it")
    clean_leftovers(path)


def check_output_file(path: Path, is_ours: Callable[[Path], bool], overwrite: bool, what: str) -> None:
    """Fail before any work if ``path`` cannot receive a file output (see ``check_output_dir``)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory, not a file; choose another path")
    check_parent(path, what)
    if path.exists() and not overwrite and not is_ours(path):
        raise OutputError(f"{what} {path} exists and is not a file xmr wrote; choose another path or pass "
                          f"--overwrite (overwrite=True) to replace it")
    clean_leftovers(path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def install_directory(staged: Path, target: Path) -> None:
    """Put the complete directory ``staged`` (a sibling of ``target``) at ``target`` in one
    step, then remove what was there."""
    if not target.exists():
        os.rename(staged, target)
    elif _exchange(staged, target):
        _remove(staged)  # now the old directory
    else:
        old = _sibling(target, OLD)
        os.rename(target, old)
        os.rename(staged, target)
        _remove(old)


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """An empty directory beside ``target`` to build the new output in; installed at
    ``target`` when the block ends normally, removed when it raises (or is interrupted)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = _sibling(target, NEW)
    staged.mkdir()
    try:
        yield staged
        install_directory(staged, target)
    finally:
        if staged.exists():
            _remove(staged)


def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(temporary)`` beside ``path``, then ``os.replace`` it there (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(path, NEW)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def link_or_copy(source: Path, destination: Path) -> None:
    """A hard link of ``source`` at ``destination`` (same file system: instant), else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def entries(directory: Path) -> set[str]:
    """Names in ``directory`` (none if it is not a directory)."""
    return {p.name for p in directory.iterdir()} if directory.is_dir() and not directory.is_symlink() else set()


def keep_foreign(old: Path, staged: Path, owned: set[str]) -> None:
    """Carry the entries of ``old`` that xmr did not write (not in ``owned``) and the new
    version does not replace into ``staged`` (linked or copied, the current directory left
    untouched): replacing a directory never loses a user's files."""
    for name in sorted(entries(old) - owned - entries(staged)):
        source = old / name
        if source.is_symlink():  # the link itself, never what it points to
            os.symlink(os.readlink(source), staged / name)
        elif source.is_dir():
            shutil.copytree(source, staged / name, copy_function=lambda s, d: link_or_copy(Path(s), Path(d)))
        elif source.exists():
            link_or_copy(source, staged / name)
