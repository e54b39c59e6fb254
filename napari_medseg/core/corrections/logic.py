"""Label algebra: logical operations, relabel / merge, threshold-limited painting."""

from __future__ import annotations

import numpy as np

from ...errors import MedSegError
from ._base import Edit, Progress, check_label_value, check_labels, make_edit, normalize_region

__all__ = ["logical_op", "relabel", "merge", "threshold_paint", "threshold_mask"]

_OPS = ("union", "intersect", "subtract", "invert")


def _other_mask(crop, other, region, shape):
    """The modifier as a bool array on the region: a class id or a full-size mask."""
    if other is None:
        return None
    if isinstance(other, (int, np.integer)):
        return crop == int(other)
    mask = np.asarray(other)
    if mask.shape != tuple(shape):
        raise MedSegError(f"the mask of shape {mask.shape} does not match the labels "
                          f"{tuple(shape)}; use a layer on the same grid")
    return mask[region].astype(bool)


def logical_op(labels, op: str, label: int, other=None, *, mask=None, region=None,
               overwrite: bool = False, progress=None, cancel=None) -> Edit:
    """Combine class ``label`` with another class or mask.

    Parameters
    ----------
    labels : numpy.ndarray of int
        ``(Z, Y, X)`` label map.
    op : {"union", "intersect", "subtract", "invert"}
        ``union``: voxels of ``other`` become ``label``; ``intersect``: voxels
        of ``label`` outside ``other`` become background; ``subtract``: voxels
        of ``label`` inside ``other`` become background; ``invert``: inside
        ``mask`` (or the region), ``label`` becomes background and background
        becomes ``label``.
    label : int
        The class that is modified.
    other : int or array_like of bool, optional
        The modifier: a class id of the same map or a ``(Z, Y, X)`` mask (e.g.
        another Labels layer ``!= 0``). Required except for ``invert``.
    mask : array_like of bool, optional
        ``(Z, Y, X)`` limit for ``invert`` (default: the whole region).
    overwrite : bool
        For ``union`` with a mask: also take voxels of other classes (a class
        id ``other`` is always taken over, that is the point of the union).

    Examples
    --------
    >>> lab = np.array([[[1, 1, 2, 2, 0]]], np.uint8)
    >>> logical_op(lab, "union", 1, 2).result(lab).tolist()
    [[[1, 1, 1, 1, 0]]]
    >>> logical_op(lab, "invert", 1).result(lab).tolist()
    [[[0, 0, 2, 2, 1]]]
    """
    if op not in _OPS:
        raise MedSegError(f"unknown logical operation {op!r}; use one of {', '.join(_OPS)}")
    lab = check_labels(labels)
    label = check_label_value(lab, label)
    region = normalize_region(region, lab.shape)
    crop = np.array(lab[region])
    prog = Progress(1, progress, cancel)
    mine = crop == label
    if op == "invert":
        lim = _other_mask(crop, mask, region, lab.shape) if mask is not None else \
            np.ones(crop.shape, bool)
        bg = crop == 0
        crop[lim & mine] = 0
        crop[lim & bg] = label
    else:
        if other is None:
            raise MedSegError(f"'{op}' needs a second class or mask")
        oth = _other_mask(crop, other, region, lab.shape)
        if op == "union":
            take = oth & ~mine
            if not (overwrite or isinstance(other, (int, np.integer))):
                take &= crop == 0
            crop[take] = label
        elif op == "intersect":
            crop[mine & ~oth] = 0
        else:
            crop[mine & oth] = 0
    prog.step()
    return make_edit(lab, region, crop)


def relabel(labels, mapping: dict, *, region=None, progress=None, cancel=None) -> Edit:
    """Change class ids: ``mapping`` is ``{old_id: new_id}`` (0 erases a class).

    Examples
    --------
    >>> lab = np.array([[[0, 1, 2, 3]]], np.uint8)
    >>> relabel(lab, {1: 3, 3: 1}).result(lab).tolist()
    [[[0, 3, 2, 1]]]
    """
    lab = check_labels(labels)
    region = normalize_region(region, lab.shape)
    crop = np.asarray(lab[region])
    out = np.array(crop, copy=True)
    prog = Progress(len(mapping), progress, cancel)
    for old, new in mapping.items():
        out[crop == int(old)] = check_label_value(lab, new)  # from the original: swaps work
        prog.step()
    return make_edit(lab, region, out)


def merge(labels, sources, target: int, *, region=None, progress=None, cancel=None) -> Edit:
    """Merge the classes ``sources`` into class ``target``."""
    return relabel(labels, {int(s): int(target) for s in sources}, region=region,
                   progress=progress, cancel=cancel)


def threshold_mask(image, lo: float, hi: float) -> np.ndarray:
    """``(Z, Y, X)`` bool: voxels with ``lo <= image <= hi`` (NaN is outside)."""
    img = np.asarray(image)
    return (img >= lo) & (img <= hi)


def threshold_paint(labels, paint_mask, label: int, *, image, lo: float, hi: float,
                    region=None, overwrite: bool = True, progress=None,
                    cancel=None) -> Edit:
    """Paint ``label`` on ``paint_mask`` but only where ``lo <= image <= hi``.

    Like the intensity masking of 3D Slicer's Segment Editor: a brush or a
    filled region only takes voxels in the intensity range (e.g. 40-200 HU
    for a contrast-enhanced organ). ``label = 0`` erases within the range.

    Parameters
    ----------
    paint_mask : array_like of bool
        ``(Z, Y, X)`` voxels the user painted (or the region when None).
    image : array_like
        ``(Z, Y, X)`` intensities on the same grid.
    lo, hi : float
        Inclusive intensity range (image units, e.g. HU).
    overwrite : bool
        Paint over other classes too (default); False paints only background.
    """
    lab = check_labels(labels)
    label = check_label_value(lab, label)
    region = normalize_region(region, lab.shape)
    img = np.asarray(image)
    if img.shape != lab.shape:
        raise MedSegError(f"the image of shape {img.shape} does not match the labels "
                          f"{lab.shape}; choose the image the labels belong to")
    if lo > hi:
        raise MedSegError(f"empty intensity range [{lo}, {hi}]; the lower bound must not "
                          "exceed the upper")
    crop = np.array(lab[region])
    prog = Progress(1, progress, cancel)
    pm = np.ones(crop.shape, bool) if paint_mask is None else \
        _other_mask(crop, paint_mask, region, lab.shape)
    take = pm & threshold_mask(img[region], lo, hi)
    if not overwrite:
        take &= crop == 0
    crop[take] = label
    prog.step()
    return make_edit(lab, region, crop)
