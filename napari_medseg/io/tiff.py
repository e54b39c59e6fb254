"""TIFF / OME-TIFF stacks through tifffile.

Voxel size comes from ImageJ metadata (X/Y resolution tags plus ``spacing``
and ``unit``), OME ``PhysicalSize*`` or tifffile's own shaped metadata, in mm.
TIFF has no patient orientation: such files get ITK's default (the LPS
identity, RAS ``diag(-sx, -sy, sz)``). Files written here also carry the exact
affine and label names in their metadata, so a round trip keeps the geometry.
Uncompressed stacks are memory-mapped, compressed ones wrapped in dask page by
page: opening takes well under a second whatever the size.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..core.volume import Volume, make_affine
from ..errors import MedSegError
from ._common import check_spatial, looks_like_label_name, prepare_label_data

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
    except Exception as exc:
        raise MedSegError(f"is not a readable TIFF file ({exc}); the file may be truncated "
                          "or corrupt", str(path)) from exc


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


def _lazy(series, path: Path):
    """A memory map for contiguous data, else a dask array reading one page per chunk."""
    import tifffile

    if series.dataoffset is not None:
        try:
            return tifffile.memmap(str(path), series=0, mode="r")
        except (ValueError, OSError):
            pass
    import dask.array as da
    from dask import delayed

    pages = list(series.pages)
    page_shape = pages[0].shape
    dtype = series.dtype

    def read(i):
        with _open(path) as tif:
            return tif.series[0].pages[i].asarray()

    planes = [da.from_delayed(delayed(read)(i), page_shape, dtype) for i in range(len(pages))]
    return da.stack(planes).reshape(series.shape)


def read_tiff(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read a TIFF / OME-TIFF stack as a Volume.

    Parameters
    ----------
    path : str or Path
        ``.tif`` / ``.tiff`` (ImageJ hyperstack, OME-TIFF or plain multi-page).
    lazy : bool
        Memory-map (uncompressed) or dask-wrap (compressed) instead of reading.
    is_label : bool, optional
        Force a label map; by default integer files named like labels are.

    Returns
    -------
    Volume
        ``(Z, Y, X)`` or ``(C, Z, Y, X)`` data; spacing from the metadata (mm).
    """
    path = Path(path)
    with _open(path) as tif:
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        if series.pages[0] is not None and getattr(series.pages[0], "photometric", 0) == 2:
            check_spatial(shape, path, rgb=True)
        letters = _axes_to_czyx(axes, shape, path)
        check_spatial(tuple(n for a, n in zip(axes, shape) if n > 1 or a in "YX"), path)
        affine, names = _geometry(tif, path, shape)
        data = _lazy(series, path) if lazy else None
        if data is None or not lazy:
            try:
                data = series.asarray()
            except Exception as exc:
                raise MedSegError(f"could not read the pixel data ({exc}); the file may "
                                  "be truncated", str(path)) from exc
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
