"""Per-class statistics of a label map: voxel counts, volumes, intensities, extent.

One function, :func:`label_statistics`, used by the QA panel, the CSV export
and the command line. Plain numpy / scipy; works on any integer ``(Z, Y, X)``
array.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

from ..errors import MedSegError

log = logging.getLogger(__name__)

__all__ = ["label_statistics", "count_islands", "body_mask", "label_qa", "STAT_FIELDS"]

#: Keys of each row returned by :func:`label_statistics`, in display order.
STAT_FIELDS = ("label", "name", "voxels", "volume_ml", "mean", "std", "bbox", "islands")


def count_islands(mask: np.ndarray, connectivity: int = 3) -> int:
    """Number of connected components of a boolean mask.

    Parameters
    ----------
    mask : numpy.ndarray of bool
        ``(Z, Y, X)`` (or any dimensionality) mask.
    connectivity : int
        1 = faces only (6-connected in 3D), up to ``mask.ndim`` = faces, edges
        and corners (26-connected in 3D, the default).
    """
    structure = ndi.generate_binary_structure(mask.ndim, connectivity)
    return int(ndi.label(mask, structure=structure)[1])


def label_statistics(labels, spacing, image=None, names=None,
                     connectivity: int = 3) -> list[dict]:
    """Statistics per class of a label map.

    Parameters
    ----------
    labels : array_like of int
        ``(Z, Y, X)`` label map; 0 is background and is not reported.
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    image : array_like, optional
        ``(Z, Y, X)`` intensity image on the same grid (e.g. HU); gives the mean
        and standard deviation of the intensity inside each class.
    names : dict[int, str], optional
        Class id to name. Classes named here but absent from ``labels`` get a
        row with ``voxels == 0`` (so empty classes can be flagged).
    connectivity : int
        Connectivity used to count islands (3 = 26-connected, default).

    Returns
    -------
    list of dict
        One row per class, sorted by id, with keys ``label`` (int), ``name``
        (str), ``voxels`` (int), ``volume_ml`` (float, millilitres), ``mean``
        and ``std`` (float intensity, None without ``image`` or when empty),
        ``bbox`` (``(z0, y0, x0, z1, y1, x1)`` voxel indices, half-open: the
        class lies in ``labels[z0:z1, y0:y1, x0:x1]``; None when empty) and
        ``islands`` (number of connected components).

    Raises
    ------
    MedSegError
        When ``labels`` is not 3D or ``image`` is on another grid.

    Examples
    --------
    >>> lab = np.zeros((4, 5, 6), np.uint8); lab[1:3, 1:3, 1:3] = 2
    >>> row = label_statistics(lab, (2.0, 1.0, 1.0))[0]
    >>> row["label"], row["voxels"], row["volume_ml"], row["bbox"], row["islands"]
    (2, 8, 0.016, (1, 1, 1, 3, 3, 3), 1)
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise MedSegError(f"label statistics need a 3D (Z, Y, X) label map, got shape "
                          f"{lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) and lab.dtype != bool:
        raise MedSegError(f"labels must be integers, got {lab.dtype}; convert the layer "
                          "to a Labels layer first")
    lab = lab.astype(np.int64, copy=False) if lab.dtype == bool else lab
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    img = None
    if image is not None:
        img = np.asarray(image)
        if img.shape != lab.shape:
            raise MedSegError(f"image of shape {img.shape} does not match the labels "
                              f"{lab.shape}; use the image the labels were drawn on")
    names = {int(k): str(v) for k, v in (names or {}).items()}

    present = np.unique(lab)
    present = [int(v) for v in present if v != 0]
    if present and min(present) < 0:
        raise MedSegError("labels contain negative values; relabel them first")
    ids = sorted(set(present) | {k for k in names if k != 0})
    if not ids:
        return []
    top = max(ids) + 1
    flat = lab.ravel()
    counts = np.bincount(flat, minlength=top)
    sums = sq = None
    if img is not None:
        fimg = img.ravel().astype(np.float64)
        sums = np.bincount(flat, weights=fimg, minlength=top)
        means = sums / np.maximum(counts, 1)
        # two passes: the variance around each class mean, robust for HU offsets
        sq = np.bincount(flat, weights=(fimg - means[flat]) ** 2, minlength=top)
    boxes = ndi.find_objects(lab, max_label=top - 1) if present else []
    rows = []
    for k in ids:
        n = int(counts[k]) if k < len(counts) else 0
        row = {"label": k, "name": names.get(k, f"label {k}"), "voxels": n,
               "volume_ml": n * voxel_ml, "mean": None, "std": None,
               "bbox": None, "islands": 0}
        if n:
            sl = boxes[k - 1]
            row["bbox"] = tuple(int(s.start) for s in sl) + tuple(int(s.stop) for s in sl)
            row["islands"] = count_islands(lab[sl] == k, connectivity)
            if sums is not None:
                row["mean"] = float(means[k])
                row["std"] = float(np.sqrt(sq[k] / n))
        rows.append(row)
    return rows


def body_mask(image=None, labels=None, threshold: float | None = None,
              modality: str = "unknown") -> np.ndarray:
    """``(Z, Y, X)`` bool mask of the patient's body.

    With ``image``: the largest connected region above ``threshold`` (default
    -300 HU for CT, Otsu's threshold otherwise), with its holes filled slice by
    slice (lungs and bowel gas stay inside). Without an image: the largest
    connected component of the labelled foreground.

    Raises
    ------
    MedSegError
        When neither ``image`` nor ``labels`` is given.
    """
    if image is not None:
        img = np.asarray(image, dtype=np.float32)
        if threshold is None:
            if modality == "CT":
                threshold = -300.0
            else:
                from skimage.filters import threshold_otsu

                step = max(1, int(round((img.size / 2e6) ** (1 / 3))))
                threshold = float(threshold_otsu(img[::step, ::step, ::step]))
        fg = img > float(threshold)
    elif labels is not None:
        fg = np.asarray(labels) != 0
    else:
        raise MedSegError("a body mask needs an image or labels")
    comp, n = ndi.label(fg, structure=ndi.generate_binary_structure(3, 1 if image is not None
                                                                    else 3))
    if n == 0:
        return fg
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    body = comp == int(np.argmax(sizes))
    if image is not None:
        for z in range(body.shape[0]):
            body[z] = ndi.binary_fill_holes(body[z])
    return body


def label_qa(labels, spacing, names=None, image=None, prediction=None, body=None) -> list[dict]:
    """Quality checks per class: statistics, corrections and flags.

    Parameters
    ----------
    labels : array_like of int
        ``(Z, Y, X)`` current labels.
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    names : dict[int, str], optional
        Class names; named classes that are missing are flagged ``"empty"``.
    image : array_like, optional
        ``(Z, Y, X)`` intensities for the mean / std columns.
    prediction : array_like of int, optional
        The model's original output: adds ``corrected_voxels`` and ``dice``.
    body : array_like of bool, optional
        Body mask (see :func:`body_mask`); voxels of a class outside it are
        counted in ``outside_voxels`` and flagged.

    Returns
    -------
    list of dict
        The :func:`label_statistics` rows plus ``corrected_voxels``, ``dice``
        (None without prediction), ``outside_voxels`` (None without body) and
        ``flags`` (list of short strings).
    """
    lab = np.asarray(labels)
    rows = label_statistics(lab, spacing, image=image, names=names)
    ledger = {}
    if prediction is not None:
        from .ledger import CorrectionLedger

        led = CorrectionLedger(prediction, spacing, names)
        ledger = {r["label"]: r for r in led.summary(lab)}
        known = {r["label"] for r in rows}
        for k, r in ledger.items():   # classes the user erased completely
            if k not in known:
                rows.append({"label": k, "name": r["name"], "voxels": 0, "volume_ml": 0.0,
                             "mean": None, "std": None, "bbox": None, "islands": 0})
        rows.sort(key=lambda r: r["label"])
    outside = None
    if body is not None:
        body = np.asarray(body, dtype=bool)
        if body.shape != lab.shape:
            raise MedSegError(f"body mask {body.shape} does not match the labels {lab.shape}")
        outside = np.bincount(lab[~body].ravel().astype(np.int64, copy=False))
    for r in rows:
        k = r["label"]
        led_row = ledger.get(k)
        r["corrected_voxels"] = led_row["corrected_voxels"] if led_row else None
        r["dice"] = led_row["dice"] if led_row else None
        r["outside_voxels"] = None
        flags = []
        if r["voxels"] == 0:
            flags.append("empty")
        if outside is not None:
            r["outside_voxels"] = int(outside[k]) if k < len(outside) else 0
            if r["outside_voxels"]:
                flags.append(f"{r['outside_voxels']} voxels outside the body")
        r["flags"] = flags
    return rows
