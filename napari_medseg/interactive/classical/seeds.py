"""Seeds of the classical engine: prompts as masks, and where each click counts."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..base import Prompts, Region
from ._arrays import ball_offsets, bbox, ellipse

__all__ = ["prompt_seeds", "neighbourhood", "locality", "near_object"]


def _stamp(points, offset, shape, small) -> list[np.ndarray]:
    """One bool mask of ``shape`` per click: the click widened by ``small`` offsets."""
    out = []
    for p in points:
        q = np.round(p - offset).astype(int)
        idx = q[None, :] + small
        ok = np.all((idx >= 0) & (idx < shape), axis=1)
        m = np.zeros(shape, bool)
        m[tuple(idx[ok].T)] = True
        if m.any():
            out.append(m)
    return out


def _box_masks(prompts: Prompts, offset, shape, fg: list) -> tuple[np.ndarray, np.ndarray]:
    """The union of the boxes and the ring just outside them; box centres are
    appended to ``fg`` when there is no positive click."""
    two_d = prompts.mode == "2d"
    box = np.zeros(shape, bool)
    for lo, hi in prompts.boxes:
        lo_i = np.floor(lo - offset + 0.5).astype(int)
        hi_i = np.floor(hi - offset + 0.5).astype(int) + 1
        if two_d:
            lo_i[prompts.axis], hi_i[prompts.axis] = 0, 1
        elif hi_i[0] - lo_i[0] <= 1:  # a 2D box used in 3D mode: any depth
            lo_i[0], hi_i[0] = 0, shape[0]
        sl = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo_i, hi_i, shape))
        inner = np.zeros(shape, bool)
        inner[sl] = True
        box |= inner
        if not len(prompts.positive):
            c = tuple(slice(s.start + (s.stop - s.start) * 2 // 5,
                            max(s.stop - (s.stop - s.start) * 2 // 5,
                                s.start + (s.stop - s.start) * 2 // 5 + 1))
                      for s in sl)
            seed = np.zeros(shape, bool)
            seed[c] = True
            fg.append(seed)
    ring = ndi.binary_dilation(box, iterations=2) & ~box
    return box, ring


def prompt_seeds(prompts: Prompts, region: Region, offset) -> tuple[list, np.ndarray,
                                                                     np.ndarray | None]:
    """Object seed groups, background seeds and the box mask in ``region``.

    Parameters
    ----------
    prompts : Prompts
        The prompts (array indices of the whole image).
    region : tuple of 3 slice
        The part of the image worked on.
    offset : (3,) int array
        ``region``'s start.

    Returns
    -------
    fg : list of (Z, Y, X) bool arrays
        One group per positive click, then the object scribble, then box
        centres (only without positive clicks).
    bg : (Z, Y, X) bool array
        Negative clicks, background scribble, the ring around boxes.
    box : (Z, Y, X) bool array or None
        Inside the boxes.
    """
    shape = tuple(s.stop - s.start for s in region)
    two_d = prompts.mode == "2d"
    rad = np.array([0.0 if two_d and a == prompts.axis else 1.5 for a in range(3)])
    small = ball_offsets(rad)
    fg = _stamp(prompts.positive, offset, shape, small)
    bg = np.zeros(shape, bool)
    for m in _stamp(prompts.negative, offset, shape, small):
        bg |= m
    if prompts.scribbles is not None:
        sc = np.asarray(prompts.scribbles[region])
        if np.any(sc == 1):
            fg.append(sc == 1)
        bg |= sc == 2
    box = None
    if len(prompts.boxes):
        box, ring = _box_masks(prompts, offset, shape, fg)
        bg |= ring
    return fg, bg, box


def neighbourhood(seed: np.ndarray, spacing, radius_mm: float) -> np.ndarray:
    """Seed voxels widened to ``radius_mm`` (a statistics sample).

    The seed itself when ``spacing`` is None or the seed is large already (a
    scribble or a box centre).
    """
    if spacing is None or seed.sum() > 200:
        return seed
    r = np.array([radius_mm / s for s in spacing])
    r = np.where(np.asarray(seed.shape) > 1, r, 0)
    pad = np.ceil(r).astype(int)
    st = np.zeros(tuple(2 * v + 1 for v in pad), bool)
    st[tuple((ball_offsets(r) + pad).T)] = True
    box = bbox(seed)
    box = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
    out = np.zeros(seed.shape, bool)
    out[box] = ndi.binary_dilation(seed[box], st)
    return out


def locality(fg: list, spacing, local_mm: float) -> list:
    """Where each seed's intensity class applies.

    Everywhere (None) for the first seed, scribbles and boxes; within
    ``local_mm`` of a later click (``(slices, ellipsoid)``), since a click on
    the object's blurred edge must not pull in every voxel of that intensity.
    """
    out = [None]
    for g in fg[1:]:
        if g.sum() > 200:
            out.append(None)
            continue
        out.append(ellipse(g, spacing, local_mm))
    return out


def near_object(grown: np.ndarray, seed: np.ndarray, spacing, local_mm: float) -> tuple:
    """The bounding box of the object and of a click, widened by ``local_mm``:
    where a homogeneous later click's intensity counts."""
    r = [int(np.ceil(local_mm / s)) for s in spacing]
    boxes = [bbox(m) for m in (grown, seed) if m.any()]
    return tuple(slice(max(min(b[a].start for b in boxes) - r[a], 0),
                       max(b[a].stop for b in boxes) + r[a]) for a in range(len(r)))


def distance_to_object(grown: np.ndarray, seed: np.ndarray, spacing,
                       reach_mm: float) -> float:
    """Distance (mm) from a click's centre to the nearest voxel of ``grown``;
    ``inf`` when none lies within ``reach_mm``."""
    c = np.round(np.argwhere(seed).mean(axis=0)).astype(int)
    r = [int(np.ceil(reach_mm / s)) for s in spacing]
    win = tuple(slice(max(ci - ri, 0), ci + ri + 1) for ci, ri in zip(c, r))
    sub = grown[win]
    if not sub.any():
        return float("inf")
    d = ndi.distance_transform_edt(~sub, sampling=spacing)
    return float(d[tuple(ci - w.start for ci, w in zip(c, win))])


def band_around(grown: np.ndarray, spacing, width_mm: float) -> np.ndarray:
    """Voxels within ``width_mm`` of ``grown`` (a window of the object's edge)."""
    if not grown.any():
        return np.zeros(grown.shape, bool)
    return ndi.distance_transform_edt(~grown, sampling=spacing) <= width_mm
