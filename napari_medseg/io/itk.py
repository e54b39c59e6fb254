"""MetaImage (``.mha``, ``.mhd`` + ``.raw``) through SimpleITK.

Geometry comes from ITK's spacing / origin / direction (LPS) and is converted
with :func:`~napari_medseg.core.volume.affine_from_itk`. Uncompressed files
are memory-mapped when read lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.volume import Volume, affine_from_itk, itk_from_affine
from ..errors import MedSegError
from ._common import (
    DEFLATE_MAX_RATIO, check_geometry, check_size, check_spatial, file_size, guarded,
    looks_like_label_name, one_line, prepare_label_data)

log = logging.getLogger(__name__)

__all__ = ["read_itk", "write_itk", "itk_geometry", "read_meta_header", "MetaHeader",
           "remove_unreferenced_data"]

_MET_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2",
    "MET_INT": "i4", "MET_UINT": "u4", "MET_LONG": "i8", "MET_ULONG": "u8",
    "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}


#: The longest MetaImage text header read (a header without ``ElementDataFile``
#: within this many bytes is refused).
_MAX_HEADER = 1 << 20
_BOOL_KEYS = ("binarydata", "binarydatabyteordermsb", "elementbyteordermsb", "compresseddata")
#: Keys holding NDims numbers, and those holding NDims x NDims numbers.
_VECTOR_KEYS = ("dimsize", "elementspacing", "elementsize", "offset", "position", "origin",
                "centerofrotation")
_MATRIX_KEYS = ("transformmatrix", "rotation", "orientation")
_INT_KEYS = ("ndims", "elementnumberofchannels", "headersize", "compresseddatasize")
_CANONICAL = {k.lower(): k for k in (
    "ObjectType", "NDims", "DimSize", "ElementType", "ElementDataFile", "ElementSpacing",
    "ElementSize", "Offset", "Position", "Origin", "CenterOfRotation", "TransformMatrix",
    "Rotation", "Orientation", "AnatomicalOrientation", "BinaryData",
    "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData", "CompressedDataSize",
    "HeaderSize", "ElementNumberOfChannels", "ElementMin", "ElementMax")}


@dataclass
class MetaHeader:
    """A checked MetaImage header.

    Attributes
    ----------
    fields : dict
        ``key -> value`` text as in the file (keys as spelled there).
    ndims : int
    size : tuple of int
        ``DimSize`` (x, y, z order).
    dtype : numpy dtype
        Element type with the byte order.
    ncomp : int
        Components per voxel.
    data_path : Path
        The file holding the voxels (the header file itself for ``LOCAL``).
    offset : int
        Byte offset of the voxels in ``data_path`` (-1: at the end).
    compressed : bool
    """

    fields: dict
    ndims: int
    size: tuple
    dtype: np.dtype
    ncomp: int
    data_path: Path
    offset: int
    compressed: bool


def _meta_text(path: Path) -> tuple[list[tuple[str, str]], int]:
    """``[(key, value), ...]`` of a MetaImage header and the byte offset after it."""
    items = []
    with open(path, "rb") as fh:
        while True:
            line = fh.readline(_MAX_HEADER)
            if not line or fh.tell() > _MAX_HEADER:
                raise MedSegError("is not a MetaImage file: no ElementDataFile line in its "
                                  "header; the file is truncated or corrupt", str(path))
            text = line.decode("latin-1").strip()
            if not text:
                continue
            key, eq, value = text.partition("=")
            if not eq or not key.strip() or any(ord(c) < 32 for c in key):
                raise MedSegError("is not a MetaImage file: its header has a line that is "
                                  "not 'Key = value'; the file is corrupt", str(path))
            items.append((key.strip(), value.strip()))
            if key.strip().lower() == "elementdatafile":
                return items, fh.tell()


def _numbers(value: str, key: str, path: Path, count: int | None = None, integer=False):
    parts = value.split()
    try:
        nums = [int(p) if integer else float(p) for p in parts]
    except ValueError:
        raise MedSegError(f"has a malformed MetaImage {key} ({one_line(value, 60)!r}); the "
                          "header is corrupt", str(path)) from None
    if count is not None and len(nums) != count:
        raise MedSegError(f"has {len(nums)} values for MetaImage {key}, expected {count}; "
                          "the header is corrupt", str(path))
    if not integer and not all(np.isfinite(nums)):
        raise MedSegError(f"has non-finite MetaImage {key}; the header is corrupt", str(path))
    return nums


def read_meta_header(path) -> MetaHeader:
    """Parse and check a MetaImage header before SimpleITK sees the file.

    SimpleITK's MetaImage parser crashes the process on some malformed headers
    (``NDims = -1`` segfaults, ``NDims = 100`` aborts), so every structural
    field is checked here first: ``NDims`` (1 to 4), ``DimSize`` (NDims whole
    numbers >= 1), ``ElementType`` (a known type), ``ElementNumberOfChannels``
    (1 to 64), spacing / origin / direction counts and finiteness, booleans,
    ``HeaderSize``, ``CompressedDataSize`` and ``ElementDataFile`` (``LOCAL`` or
    one file inside the header's folder), then the voxel count against the
    data file's size.

    Raises
    ------
    MedSegError
        One line naming the file and the bad field.
    """
    path = Path(path)
    try:
        items, end = _meta_text(path)
    except OSError as exc:
        raise MedSegError(f"cannot be read ({exc.strerror or exc})", str(path)) from exc
    fields, low = {}, {}
    for key, value in items:
        k = key.lower()
        if k in _CANONICAL and key != _CANONICAL[k]:
            raise MedSegError(f"spells the MetaImage field {_CANONICAL[k]} as {key!r}; the "
                              "header is corrupt", str(path))
        if k in low:
            raise MedSegError(f"has the MetaImage field {key} twice; the header is corrupt",
                              str(path))
        low[k], fields[key] = value, value
    for k in ("ndims", "dimsize", "elementtype"):
        if k not in low:
            raise MedSegError(f"has no MetaImage {k} field; the header is incomplete",
                              str(path))
    ints = {k: _numbers(low[k], k, path, 1, integer=True)[0] for k in _INT_KEYS if k in low}
    ndims = ints["ndims"]
    if not 1 <= ndims <= 4:
        raise MedSegError(f"has NDims = {ndims}; napari-medseg reads 3D MetaImage volumes "
                          "(NDims 3, or 4 for a channel axis); the header is corrupt or "
                          "not a volume", str(path))
    size = tuple(_numbers(low["dimsize"], "DimSize", path, ndims, integer=True))
    if min(size) < 1:
        raise MedSegError(f"has DimSize {size}; sizes must be at least 1; the header is "
                          "corrupt", str(path))
    for k in _VECTOR_KEYS[1:]:
        if k in low:
            _numbers(low[k], k, path, ndims)
    for k in _MATRIX_KEYS:
        if k in low:
            _numbers(low[k], k, path, ndims * ndims)
    for k in ("elementmin", "elementmax"):
        if k in low:
            _numbers(low[k], k, path, 1)
    for k in _BOOL_KEYS:
        if k in low and low[k].lower() not in ("true", "false"):
            raise MedSegError(f"has {k} = {one_line(low[k], 40)!r} (True or False expected); "
                              "the header is corrupt", str(path))
    if "objecttype" in low and low["objecttype"].lower() != "image":
        raise MedSegError(f"is a MetaImage of ObjectType {one_line(low['objecttype'], 40)!r}, "
                          "not an image", str(path))
    if "anatomicalorientation" in low:
        ao = low["anatomicalorientation"].upper()
        if len(ao) != ndims or not set(ao) <= set("RLAPSI?"):
            raise MedSegError(f"has a malformed AnatomicalOrientation ({one_line(ao, 20)!r}); "
                              "the header is corrupt", str(path))
    code = _MET_TYPES.get(low["elementtype"].upper())
    if code is None:
        raise MedSegError(f"has an unknown MetaImage ElementType "
                          f"({one_line(low['elementtype'], 40)!r}); the header is corrupt "
                          "or uses a type napari-medseg does not read", str(path))
    ncomp = ints.get("elementnumberofchannels", 1)
    if not 1 <= ncomp <= 64:
        raise MedSegError(f"has ElementNumberOfChannels = {ncomp} (1 to 64 expected); the "
                          "header is corrupt", str(path))
    msb = (low.get("binarydatabyteordermsb") or low.get("elementbyteordermsb")
           or "False").lower() == "true"
    dtype = np.dtype((">" if msb else "<") + code)
    compressed = low.get("compresseddata", "false").lower() == "true"
    if low.get("binarydata", "true").lower() != "true":
        raise MedSegError("stores its voxels as text (BinaryData = False); convert it to a "
                          "binary .mha first", str(path))
    datafile = low["elementdatafile"]
    if datafile.upper() == "LOCAL":
        data_path, offset = path, end
    else:
        if datafile.upper().startswith("LIST") or " " in datafile or "%" in datafile:
            raise MedSegError("keeps its voxels in a list of files, which napari-medseg does "
                              "not read; convert it to one .mha file", str(path))
        rel = Path(datafile)
        data_path = (path.parent / rel)
        if rel.is_absolute() or ".." in rel.parts or not data_path.resolve().is_relative_to(
                path.parent.resolve()):
            raise MedSegError(f"names a data file outside its folder ({one_line(datafile, 80)}); "
                              "keep the .raw / .zraw beside the header", str(path))
        if not data_path.is_file():
            raise MedSegError(f"its data file {rel.name} is missing; keep it beside the "
                              "header", str(path))
        offset = 0
    header_size = ints.get("headersize", 0 if data_path != path else None)
    data_bytes = file_size(data_path)
    if header_size is not None and data_path != path:
        if header_size < -1 or header_size > data_bytes:
            raise MedSegError(f"has HeaderSize = {header_size} for a data file of {data_bytes} "
                              "bytes; the header is corrupt", str(path))
        offset = header_size
    elif header_size == -1:
        offset = -1
    elif header_size is not None and header_size not in (0, end):
        raise MedSegError(f"has HeaderSize = {header_size} in a one-file .mha; the header is "
                          "corrupt", str(path))
    itemsize = dtype.itemsize * ncomp
    if compressed:
        csize = ints.get("compresseddatasize")
        avail = data_bytes - max(offset, 0)
        if csize is not None and (csize < 0 or csize > avail):
            raise MedSegError(f"has CompressedDataSize = {csize} but only {avail} bytes of "
                              "data; the file is truncated or corrupt", str(path))
        check_size(size, itemsize, csize if csize else avail, path, compressed=True,
                   what="the MetaImage header", ratio=DEFLATE_MAX_RATIO)  # MetaIO: zlib
    else:
        need = check_size(size, itemsize, data_bytes if offset == -1 else data_bytes - offset,
                          path, what="the MetaImage header")
        if offset == -1:
            offset = data_bytes - need
    return MetaHeader(fields, ndims, size, dtype, ncomp, data_path, offset, compressed)


def _memmap(meta: MetaHeader):
    """A memory map of uncompressed MetaImage voxels, or None when compressed."""
    if meta.compressed:
        return None
    shape = tuple(meta.size[::-1]) + ((meta.ncomp,) if meta.ncomp > 1 else ())
    return np.memmap(meta.data_path, dtype=meta.dtype, mode="r", offset=meta.offset,
                     shape=shape)


def _reader(path: Path):
    """A SimpleITK reader bound to the MetaImage IO, with the image information read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("MetaImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines() or [""]
        raise MedSegError("is not a readable MetaImage file; the file may be corrupt "
                          f"({one_line(lines[-1], 120)})", str(path)) from exc
    return reader


def _itk_affine(reader, path: Path) -> np.ndarray:
    with guarded(path):
        spacing = reader.GetSpacing()
        aff = affine_from_itk(spacing, reader.GetOrigin(), reader.GetDirection())
    return check_geometry(aff, path, spacing=spacing)


def read_itk(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read a MetaImage file as a Volume.

    The text header is parsed and checked (:func:`read_meta_header`) before
    SimpleITK opens the file, so a malformed header is one
    :class:`~napari_medseg.errors.MedSegError` line, never a crash.

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
    meta = read_meta_header(path)
    size, ncomp = meta.size, meta.ncomp
    if ncomp in (3, 4) and meta.dtype == np.dtype("u1"):
        check_spatial(tuple(size[::-1]) + (ncomp,), path, rgb=True)
    check_spatial(tuple(size[::-1]) if ncomp == 1 else (ncomp, *size[::-1]), path)
    if len(size) != 3:
        raise MedSegError(f"has {len(size)} dimensions (size {size}); a 3D volume is "
                          "needed", str(path))
    reader = _reader(path)
    if tuple(reader.GetSize()) != tuple(size) or reader.GetNumberOfComponents() != ncomp:
        raise MedSegError("has a header SimpleITK reads differently from its text; the "
                          "header is corrupt", str(path))
    affine = _itk_affine(reader, path)
    with guarded(path):
        data = _memmap(meta) if lazy else None
        if data is None:
            try:
                data = sitk.GetArrayFromImage(reader.Execute())
            except RuntimeError as exc:
                lines = str(exc).strip().splitlines() or [""]
                raise MedSegError("could not read the voxel data; the file may be truncated "
                                  f"or corrupt ({one_line(lines[-1], 120)})", str(path)) from exc
        if data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
    label = (looks_like_label_name(path) and data.dtype.kind in "iu" and data.ndim == 3) \
        if is_label is None else bool(is_label)
    return Volume(data=data, affine=affine, is_label=label, source=str(path),
                  meta={"format": "metaimage", "file_dtype": str(data.dtype)})


def itk_geometry(path) -> tuple[tuple, np.ndarray]:
    """``(shape (Z, Y, X), RAS affine)`` from the (checked) header alone."""
    path = Path(path)
    read_meta_header(path)
    reader = _reader(path)
    return tuple(reader.GetSize()[::-1]), _itk_affine(reader, path)


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
    """Write ``vol`` as compressed MetaImage to ``tmp_path``.

    ``.mha`` is one file. For ``.mhd`` the header goes to ``tmp_path`` and the
    voxels to a data file under a *new* name beside the final header,
    ``<name>.<pid>-<8 hex digits>.zraw``, which the header names: the previous
    header and its data file stay intact until the header is renamed into
    place (the last step of the atomic write), so a kill or a full disk at any
    moment leaves the old pair or the new one. The old data file, now
    unreferenced, is removed afterwards by :func:`remove_unreferenced_data`
    (called by the writers in :mod:`napari_medseg.io`, also after a failure).
    """
    import SimpleITK as sitk

    tmp_path, final_path = Path(tmp_path), Path(final_path)
    data = prepare_label_data(vol, final_path) if as_label else np.asarray(vol.data)
    img = _image(vol, data)
    if final_path.suffix.lower() != ".mhd":
        sitk.WriteImage(img, str(tmp_path), useCompression=True)
        return
    sitk.WriteImage(img, str(tmp_path), useCompression=True)
    written = tmp_path.with_suffix(".zraw")
    try:
        data_name = f"{final_path.stem}.{os.getpid()}-{secrets.token_hex(4)}.zraw"
        text = tmp_path.read_bytes()
        line = f"ElementDataFile = {written.name}".encode()
        if not text.rstrip().endswith(line):
            raise MedSegError("SimpleITK wrote an unexpected MetaImage header; nothing was "
                              "replaced", str(final_path))
        tmp_path.write_bytes(text.rstrip()[: -len(line)] + f"ElementDataFile = {data_name}\n"
                             .encode())
        with open(written, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(written, 0o666 & ~_umask())
        os.replace(written, final_path.parent / data_name)
    finally:
        with contextlib.suppress(OSError):
            written.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_unreferenced_data(header) -> list[Path]:
    """Remove MetaImage data files in ``header``'s folder that no ``.mhd`` names any more.

    Removed: data files of ``header`` itself (``<stem>.zraw`` / ``.raw`` /
    ``<stem>.<pid>-<hex>.zraw``), and data files of other headers in the folder
    written by napari-medseg (``<other>.<pid>-<hex>.zraw``) whose writer process
    is gone or which are hours old, i.e. left by a killed writer. A concurrent
    writer's new data file (its header not yet renamed) is left alone.
    Runs after every ``.mhd`` write, successful or not: it drops the previous
    data file once the new header is in place, and orphans of killed writes.

    Returns
    -------
    list of Path
        The files removed.
    """
    from .atomic import STALE_SECONDS, _alive

    header = Path(header)
    folder = header.parent
    pat = re.compile(r"^(?P<stem>.+?)(?:\.(?P<pid>\d+)-[0-9a-f]{8})?\.(?:zraw|raw)$")
    candidates = []
    for p in folder.iterdir():
        m = pat.match(p.name)
        if m and p.is_file() and (m["stem"] == header.stem or m["pid"]):
            candidates.append((p, m))
    if not candidates:
        return []
    referenced = set()
    for other in folder.glob("*.[mM][hH][dD]"):
        try:
            items, _ = _meta_text(other)
        except (MedSegError, OSError):
            continue
        for key, value in items:
            if key.lower() == "elementdatafile":
                referenced.add((folder / value).resolve())
    removed = []
    now = time.time()
    for p, m in candidates:
        if p.resolve() in referenced:
            continue
        if m["stem"] != header.stem:
            if not (folder / f"{m['stem']}.mhd").exists():
                continue
            try:
                old = now - p.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
            if _alive(int(m["pid"])) and not old:
                continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
