"""Atomic file writes: write to a hidden temporary folder beside the target, then rename.

A crash, a full disk or a kill at any moment leaves either the old file or the
new one, never a partial file. Temporary files live in
``<target folder>/.napari-medseg-tmp/`` (:data:`TMP_DIR_NAME`), named
``<host>~<pid>~<token>~<target name>`` so that

* writers that choose the format from the suffix still work (the name ends
  with the target's own name, ``.nii.gz`` included);
* other tools never pick them up beside the real files (the folder is hidden,
  and removed when empty);
* they are removed on every exit path of the writing process, and those of a
  killed process are removed by the next write to that folder: when their
  owner process is gone (same host), or, for files of another host sharing the
  folder, when they have not changed for :data:`STALE_SECONDS`. A live
  writer's file is never touched.

:func:`all_or_none` groups several writes (a run writing labels and an
uncertainty map): when any of them fails, every target is put back as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from ..errors import MedSegError

__all__ = ["atomic_path", "check_writable", "all_or_none", "clean_stale", "temp_dir",
           "TMP_DIR_NAME", "STALE_SECONDS"]

#: Hidden folder beside the targets that holds temporary files while writing.
TMP_DIR_NAME = ".napari-medseg-tmp"
#: Temporary files of another host (whose pid cannot be checked) untouched this
#: long are stale.
STALE_SECONDS = 3600
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
_NAME_RE = re.compile(r"^(?P<host>[^~]+)~(?P<pid>\d+)~[0-9a-f]+~")


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
        When the file exists and ``overwrite`` is False, the path is a folder,
        or the folder is missing or not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise MedSegError("is a folder; give a file name to write", str(path))
    if path.exists() and not overwrite:
        raise MedSegError(
            "file exists; choose another name or allow overwriting", str(path))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise MedSegError(f"folder {folder} does not exist; create it first", str(path))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MedSegError(f"folder {folder} is not writable; choose another folder",
                          str(path))
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def clean_stale(folder, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove temporary files left in ``folder``'s temporary folder by killed writers.

    An entry is stale when its owner process (named in it) no longer runs on
    this host; an entry of another host (or not named by us) when it has not
    changed for ``max_age`` seconds. Live writers' files are left alone. The
    temporary folder is removed when empty.

    Returns
    -------
    list of Path
        The entries removed.
    """
    tmp = Path(folder) / TMP_DIR_NAME
    removed = []
    try:
        entries = list(tmp.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _NAME_RE.match(entry.name)
        if m is not None and m["host"] == _HOST:
            stale = not _alive(int(m["pid"]))  # this host: the owner's pid decides
        else:  # another host sharing the folder, or a name we did not make: age decides
            try:
                st = entry.lstat()
            except OSError:
                continue
            # ctime too: a hard-linked backup keeps its file's old mtime
            stale = now - max(st.st_mtime, st.st_ctime) > max_age
        if stale:
            _remove(entry)
            removed.append(entry)
    _rmdir_if_empty(tmp)
    return removed


def _rmdir_if_empty(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.rmdir()  # fails when another writer has a file there


def temp_dir(folder) -> Path:
    """The hidden temporary folder in ``folder`` (created), after cleaning stale entries."""
    tmp = Path(folder) / TMP_DIR_NAME
    clean_stale(folder)
    tmp.mkdir(exist_ok=True)
    return tmp


def _new_temp(path: Path, suffix: str | None) -> Path:
    """Create (exclusively) an empty temporary file for ``path``; return its path."""
    name = path.name if suffix is None else path.name + suffix
    last = None
    for _ in range(5):  # the folder may vanish under us (another writer's rmdir)
        try:
            tmp = temp_dir(path.parent) / f"{_HOST}~{os.getpid()}~{secrets.token_hex(6)}~{name}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            return tmp
        except (FileNotFoundError, FileExistsError) as exc:
            last = exc
    raise MedSegError(f"could not create a temporary file ({last}); check the folder",
                      str(path))


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = False, suffix: str | None = None):
    """Yield a temporary path in a hidden folder beside ``path``; on success rename it into place.

    The temporary name ends with the target's name (``.nii.gz``, ``.seg.nrrd``
    kept) so writers that choose a format from the name still work. On any
    error, or a cancel, the temporary file is removed and the target is
    untouched. A full disk becomes a :class:`MedSegError` naming the file.

    Parameters
    ----------
    path : str or Path
        The target file.
    overwrite : bool
        Replace an existing target (otherwise :class:`MedSegError`).
    suffix : str, optional
        Appended to the temporary name (after the target's name).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('hello', ['a.txt'])
    """
    path = check_writable(path, overwrite)
    try:
        tmp = _new_temp(path, suffix)
    except OSError as exc:
        raise MedSegError(f"could not create a temporary file ({exc.strerror or exc}); "
                          "check the folder's permissions and free space", str(path)) from exc
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # new files get the permissions of the old file, or those of any new file
        mode = path.stat().st_mode & 0o7777 if path.exists() else _NEW_FILE_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise MedSegError("disk full while writing; free some space and save again; "
                              "the previous file (if any) is unchanged", str(path)) from exc
        raise MedSegError(f"could not write ({exc.strerror or exc}); the previous file "
                          "(if any) is unchanged", str(path)) from exc
    finally:
        _remove(tmp)
        _rmdir_if_empty(tmp.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _companions(path: Path) -> list[Path]:
    """Files that belong to ``path``: the data file of a ``.mhd`` header."""
    if path.suffix.lower() != ".mhd" or not path.is_file():
        return []
    try:
        from .itk import read_meta_header

        data = read_meta_header(path).data_path
    except (MedSegError, OSError):
        return []
    return [data] if data != path and data.is_file() else []


@contextlib.contextmanager
def all_or_none(paths):
    """Write several files as one: when the block fails, every target is put back.

    Existing targets (and a ``.mhd`` header's data file) are kept as hard links
    (copies where links are impossible) in the temporary folder; if the block
    raises, they are restored and targets it created are removed. Use it around
    several atomic writes (each one still atomic on its own).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("old")
    >>> try:
    ...     with all_or_none([d / "a.txt", d / "b.txt"]):
    ...         with atomic_path(d / "a.txt", overwrite=True) as t:
    ...             _ = t.write_text("new")
    ...         raise OSError("disk full")
    ... except OSError:
    ...     pass
    >>> (d / "a.txt").read_text(), (d / "b.txt").exists()
    ('old', False)
    """
    paths = [Path(p) for p in paths]
    kept: list[tuple[Path, Path]] = []  # (target, its saved copy)
    fresh = [p for p in paths if not p.exists()]
    try:
        for p in paths:
            for f in ([p] if p.is_file() else []) + _companions(p):
                keep = _new_temp(f, ".keep")
                os.unlink(keep)
                try:
                    os.link(f, keep)
                except OSError:
                    shutil.copy2(f, keep)
                kept.append((f, keep))
    except BaseException:
        for _, keep in kept:
            _remove(keep)
        raise
    try:
        yield
    except BaseException:
        for p in fresh:
            for c in _companions(p):
                _remove(c)
            _remove(p)
        for f, keep in kept:
            with contextlib.suppress(OSError):
                os.replace(keep, f)
        raise
    finally:
        for _, keep in kept:
            _remove(keep)
            _rmdir_if_empty(keep.parent)
