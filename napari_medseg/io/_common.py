"""Checks and helpers shared by the format modules: shapes, label dtypes, names.

Every reader validates a file's header with the ``check_*`` helpers here
*before* it allocates memory or parses further, so that a hostile or corrupt
file ends in one :class:`~napari_medseg.errors.MedSegError` line naming the file
and what to do, never in a crash, a hang, a huge allocation or silently wrong
geometry:

* :func:`check_size` - the voxel count a header claims against the bytes the
  file really holds (no absolute cap: lazy readers still open volumes bigger
  than RAM);
* :func:`check_geometry` - a finite, invertible affine with voxel sizes in
  :data:`SPACING_RANGE_MM`;
* :func:`check_dtype` - a numeric data type;
* :func:`guarded` - turns any other exception of a reader into one such line.
"""

from __future__ import annotations

import contextlib
import logging
import math
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
    "SPACING_RANGE_MM",
    "MAX_COMPRESSION_RATIO",
    "DEFLATE_MAX_RATIO",
    "one_line",
    "check_size",
    "check_geometry",
    "check_dtype",
    "guarded",
    "file_size",
]

#: Plausible voxel sizes in mm (0.1 µm to 1 m): microscopy in mm passes, 1e30 does not.
SPACING_RANGE_MM = (1e-4, 1e3)

#: The most a deflate (gzip / zlib) stream can expand: about 1032:1, plus headers.
#: A ``.nii.gz``, gzip NRRD or compressed MetaImage whose header promises more
#: voxels than ``compressed bytes * ratio`` lies about its size.
DEFLATE_MAX_RATIO = 1100
#: The bound for other codecs (bzip2, zstd, LZMA, ... expand all-zero data far
#: more than deflate: 10^4 to 10^5 : 1 measured), still refusing absurd claims.
MAX_COMPRESSION_RATIO = 1_000_000


def one_line(text, limit: int = 240) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_size(path) -> int:
    """Size of ``path`` in bytes (0 when it cannot be read)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def check_size(shape, dtype, available_bytes, path, compressed: bool = False,
               what: str = "the header", ratio: float | None = None) -> int:
    """Check that a header's array size fits the bytes the file holds.

    Parameters
    ----------
    shape : sequence of int
        Array shape the header claims (any order).
    dtype : numpy dtype or int
        Element type, or the item size in bytes.
    available_bytes : int
        Bytes of voxel data in the file: the file size minus the header for
        raw data, the compressed stream's size for compressed data.
    path : str or Path
        The file, for the message.
    compressed : bool
        The data is compressed: it may expand up to ``ratio`` times.
    what : str
        What makes the claim, for the message.
    ratio : float, optional
        The most the codec can expand (:data:`DEFLATE_MAX_RATIO` for gzip /
        zlib); default :data:`MAX_COMPRESSION_RATIO`.

    Returns
    -------
    int
        The uncompressed size in bytes.

    Raises
    ------
    MedSegError
        Negative or non-integer sizes, or more voxels than the file can hold.

    Examples
    --------
    >>> check_size((2, 3, 4), "int16", 48, "a.nii")
    48
    """
    dims = []
    for s in shape:
        try:
            v = int(s)
        except (TypeError, ValueError, OverflowError):
            raise MedSegError(f"{what} gives a size that is not a whole number ({s!r}); "
                              "the file is corrupt", str(path)) from None
        if v != s and not (isinstance(s, float) and s == v):
            raise MedSegError(f"{what} gives a size that is not a whole number ({s!r}); "
                              "the file is corrupt", str(path))
        if v < 0:
            raise MedSegError(f"{what} gives a negative size ({v}); the file is corrupt",
                              str(path))
        dims.append(v)
    itemsize = dtype if isinstance(dtype, int) else np.dtype(dtype).itemsize
    need = math.prod(dims) * int(itemsize)  # Python ints: no overflow
    available = max(int(available_bytes), 0)
    ratio = MAX_COMPRESSION_RATIO if ratio is None else ratio
    limit = int(available * ratio) + 4096 if compressed else available
    if need > limit:
        shown = " x ".join(str(d) for d in dims)
        if compressed:
            raise MedSegError(
                f"{what} claims {shown} voxels ({_bytes(need)}), more than its "
                f"{_bytes(available)} of compressed data can hold; the file is corrupt or "
                "not what its header says", str(path))
        raise MedSegError(
            f"is truncated or its header is wrong: {what} claims {shown} voxels "
            f"({_bytes(need)}) but the file holds {_bytes(available)} of voxel data; "
            "get an intact copy of the file", str(path))
    return need


def _bytes(n: int) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n} bytes"


def check_geometry(affine, path, spacing=None) -> np.ndarray:
    """Check a voxel-to-world affine (and optional stated voxel sizes); return it as floats.

    Parameters
    ----------
    affine : (4, 4) array_like
        Voxel-to-world map (mm).
    path : str or Path
        The file, for the message.
    spacing : sequence of float, optional
        Voxel sizes the header states separately (mm); checked like the
        affine's column norms.

    Returns
    -------
    (4, 4) ndarray of float64

    Raises
    ------
    MedSegError
        A non-finite or singular affine, or a voxel size outside
        :data:`SPACING_RANGE_MM`.

    Examples
    --------
    >>> float(check_geometry(np.diag([0.5, 0.5, 2.0, 1.0]), "a.nii")[2, 2])
    2.0
    """
    try:
        aff = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise MedSegError("has an unreadable orientation / spacing; the file is corrupt",
                          str(path)) from None
    if aff.shape != (4, 4):
        raise MedSegError(f"has an affine of shape {aff.shape}, not 4 x 4; the file is "
                          "corrupt", str(path))
    if not np.all(np.isfinite(aff)):
        raise MedSegError("has a non-finite (NaN or infinite) orientation, spacing or "
                          "origin; the file is corrupt; fix its header", str(path))
    lo, hi = SPACING_RANGE_MM
    norms = np.linalg.norm(aff[:3, :3], axis=0)
    sizes = [float(s) for s in norms]
    if spacing is not None:
        try:
            given = [abs(float(s)) for s in spacing]
        except (TypeError, ValueError, OverflowError):
            raise MedSegError("has an unreadable voxel size; the file is corrupt",
                              str(path)) from None
        if not all(math.isfinite(g) for g in given):
            raise MedSegError("has a non-finite voxel size; the file is corrupt", str(path))
        sizes += given
    bad = [s for s in sizes if not lo <= s <= hi]
    if bad:
        raise MedSegError(
            f"has an implausible voxel size ({bad[0]:.3g} mm; expected {lo:g} to {hi:g} mm); "
            "the header is corrupt or not in mm; fix its spacing", str(path))
    m = aff[:3, :3] / norms  # unit columns: the orientation alone
    det = float(np.linalg.det(m))
    if not abs(det) > 1e-6:
        raise MedSegError("has a singular orientation (two axes point the same way); the "
                          "header is corrupt; fix its direction / orientation fields",
                          str(path))
    if not np.all(np.abs(aff[:3, 3]) < 1e9):
        raise MedSegError(f"has an implausible origin ({aff[:3, 3].tolist()} mm); the header "
                          "is corrupt", str(path))
    return aff


def check_dtype(dtype, path) -> np.dtype:
    """A numeric numpy dtype (bool, integer or float), else :class:`MedSegError`."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise MedSegError(f"has an unknown voxel data type ({dtype!r}); the file is corrupt "
                          "or uses a type napari-medseg does not read", str(path)) from None
    if dt.names is not None or dt.kind not in "biuf" or dt.itemsize == 0:
        raise MedSegError(f"has voxel data type {dt} that napari-medseg does not read; "
                          "convert it to an integer or float image", str(path))
    return dt


@contextlib.contextmanager
def guarded(path, what: str = "read"):
    """Turn any exception raised inside into one :class:`MedSegError` line about ``path``.

    A :class:`MedSegError` passes through (collapsed onto one line); a
    :class:`MemoryError` says how to proceed; anything else (a parser's
    ``KeyError``, ``zlib.error``, ...) says the file is corrupt.
    """
    try:
        yield
    except MedSegError as exc:
        text = str(exc)
        if "\n" in text or "\r" in text:
            raise MedSegError(one_line(text), getattr(exc, "source", None)) from exc
        raise
    except MemoryError as exc:
        raise MedSegError(f"not enough memory to {what} it; close other volumes or open it "
                          "lazily", str(path)) from exc
    except Exception as exc:  # noqa: BLE001 - parsers raise anything on hostile input
        detail = one_line(f"{type(exc).__name__}: {exc}", 160)
        raise MedSegError(f"could not be {what} ({detail}); the file is corrupt or not "
                          "what its name says; get an intact copy", str(path)) from exc


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
