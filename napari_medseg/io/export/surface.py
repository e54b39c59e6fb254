"""Segment surfaces as STL / OBJ / PLY meshes in patient coordinates.

Each class becomes one mesh file (marching cubes on the label grid, see
:func:`napari_medseg.core.shape.class_mesh`), with vertices in millimetres in
RAS (NIfTI, 3D Slicer's world) or LPS (DICOM, ITK) as chosen; optional Taubin
smoothing and quadric decimation. Written with trimesh (the ``mesh`` extra),
atomically, one file per class named ``<stem>_<class name>.<ext>``; a binary
STL's 80-byte header says which frame its coordinates are in.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ...core.shape import class_mesh
from ...core.volume import LPS_TO_RAS, Volume
from ...errors import MedSegError, check_cancel
from ..atomic import atomic_path, check_writable

log = logging.getLogger(__name__)

__all__ = ["export_surfaces", "MESH_FORMATS"]

MESH_FORMATS = (".stl", ".obj", ".ply")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "class"


def export_surfaces(path, labels: Volume, ids=None, frame: str = "RAS", smooth: int = 0,
                    decimate: float | None = None, overwrite: bool = False,
                    progress=None, cancel=None) -> list[Path]:
    """Write the surface of each class as a mesh file.

    Parameters
    ----------
    path : str or Path
        ``<folder>/<stem>.stl`` (or ``.obj`` / ``.ply``): files are written as
        ``<folder>/<stem>_<class name>.<ext>``, one per class.
    labels : Volume
        ``(Z, Y, X)`` label map with its affine and class names.
    ids : sequence of int, optional
        Classes to export (default: every non-empty class).
    frame : {"RAS", "LPS"}
        Patient coordinate frame of the vertices (mm).
    smooth : int
        Taubin smoothing passes (0: the raw marching-cubes surface).
    decimate : float, optional
        Keep about this fraction of the faces (0 < f < 1).
    overwrite : bool
        Replace existing files.
    progress, cancel : callable, optional
        ``progress(done, total)`` and ``cancel() -> bool``.

    Returns
    -------
    list of Path
        The written files, in class order.

    Raises
    ------
    MedSegError
        Unknown suffix or frame, no trimesh, empty labels, existing files.
    """
    try:
        import trimesh
    except ImportError as exc:  # pragma: no cover - optional extra
        raise MedSegError("surface export needs trimesh: pip install 'napari-medseg[mesh]'",
                          str(path)) from exc
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in MESH_FORMATS:
        raise MedSegError("surfaces are written as " + ", ".join(MESH_FORMATS) +
                          "; give a file name with one of these suffixes", str(path))
    frame = str(frame).upper()
    if frame not in ("RAS", "LPS"):
        raise MedSegError(f"unknown coordinate frame {frame!r}; choose RAS or LPS", str(path))
    lab = np.asarray(labels.data)
    if ids is None:
        ids = [int(v) for v in np.unique(lab) if v != 0]
    if not ids:
        raise MedSegError("the labels are empty; there is no surface to export", str(path))
    names = labels.label_names or {}
    targets = [path.with_name(f"{path.stem}_{_safe(names.get(k, f'label_{k}'))}{ext}")
               for k in ids]
    for t in targets:  # refuse before writing any
        check_writable(t, overwrite)
    written = []
    for n, (k, target) in enumerate(zip(ids, targets)):
        check_cancel(cancel)
        try:
            verts, faces = class_mesh(lab, labels.affine, k, smooth=smooth, decimate=decimate)
        except ValueError:
            log.info("class %s is empty; no surface written", k)
            continue
        if frame == "LPS":
            verts = verts @ LPS_TO_RAS.T  # a half turn about S: normals stay outward
        mesh = trimesh.Trimesh(verts, faces, process=False)
        mesh.metadata["name"] = str(names.get(k, f"label {k}"))
        with atomic_path(target, overwrite=overwrite) as tmp:
            data = mesh.export(file_type=ext[1:])
            if ext == ".stl":  # say the frame in the 80-byte header
                head = f"napari-medseg {mesh.metadata['name']} {frame} mm".encode()[:80]
                data = head.ljust(80, b" ") + data[80:]
            if isinstance(data, str):
                data = data.encode()
            Path(tmp).write_bytes(data)
        written.append(target)
        if progress:
            progress(n + 1, len(ids))
    log.info("wrote %d surfaces (%s mm) next to %s", len(written), frame, path)
    return written
