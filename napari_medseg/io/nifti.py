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
from ._common import check_spatial, label_dtype, looks_like_label_name, prepare_label_data, \
    strip_ext

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
    except Exception as exc:  # nibabel raises many types for bad headers
        raise MedSegError(f"is not a readable NIfTI file ({exc}); the file may be "
                          "truncated or corrupt", str(path)) from exc


def read_nifti_header(path):
    """``(shape in file order, RAS affine, on-disk dtype)`` without reading voxels."""
    img = _load(path)
    return tuple(img.shape), np.asarray(img.header.get_best_affine(), float), \
        img.header.get_data_dtype()


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


def _guess_label(img, path: Path) -> bool:
    hdr = img.header
    dtype = hdr.get_data_dtype()
    slope, inter = hdr.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    if dtype.kind not in "iu" or scaled:
        return False
    if int(hdr["intent_code"]) == _INTENT_LABEL:
        return True
    if looks_like_label_name(path) or _LABEL_DIR_RE.match(path.parent.name):
        return True
    small = dtype.itemsize == 1 or dtype == np.dtype(np.uint16)
    return small and _sibling_is_image(path, img.shape)


def _data(img, path: Path, lazy: bool):
    """The voxel array in file order ``(i, j, k[, c])``, lazily where possible."""
    proxy = img.dataobj
    compressed = str(path).lower().endswith(".gz")
    if lazy and not compressed:
        arr = np.asanyarray(proxy) if getattr(proxy, "is_proxy", False) else proxy
        if isinstance(arr, np.memmap):
            return arr
        if getattr(proxy, "is_proxy", False):  # scaled data: read chunk by chunk
            import dask.array as da

            chunks = tuple(img.shape[:2]) + (max(1, min(img.shape[2], 16)),) + \
                tuple(img.shape[3:])
            return da.from_array(proxy, chunks=chunks, asarray=True)
        return np.asanyarray(arr)
    try:
        return np.asanyarray(proxy)
    except Exception as exc:
        raise MedSegError(f"could not read the voxel data ({exc}); the file may be "
                          "truncated or corrupt", str(path)) from exc


def read_nifti(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read a NIfTI file as a Volume.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.
    lazy : bool
        Memory-map uncompressed files instead of reading them (gzip files are
        always read whole: they cannot be memory-mapped).
    is_label : bool, optional
        Force (or forbid) a label map; by default integer files named like
        labels (``*_seg*``, ``*label*``, ``*mask*``), with the NIfTI label intent,
        or lying beside an image of the same shape are labels.

    Returns
    -------
    Volume
        ``data`` is ``(Z, Y, X)`` (or ``(C, Z, Y, X)`` for 4D files).
    """
    path = Path(path)
    img = _load(path)
    shape = tuple(img.shape)
    dtype = img.header.get_data_dtype()
    if dtype.names is not None or dtype.kind == "V":
        check_spatial(shape[::-1] + (3,), path, rgb=True)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    check_spatial(shape[::-1], path)
    if len(shape) == 3 and shape[2] == 1:
        check_spatial(shape[:2], path)
    data = _data(img, path, lazy)
    if data.ndim != len(shape):
        data = data.reshape(shape)
    if tuple(data.shape) != shape:
        raise MedSegError(f"voxel data of shape {data.shape} does not match the header "
                          f"{shape}; the file is corrupt", str(path))
    data = data.T  # (i, j, k[, c]) -> ([c,] k, j, i): a view
    label = _guess_label(img, path) if is_label is None else bool(is_label)
    if label and data.ndim == 4:
        label = False
    if label and data.dtype.kind == "f":
        data = np.asarray(data)
        data = data.astype(label_dtype(data))
    hdr = img.header
    return Volume(
        data=data,
        affine=np.asarray(hdr.get_best_affine(), dtype=float),
        modality="unknown",
        is_label=label,
        source=str(path),
        meta={
            "format": "nifti",
            "nifti_qform_code": int(hdr["qform_code"]),
            "nifti_sform_code": int(hdr["sform_code"]),
            "file_dtype": str(dtype),
        },
    )


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
