"""MetaImage (``.mha``, ``.mhd`` + ``.raw``) through SimpleITK.

Geometry comes from ITK's spacing / origin / direction (LPS) and is converted
with :func:`~napari_medseg.core.volume.affine_from_itk`. Uncompressed files
are memory-mapped when read lazily.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..core.volume import Volume, affine_from_itk, itk_from_affine
from ..errors import MedSegError
from ._common import check_spatial, looks_like_label_name, prepare_label_data

log = logging.getLogger(__name__)

__all__ = ["read_itk", "write_itk", "itk_geometry"]

_MET_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2",
    "MET_INT": "i4", "MET_UINT": "u4", "MET_LONG": "i8", "MET_ULONG": "u8",
    "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}


def _meta_header(path: Path) -> tuple[dict, int]:
    """Key/value pairs of a MetaImage header and the byte offset after it."""
    fields: dict = {}
    with open(path, "rb") as fh:
        while True:
            line = fh.readline()
            if not line:
                break
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        return fields, fh.tell()


def _memmap(path: Path, shape_zyx, ncomp: int):
    """A memory map of uncompressed MetaImage voxels, or None when not possible."""
    try:
        fields, offset = _meta_header(path)
    except (OSError, UnicodeDecodeError):
        return None
    if fields.get("CompressedData", "False").lower() == "true":
        return None
    code = _MET_TYPES.get(fields.get("ElementType", ""))
    datafile = fields.get("ElementDataFile", "")
    if code is None or not datafile:
        return None
    msb = (fields.get("BinaryDataByteOrderMSB") or fields.get("ElementByteOrderMSB")
           or "False").lower() == "true"
    dtype = np.dtype((">" if msb else "<") + code)
    if datafile.upper() != "LOCAL":
        if " " in datafile or datafile.upper() == "LIST":
            return None
        target = path.parent / datafile
        offset = int(fields.get("HeaderSize", 0) or 0)
    else:
        target = path
    if int(fields.get("HeaderSize", 0) or 0) < 0:
        return None
    shape = tuple(shape_zyx) + ((ncomp,) if ncomp > 1 else ())
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if not target.exists() or target.stat().st_size < need:
        return None
    return np.memmap(target, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_itk(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read a MetaImage file as a Volume.

    Parameters
    ----------
    path : str or Path
        ``.mha`` or ``.mhd``.
    lazy : bool
        Memory-map uncompressed voxel data.
    is_label : bool, optional
        Force a label map; by default integer files named like labels are.

    Returns
    -------
    Volume
        ``(Z, Y, X)`` data (``(C, Z, Y, X)`` for vector images).
    """
    import SimpleITK as sitk

    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MedSegError("is not a readable MetaImage file; the file may be corrupt "
                          f"({str(exc).strip().splitlines()[-1]})", str(path)) from exc
    size = reader.GetSize()
    ncomp = reader.GetNumberOfComponents()
    if ncomp in (3, 4) and reader.GetPixelID() in (sitk.sitkVectorUInt8,):
        check_spatial(tuple(size[::-1]) + (ncomp,), path, rgb=True)
    check_spatial(tuple(size[::-1]) if ncomp == 1 else (ncomp, *size[::-1]), path)
    if len(size) != 3:
        raise MedSegError(f"has {len(size)} dimensions (size {size}); a 3D volume is "
                          "needed", str(path))
    data = _memmap(path, size[::-1], ncomp) if lazy else None
    if data is None:
        try:
            data = sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError as exc:
            raise MedSegError("could not read the voxel data; the file may be truncated "
                              f"({str(exc).strip().splitlines()[-1]})", str(path)) from exc
    if data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    affine = affine_from_itk(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    label = (looks_like_label_name(path) and data.dtype.kind in "iu" and data.ndim == 3) \
        if is_label is None else bool(is_label)
    return Volume(data=data, affine=affine, is_label=label, source=str(path),
                  meta={"format": "metaimage", "file_dtype": str(data.dtype)})


def itk_geometry(path) -> tuple[tuple, np.ndarray]:
    """``(shape (Z, Y, X), RAS affine)`` from the header alone."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MedSegError("is not a readable MetaImage file", str(path)) from exc
    return tuple(reader.GetSize()[::-1]), affine_from_itk(
        reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def _image(vol: Volume, data: np.ndarray):
    import SimpleITK as sitk

    if data.ndim == 4:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(data, 0, -1)),
                                     isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(data))
    spacing, origin, direction = itk_from_affine(vol.affine)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def write_itk(tmp_path, vol: Volume, final_path, as_label: bool) -> None:
    """Write ``vol`` as compressed MetaImage.

    For ``.mhd`` the data file (``<name>.zraw``) is written beside the final
    header under its final name and the header goes to ``tmp_path``.
    """
    import SimpleITK as sitk

    final_path = Path(final_path)
    data = prepare_label_data(vol, final_path) if as_label else np.asarray(vol.data)
    img = _image(vol, data)
    if final_path.suffix.lower() != ".mhd":
        sitk.WriteImage(img, str(tmp_path), useCompression=True)
        return
    work = Path(tempfile.mkdtemp(prefix=".medseg-", dir=final_path.parent))
    try:
        header = work / final_path.name
        sitk.WriteImage(img, str(header), useCompression=True)
        for f in work.iterdir():
            if f != header:
                os.replace(f, final_path.parent / f.name)
        shutil.copyfile(header, tmp_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
