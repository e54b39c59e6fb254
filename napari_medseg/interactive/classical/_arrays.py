"""Small array helpers of the classical engine: masks, boxes, robust statistics."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["ball_offsets", "bbox", "connected", "union", "ellipse", "kmeans_1d",
           "robust_stats", "noise_level", "dilate", "erode", "fill_all_holes"]


def _shifted(ndim: int, axis: int) -> tuple[tuple, tuple]:
    """Index pairs ``(lo, hi)`` that view an array one voxel apart along ``axis``."""
    lo = tuple(slice(1, None) if a == axis else slice(None) for a in range(ndim))
    hi = tuple(slice(None, -1) if a == axis else slice(None) for a in range(ndim))
    return lo, hi


def dilate(mask: np.ndarray, iterations: int = 1, within: np.ndarray | None = None
           ) -> np.ndarray:
    """Binary dilation by the face-connected cross, ``iterations`` times.

    The same result as ``ndi.binary_dilation(mask, cross, iterations, mask=within)``
    for ``mask`` inside ``within`` (outside the array counts as background),
    several times faster: shifted views OR-ed together.
    """
    out = np.array(mask, bool, copy=True)
    for _ in range(iterations):
        src = out.copy()
        for a in range(out.ndim):
            lo, hi = _shifted(out.ndim, a)
            out[lo] |= src[hi]
            out[hi] |= src[lo]
        if within is not None:
            out &= within
    return out


def erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary erosion by the face-connected cross (``ndi.binary_erosion`` with
    ``border_value=0``: voxels on the array's border are eroded)."""
    out = np.array(mask, bool, copy=True)
    for _ in range(iterations):
        src = out.copy()
        for a in range(out.ndim):
            lo, hi = _shifted(out.ndim, a)
            out[lo] &= src[hi]
            out[hi] &= src[lo]
            edge = [slice(None)] * out.ndim
            for i in (0, -1):
                edge[a] = i
                out[tuple(edge)] = False
    return out


def fill_all_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes`` (face-connected background): the background
    not connected to the array's border becomes object."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    border = np.zeros(n + 1, bool)
    for a in range(mask.ndim):
        for i in (0, -1):
            border[np.unique(np.take(lab, i, axis=a))] = True
    border[0] = False
    return ~border[lab]


def ball_offsets(radius_vox) -> np.ndarray:
    """Integer offsets ``(N, ndim)`` inside an ellipsoid of per-axis radii ``radius_vox``."""
    r = np.maximum(np.asarray(radius_vox, float), 0.5)
    rng = [np.arange(-int(np.floor(v)), int(np.floor(v)) + 1) for v in r]
    grid = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, len(r))
    keep = ((grid / r) ** 2).sum(1) <= 1.0 + 1e-9
    return grid[keep]


def bbox(mask: np.ndarray) -> tuple:
    """Slices of the bounding box of a non-empty bool array (faster than
    ``ndi.find_objects`` on a large array)."""
    out = []
    for a in range(mask.ndim):
        idx = np.flatnonzero(np.any(mask, axis=tuple(b for b in range(mask.ndim) if b != a)))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def connected(cand: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The connected parts of ``cand | seeds`` that hold a seed voxel."""
    lab, n = ndi.label(cand | seeds)
    if n == 0:
        return np.zeros(cand.shape, bool)
    ids = np.unique(lab[seeds])
    ids = ids[ids > 0]
    keep = np.zeros(n + 1, bool)
    keep[ids] = True
    return keep[lab]


def union(masks) -> np.ndarray:
    """Voxel-wise OR of a non-empty list of equally shaped bool arrays."""
    out = np.zeros(masks[0].shape, bool)
    for m in masks:
        out |= m
    return out


def ellipse(seed: np.ndarray, spacing, radius_mm: float) -> tuple:
    """``(slices, bool ellipsoid)`` of radius ``radius_mm`` (mm) around a click.

    The slices may reach past the array's end; callers crop the ellipsoid to
    what the slices give.
    """
    c = np.argwhere(seed).mean(axis=0)
    r = np.array([radius_mm / s for s in spacing])
    sl = tuple(slice(max(int(np.floor(ci - ri)), 0), int(np.ceil(ci + ri)) + 1)
               for ci, ri in zip(c, r))
    grids = np.ogrid[sl]
    ell = sum(((gr - ci) / ri) ** 2 for gr, ci, ri in zip(grids, c, r)) <= 1.0
    return sl, ell


def kmeans_1d(values: np.ndarray, k: int, iters: int = 12) -> list:
    """``[(centre, count)]`` of a 1D k-means (quantile start)."""
    v = values if values.size <= 20000 else values[:: values.size // 20000 + 1]
    c = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        idx = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        c = np.array([v[idx == i].mean() if np.any(idx == i) else c[i] for i in range(k)])
    counts = np.bincount(idx, minlength=k) * (values.size / v.size)
    return [(float(ci), float(ni)) for ci, ni in zip(c, counts)]


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (scaled MAD) of ``values``."""
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    return med, mad


def noise_level(arr: np.ndarray, sigma) -> float:
    """Noise standard deviation of ``arr`` after Gaussian smoothing by ``sigma``.

    The raw noise comes from the robust spread of each voxel's difference to
    the mean of its axis neighbours (edges are a minority and do not count);
    smoothing divides it by the root of the kernel's sum of squares.

    Parameters
    ----------
    arr : (Z, Y, X) float array
        The unsmoothed image block.
    sigma : sequence of float
        Gaussian sigma per axis (voxels) that will be applied.
    """
    sub = arr[tuple(slice(None, None, 2) if n > 8 else slice(None) for n in arr.shape)]
    axes = [a for a in range(sub.ndim) if sub.shape[a] > 2]
    if not axes:
        return 0.0
    core = tuple(slice(1, -1) if a in axes else slice(None) for a in range(sub.ndim))
    diff = sub[core] * 1.0
    for a in axes:
        lo = tuple(slice(0, -2) if b == a else c for b, c in enumerate(core))
        hi = tuple(slice(2, None) if b == a else c for b, c in enumerate(core))
        diff = diff - (sub[lo] + sub[hi]) / (2 * len(axes))
    raw = 1.4826 * float(np.median(np.abs(diff - np.median(diff))))
    raw /= np.sqrt(1 + 1 / (2 * len(axes)))
    delta = np.zeros([9 if s > 0 else 1 for s in sigma], np.float32)
    delta[tuple(n // 2 for n in delta.shape)] = 1
    kern = ndi.gaussian_filter(delta, sigma, mode="constant", truncate=2.0)
    return raw * float(np.sqrt((kern ** 2).sum()))
