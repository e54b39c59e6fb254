"""NRRD (``.nrrd``, ``.nhdr``) and 3D Slicer segmentations (``.seg.nrrd``) via pynrrd.

Geometry: ``space directions`` (one vector per axis) and ``space origin`` in
the file's ``space`` (LPS or RAS) become our RAS affine. Slicer segment fields
(``Segment<N>_Name``, ``_Color``, ``_LabelValue``, ``_Layer``) become the
Volume's ``label_names`` / ``label_colors`` and are written back the same way.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..core.volume import LPS_TO_RAS, Volume
from ..errors import MedSegError
from ._common import (
    DEFLATE_MAX_RATIO, check_dtype, check_geometry, check_size, check_spatial, file_size,
    guarded, looks_like_label_name, one_line, prepare_label_data)

log = logging.getLogger(__name__)

__all__ = ["read_nrrd", "write_nrrd", "segment_fields", "nrrd_geometry"]

_RAS_SPACES = {"right-anterior-superior", "ras", "scanner-xyz", "3d-right-handed"}
_SEG_RE = re.compile(r"^Segment(\d+)_(\w+)$")
_PALETTE = [(0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.4), (0.9, 0.5, 0.5),
            (0.56, 0.73, 0.9), (0.86, 0.38, 0.82), (1.0, 0.98, 0.86), (0.44, 0.72, 0.82)]


def _read_header(path: Path):
    import nrrd

    try:
        with open(path, "rb") as fh:
            if not fh.read(8).startswith(b"NRRD000"):
                raise MedSegError("is not an NRRD file (no NRRD000x magic line); the file is "
                                  "corrupt or not what its name says", str(path))
            fh.seek(0)
            header = nrrd.read_header(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise MedSegError("file not found", str(path)) from None
    except MedSegError:
        raise
    except Exception as exc:
        raise MedSegError(f"is not a readable NRRD file ({one_line(exc, 120)}); the file may "
                          "be corrupt", str(path)) from exc
    with guarded(path):
        n = len(header.get("sizes", ()))
        consistent = n > 0 and "type" in header and all(
            len(header[k]) == n for k in ("kinds", "space directions", "spacings")
            if k in header)
        if not consistent or int(header.get("dimension", n)) != n:
            raise MedSegError("has an incomplete or inconsistent NRRD header; the file may be "
                              "truncated or corrupt", str(path))
        check_dtype(_dtype(header, path), path)
        if any(int(s) < 1 for s in header["sizes"]):
            raise MedSegError(f"has NRRD sizes {list(header['sizes'])}; sizes must be at least "
                              "1; the header is corrupt", str(path))
    return header, offset


def _dtype(header, path) -> np.dtype:
    from nrrd.reader import _determine_datatype

    try:
        return _determine_datatype(header)
    except Exception as exc:
        raise MedSegError(f"has an unknown NRRD type ({one_line(header.get('type'), 40)!r}); "
                          "the header is corrupt", str(path)) from exc


def _data_file(path: Path, header) -> Path | None:
    """The detached data file (inside the header's folder), or None when attached."""
    name = header.get("data file", header.get("datafile"))
    if name is None:
        return None
    name = str(name)
    if name.upper().startswith("LIST") or " " in name.strip() or "%" in name:
        raise MedSegError("keeps its voxels in a list of files, which napari-medseg does "
                          "not read; save it as one .nrrd", str(path))
    rel = Path(name.strip())
    target = path.parent / rel
    if rel.is_absolute() or ".." in rel.parts or not target.resolve().is_relative_to(
            path.parent.resolve()):
        raise MedSegError(f"names a data file outside its folder ({one_line(name, 80)}); keep "
                          "the data file beside the header", str(path))
    if not target.is_file():
        raise MedSegError(f"its data file {rel.name} is missing; keep it beside the header",
                          str(path))
    return target


def _check_data_size(path: Path, header, offset: int) -> None:
    """The header's voxel count against the bytes of (possibly detached) data."""
    target = _data_file(path, header)
    avail = file_size(target) if target is not None else file_size(path) - offset
    encoding = str(header.get("encoding", "raw")).lower()
    sizes = [int(s) for s in header["sizes"]]
    if encoding == "raw":
        skip = int(header.get("byte skip", 0) or 0)
        check_size(sizes, _dtype(header, path), avail - max(skip, 0), path,
                   what="the NRRD header")
    elif encoding in ("gzip", "gz", "bzip2", "bz2"):
        check_size(sizes, _dtype(header, path), avail, path, compressed=True,
                   what="the NRRD header",
                   ratio=DEFLATE_MAX_RATIO if encoding.startswith("gz") else None)
    elif encoding in ("ascii", "text", "txt"):
        check_size(sizes, 1, avail, path, what="the NRRD header")  # >= 1 character a value
    else:
        raise MedSegError(f"has an NRRD encoding {one_line(encoding, 30)!r} napari-medseg does "
                          "not read; save it as raw or gzip NRRD", str(path))


def _read_data(path: Path, header, offset: int, lazy: bool):
    """Voxel array in ``C`` order (slowest axis first), memory-mapped when raw."""
    import nrrd
    from nrrd.reader import _determine_datatype

    sizes = tuple(int(s) for s in header["sizes"])[::-1]
    _check_data_size(path, header, offset)
    raw = header.get("encoding", "raw") == "raw"
    attached = "data file" not in header and "datafile" not in header
    skips = int(header.get("line skip", 0)) or int(header.get("byte skip", 0))
    if lazy and raw and attached and not skips:
        dtype = _determine_datatype(header)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=sizes)
    try:
        data, _ = nrrd.read(str(path), index_order="C")
    except Exception as exc:
        raise MedSegError(f"could not read the voxel data ({one_line(exc, 120)}); the file "
                          "may be truncated or corrupt", str(path)) from exc
    if tuple(data.shape) != sizes:
        raise MedSegError(f"holds voxel data of shape {data.shape}, not the header's "
                          f"{sizes}; the file is corrupt", str(path))
    return data


def _affine(header, spatial_axes) -> np.ndarray:
    """RAS affine from NRRD space fields (file axis order), LPS default."""
    space = str(header.get("space", "left-posterior-superior")).lower()
    to_ras = np.eye(3) if space in _RAS_SPACES else LPS_TO_RAS
    aff = np.eye(4)
    dirs = header.get("space directions")
    if dirs is not None:
        dirs = np.asarray(dirs, dtype=float)
        dirs = np.stack([dirs[a] for a in spatial_axes])  # rows: axes i, j, k
        aff[:3, :3] = to_ras @ dirs.T
    else:
        sp = header.get("spacings")
        sp = [1.0, 1.0, 1.0] if sp is None else [float(sp[a]) for a in spatial_axes]
        sp = [1.0 if not np.isfinite(s) else s for s in sp]
        aff[:3, :3] = LPS_TO_RAS @ np.diag(sp)
    origin = header.get("space origin")
    if origin is not None:
        aff[:3, 3] = to_ras @ np.asarray(origin, dtype=float)
    return aff


def _checked_affine(header, spatial_axes, path) -> np.ndarray:
    with guarded(path):
        aff = _affine(header, spatial_axes)
    return check_geometry(aff, path)


def segment_fields(header) -> dict[int, dict]:
    """Slicer segment fields grouped by segment index: ``{0: {"Name": ..., ...}}``."""
    out: dict[int, dict] = {}
    for key, value in header.items():
        m = _SEG_RE.match(str(key))
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = str(value)
    return out


def _segments(header, data, path):
    """``(label array (Z, Y, X), names, colours)`` from Slicer segment metadata."""
    segs = segment_fields(header)
    names, colors = {}, {}
    layered = data.ndim == 4
    merged = np.zeros(data.shape[-3:], dtype=np.uint16) if layered else None
    for idx in sorted(segs):
        seg = segs[idx]
        value = int(seg.get("LabelValue", idx + 1))
        layer = int(seg.get("Layer", 0))
        new_id = idx + 1 if layered else value
        names[new_id] = seg.get("Name", f"Segment_{idx + 1}")
        if "Color" in seg:
            colors[new_id] = tuple(float(c) for c in seg["Color"].split()[:3])
        if layered:
            mask = np.asarray(data[layer]) == value
            if np.any(merged[mask]):
                log.warning("%s: segment %r overlaps others; overlapping voxels take "
                            "the later segment", path, names[new_id])
            merged[mask] = new_id
    if layered:
        return merged, names, colors
    return data, names, colors


def _spatial_axes(header, path: Path):
    """``(sizes, spatial axis indices)`` after checking the file holds a 3D volume."""
    sizes = [int(s) for s in header["sizes"]]
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
    dirs = header.get("space directions")
    spatial = [a for a in range(len(sizes))
               if kinds[a] in ("domain", "space")
               and (dirs is None or np.all(np.isfinite(np.asarray(dirs[a], float))))]
    if len(spatial) != len(sizes) and any(k in ("rgb-color", "rgba-color") for k in kinds):
        check_spatial(sizes[::-1], path, rgb=True)
    check_spatial([sizes[a] for a in spatial][::-1], path)
    if len(sizes) > 4 or len(spatial) != 3:
        check_spatial(sizes[::-1] + [1] * (len(sizes) < 3), path)
        raise MedSegError(f"has {len(spatial)} spatial axes (sizes {sizes}); a 3D volume "
                          "is needed", str(path))
    return sizes, spatial


def nrrd_geometry(path) -> tuple[tuple, np.ndarray]:
    """``(shape (Z, Y, X), RAS affine)`` from the header alone."""
    path = Path(path)
    header, _ = _read_header(path)
    with guarded(path):
        sizes, spatial = _spatial_axes(header, path)
    return tuple(sizes[a] for a in spatial)[::-1], _checked_affine(header, spatial, path)


def read_nrrd(path, lazy: bool = True, is_label: bool | None = None) -> Volume:
    """Read an NRRD file (or a Slicer ``.seg.nrrd``) as a Volume.

    Parameters
    ----------
    path : str or Path
        ``.nrrd``, ``.nhdr`` (detached data) or ``.seg.nrrd``.
    lazy : bool
        Memory-map raw (uncompressed) attached data.
    is_label : bool, optional
        Force a label map; by default ``.seg.nrrd``, files with segment fields
        and integer files named like labels are label maps.

    Returns
    -------
    Volume
        ``(Z, Y, X)`` (or ``(C, Z, Y, X)`` for a multi-component image).
    """
    path = Path(path)
    header, offset = _read_header(path)
    with guarded(path):
        return _read(path, header, offset, lazy, is_label)


def _read(path: Path, header, offset: int, lazy: bool, is_label) -> Volume:
    sizes, spatial = _spatial_axes(header, path)
    affine = _checked_affine(header, spatial, path)
    data = _read_data(path, header, offset, lazy)
    if len(sizes) == 4:  # C order: the non-spatial axis to the front
        nonspatial = [a for a in range(4) if a not in spatial][0]
        data = np.moveaxis(data, 3 - nonspatial, 0)
    segs = segment_fields(header)
    is_seg = path.name.lower().endswith(".seg.nrrd") or bool(segs)
    label = (is_seg or (looks_like_label_name(path) and data.dtype.kind in "iu")) \
        if is_label is None else bool(is_label)
    names, colors = {}, {}
    if label and segs:
        data, names, colors = _segments(header, data, path)
    elif label and data.ndim == 4:
        raise MedSegError(f"holds a 4D array {data.shape} without segment fields; "
                          "cannot open it as labels", str(path))
    return Volume(
        data=data,
        affine=affine,
        modality="unknown",
        is_label=label,
        label_names=names,
        label_colors=colors,
        source=str(path),
        meta={"format": "nrrd", "file_dtype": str(data.dtype)},
    )


def _segment_header(data, vol: Volume) -> dict:
    ids = sorted(set(int(i) for i in np.unique(data) if i != 0) | set(
        int(k) for k in vol.label_names if int(k) != 0))
    hdr = {}
    for n, lid in enumerate(ids):
        color = vol.label_colors.get(lid) or _PALETTE[n % len(_PALETTE)]
        zyx = np.nonzero(data == lid)
        if zyx[0].size:
            k0, j0, i0 = (int(a.min()) for a in zyx)
            k1, j1, i1 = (int(a.max()) for a in zyx)
        else:
            k0 = j0 = i0 = 0
            k1, j1, i1 = (s - 1 for s in data.shape)
        p = f"Segment{n}_"
        hdr[p + "ID"] = f"Segment_{lid}"
        hdr[p + "Name"] = str(vol.label_names.get(lid, f"Segment_{lid}"))
        hdr[p + "NameAutoGenerated"] = "0" if lid in vol.label_names else "1"
        hdr[p + "Color"] = " ".join(f"{float(c):.6g}" for c in tuple(color)[:3])
        hdr[p + "ColorAutoGenerated"] = "0" if lid in vol.label_colors else "1"
        hdr[p + "LabelValue"] = str(lid)
        hdr[p + "Layer"] = "0"
        hdr[p + "Extent"] = f"{i0} {i1} {j0} {j1} {k0} {k1}"
        hdr[p + "Tags"] = "|"
    hdr["Segmentation_MasterRepresentation"] = "Binary labelmap"
    hdr["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    hdr["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    return hdr


def write_nrrd(tmp_path, vol: Volume, final_path, as_label: bool) -> None:
    """Write ``vol`` as gzip NRRD in LPS space; label maps carry Slicer segment fields."""
    import nrrd

    data = prepare_label_data(vol, final_path) if as_label else np.asarray(vol.data)
    m = LPS_TO_RAS @ vol.affine[:3, :3]
    header = {
        "encoding": "gzip",
        "space": "left-posterior-superior",
        "space origin": LPS_TO_RAS @ vol.affine[:3, 3],
    }
    if data.ndim == 4:
        header["kinds"] = ["vector", "domain", "domain", "domain"]
        header["space directions"] = np.vstack([np.full(3, np.nan), m.T])
    else:
        header["kinds"] = ["domain", "domain", "domain"]
        header["space directions"] = m.T
    if as_label:
        header.update(_segment_header(data, vol))
    fdata = np.moveaxis(data, 0, -1) if data.ndim == 4 else data
    nrrd.write(str(tmp_path), np.ascontiguousarray(fdata), header, index_order="C",
               compression_level=1)
