"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash, a full disk or a kill at any moment leaves either the old file or the
new one, never a partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import MedSegError

__all__ = ["atomic_path", "check_writable"]


def _default_mode() -> int:
    """Permission bits a plain ``open()`` would give a new file (0o666 minus umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _default_mode()


def check_writable(path, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written; return it as a Path.

    Raises
    ------
    MedSegError
        When the file exists and ``overwrite`` is False, or the folder is missing
        or not writable.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedSegError(
            "file exists; choose another name or allow overwriting", str(path))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise MedSegError(f"folder {folder} does not exist; create it first", str(path))
    if not os.access(folder, os.W_OK):
        raise MedSegError(f"folder {folder} is not writable; choose another folder",
                          str(path))
    return path


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = False, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it into place.

    The temporary name keeps the target's full suffix (``.nii.gz``, ``.seg.nrrd``)
    so writers that choose a format from the name still work. On any error the
    temporary file is removed and the target is untouched. A full disk becomes a
    :class:`MedSegError` naming the file.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "a.txt").read_text()
    'hello'
    """
    path = check_writable(path, overwrite)
    name = path.name
    if suffix is None:
        suffix = "".join(Path(name).suffixes) or ""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes owner-only files; give the result the permissions the old
        # file had, or those of any newly created file.
        mode = path.stat().st_mode & 0o7777 if path.exists() else _NEW_FILE_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        _remove(tmp)
        if exc.errno == 28:  # ENOSPC
            raise MedSegError("disk full while writing; free some space and save again; "
                              "the previous file (if any) is unchanged", str(path)) from exc
        raise MedSegError(f"could not write ({exc.strerror or exc}); the previous file "
                          "(if any) is unchanged", str(path)) from exc
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()
