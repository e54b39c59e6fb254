"""Read and write medical volumes with their exact geometry.

>>> from napari_medseg.io import read_volume, write_labels  # doctest: +SKIP
>>> vol = read_volume("ct.nii.gz")                          # doctest: +SKIP
>>> write_labels("ct_seg.nii.gz", vol.like_labels(mask))    # doctest: +SKIP

Formats are chosen by extension (or, for folders, DICOM): NIfTI ``.nii`` /
``.nii.gz``, NRRD ``.nrrd`` / ``.nhdr`` / ``.seg.nrrd``, MetaImage ``.mha`` /
``.mhd``, TIFF / OME-TIFF ``.tif`` / ``.tiff`` and DICOM series (a folder, or
one ``.dcm`` file standing for its series). Every reader returns a
:class:`~napari_medseg.core.volume.Volume` (``(Z, Y, X)`` data, RAS affine);
every writer is atomic, refuses to overwrite unless asked and re-reads the file
to check its geometry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..core.volume import Volume
from ..errors import MedSegError
from ._common import check_geometry, guarded
from .atomic import atomic_path, check_writable

log = logging.getLogger(__name__)

__all__ = [
    "read_volume",
    "read_volumes",
    "write_labels",
    "write_volume",
    "format_of",
    "geometry",
    "READ_EXTENSIONS",
    "WRITE_EXTENSIONS",
]

READ_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".seg.nrrd", ".mha", ".mhd",
                   ".tif", ".tiff", ".dcm", ".zarr")
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd", ".tif", ".tiff")


def format_of(path) -> str | None:
    """The format name for ``path`` (``"nifti"``, ``"nrrd"``, ``"itk"``, ``"tiff"``,
    ``"dicom"``), or None when napari-medseg does not read it.

    Folders are ``"dicom"`` when they hold DICOM files; files without a known
    extension are ``"dicom"`` when they carry the DICOM preamble.
    """
    p = Path(path)
    low = p.name.lower()
    if low.endswith((".nii", ".nii.gz")):
        return "nifti"
    if low.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if low.endswith((".mha", ".mhd")):
        return "itk"
    if low.endswith((".tif", ".tiff")):
        return "tiff"
    from .zarr import is_zarr

    if is_zarr(p):  # OME-Zarr / Zarr store (a folder), read lazily
        return "zarr"
    from .dicom import is_dicom_file, looks_like_dicom_folder

    if p.is_dir():
        return "dicom" if looks_like_dicom_folder(p) else None
    if low.endswith(".dcm") or (p.is_file() and "." not in low and is_dicom_file(p)):
        return "dicom"
    return None


def _reader(fmt):
    if fmt == "nifti":
        from .nifti import read_nifti as fn
    elif fmt == "nrrd":
        from .nrrd import read_nrrd as fn
    elif fmt == "itk":
        from .itk import read_itk as fn
    elif fmt == "tiff":
        from .tiff import read_tiff as fn
    elif fmt == "zarr":
        from .zarr import read_zarr as fn
    else:
        from .dicom import read_dicom as fn
    return fn


def read_volume(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read one volume (image or label map) with its geometry.

    Parameters
    ----------
    path : str or Path
        A file, or a folder holding a DICOM series (when it holds several, the
        one with the most slices is read and a warning names the others).
    lazy : bool
        Memory-map or wrap in dask where the format allows (uncompressed NIfTI,
        TIFF, raw NRRD), so large volumes open in about a second.
    is_label : bool, optional
        Force the result to be (or not be) a label map; by default the reader
        decides from the file name (``*_seg*``, ``*label*``, ``*mask*``,
        ``.seg.nrrd``) and contents.

    Returns
    -------
    Volume
        ``data`` is ``(Z, Y, X)`` or ``(C, Z, Y, X)``; ``affine`` maps voxels to
        RAS mm.

    Raises
    ------
    MedSegError
        When the path is missing, of an unknown type, corrupt, 2D, RGB or 5D:
        always one line naming the file and what to do. Every reader checks the
        header before it allocates (sizes against the file's length, a finite
        invertible affine, voxel sizes in 1e-4..1e3 mm, a known data type), so
        hostile files neither crash nor exhaust memory; data read later (dask)
        raises the same one-line error.
    """
    path = Path(path)
    if not path.exists():
        raise MedSegError("file or folder not found; check the path", str(path))
    fmt = format_of(path)
    if fmt is None:
        raise MedSegError(
            "is not a format napari-medseg reads (NIfTI, NRRD, MHA/MHD, TIFF, DICOM)",
            str(path))
    if fmt == "dicom":
        from .dicom import read_dicom

        if path.is_file():
            from .dicom_objects import dicom_object_kind

            kind = dicom_object_kind(path)
            if kind is not None:
                raise MedSegError(
                    f"is a DICOM {kind}, not an image; open it in napari (it becomes a "
                    "Labels layer) or read it with napari_medseg.io.dicom_objects."
                    "read_dicom_object", str(path))
        with guarded(path):
            vol = read_dicom(path, lazy=lazy)
        if is_label is not None:
            vol.is_label = bool(is_label)
        return vol
    with guarded(path):
        vol = _reader(fmt)(path, lazy=lazy, is_label=is_label)
        check_geometry(vol.affine, path)  # every reader, new ones included
    if fmt == "nifti" and vol.is_label and not vol.label_names:
        from .sidecar import read_label_sidecar

        vol.label_names, vol.label_colors = read_label_sidecar(path)
    log.info("read %s", vol)
    return vol


def read_volumes(path, lazy: bool = True) -> list[Volume]:
    """Read every volume at ``path``: each DICOM series of a folder, else one volume."""
    path = Path(path)
    if path.is_dir() and format_of(path) == "dicom":
        from .dicom import read_dicom_series

        with guarded(path):
            return read_dicom_series(path, lazy=lazy)
    return [read_volume(path, lazy=lazy)]


def _writer(path: Path):
    low = path.name.lower()
    fmt = format_of(path) if low.endswith(WRITE_EXTENSIONS) else None
    if fmt == "nifti":
        from .nifti import write_nifti as fn
    elif fmt == "nrrd":
        from .nrrd import write_nrrd as fn
    elif fmt == "itk":
        from .itk import write_itk as fn
    elif fmt == "tiff":
        from .tiff import write_tiff as fn
    else:
        raise MedSegError(
            "cannot be written: use one of " + ", ".join(WRITE_EXTENSIONS), str(path))
    return fn


def _verify(path: Path, vol: Volume, as_label: bool) -> None:
    """Re-read the written header and compare shape and affine with ``vol``."""
    shape, affine = geometry(path)
    atol = 1e-3 if format_of(path) == "tiff" else 1e-4
    if tuple(shape) != tuple(vol.shape3) or not np.allclose(
            affine, vol.affine, atol=atol * max(1.0, np.abs(vol.affine).max())):
        raise MedSegError(
            f"the written file does not have the expected geometry (shape "
            f"{tuple(shape)} vs {vol.shape3}); it was kept for inspection", str(path))


def geometry(path) -> tuple[tuple, np.ndarray]:
    """``(shape (Z, Y, X), RAS affine)`` of a file, reading only its header if possible."""
    fmt = format_of(path)
    with guarded(path):
        return _geometry(path, fmt)


def _geometry(path, fmt) -> tuple[tuple, np.ndarray]:
    if fmt == "nifti":
        from .nifti import read_nifti_header

        shape, affine, _ = read_nifti_header(path)
        return tuple(shape[:3])[::-1], affine
    if fmt == "nrrd":
        from .nrrd import nrrd_geometry

        return nrrd_geometry(path)
    if fmt == "itk":
        from .itk import itk_geometry

        return itk_geometry(path)
    vol = read_volume(path, lazy=True)
    return vol.shape3, vol.affine


def _write(path, vol: Volume, overwrite: bool, verify: bool, as_label: bool) -> Path:
    path = Path(path)
    if not isinstance(vol, Volume):
        raise MedSegError(f"expected a Volume to write, got {type(vol).__name__}", str(path))
    fn = _writer(path)
    check_writable(path, overwrite)
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            fn(tmp, vol, path, as_label)
    finally:
        if path.suffix.lower() == ".mhd":  # the old data file, or a new one left orphan
            from .itk import remove_unreferenced_data

            remove_unreferenced_data(path)
    if verify:
        _verify(path, vol, as_label)
    if as_label and format_of(path) == "nifti":  # names and colours beside the file
        from .sidecar import write_label_sidecar

        write_label_sidecar(path, vol.label_names, vol.label_colors)
    log.info("wrote %s", path)
    return path


def write_labels(path, labels_vol: Volume, overwrite: bool = False,
                 verify: bool = True) -> Path:
    """Write a label map with its exact geometry; the format follows the extension.

    Parameters
    ----------
    path : str or Path
        Target file (``.nii.gz``, ``.nii``, ``.seg.nrrd``, ``.nrrd``, ``.mha``,
        ``.mhd``, ``.tif``).
    labels_vol : Volume
        ``(Z, Y, X)`` integer class ids. Stored in the smallest integer dtype
        that holds them; ``label_names`` / ``label_colors`` go into ``.seg.nrrd``
        segment fields, NRRD / TIFF metadata and, for NIfTI, a JSON sidecar
        (``case.json`` beside ``case.nii.gz``; see :mod:`napari_medseg.io.sidecar`).
    overwrite : bool
        Replace an existing file (otherwise :class:`MedSegError`).
    verify : bool
        Re-read the written file and check its shape and affine.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    MedSegError
        When the file exists, the folder is not writable, the extension is
        unknown or the labels are not whole numbers. The target is untouched.
    """
    return _write(path, labels_vol, overwrite, verify, as_label=True)


def write_volume(path, vol: Volume, overwrite: bool = False, verify: bool = True) -> Path:
    """Write an image (or label) volume in its own dtype; see :func:`write_labels`."""
    return _write(path, vol, overwrite, verify, as_label=bool(vol.is_label))
