"""Uncertainty-guided review: which case first, and where to look within a case.

The uncertainty maps come from inference (``Model.predict(...,
uncertainty="entropy" | "tta")``): ``(Z, Y, X)`` values in [0, 1], normalised
entropy of the softmax or disagreement of the mirrored passes.

* :func:`case_uncertainty` is one number per case (the mean over the voxels),
  :func:`rank_cases` orders cases by it, most uncertain first.
* :func:`uncertain_regions` finds connected regions where the uncertainty is
  at least a threshold and ranks them by the uncertainty they hold
  (``volume_ml x mean``), with their size in mL from the voxel spacing, so the
  "next uncertain region" key can move the view to the largest doubt first.

Plain numpy / scipy: no napari, Qt, io or models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["case_uncertainty", "rank_cases", "uncertain_regions", "UncertainRegion"]


def case_uncertainty(unc) -> float:
    """Mean uncertainty of a case.

    Parameters
    ----------
    unc : array_like
        ``(Z, Y, X)`` uncertainty in [0, 1] (NaNs ignored).

    Returns
    -------
    float

    Examples
    --------
    >>> case_uncertainty(np.array([[[0.0, 1.0], [0.5, 0.5]]]))
    0.5
    """
    a = np.asarray(unc, dtype=np.float32)
    if a.size == 0:
        return 0.0
    return float(np.nanmean(a))


def rank_cases(scores: dict) -> list:
    """Case ids by decreasing uncertainty; cases without a score (None) last, in order.

    Examples
    --------
    >>> rank_cases({"a": 0.1, "b": None, "c": 0.3})
    ['c', 'a', 'b']
    """
    known = [(k, v) for k, v in scores.items() if v is not None and np.isfinite(v)]
    unknown = [k for k, v in scores.items() if v is None or not np.isfinite(v)]
    return [k for k, _ in sorted(known, key=lambda kv: -kv[1])] + unknown


@dataclass
class UncertainRegion:
    """A connected region of high uncertainty.

    Attributes
    ----------
    rank : int
        0 for the region holding the most uncertainty.
    centroid : tuple of 3 float
        ``(z, y, x)`` voxel coordinates of its uncertainty-weighted centre.
    peak : tuple of 3 int
        ``(z, y, x)`` of its most uncertain voxel (inside the region).
    bbox : tuple of 6 int
        Half-open ``(z0, y0, x0, z1, y1, x1)``.
    n_voxels : int
    volume_ml : float
        ``n_voxels x voxel volume`` in mL.
    mean, max : float
        Uncertainty over the region.
    score : float
        ``volume_ml x mean`` (mL): what the ranking sorts on.
    """

    rank: int
    centroid: tuple
    peak: tuple
    bbox: tuple
    n_voxels: int
    volume_ml: float
    mean: float
    max: float
    score: float


def uncertain_regions(unc, spacing=(1.0, 1.0, 1.0), threshold: float = 0.3,
                      min_ml: float = 0.0, max_regions: int | None = None,
                      connectivity: int = 1) -> list:
    """Connected regions with uncertainty >= ``threshold``, most uncertainty first.

    Parameters
    ----------
    unc : array_like
        ``(Z, Y, X)`` uncertainty in [0, 1].
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    threshold : float
        Voxels at or above it form the regions.
    min_ml : float
        Regions smaller than this (mL) are left out.
    max_regions : int, optional
        Keep only the first ones.
    connectivity : {1, 2, 3}
        Neighbourhood of :func:`scipy.ndimage.generate_binary_structure` (1:
        faces only).

    Returns
    -------
    list of UncertainRegion
        Sorted by ``score`` (``volume_ml x mean``), then size.

    Examples
    --------
    >>> u = np.zeros((4, 10, 10), np.float32); u[1:3, 1:3, 1:3] = 0.9; u[0, 6:10, 6:10] = 0.5
    >>> [(r.n_voxels, round(r.volume_ml, 4)) for r in uncertain_regions(u, (2, 1, 1))]
    [(16, 0.032), (8, 0.016)]
    """
    from scipy import ndimage

    a = np.asarray(unc, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"the uncertainty map must be (Z, Y, X), got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0)
    mask = a >= float(threshold)
    if not mask.any():
        return []
    structure = ndimage.generate_binary_structure(3, int(connectivity))
    lab, n = ndimage.label(mask, structure=structure)
    idx = np.arange(1, n + 1)
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    sums = ndimage.sum_labels(a, lab, idx)
    maxima = ndimage.maximum(a, lab, idx)
    peaks = ndimage.maximum_position(a, lab, idx)
    centroids = ndimage.center_of_mass(a, lab, idx)
    boxes = ndimage.find_objects(lab)
    ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    regions = []
    for i in range(n):
        vol = counts[i] * ml
        if vol < min_ml:
            continue
        mean = float(sums[i] / max(counts[i], 1))
        sl = boxes[i]
        regions.append(UncertainRegion(
            rank=-1, centroid=tuple(float(c) for c in centroids[i]),
            peak=tuple(int(p) for p in peaks[i]),
            bbox=tuple([s.start for s in sl] + [s.stop for s in sl]),
            n_voxels=int(counts[i]), volume_ml=float(vol), mean=mean, max=float(maxima[i]),
            score=float(vol * mean)))
    regions.sort(key=lambda r: (-r.score, -r.n_voxels))
    if max_regions is not None:
        regions = regions[: int(max_regions)]
    for i, r in enumerate(regions):
        r.rank = i
    return regions
