"""Autosave of label maps being edited, and recovery after a crash.

Each image has a *key* made from its source path, shape and affine, so the
same image opened again (same file, same grid) finds its recovery folder::

    recovery_dir()/<image-key>/<labels-name>.<digest>.npz  compressed labels
    recovery_dir()/<image-key>/<labels-name>.json           geometry, names, time,
                                                            and which .npz is current

The labels file is written first under a new name, then the JSON that points
to it, and only then is the previous labels file removed: a crash at any moment
leaves a JSON pointing at a complete labels file.

:class:`AutoSaver` is GUI-agnostic: it asks a callable for a snapshot and
writes it (atomically) only when the labels changed since its last save. The
Export widget drives it from a timer; scripts can call :meth:`AutoSaver.start`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..core.volume import Volume
from ..errors import MedSegError
from ..paths import recovery_dir
from .atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = ["Snapshot", "RecoveryEntry", "AutoSaver", "image_key", "save_recovery",
           "find_recovery", "list_recoveries"]


def image_key(source, shape, affine) -> str:
    """Folder name identifying an image: readable stem plus a hash of its identity.

    Parameters
    ----------
    source : str or Path or None
        The file or folder the image was read from.
    shape : sequence of int
        Spatial shape ``(Z, Y, X)``.
    affine : (4, 4) array_like
        Voxel-to-RAS affine (rounded to 1e-4 mm before hashing).
    """
    src = str(Path(source).expanduser().resolve()) if source else ""
    aff = np.round(np.asarray(affine, dtype=float), 4) + 0.0  # no "-0.0"
    h = hashlib.sha1()
    h.update(src.encode())
    h.update(np.asarray(tuple(shape)[-3:], np.int64).tobytes())
    h.update(aff.tobytes())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(src).name)[:40] if src else "unsaved"
    return f"{stem}-{h.hexdigest()[:16]}"


def _key_of(image) -> str:
    if isinstance(image, str):
        return image
    if isinstance(image, Volume):
        return image_key(image.source, image.shape3, image.affine)
    raise TypeError(f"expected a Volume or an image key, got {type(image).__name__}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")[:60] or "labels"


def _label_files(folder: Path, name: str) -> list[Path]:
    """Labels files (any digest) saved for the layer ``name`` in ``folder``."""
    pat = re.compile(rf"^{re.escape(_slug(name))}\.[0-9a-f]{{16}}\.npz$")
    return [p for p in folder.glob("*.npz") if pat.match(p.name)]


def _digest(labels: np.ndarray) -> str:
    arr = np.ascontiguousarray(labels)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class Snapshot(NamedTuple):
    """What :class:`AutoSaver` saves: labels ``(Z, Y, X)``, their RAS affine, the image key."""

    labels: np.ndarray
    affine: np.ndarray
    image_key: str
    name: str = "labels"
    label_names: dict | None = None
    source: str | None = None


@dataclass
class RecoveryEntry:
    """One autosaved label map.

    Attributes
    ----------
    folder : Path
        The image's recovery folder.
    name : str
        Labels layer name.
    saved_at : float
        Time of the save (seconds since the epoch).
    info : dict
        The JSON side-car: ``shape``, ``affine``, ``label_names``, ``source``, ``digest``.
    """

    folder: Path
    name: str
    saved_at: float
    info: dict = field(default_factory=dict)

    @property
    def npz(self) -> Path:
        return self.folder / self.info.get("file", f"{_slug(self.name)}.npz")

    @property
    def json(self) -> Path:
        return self.folder / f"{_slug(self.name)}.json"

    def load(self) -> Volume:
        """The autosaved labels as a label Volume on their saved grid.

        Raises
        ------
        MedSegError
            When the files are unreadable or do not match each other.
        """
        try:
            if not self.npz.exists() and self.json.exists():  # replaced meanwhile
                self.info = json.loads(self.json.read_text())
            with np.load(self.npz, allow_pickle=False) as z:
                data = z["labels"]
        except (OSError, ValueError, KeyError) as exc:
            raise MedSegError(f"the autosaved labels cannot be read ({exc}); discard them",
                              str(self.npz)) from exc
        if list(data.shape) != list(self.info.get("shape", data.shape)) or \
                _digest(data) != self.info.get("digest", _digest(data)):
            raise MedSegError("the autosaved labels do not match their description; "
                              "discard them", str(self.npz))
        names = {int(k): v for k, v in (self.info.get("label_names") or {}).items()}
        return Volume(data, affine=np.asarray(self.info["affine"], float), is_label=True,
                      label_names=names, source=None,
                      meta={"recovered_from": str(self.npz),
                            "reference": self.info.get("source")})

    def discard(self) -> None:
        """Delete this entry (and the image folder once it is empty)."""
        for p in (self.json, self.npz, *_label_files(self.folder, self.name)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def save_recovery(snapshot: Snapshot, root=None) -> RecoveryEntry:
    """Write one snapshot atomically (labels first, then the JSON that describes them)."""
    labels = np.asarray(snapshot.labels)
    if labels.ndim != 3:
        raise MedSegError(f"autosave expects (Z, Y, X) labels, got shape {labels.shape}",
                          snapshot.name)
    folder = Path(root or recovery_dir()) / snapshot.image_key
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSegError(f"cannot create the recovery folder ({exc.strerror}); set "
                          "NAPARI_MEDSEG_HOME to a writable folder", str(folder)) from exc
    entry = RecoveryEntry(folder, snapshot.name, time.time())
    digest = _digest(labels)
    entry.info = {
        "name": snapshot.name, "saved_at": entry.saved_at, "shape": list(labels.shape),
        "dtype": str(labels.dtype), "affine": np.asarray(snapshot.affine, float).tolist(),
        "label_names": {str(k): v for k, v in (snapshot.label_names or {}).items()},
        "source": snapshot.source, "digest": digest,
        "file": f"{_slug(snapshot.name)}.{digest[:16]}.npz",
    }
    with atomic_path(entry.npz, overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, labels=labels)
    with atomic_path(entry.json, overwrite=True) as tmp:
        tmp.write_text(json.dumps(entry.info, indent=1))
    for old in _label_files(folder, snapshot.name):
        if old.name != entry.info["file"]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    log.debug("autosaved %s to %s", snapshot.name, folder)
    return entry


def list_recoveries(image, root=None) -> list[RecoveryEntry]:
    """All autosaved label maps for ``image`` (a Volume or an image key), newest first."""
    folder = Path(root or recovery_dir()) / _key_of(image)
    out = []
    if folder.is_dir():
        for j in folder.glob("*.json"):
            try:
                info = json.loads(j.read_text())
                entry = RecoveryEntry(folder, info["name"], float(info["saved_at"]), info)
            except (OSError, ValueError, KeyError):
                log.warning("ignoring an unreadable recovery file %s", j)
                continue
            if entry.npz.exists():
                out.append(entry)
    return sorted(out, key=lambda e: -e.saved_at)


def find_recovery(image, root=None) -> RecoveryEntry | None:
    """The newest autosaved label map for ``image`` (Volume or key), or None."""
    entries = list_recoveries(image, root)
    return entries[0] if entries else None


class AutoSaver:
    """Save label maps to the recovery folder when they changed.

    Parameters
    ----------
    get_snapshots : callable
        Returns a :class:`Snapshot` (or tuple ``(labels, affine, image_key[, name])``),
        a list of them, or None when there is nothing to save.
    interval_s : float
        Seconds between checks for :meth:`start`.
    root : Path, optional
        Recovery folder (default :func:`napari_medseg.paths.recovery_dir`).

    Examples
    --------
    >>> import tempfile
    >>> lab = np.zeros((2, 3, 4), np.uint8)
    >>> saver = AutoSaver(lambda: (lab, np.eye(4), "demo"), root=tempfile.mkdtemp())
    >>> len(saver.save_if_changed()), len(saver.save_if_changed())
    (1, 0)
    """

    def __init__(self, get_snapshots: Callable, interval_s: float = 60.0, root=None):
        self.get_snapshots = get_snapshots
        self.interval_s = float(interval_s)
        self.root = root
        self._last: dict[tuple, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def save_if_changed(self, snapshots=None) -> list[RecoveryEntry]:
        """Save each snapshot whose labels changed since the last save; return the entries."""
        snaps = self.get_snapshots() if snapshots is None else snapshots
        if snaps is None:
            return []
        if isinstance(snaps, Snapshot) or (isinstance(snaps, tuple) and snaps
                                           and isinstance(snaps[0], np.ndarray)):
            snaps = [snaps]
        saved = []
        with self._lock:
            for s in snaps:
                s = s if isinstance(s, Snapshot) else Snapshot(*s)
                ident = (s.image_key, s.name)
                digest = _digest(np.asarray(s.labels))
                if self._last.get(ident) == digest:
                    continue
                saved.append(save_recovery(s, self.root))
                self._last[ident] = digest
        return saved

    def forget(self, image_key: str, name: str) -> None:
        """Drop the remembered digest (the next save writes even without a change)."""
        self._last.pop((image_key, name), None)

    # ------------------------------------------------------------- headless
    def start(self) -> "AutoSaver":
        """Check every ``interval_s`` seconds in a background thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="medseg-autosave")
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread (after a save in progress finishes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.save_if_changed()
            except MedSegError as exc:
                log.warning("autosave failed: %s", exc)
