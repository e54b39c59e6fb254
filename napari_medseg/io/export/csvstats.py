"""Per-class label statistics as a CSV table."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from ...core.shape import SHAPE_FIELDS, shape_statistics
from ...core.stats import label_statistics
from ...core.volume import make_affine
from ...errors import MedSegError
from ..atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = ["STAT_COLUMNS", "SHAPE_COLUMNS", "statistics_rows", "write_statistics_csv"]

#: CSV columns, in order. ``bbox_*`` are half-open voxel indices along (Z, Y, X).
STAT_COLUMNS = ("label", "name", "voxels", "volume_ml", "mean", "std", "islands",
                "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1")
_LEDGER_COLUMNS = ("added_voxels", "removed_voxels", "dice")
#: Shape columns (see :mod:`napari_medseg.core.shape`): surface in mm^2, centroid in
#: RAS mm, ellipsoid-equivalent principal diameters, maximum (Feret) diameter in mm,
#: sphericity, intensity percentiles.
SHAPE_COLUMNS = SHAPE_FIELDS


def statistics_rows(labels, spacing, image=None, names=None, ledger=None,
                    affine=None) -> list[dict]:
    """Flat rows (one per class) for the CSV: statistics, and corrections with ``ledger``.

    Parameters
    ----------
    labels : array_like of int
        ``(Z, Y, X)`` label map.
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    image : array_like, optional
        ``(Z, Y, X)`` intensities on the same grid (mean / std per class).
    names : dict[int, str], optional
        Class id to name.
    ledger : CorrectionLedger, optional
        Adds ``added_voxels``, ``removed_voxels`` and ``dice`` (vs the prediction).
    affine : (4, 4) array_like, optional
        Voxel ``(i, j, k)`` to RAS mm, for the centroid in patient coordinates
        (default: ``spacing`` with the origin at voxel 0).
    """
    labels = np.asarray(labels)
    rows = label_statistics(labels, spacing, image=image, names=names)
    aff = make_affine(spacing) if affine is None else np.asarray(affine, float)
    shapes = shape_statistics(labels, aff, image=image,
                              ids=[r["label"] for r in rows if r["voxels"]])
    fixes = {}
    if ledger is not None:
        fixes = {r["label"]: r for r in ledger.summary(labels)}
    out = []
    for r in rows:
        flat = {k: r[k] for k in ("label", "name", "voxels", "volume_ml", "mean", "std",
                                  "islands")}
        box = r["bbox"] or (None,) * 6
        flat.update(zip(STAT_COLUMNS[7:], box))
        flat.update(shapes.get(r["label"]) or dict.fromkeys(SHAPE_COLUMNS))
        if ledger is not None:
            fx = fixes.get(r["label"], {})
            flat.update({k: fx.get(k) for k in _LEDGER_COLUMNS})
        out.append(flat)
    return out


def write_statistics_csv(path, labels, spacing, image=None, names=None, ledger=None,
                         overwrite: bool = False, affine=None) -> Path:
    """Write per-class statistics of ``labels`` to a CSV file, atomically.

    Columns are :data:`STAT_COLUMNS` (volume in mL, voxel count, intensity mean
    and standard deviation, islands, bounding box), :data:`SHAPE_COLUMNS`
    (surface, centroid in RAS mm, principal and maximum diameters, sphericity,
    intensity percentiles), plus ``added_voxels``,
    ``removed_voxels`` and ``dice`` when a correction ledger is given. Empty
    cells mean "not available" (no image, or an empty class).

    Parameters
    ----------
    path : str or Path
        Target ``.csv`` file.
    labels, spacing, image, names, ledger, affine
        See :func:`statistics_rows`.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    MedSegError
        When the file exists (and ``overwrite`` is False), its folder is not
        writable, or ``image`` is on another grid.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise MedSegError("statistics are written as CSV; give a file name ending in .csv",
                          str(path))
    rows = statistics_rows(labels, spacing, image=image, names=names, ledger=ledger,
                           affine=affine)
    columns = list(STAT_COLUMNS) + list(SHAPE_COLUMNS) + \
        (list(_LEDGER_COLUMNS) if ledger is not None else [])
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(row.get(k)) for k in columns})
    log.info("wrote statistics of %d classes to %s", len(rows), path)
    return path


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
