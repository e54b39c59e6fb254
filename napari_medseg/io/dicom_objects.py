"""DICOM Segmentations (SEG) and RT Structure Sets (RTSTRUCT) as label maps.

A SEG is decoded by highdicom (``dicomseg`` extra); an RTSTRUCT by pydicom,
its closed planar contours filled slice by slice with scikit-image (even-odd
rule, so inner contours are holes). The result lies on the grid of the
*referenced series* when it is given (an open image, or the series found in
the same folder), else, for a SEG, on the SEG's own frame geometry; an
RTSTRUCT has no grid of its own and needs its series.

Segments that overlap are never merged: they are spread over as few label
maps as possible (one :class:`~napari_medseg.core.volume.Volume` per group of
mutually disjoint segments), so every voxel of every segment survives.

Headers are checked before anything is allocated: frame counts and sizes
against the file length, finite contour coordinates whose count matches
``NumberOfContourPoints``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..core.volume import LPS_TO_RAS, Volume
from ..errors import MedSegError

log = logging.getLogger(__name__)

__all__ = ["dicom_object_kind", "find_dicom_objects", "referenced_series_uid",
           "read_dicom_seg", "read_rtstruct", "read_dicom_object", "group_disjoint"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_MAX_VOXELS = 2 ** 31


def _header(path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types
        raise MedSegError(f"is not a readable DICOM file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120] if str(exc) else ''})",
                          str(path)) from exc


def dicom_object_kind(path) -> str | None:
    """``"SEG"``, ``"RTSTRUCT"`` or None, from the header of one file (never raises)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "Modality"], force=True)
    except Exception:  # noqa: BLE001 - not DICOM: not ours
        return None
    sop = str(ds.get("SOPClassUID", ""))
    mod = str(ds.get("Modality", ""))
    if sop == SEG_SOP_CLASS or mod == "SEG":
        return "SEG"
    if sop == RTSTRUCT_SOP_CLASS or mod == "RTSTRUCT":
        return "RTSTRUCT"
    return None


def find_dicom_objects(folder, max_files: int = 5000) -> list[Path]:
    """SEG and RTSTRUCT files under ``folder`` (at most ``max_files`` files looked at)."""
    from .dicom import is_dicom_file

    out = []
    for n, p in enumerate(sorted(Path(folder).rglob("*"))):
        if n >= max_files:
            break
        if p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p)) \
                and dicom_object_kind(p):
            out.append(p)
    return out


def referenced_series_uid(ds) -> str | None:
    """SeriesInstanceUID of the image series a SEG or RTSTRUCT dataset refers to."""
    for item in ds.get("ReferencedSeriesSequence", []) or []:
        if "SeriesInstanceUID" in item:
            return str(item.SeriesInstanceUID)
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        for study in frame.get("RTReferencedStudySequence", []) or []:
            for series in study.get("RTReferencedSeriesSequence", []) or []:
                if "SeriesInstanceUID" in series:
                    return str(series.SeriesInstanceUID)
    return None


def frame_of_reference_uid(ds) -> str:
    """FrameOfReferenceUID of a SEG or RTSTRUCT dataset ("" when none)."""
    if str(ds.get("FrameOfReferenceUID", "")):
        return str(ds.FrameOfReferenceUID)
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        if str(frame.get("FrameOfReferenceUID", "")):
            return str(frame.FrameOfReferenceUID)
    return ""


def _find_reference(path: Path, ds, candidates) -> Volume | None:
    """The referenced series: among ``candidates`` (Volumes), else in the file's folder.

    Matched by SeriesInstanceUID; when that is empty (some anonymised data sets
    blank it), by FrameOfReferenceUID.
    """
    uid = referenced_series_uid(ds) or ""
    frame = frame_of_reference_uid(ds)

    def matches(series_uid, frame_uid):
        if uid:
            return series_uid == uid
        return bool(frame) and frame_uid == frame

    for v in candidates or ():
        if isinstance(v, Volume) and matches(v.meta.get("dicom_series_instance_uid", ""),
                                             v.meta.get("dicom_frame_of_reference_uid", "")):
            return v
    if not uid and not frame:
        return None
    from .dicom import _volume, scan_series

    try:
        series = [s for s in scan_series(path.parent) if len(s.headers) > 1 and matches(
            s.uid, str(s.headers[0][1].get("FrameOfReferenceUID", "")))]
    except MedSegError:
        return None
    return _volume(series[0], path.parent) if series else None


# ------------------------------------------------------------------ grouping
def group_disjoint(segments, shape) -> list[tuple[np.ndarray, dict, dict]]:
    """Spread segments over as few label maps as possible without merging any voxel.

    Parameters
    ----------
    segments : sequence of (int, str, tuple or None, numpy.ndarray)
        ``(number, name, rgb or None, mask)``; each mask is a boolean ``shape`` array.
    shape : tuple of int
        ``(Z, Y, X)``.

    Returns
    -------
    list of (labels, names, colors)
        Each ``labels`` is a ``(Z, Y, X)`` ``uint16`` map where each segment keeps
        its own number; a segment goes to the first map none of whose labelled
        voxels it touches.
    """
    groups: list[tuple[np.ndarray, dict, dict]] = []
    for number, name, rgb, mask in segments:
        for arr, names, colors in groups:
            if not np.any(arr[mask]):
                break
        else:
            arr, names, colors = np.zeros(shape, np.uint16), {}, {}
            groups.append((arr, names, colors))
        arr[mask] = int(number)
        names[int(number)] = str(name)
        if rgb is not None:
            colors[int(number)] = tuple(float(c) for c in rgb)
    return groups


def _volumes(groups, affine, path: Path, kind: str, reference: Volume | None) -> list[Volume]:
    out = []
    for n, (arr, names, colors) in enumerate(groups):
        meta = {"format": kind.lower(), "dicom_object": kind,
                "reference": None if reference is None else reference.source}
        if reference is not None:
            meta.update({k: v for k, v in reference.meta.items() if k.startswith("dicom_")
                         and k != "dicom_object"})
        if len(groups) > 1:
            meta["overlap_group"] = n + 1
            meta["warnings"] = [f"{path.name}: overlapping segments are in {len(groups)} "
                                "label layers (none merged)"]
        out.append(Volume(arr, affine=np.array(affine, float), modality="unknown",
                          is_label=True, label_names=names, label_colors=colors,
                          source=str(path), meta=meta))
    return out


# ------------------------------------------------------------------------ SEG
def _check_seg_header(ds, path: Path) -> None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.get("BitsAllocated", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise MedSegError(f"is a DICOM SEG without a valid image size ({exc}); the file is "
                          "corrupt", str(path)) from exc
    if min(rows, cols, frames) < 1 or rows * cols * frames > _MAX_VOXELS:
        raise MedSegError(f"is a DICOM SEG claiming {frames} frames of {rows} x {cols}; the "
                          "header is corrupt", str(path))
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"):
        need = (rows * cols * frames * bits + 7) // 8
        size = path.stat().st_size
        if size < need:
            raise MedSegError(f"is a DICOM SEG of {frames} frames of {rows} x {cols} "
                              f"({need} bytes of pixels) but the file has {size} bytes; it is "
                              "truncated", str(path))


def _seg_color(desc):
    lab = desc.get("RecommendedDisplayCIELabValue")
    if lab is None:
        return None
    try:
        import highdicom as hd

        rgb = hd.color.CIELabColor.from_dicom_value(lab).to_rgb()
        return tuple(float(c) / 255.0 for c in rgb[:3])
    except Exception:  # noqa: BLE001 - a bad colour is not worth failing for
        return None


def read_dicom_seg(path, reference: Volume | None = None, candidates=()) -> list[Volume]:
    """Read a DICOM SEG file as label map(s).

    Parameters
    ----------
    path : str or Path
        The SEG file.
    reference : Volume, optional
        The referenced series (read from DICOM); when None it is looked for
        among ``candidates`` and in the file's folder, else the SEG's own frame
        geometry is used.
    candidates : sequence of Volume
        Open images to look for the referenced series in.

    Returns
    -------
    list of Volume
        One ``(Z, Y, X)`` label map per group of disjoint segments, each
        segment labelled with its segment number, named by its SegmentLabel,
        coloured by its recommended display colour.
    """
    try:
        import highdicom as hd
    except ImportError as exc:  # pragma: no cover - optional extra
        raise MedSegError("reading DICOM SEG needs highdicom: pip install "
                          "'napari-medseg[dicomseg]'", str(path)) from exc
    path = Path(path)
    hdr = _header(path)
    _check_seg_header(hdr, path)
    if reference is None:
        reference = _find_reference(path, hdr, candidates)
    try:
        seg = hd.seg.segread(str(path))
        numbers = list(seg.get_segment_numbers())
        if reference is not None and reference.meta.get("dicom_sop_instance_uids"):
            uids = list(reference.meta["dicom_sop_instance_uids"])
            if not all(uids) and reference.meta.get("dicom_files"):  # UIDs in the file meta
                from .export.dicomseg import read_source_headers

                uids = [str(h.SOPInstanceUID)
                        for h in read_source_headers(reference.meta["dicom_files"])]
            pix = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=uids, segment_numbers=numbers,
                combine_segments=False, assert_missing_frames_are_empty=False,
                ignore_spatial_locations=True)
            masks = np.moveaxis(np.asarray(pix) > 0, -1, 0)  # (S, Z, Y, X)
            affine = reference.affine
        else:
            vol = seg.get_volume(segment_numbers=numbers, combine_segments=False)
            arr = np.asarray(vol.array)
            masks = np.moveaxis(arr > 0, -1, 0) if arr.ndim == 4 else (arr > 0)[None]
            hd_aff = np.asarray(vol.affine, float)  # (slice, row, col) index -> LPS
            lps = np.eye(4)
            lps[:3, 0], lps[:3, 1], lps[:3, 2] = hd_aff[:3, 2], hd_aff[:3, 1], hd_aff[:3, 0]
            lps[:3, 3] = hd_aff[:3, 3]
            affine = np.eye(4)
            affine[:3] = LPS_TO_RAS @ lps[:3]
            reference = None
    except MedSegError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom's errors: one line for the user
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise MedSegError(f"could not decode the DICOM SEG ({msg})", str(path)) from exc
    segments = []
    for n, mask in zip(numbers, masks):
        desc = seg.get_segment_description(n)
        segments.append((n, str(desc.segment_label), _seg_color(desc), mask))
    return _volumes(group_disjoint(segments, masks.shape[1:]), affine, path, "SEG", reference)


# ------------------------------------------------------------------- RTSTRUCT
def _contour_points(item, path: Path) -> np.ndarray:
    data = item.get("ContourData")
    n = int(item.get("NumberOfContourPoints", 0) or 0)
    if data is None:
        return np.zeros((0, 3))
    pts = np.asarray([float(v) for v in data], float)
    if pts.size % 3 or (n and pts.size != 3 * n):
        raise MedSegError(f"has a contour with {pts.size} coordinates for "
                          f"{n} points; the RTSTRUCT is corrupt", str(path))
    if not np.all(np.isfinite(pts)):
        raise MedSegError("has a contour with non-finite coordinates; the RTSTRUCT is "
                          "corrupt", str(path))
    return pts.reshape(-1, 3)


def read_rtstruct(path, reference: Volume | None = None, candidates=()) -> list[Volume]:
    """Read an RT Structure Set as label map(s) on its referenced series' grid.

    Parameters
    ----------
    path : str or Path
        The RTSTRUCT file.
    reference : Volume, optional
        The referenced image series; by default looked for among
        ``candidates`` and in the file's folder.
    candidates : sequence of Volume
        Open images to look for the referenced series in.

    Returns
    -------
    list of Volume
        One label map per group of disjoint ROIs; each ROI keeps its ROINumber
        as label, its ROIName and ROIDisplayColor.

    Raises
    ------
    MedSegError
        When the referenced series is neither given nor found, or a contour is
        malformed or lies off the series' slices.
    """
    from skimage.draw import polygon

    path = Path(path)
    ds = _header(path)
    if reference is None:
        reference = _find_reference(path, ds, candidates)
    if reference is None:
        raise MedSegError("is an RTSTRUCT whose image series is neither open nor in its "
                          "folder; open the referenced CT / MR series first", str(path))
    shape = reference.shape3
    inv = np.linalg.inv(reference.affine)
    names = {int(r.ROINumber): str(r.get("ROIName", f"ROI {r.ROINumber}"))
             for r in ds.get("StructureSetROISequence", []) or []}
    segments = []
    for rc in ds.get("ROIContourSequence", []) or []:
        number = int(rc.ReferencedROINumber)
        color = rc.get("ROIDisplayColor")
        rgb = None if color is None else tuple(float(c) / 255.0 for c in list(color)[:3])
        mask = np.zeros(shape, bool)
        for item in rc.get("ContourSequence", []) or []:
            pts = _contour_points(item, path)
            if len(pts) == 0:
                continue
            ras = pts @ LPS_TO_RAS.T
            ijk = ras @ inv[:3, :3].T + inv[:3, 3]
            if str(item.get("ContourGeometricType", "CLOSED_PLANAR")) == "POINT" \
                    or len(pts) < 3:
                continue
            k = np.rint(ijk[:, 2])
            if np.ptp(ijk[:, 2]) > 0.5 or not 0 <= k[0] < shape[0]:
                raise MedSegError(f"ROI '{names.get(number, number)}' has a contour off the "
                                  "slices of its image series; open the series it was drawn "
                                  "on", str(path))
            rr, cc = polygon(ijk[:, 1], ijk[:, 0], shape=shape[1:])
            plane = np.zeros(shape[1:], bool)
            plane[rr, cc] = True
            mask[int(k[0])] ^= plane  # even-odd: an inner contour is a hole
        segments.append((number, names.get(number, f"ROI {number}"), rgb, mask))
    if not segments:
        raise MedSegError("is an RTSTRUCT without contours", str(path))
    return _volumes(group_disjoint(segments, shape), reference.affine, path, "RTSTRUCT",
                    reference)


def read_dicom_object(path, candidates=()) -> list[Volume]:
    """Read a SEG or RTSTRUCT file (see :func:`read_dicom_seg`, :func:`read_rtstruct`)."""
    kind = dicom_object_kind(path)
    if kind == "SEG":
        return read_dicom_seg(path, candidates=candidates)
    if kind == "RTSTRUCT":
        return read_rtstruct(path, candidates=candidates)
    raise MedSegError("is neither a DICOM SEG nor an RTSTRUCT", str(path))
