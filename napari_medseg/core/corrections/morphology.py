"""Component and morphology corrections: islands, holes, smoothing, margins.

Every function takes a ``(Z, Y, X)`` integer label map, the class to work on
(``label=None``: every class in turn), the voxel ``spacing`` in mm, an optional
``region`` (tuple of 3 slices; see :func:`slice_range`) and returns an
:class:`Edit` (the new values of the changed box); the input is not modified.
Sizes are physical: mm and mm^3, never voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ...errors import MedSegError
from ..policy import largest_component
from ._base import (Edit, Progress, check_label_value, check_labels, ellipsoid, label_ids,
                    make_edit, normalize_region, pad_region)

__all__ = ["remove_islands", "keep_largest", "split_components", "fill_holes", "smooth",
           "margin"]


def _components(mask, connectivity):
    structure = ndi.generate_binary_structure(3, connectivity)
    comp, n = ndi.label(mask, structure=structure)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    sizes[0] = 0
    return comp, n, sizes


def remove_islands(labels, label=None, *, min_volume_mm3: float, spacing=(1.0, 1.0, 1.0),
                   region=None, connectivity: int = 3, progress=None, cancel=None) -> Edit:
    """Erase connected components smaller than ``min_volume_mm3``.

    Parameters
    ----------
    labels : numpy.ndarray of int
        ``(Z, Y, X)`` label map.
    label : int, optional
        The class to clean; every class when None.
    min_volume_mm3 : float
        Islands with a volume (voxel count x voxel volume) below this, in mm^3,
        become background.
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    region : tuple of 3 slices, optional
        Only components inside this box are considered (cut at its border).
    connectivity : int
        1 (6-connected) to 3 (26-connected, default).

    Examples
    --------
    >>> lab = np.zeros((3, 6, 6), np.uint8); lab[1, 1:4, 1:4] = 1; lab[1, 5, 5] = 1
    >>> int(remove_islands(lab, 1, min_volume_mm3=2.0).result(lab).sum())
    9
    """
    lab = check_labels(labels)
    region = normalize_region(region, lab.shape)
    voxel_mm3 = float(np.prod(spacing))
    crop = np.array(lab[region])
    ids = label_ids(crop, label)
    prog = Progress(len(ids), progress, cancel)
    removed = 0
    for k in ids:
        comp, _n, sizes = _components(crop == k, connectivity)
        small = (sizes * voxel_mm3 < float(min_volume_mm3)) & (sizes > 0)
        kill = small[comp]
        removed += int(small.sum())
        crop[kill] = 0
        prog.step()
    return make_edit(lab, region, crop, islands_removed=removed)


def keep_largest(labels, label=None, *, region=None, connectivity: int = 3,
                 progress=None, cancel=None) -> Edit:
    """Keep only the largest connected component of a class (others -> background).

    Examples
    --------
    >>> lab = np.zeros((3, 6, 6), np.uint8); lab[1, 1:4, 1:4] = 1; lab[1, 5, 5] = 1
    >>> int(keep_largest(lab, 1).result(lab).sum())
    9
    """
    lab = check_labels(labels)
    region = normalize_region(region, lab.shape)
    crop = np.array(lab[region])
    ids = label_ids(crop, label)
    prog = Progress(len(ids), progress, cancel)
    for k in ids:
        mask = crop == k
        crop[mask & ~largest_component(mask, connectivity)] = 0
        prog.step()
    return make_edit(lab, region, crop)


def split_components(labels, label, *, region=None, connectivity: int = 3,
                     progress=None, cancel=None) -> Edit:
    """Give each connected component of ``label`` its own class id.

    The largest component keeps ``label``; the others, from largest to
    smallest, get new ids after the highest id in the whole map.
    ``edit.info["new_labels"]`` lists them.
    """
    lab = check_labels(labels)
    region = normalize_region(region, lab.shape)
    crop = np.array(lab[region])
    prog = Progress(1, progress, cancel)
    comp, n, sizes = _components(crop == int(label), connectivity)
    order = np.argsort(-sizes[1:], kind="stable") + 1  # component ids, largest first
    start = int(lab.max()) + 1
    new_ids = []
    if n > 1:
        check_label_value(lab, start + n - 2)
        lut = np.zeros(n + 1, dtype=lab.dtype)
        lut[order[0]] = int(label)
        for i, c in enumerate(order[1:]):
            lut[c] = start + i
            new_ids.append(start + i)
        inside = comp != 0
        crop[inside] = lut[comp[inside]]
    prog.step()
    return make_edit(lab, region, crop, new_labels=new_ids)


def fill_holes(labels, label=None, *, mode: str = "3d", axis: int = 0, region=None,
               overwrite: bool = False, progress=None, cancel=None) -> Edit:
    """Fill cavities enclosed by a class.

    Parameters
    ----------
    mode : {"3d", "slice"}
        ``"3d"`` fills holes closed in 3D; ``"slice"`` fills holes of each 2D
        slice along ``axis`` (0 = axial), which also closes tubes open at the ends.
    overwrite : bool
        Also overwrite other classes inside the hole (default: only background).

    Examples
    --------
    >>> lab = np.zeros((5, 5, 5), np.uint8); lab[1:4, 1:4, 1:4] = 2; lab[2, 2, 2] = 0
    >>> int((fill_holes(lab, 2).result(lab) == 2).sum())
    27
    """
    if mode not in ("3d", "slice"):
        raise MedSegError(f"unknown fill mode {mode!r}; use '3d' or 'slice'")
    lab = check_labels(labels)
    region = normalize_region(region, lab.shape)
    crop = np.array(lab[region])
    ids = label_ids(crop, label)
    n_steps = len(ids) * (crop.shape[axis] if mode == "slice" else 1)
    prog = Progress(n_steps, progress, cancel)
    for k in ids:
        mask = crop == k
        if mode == "3d":
            filled = ndi.binary_fill_holes(mask)
            prog.step()
        else:
            filled = np.empty_like(mask)
            for i in range(mask.shape[axis]):
                sl = [slice(None)] * 3
                sl[axis] = i
                filled[tuple(sl)] = ndi.binary_fill_holes(mask[tuple(sl)])
                prog.step()
        new = filled & ~mask
        if not overwrite:
            new &= crop == 0
        crop[new] = k
    return make_edit(lab, region, crop)


def _median_binary(mask, footprint):
    counts = ndi.correlate(mask.astype(np.float32), footprint.astype(np.float32),
                           mode="constant", cval=0.0)
    return counts > footprint.sum() / 2.0


def smooth(labels, label=None, *, method: str = "median", radius_mm: float = 1.0,
           spacing=(1.0, 1.0, 1.0), region=None, overwrite: bool = False,
           progress=None, cancel=None) -> Edit:
    """Smooth a class with a median, opening or closing filter of radius in mm.

    The structuring element is an ellipsoid covering a sphere of ``radius_mm``
    in physical space (see :func:`ellipsoid`), so anisotropic voxels are
    handled. ``"median"`` is a majority vote in that sphere (removes small
    bumps and fills small dents), ``"opening"`` removes parts thinner than
    the sphere, ``"closing"`` fills gaps narrower than it.

    Parameters
    ----------
    overwrite : bool
        Let the class grow into other classes (default: only into background).
    """
    if method not in ("median", "opening", "closing"):
        raise MedSegError(f"unknown smoothing {method!r}; use median, opening or closing")
    lab = check_labels(labels)
    region = normalize_region(region, lab.shape)
    fp = ellipsoid(radius_mm, spacing)
    half = np.array(fp.shape) // 2
    # closing needs room to dilate then erode: pad by twice the radius
    padded, inner = pad_region(region, half * (2 if method != "median" else 1), lab.shape)
    work = np.asarray(lab[padded])
    crop = np.array(lab[region])
    ids = label_ids(crop, label)
    prog = Progress(len(ids), progress, cancel)
    for k in ids:
        mask = work == k
        if method == "median":
            out = _median_binary(mask, fp)
        elif method == "opening":
            out = ndi.binary_opening(mask, structure=fp)
        else:
            big = np.pad(mask, [(h, h) for h in half])  # closing must not touch the border
            out = ndi.binary_closing(big, structure=fp)[tuple(slice(h, -h or None)
                                                              for h in half)]
        out, mask_in = out[inner], mask[inner]
        crop[mask_in & ~out & (crop == k)] = 0
        grow = out & ~mask_in
        if not overwrite:
            grow &= crop == 0
        crop[grow] = k
        prog.step()
    return make_edit(lab, region, crop)


def margin(labels, label=None, *, margin_mm: float, spacing=(1.0, 1.0, 1.0), region=None,
           overwrite: bool = False, progress=None, cancel=None) -> Edit:
    """Grow (``margin_mm > 0``) or shrink (``< 0``) a class by an exact distance in mm.

    A voxel joins the class when the Euclidean distance (with ``spacing``)
    from its centre to the nearest class voxel centre is at most
    ``margin_mm``; a voxel leaves it when its distance to the nearest voxel
    outside the class is at most ``-margin_mm`` (the array border does not
    count as outside: an organ cut by the field of view is not eroded there).

    Parameters
    ----------
    margin_mm : float
        Distance in mm; positive grows, negative shrinks.
    overwrite : bool
        When growing, also take over voxels of other classes (default: only
        background). With ``label=None`` every class grows in turn.

    Examples
    --------
    >>> lab = np.zeros((1, 1, 9), np.uint8); lab[0, 0, 4] = 1
    >>> margin(lab, 1, margin_mm=1.5, spacing=(1, 1, 0.5)).result(lab)[0, 0].tolist()
    [0, 1, 1, 1, 1, 1, 1, 1, 0]
    """
    lab = check_labels(labels)
    region = normalize_region(region, lab.shape)
    spacing = tuple(float(s) for s in spacing)
    m = float(margin_mm)
    pad = np.ceil(abs(m) / np.asarray(spacing)).astype(int) + 1
    padded, inner = pad_region(region, pad, lab.shape)
    work = np.asarray(lab[padded])
    crop = np.array(lab[region])
    ids = label_ids(work, label)
    prog = Progress(len(ids), progress, cancel)
    for k in ids:
        mask = work == k
        if not mask.any():
            prog.step()
            continue
        if m >= 0:
            dist = ndi.distance_transform_edt(~mask, sampling=spacing)[inner]
            grow = (dist <= m + 1e-9) & ~mask[inner]
            if not overwrite:
                grow &= crop == 0
            crop[grow] = k
        else:
            # the array border is not an edge of the class (a cut organ goes on
            # beyond the field of view), so it does not erode
            if mask.all():
                prog.step()
                continue
            dist = ndi.distance_transform_edt(mask, sampling=spacing)[inner]
            crop[mask[inner] & (dist <= -m + 1e-9) & (crop == k)] = 0
        prog.step()
    return make_edit(lab, region, crop)
