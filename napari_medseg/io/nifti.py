"""NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``) through nibabel.

The file affine already is the RAS voxel-to-world map our Volume uses
(nibabel's ``get_best_affine``: sform when set, else qform). The array is
stored fastest-axis-first ``(i, j, k)``; transposing gives ``(Z, Y, X)`` as a
view, so an uncompressed file stays memory-mapped.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..core.volume import Volume
from ..errors import MedSegError
from ._common import (
    DEFLATE_MAX_RATIO, check_dtype, check_geometry, check_size, check_spatial, file_size,
    guarded, label_dtype, looks_like_label_name, one_line, prepare_label_data, strip_ext)

log = logging.getLogger(__name__)

__all__ = ["read_nifti", "write_nifti", "is_nifti", "read_nifti_header"]

_INTENT_LABEL = 1002  # NIFTI_INTENT_LABEL
#: Folders that hold label maps (nnU-Net ``labelsTr``, ``masks``, ``segmentations``).
_LABEL_DIR_RE = re.compile(r"^(labels\w*|masks?|segmentations?)$", re.I)


def is_nifti(path) -> bool:
    """True for ``.nii`` / ``.nii.gz`` names."""
    low = str(path).lower()
    return low.endswith(".nii") or low.endswith(".nii.gz")


def _load(path):
    import nibabel as nib

    try:
        return nib.load(str(path), mmap=True)
    except FileNotFoundError:
        raise MedSegError("file not found", str(path)) from None
    except MemoryError as exc:
        raise MedSegError("has a NIfTI header too large to read; the file is corrupt",
                          str(path)) from exc
    except Exception as exc:  # nibabel raises many types for bad headers
        raise MedSegError(f"is not a readable NIfTI file ({one_line(exc, 120)}); the file "
                          "may be truncated or corrupt", str(path)) from exc


def read_nifti_header(path):
    """``(shape in file order, RAS affine, on-disk dtype)`` without reading voxels.

    The affine is checked (finite, invertible, plausible voxel sizes).
    """
    img = _load(path)
    with guarded(path):
        affine = check_geometry(img.header.get_best_affine(), path)
        return tuple(int(n) for n in img.shape), affine, img.header.get_data_dtype()


def _sibling_is_image(path: Path, shape) -> bool:
    """True when another NIfTI of the same grid shape, not itself a label file, sits beside."""
    stem = strip_ext(path.name)
    for other in path.parent.iterdir():
        if other == path or not is_nifti(other) or looks_like_label_name(other):
            continue
        ostem = strip_ext(other.name)
        if not (ostem.startswith(stem) or stem.startswith(ostem)):
            continue
        try:
            oshape, _, odtype = read_nifti_header(other)
        except MedSegError:
            continue
        if tuple(oshape[:3]) == tuple(shape[:3]) and odtype != np.dtype(np.uint8):
            return True
    return False


def _scaling(img, path: Path) -> tuple[float, float]:
    """``(slope, intercept)`` the voxels are read with (``(1, 0)`` when unscaled).

    nibabel moves ``scl_slope`` / ``scl_inter`` from the header into the data
    proxy when it loads a file (the header then says NaN), so the proxy is asked.
    """
    proxy = img.dataobj
    slope = float(getattr(proxy, "slope", 1.0) if getattr(proxy, "slope", None) is not None
                  else 1.0)
    inter = float(getattr(proxy, "inter", 0.0) if getattr(proxy, "inter", None) is not None
                  else 0.0)
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise MedSegError(f"has a non-finite intensity scaling (scl_slope {slope}, scl_inter "
                          f"{inter}); the header is corrupt; fix or clear scl_slope", str(path))
    return slope, inter


def _guess_label(img, path: Path) -> bool:
    """True when the file is a label candidate: an integer file on disk with the
    label intent, a label-like name or folder, or an image of the same grid beside it.

    Scaling does not decide: the scaled values do (see :func:`_as_labels`).
    """
    hdr = img.header
    dtype = hdr.get_data_dtype()
    if dtype.kind not in "iu":
        return False
    if int(hdr["intent_code"]) == _INTENT_LABEL:
        return True
    if looks_like_label_name(path) or _LABEL_DIR_RE.match(path.parent.name):
        return True
    small = dtype.itemsize == 1 or dtype == np.dtype(np.uint16)
    return small and _sibling_is_image(path, img.shape)


#: Scaled or float voxel values this close to whole numbers are label ids.
_WHOLE_TOL = 1e-3


def _as_labels(data, path: Path, forced: bool):
    """``(label array, None)`` for whole-valued data, else ``(None, note)``.

    Integer data is kept. Float data (a float file, or an integer file with a
    scale factor, e.g. a 0/1 mask stored as int32 with ``scl_slope``) becomes
    labels when its *scaled* values are all within 1e-3 of whole numbers; they
    are rounded to the nearest id (never truncated: 0.99999997 is 1). Other
    values make a guessed label file open as an image instead; when labels were
    asked for (``forced``) they are rounded to the nearest id with a warning.
    """
    if data.dtype.kind in "iub":
        return data, None
    arr = np.asarray(data)
    finite = np.isfinite(arr)
    rounded = np.rint(np.where(finite, arr, 0))
    off = int(np.count_nonzero(np.abs(np.where(finite, arr, 0) - rounded) > _WHOLE_TOL))
    off += int(arr.size - np.count_nonzero(finite))
    if off and not forced:
        return None, (f"{path}: named like a label map but {off} voxels are not whole "
                      "numbers once scaled; opened as an image")
    note = None
    if off:
        note = (f"{path}: {off} voxels are not whole numbers; rounded to the nearest label "
                "id (non-finite values to 0)")
    return rounded.astype(label_dtype(rounded)), note


def _read_gz(path: Path, shape, dtype: np.dtype, offset: int) -> np.ndarray:
    """Decompress a ``.nii.gz`` whole with the gzip CRC and length checked.

    nibabel does not verify the gzip CRC, so a flipped bit in the compressed
    stream could silently change voxels; Python's :mod:`gzip` checks both at
    the end of the stream, which is read to its end here.
    """
    import gzip
    import zlib

    count = int(np.prod(shape, dtype=object))
    need = offset + count * dtype.itemsize
    buf = bytearray(need)
    view = memoryview(buf)
    got = 0
    try:
        with gzip.open(path, "rb") as gz:
            while got < need:
                n = gz.readinto(view[got:])
                if not n:
                    break
                got += n
            if got == need:
                while gz.read(1 << 20):  # to the end: gzip checks CRC and length there
                    pass
    except (OSError, EOFError, zlib.error) as exc:
        raise MedSegError(f"has corrupt compressed data ({one_line(exc, 100)}); the gzip "
                          "check failed, so its voxels cannot be trusted; get an intact copy",
                          str(path)) from exc
    finally:
        view.release()
    if got < need:
        raise MedSegError(f"is truncated: {got} of {need} bytes of voxel data after "
                          "decompression; get an intact copy", str(path))
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(
        shape, order="F")


def _data(img, path: Path, lazy: bool, dtype: np.dtype, slope: float, inter: float):
    """The voxel array in file order ``(i, j, k[, c])``, lazily where possible."""
    from nibabel.volumeutils import apply_read_scaling

    proxy = img.dataobj
    shape = tuple(int(n) for n in img.shape)
    scaled = (slope, inter) != (1.0, 0.0)
    if str(path).lower().endswith(".gz"):
        raw = _read_gz(path, shape, dtype, int(proxy.offset))
        return apply_read_scaling(raw, slope, inter) if scaled else raw
    if lazy:
        arr = np.asanyarray(proxy) if not scaled else None
        if isinstance(arr, np.memmap):
            return arr
        if scaled:  # scaled data: read chunk by chunk
            import dask.array as da

            chunks = tuple(shape[:2]) + (max(1, min(shape[2], 16)),) + tuple(shape[3:])
            return da.from_array(_GuardedProxy(proxy, path), chunks=chunks, asarray=True)
        return np.asanyarray(arr)
    return np.asanyarray(proxy)


class _GuardedProxy:
    """A nibabel proxy whose reads raise one-line :class:`MedSegError` (for dask)."""

    def __init__(self, proxy, path):
        self.proxy, self.path = proxy, path
        self.shape, self.ndim = proxy.shape, proxy.ndim
        self.dtype = np.asanyarray(proxy[(slice(0, 1),) * proxy.ndim]).dtype

    def __getitem__(self, key):
        with guarded(self.path):
            return np.asanyarray(self.proxy[key])


def read_nifti(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read a NIfTI file as a Volume.

    The header is checked before any voxel is read: the voxel count against the
    file's size, a numeric data type, a finite invertible affine with voxel
    sizes in 1e-4..1e3 mm, a finite intensity scaling. ``.nii.gz`` data is
    decompressed with the gzip CRC verified.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.
    lazy : bool
        Memory-map uncompressed files instead of reading them (gzip files are
        always read whole: they cannot be memory-mapped).
    is_label : bool, optional
        Force (or forbid) a label map. By default integer files (on disk) named
        like labels (``*_seg*``, ``*label*``, ``*mask*``), with the NIfTI label
        intent, or lying beside an image of the same shape are labels, provided
        their values (after ``scl_slope`` / ``scl_inter``) are whole numbers
        within 1e-3 (rounded to the nearest id); otherwise they open as images.
        Forced labels are rounded to the nearest id.

    Returns
    -------
    Volume
        ``data`` is ``(Z, Y, X)`` (or ``(C, Z, Y, X)`` for 4D files).

    Raises
    ------
    MedSegError
        One line naming the file, for any corrupt, truncated or implausible file.
    """
    path = Path(path)
    img = _load(path)
    with guarded(path):
        return _read(img, path, lazy, is_label)


def _read(img, path: Path, lazy: bool, is_label) -> Volume:
    hdr = img.header
    dtype = hdr.get_data_dtype()
    shape = tuple(int(n) for n in img.shape)
    if dtype.names is not None or dtype.kind == "V":
        check_spatial(shape[::-1] + (3,), path, rgb=True)
    dtype = check_dtype(dtype, path)
    affine = check_geometry(hdr.get_best_affine(), path)
    size = file_size(path)
    if str(path).lower().endswith(".gz"):
        check_size(shape, dtype, size, path, compressed=True, what="the NIfTI header",
                   ratio=DEFLATE_MAX_RATIO)
    else:
        offset = int(img.dataobj.offset)
        check_size(shape, dtype, size - offset, path, what="the NIfTI header")
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    check_spatial(squeezed[::-1], path)
    if len(squeezed) == 3 and squeezed[2] == 1:
        check_spatial(squeezed[:2], path)
    slope, inter = _scaling(img, path)
    data = _data(img, path, lazy, dtype, slope, inter)
    if data.ndim != len(squeezed):
        data = data.reshape(squeezed)
    if tuple(data.shape) != squeezed:
        raise MedSegError(f"voxel data of shape {data.shape} does not match the header "
                          f"{squeezed}; the file is corrupt", str(path))
    data = data.T  # (i, j, k[, c]) -> ([c,] k, j, i): a view
    forced = is_label is not None
    label = _guess_label(img, path) if is_label is None else bool(is_label)
    notes = []
    if label and data.ndim == 4:
        label = False
    if label:
        as_labels, note = _as_labels(data, path, forced)
        if note:
            log.warning("%s", note)
            notes.append(note)
        label = as_labels is not None
        if label:
            data = as_labels
    meta = {
        "format": "nifti",
        "nifti_qform_code": int(hdr["qform_code"]),
        "nifti_sform_code": int(hdr["sform_code"]),
        "file_dtype": str(dtype),
    }
    if notes:
        meta["warnings"] = notes
    return Volume(data=data, affine=affine, modality="unknown", is_label=label,
                  source=str(path), meta=meta)


def write_nifti(tmp_path, vol: Volume, final_path, as_label: bool) -> None:
    """Write ``vol`` to ``tmp_path`` as NIfTI-1 with both qform and sform set.

    The qform / sform codes of the source file are kept when known (default:
    qform 1 "scanner", sform 2 "aligned", as nibabel does for the sform).
    Label maps are stored in their smallest integer dtype with the NIfTI label
    intent.
    """
    import nibabel as nib

    if as_label:
        data = prepare_label_data(vol, final_path)
    else:
        data = np.asarray(vol.data)
    img = nib.Nifti1Image(data.T, vol.affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm", "sec")
    qcode = int(vol.meta.get("nifti_qform_code") or 1)
    scode = int(vol.meta.get("nifti_sform_code") or 2)
    img.set_qform(vol.affine, code=qcode)
    img.set_sform(vol.affine, code=scode)
    if as_label:
        hdr.set_intent("label")
        hdr["cal_min"], hdr["cal_max"] = 0, float(data.max()) if data.size else 0
    nib.save(img, str(tmp_path))
