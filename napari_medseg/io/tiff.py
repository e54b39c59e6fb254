"""TIFF / OME-TIFF stacks through tifffile.

Voxel size comes from ImageJ metadata (X/Y resolution tags plus ``spacing``
and ``unit``), OME ``PhysicalSize*`` or tifffile's own shaped metadata, in mm.
TIFF has no patient orientation: such files get ITK's default (the LPS
identity, RAS ``diag(-sx, -sy, sz)``). Files written here also carry the exact
affine and label names in their metadata, so a round trip keeps the geometry.
Uncompressed stacks are memory-mapped; compressed ones are wrapped in dask, a
block of about 16 MB of pages per chunk, each chunk decoded in one pass (one
open of the file per block, not per page).
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..core.volume import Volume, make_affine
from ..errors import MedSegError
from ._common import (
    DEFLATE_MAX_RATIO, check_dtype, check_geometry, check_size, check_spatial, file_size,
    guarded, looks_like_label_name, one_line, prepare_label_data)

log = logging.getLogger(__name__)

__all__ = ["read_tiff", "write_tiff"]

_UNIT_MM = {"mm": 1.0, "millimeter": 1.0, "millimetre": 1.0, "cm": 10.0, "m": 1000.0,
            "um": 1e-3, "µm": 1e-3, "\\u00b5m": 1e-3, "micron": 1e-3, "microns": 1e-3,
            "micrometer": 1e-3, "nm": 1e-6, "pixel": 1.0, "": 1.0}
_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def _open(path: Path):
    import tifffile

    try:
        return tifffile.TiffFile(str(path))
    except FileNotFoundError:
        raise MedSegError("file not found", str(path)) from None
    except MemoryError as exc:
        raise MedSegError("has a TIFF structure too large to read; the file is corrupt",
                          str(path)) from exc
    except Exception as exc:
        raise MedSegError(f"is not a readable TIFF file ({one_line(exc, 120)}); the file may "
                          "be truncated or corrupt", str(path)) from exc


def _unit(u) -> float:
    u = str(u or "").strip().lower()
    return _UNIT_MM.get(u, _UNIT_MM.get(u.replace("μ", "µ"), 1.0))


def _ome_spacing(tif):
    root = ET.fromstring(tif.ome_metadata)
    pix = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pix is None:
        return None
    out = []
    for ax in "ZYX":
        size = float(pix.get(f"PhysicalSize{ax}", 1.0))
        out.append(size * _unit(pix.get(f"PhysicalSize{ax}Unit", "µm")))
    return tuple(out)


def _xy_resolution(page):
    """``(sy, sx)`` from the resolution tags (pixel size = 1 / resolution)."""
    out = []
    for tag in ("YResolution", "XResolution"):
        t = page.tags.get(tag)
        if t is None:
            out.append(1.0)
            continue
        num, den = t.value
        out.append(float(den) / float(num) if num else 1.0)
    return out


def _geometry(tif, path: Path, zyx_shape):
    """RAS affine and extra metadata (label names) from the file's metadata."""
    meta = {}
    spacing = (1.0, 1.0, 1.0)
    if tif.is_ome and tif.ome_metadata:
        spacing = _ome_spacing(tif) or spacing
    elif tif.is_imagej and tif.imagej_metadata:
        meta = dict(tif.imagej_metadata)
        sy, sx = _xy_resolution(tif.pages[0])
        f = _unit(meta.get("unit"))
        spacing = (float(meta.get("spacing", 1.0)) * f, sy * f, sx * f)
    elif tif.is_shaped and tif.shaped_metadata:
        meta = dict(tif.shaped_metadata[0])
        if "spacing" in meta:
            spacing = tuple(float(s) for s in np.broadcast_to(meta["spacing"], 3))
    affine = make_affine(spacing, direction=np.diag([-1.0, -1.0, 1.0]))
    stored = meta.get("medseg_affine")
    if stored is not None:
        try:
            cand = np.asarray(json.loads(stored) if isinstance(stored, str) else stored,
                              dtype=float).reshape(4, 4)
            if np.allclose(np.linalg.norm(cand[:3, :3], axis=0)[::-1], spacing, rtol=1e-4):
                affine = cand
        except (ValueError, TypeError):
            log.warning("%s: ignoring an unreadable stored affine", path)
    names = {}
    if "medseg_labels" in meta:
        try:
            raw = meta["medseg_labels"]
            names = {int(k): str(v) for k, v in (json.loads(raw) if isinstance(raw, str)
                                                 else raw).items()}
        except (ValueError, TypeError, AttributeError):
            pass
    return affine, names


def _axes_to_czyx(axes: str, shape, path: Path):
    """Map tifffile axes to ``(C, Z, Y, X)`` order: a transpose and squeeze plan."""
    keep = [(a, n) for a, n in zip(axes, shape) if n > 1 or a in "YX"]
    letters = "".join(a for a, _ in keep)
    if "S" in letters and dict(keep)["S"] in (3, 4):
        check_spatial(tuple(shape), path, rgb=True)
    for alias in "IQTE":
        if alias in letters and "Z" not in letters:
            letters = letters.replace(alias, "Z")
    if not set(letters) <= set("CZYX") or len(letters) != len(set(letters)):
        check_spatial(tuple(n for _, n in keep), path)
        raise MedSegError(f"has axes {axes} (shape {tuple(shape)}); napari-medseg reads "
                          "Z stacks with an optional channel axis", str(path))
    return letters


#: Compressed stacks are wrapped in dask with about this many bytes of pages per
#: chunk; each chunk opens the file once and decodes its pages in one pass.
_CHUNK_BYTES = 16 << 20


def _check_ome(tif, path: Path) -> None:
    """Refuse OME metadata claiming more planes than the file has pages.

    tifffile trusts ``SizeZ`` / ``SizeC`` / ``SizeT`` and fills missing planes
    with zeros, so a 10-page file claiming a million planes would be read as
    a million mostly-empty frames.
    """
    if not tif.is_ome:
        return
    try:
        root = ET.fromstring(tif.ome_metadata)
    except (ET.ParseError, TypeError, ValueError):
        return  # tifffile ignores unreadable OME metadata too
    npages = len(tif.pages)
    claimed = 0
    for pix in (e for e in root.iter() if e.tag.endswith("Pixels")):
        try:
            sizes = {k: int(pix.get(f"Size{k}", 1)) for k in "XYZCT"}
        except ValueError:
            raise MedSegError("has OME metadata with a size that is not a whole number; the "
                              "file is corrupt", str(path)) from None
        if min(sizes.values()) < 1:
            raise MedSegError(f"has OME sizes {sizes}; sizes must be at least 1; the file is "
                              "corrupt", str(path))
        planes = sizes["Z"] * sizes["C"] * sizes["T"]
        spp = next((int(c.get("SamplesPerPixel", 1) or 1) for c in pix
                    if c.tag.endswith("Channel")), 1)
        claimed += planes // max(1, spp)
    if claimed > npages:
        raise MedSegError(f"has OME metadata claiming {claimed} image planes but the file holds "
                          f"{npages} pages; the file is truncated or its metadata is wrong",
                          str(path))


#: The most a codec can expand, by TIFF compression tag: deflate (8, 32946),
#: LZW (5; 12-bit codes), PackBits (32773); other codecs get the generic bound.
_RATIO = {8: DEFLATE_MAX_RATIO, 32946: DEFLATE_MAX_RATIO, 5: 5000, 32773: 130}


def _check_pages(series, path: Path) -> bool:
    """Check each page's claimed size, data location and compression; True if compressed."""
    from tifffile import TIFF

    fsize = file_size(path)
    compressed = False
    for page in series.pages:
        if page is None:
            raise MedSegError("is missing image pages its metadata lists; the file is "
                              "truncated or corrupt", str(path))
        key = getattr(page, "keyframe", page)
        if key.dtype is None:
            raise MedSegError("has a sample format napari-medseg does not read; the file is "
                              "corrupt or unusual; convert it with Fiji", str(path))
        check_dtype(key.dtype, path)
        comp = int(key.compression)
        if comp != 1 and comp not in TIFF.DECOMPRESSORS:
            raise MedSegError(f"uses TIFF compression {comp}, which cannot be decoded here; "
                              "the file is corrupt or needs `pip install imagecodecs`",
                              str(path))
        compressed = compressed or comp != 1
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) != len(counts) or any(o < 0 or c < 0 or o + c > fsize
                                              for o, c in zip(offsets, counts)):
            raise MedSegError("has image data beyond the end of the file; the file is "
                              "truncated or corrupt", str(path))
        check_size(key.shape, key.dtype, sum(counts), path, compressed=comp != 1,
                   what="a TIFF page", ratio=_RATIO.get(comp))
    return compressed


def _lazy(series, path: Path, compressed: bool):
    """A memory map for contiguous data, else a dask array reading a block of pages
    per chunk (one open of the file per block, not per page: a 1000-page stack of
    small pages is one chunk)."""
    import tifffile

    if series.dataoffset is not None and not compressed:
        try:
            return tifffile.memmap(str(path), series=0, mode="r")
        except (ValueError, OSError):
            pass
    import dask.array as da
    from dask import delayed

    npages = len(series.pages)
    page_shape = tuple(series.pages[0].shape)
    page_bytes = max(1, int(np.prod(page_shape)) * series.dtype.itemsize)
    step = max(1, _CHUNK_BYTES // page_bytes)
    dtype = series.dtype

    def read(a, b):
        with guarded(path):
            with _open(path) as tif:
                return tif.asarray(key=range(a, b), series=0, maxworkers=1).reshape(
                    (b - a,) + page_shape)

    blocks = [da.from_delayed(delayed(read)(a, min(a + step, npages)),
                              (min(a + step, npages) - a,) + page_shape, dtype)
              for a in range(0, npages, step)]
    return da.concatenate(blocks).reshape(series.shape)


def read_tiff(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read a TIFF / OME-TIFF stack as a Volume.

    The file is checked before pixels are decoded: OME plane counts against the
    pages present, each page's size against its data (and the file's end), the
    compression and sample format, and a finite plausible voxel size.

    Parameters
    ----------
    path : str or Path
        ``.tif`` / ``.tiff`` (ImageJ hyperstack, OME-TIFF or plain multi-page).
    lazy : bool
        Memory-map uncompressed stacks; wrap compressed ones in dask (a block of
        pages per chunk, about 16 MB, each decoded in one pass over the file).
    is_label : bool, optional
        Force a label map; by default integer files named like labels are.

    Returns
    -------
    Volume
        ``(Z, Y, X)`` or ``(C, Z, Y, X)`` data; spacing from the metadata (mm).
    """
    path = Path(path)
    with _open(path) as tif, guarded(path):
        _check_ome(tif, path)
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        if series.pages[0] is not None and getattr(series.pages[0], "photometric", 0) == 2:
            check_spatial(shape, path, rgb=True)
        letters = _axes_to_czyx(axes, shape, path)
        check_spatial(tuple(n for a, n in zip(axes, shape) if n > 1 or a in "YX"), path)
        tif.pages.useframes = True  # light page objects for the checks below
        compressed = _check_pages(series, path)
        affine, names = _geometry(tif, path, shape)
        affine = check_geometry(affine, path)
        data = _lazy(series, path, compressed) if lazy else None
        if data is None:
            try:
                data = series.asarray()
            except MedSegError:
                raise
            except Exception as exc:
                raise MedSegError(f"could not read the pixel data ({one_line(exc, 120)}); the "
                                  "file may be truncated or corrupt", str(path)) from exc
        if int(np.prod(data.shape)) != int(np.prod(shape)):
            raise MedSegError(f"holds pixel data of shape {data.shape}, not {shape}; the file "
                              "is corrupt", str(path))
        data = data.reshape(tuple(n for a, n in zip(axes, shape) if n > 1 or a in "YX"))
        order = [letters.index(a) for a in "CZYX" if a in letters]
        data = data.transpose(order)
    label = (looks_like_label_name(path) and data.dtype.kind in "iu" and data.ndim == 3) \
        if is_label is None else bool(is_label)
    return Volume(data=data, affine=affine, modality="unknown", is_label=label,
                  label_names=names if label else {}, source=str(path),
                  meta={"format": "tiff", "file_dtype": str(data.dtype)})


def write_tiff(tmp_path, vol: Volume, final_path, as_label: bool) -> None:
    """Write ``vol`` as an ImageJ TIFF with its voxel size (mm) and exact affine.

    dtypes ImageJ cannot hold (``int16``, ``uint32``, ...) are written as plain
    tifffile stacks with the same metadata.
    """
    import tifffile

    data = prepare_label_data(vol, final_path) if as_label else np.asarray(vol.data)
    sz, sy, sx = vol.spacing
    extra = {"medseg_affine": json.dumps(vol.affine.tolist())}
    if as_label and vol.label_names:
        extra["medseg_labels"] = json.dumps({str(k): v for k, v in vol.label_names.items()})
    axes = "CZYX" if data.ndim == 4 else "ZYX"
    if data.dtype in [np.dtype(d) for d in _IMAGEJ_DTYPES]:
        ij_data = np.moveaxis(data, 0, 1) if data.ndim == 4 else data  # ImageJ: ZCYX
        tifffile.imwrite(str(tmp_path), ij_data, imagej=True, photometric="minisblack",
                         resolution=(1 / sx, 1 / sy),
                         metadata={"spacing": sz, "unit": "mm",
                                   "axes": "ZCYX" if data.ndim == 4 else "ZYX", **extra})
    else:
        tifffile.imwrite(str(tmp_path), data, photometric="minisblack",
                         resolution=(1 / sx, 1 / sy),
                         metadata={"spacing": [sz, sy, sx], "axes": axes, **extra})
