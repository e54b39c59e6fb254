"""Correction operations on label maps, in the spirit of 3D Slicer's Segment Editor.

Pure functions over ``(Z, Y, X)`` integer arrays (numpy / scipy): each works on
one class or all, optionally inside a ``region`` (tuple of 3 slices, e.g. from
:func:`slice_range`), respects the voxel spacing (sizes in mm and mm^3) and
returns an :class:`Edit`: the new values of the tight box that changes, which
a viewer applies (and records for undo) without touching the rest.

>>> import numpy as np
>>> lab = np.zeros((4, 8, 8), np.uint8); lab[1:3, 2:6, 2:6] = 1
>>> edit = margin(lab, 1, margin_mm=1.0, spacing=(2.0, 1.0, 1.0))
>>> edit.region
(slice(1, 3, None), slice(1, 7, None), slice(1, 7, None))
>>> int((edit.result(lab) == 1).sum())
64
"""

from ._base import Edit, ellipsoid, normalize_region, slice_range
from .interpolate import fill_between_slices, signed_distance_2d
from .logic import logical_op, merge, relabel, threshold_mask, threshold_paint
from .morphology import fill_holes, keep_largest, margin, remove_islands, smooth, \
    split_components

__all__ = [
    "Edit", "ellipsoid", "normalize_region", "slice_range",
    "remove_islands", "keep_largest", "split_components", "fill_holes", "smooth", "margin",
    "fill_between_slices", "signed_distance_2d",
    "logical_op", "relabel", "merge", "threshold_paint", "threshold_mask",
]
