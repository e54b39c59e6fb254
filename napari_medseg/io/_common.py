"""Checks and helpers shared by the format modules: shapes, label dtypes, names."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import MedSegError

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_NAME_RE",
    "looks_like_label_name",
    "strip_ext",
    "check_spatial",
    "label_dtype",
    "prepare_label_data",
    "is_integer_valued",
]

#: File names that mark a label map: ``*_seg*``, ``*label*``, ``*mask*``, ``*.seg.nrrd``.
LABEL_NAME_RE = re.compile(r"(_seg|\.seg\.|label|mask|segmentation|annotation)", re.I)

_MULTI_EXT = (".nii.gz", ".seg.nrrd", ".ome.tiff", ".ome.tif")


def strip_ext(name: str) -> str:
    """File name without its (possibly double) extension: ``ct.nii.gz`` -> ``ct``."""
    low = name.lower()
    for ext in _MULTI_EXT:
        if low.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem if Path(name).suffix else name


def looks_like_label_name(path) -> bool:
    """True when the file name marks a label map (``liver_seg.nii.gz``, ``mask.tif``)."""
    return bool(LABEL_NAME_RE.search(Path(path).name))


def check_spatial(shape, path, rgb: bool = False) -> None:
    """Refuse anything that is not a 3D volume or a 4D multi-channel volume.

    Parameters
    ----------
    shape : tuple of int
        Array shape in ``(Z, Y, X)`` / ``(C, Z, Y, X)`` order.
    path : str or Path
        The file, for the message.
    rgb : bool
        True when the file stores colour pixels (RGB / RGBA).

    Raises
    ------
    MedSegError
        For 2D images, RGB images, 5D+ arrays or empty arrays.
    """
    shape = tuple(int(s) for s in shape)
    if 0 in shape:
        raise MedSegError(f"holds an empty array (shape {shape})", str(path))
    if rgb:
        raise MedSegError(
            f"holds RGB colour pixels (shape {shape}); napari-medseg needs a greyscale "
            "3D volume; convert it to a single-channel stack first", str(path))
    if len(shape) > 4:
        raise MedSegError(
            f"has {len(shape)} dimensions (shape {shape}); only 3D volumes or 4D "
            "multi-channel volumes are supported; split it into 3D files first", str(path))
    spatial = shape[-3:] if len(shape) <= 4 else shape
    if len(shape) < 3 or min(spatial) == 1:
        raise MedSegError(
            f"is a 2D image (shape {shape}); napari-medseg needs a 3D volume (Z, Y, X); "
            "open it with napari's built-in reader instead", str(path))


def is_integer_valued(data) -> bool:
    """True when ``data`` has an integer dtype or float values that are all whole."""
    data = np.asarray(data)
    if data.dtype.kind in "iub":
        return True
    if data.dtype.kind != "f":
        return False
    finite = np.isfinite(data)
    return bool(finite.all() and np.array_equal(data, np.round(data)))


def label_dtype(data) -> np.dtype:
    """Smallest integer dtype holding every value of a label array.

    Unsigned when there are no negative values (``uint8`` up to 255, ``uint16``
    up to 65535, ...), signed otherwise.
    """
    data = np.asarray(data)
    if data.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(data.min()), int(data.max())
    candidates = (np.uint8, np.uint16, np.uint32) if lo >= 0 else (np.int8, np.int16, np.int32)
    for dt in candidates:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def prepare_label_data(vol, path) -> np.ndarray:
    """The label array of ``vol`` as a ``(Z, Y, X)`` array in its smallest integer dtype.

    Raises
    ------
    MedSegError
        When the data is not 3D or holds non-integer values.
    """
    data = np.asarray(vol.data)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise MedSegError(f"labels must be a 3D array (Z, Y, X), got shape {data.shape}",
                          str(path))
    if not is_integer_valued(data):
        raise MedSegError(
            f"labels hold non-integer values (dtype {data.dtype}); labels must be whole "
            "class ids; round or threshold them before saving", str(path))
    return data.astype(label_dtype(data), copy=False)
