"""Small helpers for export: an advisory folder lock and atomic JSON writes."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from ...errors import MedSegError
from ..atomic import atomic_path

__all__ = ["folder_lock", "write_json", "read_json"]

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@contextlib.contextmanager
def folder_lock(folder, timeout: float = 30.0):
    """Hold an exclusive advisory lock on ``folder`` (``.medseg/lock`` inside it).

    Serialises read-modify-write updates of shared files (``dataset.json``, a
    datalist) between processes exporting into the same folder at once.
    """
    lock_dir = Path(folder) / ".medseg"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fh = open(lock_dir / "lock", "a+")
    try:
        if fcntl is not None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise MedSegError("another export into this folder is still "
                                          "running; try again when it has finished",
                                          str(folder)) from None
                    time.sleep(0.05)
        yield
    finally:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def read_json(path, default=None):
    """Parse a JSON file; ``default`` when it does not exist.

    Raises
    ------
    MedSegError
        When the file exists but is not valid JSON.
    """
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedSegError(f"cannot read this JSON file ({exc}); fix or remove it",
                          str(path)) from exc


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically replacing any previous file."""
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)
