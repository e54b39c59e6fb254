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
from ._common import check_spatial, looks_like_label_name, prepare_label_data

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
            header = nrrd.read_header(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise MedSegError("file not found", str(path)) from None
    except Exception as exc:
        raise MedSegError(f"is not a readable NRRD file ({exc}); the file may be corrupt",
                          str(path)) from exc
    n = len(header.get("sizes", ()))
    consistent = n > 0 and "type" in header and all(
        len(header[k]) == n for k in ("kinds", "space directions") if k in header)
    if not consistent:
        raise MedSegError("has an incomplete or inconsistent NRRD header; the file may be "
                          "truncated or corrupt", str(path))
    return header, offset


def _read_data(path: Path, header, offset: int, lazy: bool):
    """Voxel array in ``C`` order (slowest axis first), memory-mapped when raw."""
    import nrrd
    from nrrd.reader import _determine_datatype

    sizes = tuple(int(s) for s in header["sizes"])[::-1]
    raw = header.get("encoding", "raw") == "raw"
    attached = "data file" not in header and "datafile" not in header
    skips = int(header.get("line skip", 0)) or int(header.get("byte skip", 0))
    if lazy and raw and attached and not skips:
        dtype = _determine_datatype(header)
        need = offset + int(np.prod(sizes)) * dtype.itemsize
        if path.stat().st_size < need:
            raise MedSegError(f"is truncated ({path.stat().st_size} bytes, the header "
                              f"promises {need})", str(path))
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=sizes)
    try:
        data, _ = nrrd.read(str(path), index_order="C")
    except Exception as exc:
        raise MedSegError(f"could not read the voxel data ({exc}); the file may be "
                          "truncated or corrupt", str(path)) from exc
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
    sizes, spatial = _spatial_axes(header, path)
    return tuple(sizes[a] for a in spatial)[::-1], _affine(header, spatial)


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
    sizes, spatial = _spatial_axes(header, path)
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
        affine=_affine(header, spatial),
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
