"""Final touches of the classical engine: local edge placement, hole filling."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._arrays import bbox, connected, dilate, erode, fill_all_holes

__all__ = ["refine_edge", "fill_holes", "trim_shell"]


def refine_edge(sm, mask, bg, size: int = 5) -> np.ndarray:
    """Move the edge by at most one voxel towards the local half-way level.

    A spleen against fat and against muscle has two different half-way
    levels: a voxel just outside joins when it is closer to the mean of the
    object nearby than to the mean of the background nearby (means over a
    ``size``-voxel window).
    """
    if not mask.any():
        return mask
    sl = bbox(mask)
    sl = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in sl)
    m = mask[sl]
    img = sm[sl]
    inner = erode(m)
    near = dilate(m)
    outer = dilate(near, 2) & ~near
    shell = near & ~m & ~bg[sl]

    def local_mean(sel):
        w = ndi.uniform_filter(sel.astype(np.float32), size)
        v = ndi.uniform_filter(np.where(sel, img, 0).astype(np.float32), size)
        return v / np.maximum(w, 1e-6), w > 1e-6

    fg_mean, fg_ok = local_mean(inner)
    bg_mean, bg_ok = local_mean(outer)
    add = shell & fg_ok & bg_ok & (np.abs(img - fg_mean) < np.abs(img - bg_mean))
    out = mask.copy()
    out[sl] |= add
    return out


def fill_holes(mask, bg, max_fraction: float = 0.002, min_voxels: int = 64) -> np.ndarray:
    """Fill small holes (noise), never one holding a background seed.

    Large holes (a lesion inside an organ, more than ``max_fraction`` of the
    object and ``min_voxels``) are kept: they are another structure, and a
    positive click there adds them when wanted.
    """
    if not mask.any():
        return mask
    box = bbox(mask)
    sub = mask[box]
    holes = fill_all_holes(sub) & ~sub
    if not holes.any():
        return mask
    lab, n = ndi.label(holes)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes <= max(min_voxels, max_fraction * int(sub.sum()))
    keep[np.unique(lab[bg[box]])] = False
    keep[0] = False
    out = mask.copy()
    out[box] = sub | keep[lab]
    return out


def trim_shell(raw, mask, seeds, means, bg_means, tol: float) -> np.ndarray:
    """Cut a thin shell's mask down to the shell's own intensity.

    A layer one or two voxels thick (CSF under the skull) is a blend of its
    neighbours in a smoothed image, so the growth also takes the thin dark
    blends next to it (the skull's inner table), and the growth's tolerance,
    widened by that blend, bounds nothing on a side without a background
    class. In the raw image the shell keeps its own intensity: voxels farther
    than ``tol`` from every object intensity on such an unbounded side are
    dropped, and what stays connected to the seeds is kept.

    Parameters
    ----------
    raw : (Z, Y, X) or (Y, X) float array
        The unsmoothed image.
    mask, seeds : bool arrays like ``raw``
        The object and every object seed.
    means, bg_means : list of float
        Object and background intensities.
    tol : float
        Intensity tolerance (``k`` times the raw image's noise).
    """
    if not mask.any():
        return mask
    ok = np.zeros(mask.shape, bool)
    for m in means:
        lo = m - tol if not any(b < m for b in bg_means) else -np.inf
        hi = m + tol if not any(b > m for b in bg_means) else np.inf
        ok |= (raw >= lo) & (raw <= hi)
    out = connected(mask & ok, seeds & mask & ok)
    return out if out.any() else mask
