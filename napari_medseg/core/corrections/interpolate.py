"""Fill between slices: interpolate a class drawn on a few slices through the gaps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ...errors import MedSegError
from ._base import Edit, Progress, check_labels, label_ids, make_edit, normalize_region

__all__ = ["fill_between_slices", "signed_distance_2d"]


def signed_distance_2d(mask: np.ndarray, spacing2=(1.0, 1.0)) -> np.ndarray:
    """Signed distance (mm) of a 2D mask: negative inside, positive outside.

    The zero level lies half-way between the boundary voxels inside and
    outside, so thresholding at 0 gives the mask back.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.all():
        return -np.full(mask.shape, np.inf)
    outside = ndi.distance_transform_edt(~mask, sampling=spacing2)
    inside = ndi.distance_transform_edt(mask, sampling=spacing2)
    return outside - inside


def fill_between_slices(labels, label=None, *, axis: int = 0, spacing=(1.0, 1.0, 1.0),
                        region=None, overwrite: bool = False, progress=None,
                        cancel=None) -> Edit:
    """Interpolate a class through the slices between the ones it was drawn on.

    Shape-based interpolation: for each pair of consecutive drawn slices
    (slices along ``axis`` that contain the class) with empty slices between
    them, the 2D signed distance maps of the two drawings (in mm, with the
    in-plane spacing) are blended linearly with the slice position and the
    zero level gives the class on each slice in between. Drawn slices are not
    changed.

    Parameters
    ----------
    labels : numpy.ndarray of int
        ``(Z, Y, X)`` label map.
    label : int, optional
        The class to interpolate; every class in turn when None.
    axis : int
        The slicing axis the user drew on (0 = axial, 1 = coronal, 2 = sagittal
        for a standard axial acquisition).
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    region : tuple of 3 slices, optional
        Limit the interpolation to this box (e.g. a slice range).
    overwrite : bool
        Also overwrite other classes on the filled slices (default: only
        background).

    Raises
    ------
    MedSegError
        When the class is drawn on fewer than two slices.

    Examples
    --------
    >>> lab = np.zeros((5, 7, 7), np.uint8)
    >>> lab[0, 2:5, 2:5] = 1; lab[4, 2:5, 2:5] = 1
    >>> out = fill_between_slices(lab, 1).result(lab)
    >>> [int(out[z].sum()) for z in range(5)]
    [9, 9, 9, 9, 9]
    """
    lab = check_labels(labels)
    if axis not in (0, 1, 2):
        raise MedSegError(f"axis must be 0, 1 or 2, got {axis}")
    region = normalize_region(region, lab.shape)
    crop = np.array(lab[region])
    spacing2 = tuple(float(s) for i, s in enumerate(spacing) if i != axis)
    moved = np.moveaxis(crop, axis, 0)  # a view: writes go to crop
    ids = label_ids(crop, label)
    prog = Progress(max(moved.shape[0], 1) * len(ids), progress, cancel)
    filled = 0
    for k in ids:
        present = np.flatnonzero((moved == k).any(axis=(1, 2)))
        if len(present) < 2:
            if label is not None:
                raise MedSegError(f"label {k} is drawn on {len(present)} slice(s) here; "
                                  "draw it on at least two slices to fill between them")
            continue
        for a, b in zip(present[:-1], present[1:]):
            prog.step(b - a)
            if b - a < 2:
                continue
            sd_a = signed_distance_2d(moved[a] == k, spacing2)
            sd_b = signed_distance_2d(moved[b] == k, spacing2)
            for z in range(a + 1, b):
                t = (z - a) / (b - a)
                inside = (1.0 - t) * sd_a + t * sd_b <= 0
                if not overwrite:
                    inside &= moved[z] == 0
                moved[z][inside] = k
                filled += int(inside.sum())
    return make_edit(lab, region, crop, filled_voxels=filled)
