"""Shared pieces of the correction operations: regions, edits, structuring elements."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import MedSegError, check_cancel

__all__ = ["Edit", "normalize_region", "slice_range", "ellipsoid", "pad_region",
           "make_edit", "label_ids", "check_labels", "Progress"]


def check_labels(labels) -> np.ndarray:
    """``labels`` as a 3D integer numpy array (no copy when possible)."""
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise MedSegError(f"corrections work on 3D (Z, Y, X) label maps, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise MedSegError(f"labels must be integers, got {lab.dtype}")
    return lab


def normalize_region(region, shape) -> tuple[slice, slice, slice]:
    """Clip ``region`` (tuple of 3 slices, or None for everything) to ``shape``.

    Returns slices with explicit integer ``start``/``stop`` and step 1.
    """
    if region is None:
        return tuple(slice(0, int(n)) for n in shape)
    if len(region) != 3:
        raise MedSegError(f"a region needs one slice per axis (Z, Y, X), got {region!r}")
    out = []
    for sl, n in zip(region, shape):
        if not isinstance(sl, slice):
            sl = slice(int(sl), int(sl) + 1)
        start, stop, step = sl.indices(int(n))
        if step != 1:
            raise MedSegError("regions must be contiguous (slice step 1)")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def slice_range(start: int, stop: int, axis: int = 0) -> tuple[slice, slice, slice]:
    """The region of slices ``start..stop-1`` along ``axis`` (0 = Z, axial)."""
    region = [slice(None)] * 3
    region[axis] = slice(int(start), int(stop))
    return tuple(region)


def pad_region(region, pad, shape):
    """Grow ``region`` by ``pad`` voxels per axis (clipped).

    Returns ``(padded, inner)``: the grown region in array coordinates and the
    original region relative to ``padded``.
    """
    pad = np.broadcast_to(np.asarray(pad, dtype=int), (3,))
    padded, inner = [], []
    for sl, p, n in zip(region, pad, shape):
        a, b = max(sl.start - int(p), 0), min(sl.stop + int(p), int(n))
        padded.append(slice(a, b))
        inner.append(slice(sl.start - a, sl.stop - a))
    return tuple(padded), tuple(inner)


def ellipsoid(radius_mm: float, spacing) -> np.ndarray:
    """Boolean ellipsoidal structuring element of physical radius ``radius_mm``.

    Parameters
    ----------
    radius_mm : float
        Radius in mm (the same in every direction in physical space).
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.

    Returns
    -------
    numpy.ndarray of bool
        Odd-sized ``(2 rz + 1, 2 ry + 1, 2 rx + 1)`` footprint with
        ``r = floor(radius_mm / spacing)`` per axis; the centre is always set.

    Examples
    --------
    >>> ellipsoid(2.0, (2.0, 1.0, 1.0)).shape
    (3, 5, 5)
    """
    spacing = np.asarray(spacing, dtype=float)
    half = np.floor(float(radius_mm) / spacing + 1e-9).astype(int)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    d2 = sum((g * s) ** 2 for g, s in zip(grids, spacing))
    return d2 <= float(radius_mm) ** 2 + 1e-9


@dataclass
class Edit:
    """The result of a correction: new label values for one box of the array.

    Attributes
    ----------
    region : tuple of 3 slices
        Tight bounding box (array coordinates) of the voxels that change; an
        empty box (zero size) when nothing changes.
    values : numpy.ndarray
        New labels for ``labels[region]`` (same dtype as the labels).
    info : dict
        Extra results of the operation (e.g. ``new_labels`` of a split).
    """

    region: tuple
    values: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when the edit changes nothing."""
        return self.values.size == 0

    def changes(self, labels):
        """``(indices, new_values)`` of the voxels that differ from ``labels``.

        ``indices`` is a tuple of three index arrays (the smallest unsigned
        dtype that holds the shape), ready for ``Labels.data_setitem``.
        """
        if self.empty:
            return tuple(np.zeros(0, np.intp) for _ in range(3)), self.values.ravel()
        old = np.asarray(labels[self.region])
        mask = old != self.values
        dtype = np.uint16 if max(np.shape(labels)) < 2 ** 16 else np.uint32
        idx = tuple((ix + sl.start).astype(dtype) for ix, sl in
                    zip(np.nonzero(mask), self.region))
        return idx, self.values[mask]

    def apply(self, labels) -> np.ndarray:
        """Write the edit into ``labels`` in place and return it."""
        if not self.empty:
            labels[self.region] = self.values
        return labels

    def result(self, labels) -> np.ndarray:
        """A new array: a copy of ``labels`` with the edit applied."""
        return self.apply(np.array(labels, copy=True))


def make_edit(labels, region, new_values, **info) -> Edit:
    """Build an :class:`Edit` from new values for ``labels[region]``, shrunk to the changes."""
    old = labels[region]
    new_values = np.asarray(new_values).astype(labels.dtype, copy=False)
    diff = old != new_values
    if not diff.any():
        empty = tuple(slice(sl.start, sl.start) for sl in region)
        return Edit(empty, np.zeros((0, 0, 0), labels.dtype), dict(info))
    box = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(diff.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    box = tuple(box)
    absolute = tuple(slice(r.start + b.start, r.start + b.stop) for r, b in zip(region, box))
    return Edit(absolute, np.array(new_values[box], copy=True), dict(info))


def label_ids(labels, label) -> list[int]:
    """``[label]``, or every non-zero id present in ``labels`` when ``label`` is None."""
    if label is None:
        return [int(v) for v in np.unique(labels) if v != 0]
    return [int(label)]


def check_label_value(labels, value) -> int:
    """``value`` as an int that fits in ``labels``' dtype (MedSegError otherwise)."""
    value = int(value)
    info = np.iinfo(labels.dtype)
    if not info.min <= value <= info.max:
        raise MedSegError(f"label {value} does not fit in {labels.dtype} labels; convert "
                          "the layer to a larger integer type first")
    return value


class Progress:
    """Report ``done / total`` steps and check for cancellation between them."""

    def __init__(self, total: int, progress=None, cancel=None):
        self.total = max(int(total), 1)
        self.done = 0
        self._progress = progress
        self._cancel = cancel
        self.step(0)

    def step(self, n: int = 1) -> None:
        check_cancel(self._cancel)
        self.done += n
        if self._progress is not None:
            self._progress(min(self.done, self.total), self.total)
