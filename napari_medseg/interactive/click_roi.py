"""Where the click model looks: regions around the clicks and the grid it runs on.

The network always sees a region of interest (ROI) resampled onto a grid of at
most a fixed number of voxels (the *budget*), with voxels as close to
isotropic in mm as the budget allows and never finer than the image. Small
objects are seen at the image's resolution, large ones coarser, so one update
costs about the same whatever the object. Training
(:mod:`napari_medseg.training.train_click_model`) draws its regions with the
same rules, so the network meets the same scales at inference.

Shapes are ``(Z, Y, X)``; boxes are ``(lo, hi)`` integer arrays of array
indices (``hi`` exclusive); spacings are in mm.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BUDGET_3D", "INPLANE_2D", "SLAB_2D", "FIRST_ROI_MM", "MULTIPLE",
           "plan_grid", "box_around", "grow_box", "resample", "touching_faces",
           "to_grid"]

#: Most voxels of the 3D grid (32 x 64 x 64).
BUDGET_3D = 32 * 64 * 64
#: Most in-plane voxels of the 2D slab grid (80 x 80).
INPLANE_2D = 80 * 80
#: Slices of the slab the network sees around the slice of a 2D update.
SLAB_2D = 16
#: Edge (mm) of the cube around a first click, before the mask says how big
#: the object is.
FIRST_ROI_MM = 64.0
#: Grid sides are multiples of this (three 2x poolings in the network).
MULTIPLE = 8


def plan_grid(extent, spacing, budget: int, fixed: tuple = ()) -> tuple[int, ...]:
    """Grid shape for a region of ``extent`` voxels at ``spacing``.

    Parameters
    ----------
    extent : sequence of 3 int
        Region size in image voxels ``(Z, Y, X)``.
    spacing : sequence of 3 float
        Image voxel size in mm.
    budget : int
        Most voxels of the grid over the axes not in ``fixed``.
    fixed : tuple of int
        Axes kept at their voxel count (the slab axis of a 2D update).

    Returns
    -------
    tuple of 3 int
        Multiples of :data:`MULTIPLE`, at least two (fixed axes: unchanged); the grid's
        voxels are at least the image's in every axis, and as isotropic in mm
        as ``budget`` allows.
    """
    ext = np.asarray(extent, float)
    sp = np.asarray(spacing, float)
    mm = ext * sp
    free = [a for a in range(3) if a not in fixed]

    def count(t):
        return float(np.prod([max(mm[a] / max(sp[a], t), 1.0) for a in free]))

    lo, hi = 0.0, float(mm.max()) + 1.0
    if count(lo) <= budget:
        t = lo
    else:
        for _ in range(40):  # bisection on the grid voxel size (mm)
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if count(mid) > budget else (lo, mid)
        t = hi
    shape = []
    for a in range(3):
        if a in fixed:
            shape.append(int(ext[a]))
            continue
        n = mm[a] / max(sp[a], t)
        shape.append(max(2 * MULTIPLE, int(round(n / MULTIPLE)) * MULTIPLE))
    while float(np.prod([shape[a] for a in free])) > budget * 1.15:
        a = max(free, key=lambda k: shape[k])
        shape[a] -= MULTIPLE
    return tuple(shape)


def box_around(points, spacing, shape, margin_mm=0.0, min_mm=0.0, rel=0.0):
    """The box around ``points`` grown by a margin and to a least size, clipped.

    Parameters
    ----------
    points : (N, 3) array
        Array indices (clicks, mask voxels' corners).
    spacing : sequence of 3 float
        Voxel size (mm).
    shape : sequence of 3 int
        Image shape.
    margin_mm : float
        Added on every side (mm).
    min_mm : float
        Least edge of the box (mm), centred on the points.
    rel : float
        Extra margin on each side as a fraction of the points' extent.

    Returns
    -------
    lo, hi : int arrays
    """
    pts = np.asarray(points, float).reshape(-1, 3)
    sp = np.asarray(spacing, float)
    shape = np.asarray(shape, int)
    lo = pts.min(0)
    hi = pts.max(0) + 1
    ext = hi - lo
    pad = margin_mm / sp + rel * ext
    lo, hi = lo - pad, hi + pad
    need = np.maximum(min_mm / sp - (hi - lo), 0) / 2
    lo, hi = lo - need, hi + need
    lo = np.clip(np.floor(lo), 0, shape - 1).astype(int)
    hi = np.clip(np.ceil(hi), lo + 1, shape).astype(int)
    return lo, hi


def grow_box(lo, hi, faces, shape, fixed=()):
    """Double the box's extent towards each face in ``faces`` ((axis, side) pairs)."""
    lo, hi = lo.copy(), hi.copy()
    for a, side in faces:
        if a in fixed:
            continue
        ext = hi[a] - lo[a]
        if side == 0:
            lo[a] = max(lo[a] - ext, 0)
        else:
            hi[a] = min(hi[a] + ext, int(shape[a]))
    return lo, hi


def touching_faces(mask_grid: np.ndarray, lo, hi, shape, fixed=()) -> list:
    """Faces ``(axis, side)`` of the region that the mask touches inside the image."""
    out = []
    for a in range(3):
        if a in fixed:
            continue
        first = np.take(mask_grid, 0, axis=a)
        last = np.take(mask_grid, mask_grid.shape[a] - 1, axis=a)
        if lo[a] > 0 and first.any():
            out.append((a, 0))
        if hi[a] < shape[a] and last.any():
            out.append((a, 1))
    return out


def resample(arr, shape, mode: str = "trilinear") -> np.ndarray:
    """Resample a ``(Z, Y, X)`` float array to ``shape`` (cell-centred)."""
    arr = np.asarray(arr, np.float32)
    if tuple(arr.shape) == tuple(shape):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode, **kw)[0, 0].numpy()


def to_grid(points, lo, hi, grid_shape) -> np.ndarray:
    """Image array indices -> grid indices of the region ``lo:hi`` (cell-centred)."""
    pts = np.asarray(points, float).reshape(-1, 3)
    scale = np.asarray(grid_shape, float) / (np.asarray(hi) - np.asarray(lo))
    return (pts - lo + 0.5) * scale - 0.5
