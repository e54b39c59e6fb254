"""DICOM series from a folder, through pydicom.

Files are grouped by SeriesInstanceUID (and, inside a series, by image size
and orientation), sorted by their position along the slice normal, rescaled
to real units (Hounsfield units for CT) and placed with an affine built from
ImageOrientationPatient, PixelSpacing and ImagePositionPatient. Gaps and
uneven slice spacing are reported as warnings (also kept in
``vol.meta["warnings"]``).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.volume import LPS_TO_RAS, Volume
from ..errors import MedSegError
from ._common import check_geometry, check_size, check_spatial, file_size, guarded, one_line

log = logging.getLogger(__name__)

__all__ = ["is_dicom_file", "looks_like_dicom_folder", "read_dicom", "read_dicom_series",
           "scan_series"]

_NON_IMAGE = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "REG", "KO", "DOC"}
_DICOMDIR_UID = "1.2.840.10008.1.3.10"


def is_dicom_file(path) -> bool:
    """True when ``path`` starts with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_dicom_folder(path, max_probe: int = 50, max_entries: int = 2000) -> bool:
    """True when a folder (or its sub-folders) holds a DICOM file.

    Looks at no more than ``max_probe`` files and ``max_entries`` directory
    entries, so dropping a large unrelated folder on napari stays quick.
    """
    probed = seen = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            seen += 1
            p = Path(root) / name
            if name.lower().endswith(".dcm") or is_dicom_file(p):
                return True
            probed += 1
            if probed >= max_probe or seen >= max_entries:
                return False
        seen += len(dirs)
        if seen >= max_entries:
            return False
    return False


@dataclass
class Series:
    """One stack of same-sized, same-orientation slices of one DICOM series."""

    uid: str
    description: str
    number: str
    modality: str
    headers: list = field(default_factory=list)  # (path, dataset without pixels)
    #: DICOM-named files of the folder that could not be read (may be its slices).
    unreadable: list = field(default_factory=list)

    def label(self) -> str:
        """Human-readable name: number, description, slice count and UID."""
        desc = f" '{self.description}'" if self.description else ""
        return f"series {self.number}{desc} ({len(self.headers)} slices, UID {self.uid})"


def scan_series(folder) -> list[Series]:
    """Group the image files under ``folder`` into series, largest first.

    Raises
    ------
    MedSegError
        When the folder holds no DICOM image.
    """
    import pydicom

    folder = Path(folder)
    groups: dict[tuple, Series] = {}
    skipped = 0
    incomplete: list[tuple[Path, str | None]] = []  # (file, its series UID if known)
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or not (p.suffix.lower() == ".dcm" or is_dicom_file(p)):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID",
                                    ""))
            if sop_class == _DICOMDIR_UID or str(ds.get("Modality", "")) in _NON_IMAGE:
                skipped += 1
                continue
            if ("Rows" not in ds or "ImagePositionPatient" not in ds
                    or "ImageOrientationPatient" not in ds):
                skipped += 1  # no image slice, or one cut short: may belong to a series
                incomplete.append((p, str(ds.get("SeriesInstanceUID", "")) or None))
                continue
            iop = tuple(round(float(v), 3) for v in ds.ImageOrientationPatient)
            ipp = [float(v) for v in ds.ImagePositionPatient]
            key = (str(ds.get("SeriesInstanceUID", "")), int(ds.Rows), int(ds.Columns), iop)
            if len(iop) != 6 or len(ipp) != 3 or not np.all(np.isfinite(iop + tuple(ipp))) \
                    or key[1] < 1 or key[2] < 1:
                raise ValueError("implausible position, orientation or size")
        except Exception as exc:  # noqa: BLE001 - pydicom raises anything on corrupt files
            log.warning("%s: not readable as DICOM (%s); skipped", p, one_line(exc, 100))
            skipped += 1
            incomplete.append((p, None))
            continue
        if key not in groups:
            groups[key] = Series(uid=key[0], description=str(ds.get("SeriesDescription", "")),
                                 number=str(ds.get("SeriesNumber", "?")),
                                 modality=str(ds.get("Modality", "unknown")))
        groups[key].headers.append((p, ds))
    for s in groups.values():
        s.unreadable = [p for p, uid in incomplete if uid is None or uid == s.uid]
    if not groups:
        raise MedSegError(
            "holds no DICOM images with position information"
            + (f" ({skipped} other DICOM files were ignored)" if skipped else "")
            + "; choose the folder of a CT / MR / PET series", str(folder))
    return sorted(groups.values(), key=lambda s: -len(s.headers))


def _sorted_positions(series: Series, folder):
    """Sort slices along the normal; return normal-projected distances and warnings."""
    ds0 = series.headers[0][1]
    iop = np.asarray(ds0.ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = [np.asarray(h[1].ImagePositionPatient, dtype=float) for h in series.headers]
    dist = np.array([float(p @ normal) for p in pos])
    order = np.argsort(dist, kind="stable")
    series.headers = [series.headers[i] for i in order]
    dist = dist[order]
    notes = []
    dup = np.flatnonzero(np.diff(dist) < 1e-3)
    if dup.size:
        notes.append(f"{series.label()} in {folder}: {dup.size} slices share a position "
                     "with another slice (several echoes or time points?); only the first "
                     "slice at each position is used")
        keep = np.ones(len(dist), bool)
        keep[dup + 1] = False
        series.headers = [h for h, k in zip(series.headers, keep) if k]
        dist = dist[keep]
    return row, col, dist, notes


def _spacing_notes(series: Series, dist, folder) -> tuple[float, list[str]]:
    """Median slice spacing (mm) and warnings about gaps or uneven spacing."""
    if dist.size < 2:
        return 1.0, []
    steps = np.diff(dist)
    med = float(np.median(steps))
    notes = []
    gaps = np.flatnonzero(steps > 1.5 * med)
    if gaps.size:
        missing = int(sum(round(steps[g] / med) - 1 for g in gaps))
        where = ", ".join(f"after slice {g} ({steps[g]:.2f} mm)" for g in gaps[:5])
        notes.append(f"{series.label()} in {folder}: gap in the slice positions {where}; "
                     f"about {missing} slices are missing (regular spacing {med:.3g} mm). "
                     "Positions beyond the gap are shown up to "
                     f"{float(np.max(np.abs(dist - dist[0] - med * np.arange(dist.size)))):.3g}"
                     " mm off")
    elif np.ptp(steps) > max(0.01, 0.01 * med):
        notes.append(f"{series.label()} in {folder}: uneven slice spacing from "
                     f"{steps.min():.4g} to {steps.max():.4g} mm (median {med:.4g} mm); "
                     "the volume uses the median spacing")
    return med, notes


def _check_pixel_size(hdr, path: Path) -> None:
    """Rows x Columns x frames x samples against the file's size, before decoding."""
    try:
        shape = (int(hdr.get("NumberOfFrames", 1) or 1), int(hdr.Rows), int(hdr.Columns),
                 int(hdr.get("SamplesPerPixel", 1) or 1))
        itemsize = max(1, (int(hdr.get("BitsAllocated", 16) or 16) + 7) // 8)
        syntax = getattr(getattr(hdr, "file_meta", None), "TransferSyntaxUID", None)
        compressed = bool(getattr(syntax, "is_compressed", False)) or \
            bool(getattr(syntax, "is_deflated", False))
    except (TypeError, ValueError, AttributeError) as exc:
        raise MedSegError(f"{path.name} has unreadable image size fields ({exc}); the file "
                          "is corrupt", str(path)) from exc
    check_size(shape, itemsize, file_size(path), path, compressed=compressed,
               what="its DICOM header")


def _pixels(series: Series, folder):
    """Stack rescaled slices to ``(Z, Y, X)``: int16 when exact, else float32."""
    import pydicom

    slopes, inters, planes = [], [], []
    for path, hdr in series.headers:
        _check_pixel_size(hdr, path)
        try:
            arr = pydicom.dcmread(path).pixel_array
        except Exception as exc:
            raise MedSegError(
                f"cannot decode the pixel data of {path.name} in {series.label()} ({exc}); "
                "compressed DICOM may need `pip install pylibjpeg pylibjpeg-libjpeg`",
                str(folder)) from exc
        if arr.ndim != 2:
            check_spatial(arr.shape, path, rgb=arr.ndim == 3 and arr.shape[-1] in (3, 4))
            raise MedSegError(f"{path.name} is a multi-frame image; open the file itself",
                              str(folder))
        expected = planes[0].shape if planes else (int(hdr.Rows), int(hdr.Columns))
        if arr.shape != expected:
            raise MedSegError(f"{path.name} in {series.label()} holds a {arr.shape} image, "
                              "not the series' size; the file is corrupt", str(folder))
        planes.append(arr)
        try:
            slope = float(hdr.get("RescaleSlope", 1) or 1)
            inter = float(hdr.get("RescaleIntercept", 0) or 0)
        except (TypeError, ValueError):
            slope = inter = float("nan")
        if not (np.isfinite(slope) and np.isfinite(inter)) or abs(slope) > 1e6 \
                or abs(inter) > 1e9:
            raise MedSegError(f"{path.name} in {series.label()} has an unusable rescale "
                              f"(RescaleSlope {hdr.get('RescaleSlope')}, RescaleIntercept "
                              f"{hdr.get('RescaleIntercept')}); the file is corrupt; fix or "
                              "remove that slice", str(folder))
        slopes.append(slope)
        inters.append(inter)
    raw = np.stack(planes)
    slopes, inters = np.array(slopes), np.array(inters)
    if np.all(slopes == 1) and np.all(inters == np.round(inters)):
        lo = float(raw.min()) + inters.min()
        hi = float(raw.max()) + inters.max()
        if -32768 <= lo and hi <= 32767:
            return raw.astype(np.int16) + inters.astype(np.int16)[:, None, None]
    out = raw.astype(np.float32) * slopes.astype(np.float32)[:, None, None]
    return out + inters.astype(np.float32)[:, None, None]


def _volume(series: Series, folder) -> Volume:
    row, col, dist, notes = _sorted_positions(series, folder)
    med, more = _spacing_notes(series, dist, folder)
    notes += more
    ds0 = series.headers[0][1]
    check_spatial((len(series.headers), int(ds0.Rows), int(ds0.Columns)), folder)
    first = np.asarray(ds0.ImagePositionPatient, dtype=float)
    last = np.asarray(series.headers[-1][1].ImagePositionPatient, dtype=float)
    kdir = (last - first) / np.linalg.norm(last - first)
    kdir = kdir / float(kdir @ np.cross(row, col))  # gantry tilt: keep the in-plane offset
    dy, dx = (float(v) for v in ds0.get("PixelSpacing", [1.0, 1.0]))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * dx, col * dy, kdir * med
    lps[:3, 3] = first
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ lps[:3]
    affine = check_geometry(affine, folder)
    if series.unreadable:
        names = ", ".join(p.name for p in series.unreadable[:3])
        more = f" and {len(series.unreadable) - 3} more" if len(series.unreadable) > 3 else ""
        notes.append(f"{len(series.unreadable)} DICOM file(s) in {folder} could not be read "
                     f"({names}{more}); if they belong to {series.label()}, slices are missing "
                     "(at its ends, where no gap shows); check or replace those files")
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=3)
    data = _pixels(series, folder)
    files = [str(p) for p, _ in series.headers]
    return Volume(
        data=data, affine=affine, modality=series.modality, source=str(folder),
        meta={
            "format": "dicom",
            "warnings": notes,
            "dicom_files": files,
            "dicom_sop_instance_uids": [str(h.get("SOPInstanceUID", "")) for _, h in
                                        series.headers],
            "dicom_series_instance_uid": series.uid,
            "dicom_study_instance_uid": str(ds0.get("StudyInstanceUID", "")),
            "dicom_frame_of_reference_uid": str(ds0.get("FrameOfReferenceUID", "")),
            "dicom_series_description": series.description,
            "dicom_series_number": series.number,
            "dicom_patient_id": str(ds0.get("PatientID", "")),
        },
    )


def _folder_and_filter(path: Path):
    """A folder to scan and, for a single file, the series UID it belongs to."""
    if path.is_dir():
        return path, None
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise MedSegError(f"is not a readable DICOM file ({exc})", str(path)) from exc
    return path.parent, str(ds.get("SeriesInstanceUID", ""))


def read_dicom_series(path, lazy: bool = True) -> list[Volume]:
    """Every image series under a folder as its own Volume, largest first.

    ``lazy`` is accepted for symmetry with the other readers; DICOM slices are
    read whole.
    """
    folder, uid = _folder_and_filter(Path(path))
    with guarded(folder):
        return _read_series(path, folder, uid)


def _read_series(path, folder, uid) -> list[Volume]:
    series = [s for s in scan_series(folder) if uid is None or s.uid == uid]
    if not series:
        raise MedSegError("its series has no images with position information", str(path))
    stacks = [s for s in series if len(s.headers) > 1]
    for s in series:
        if len(s.headers) < 2:
            log.info("%s: skipped %s (a single 2D image)", folder, s.label())
    if not stacks:
        return [_volume(series[0], folder)]  # raises: a 2D image
    return [_volume(s, folder) for s in stacks]


def read_dicom(path, lazy: bool = True) -> Volume:
    """Read the DICOM series in a folder (or the series of one ``.dcm`` file).

    When the folder holds several series, the one with the most slices is read
    and a warning names the folder, the chosen series and the others.

    Returns
    -------
    Volume
        ``(Z, Y, X)`` rescaled values (HU for CT; ``int16`` when exact, else
        ``float32``), RAS affine; ``meta["dicom_files"]`` lists the slice files in
        order, ``meta["dicom_sop_instance_uids"]`` their SOP Instance UIDs.
    """
    folder, uid = _folder_and_filter(Path(path))
    with guarded(folder):
        return _read_one(path, folder, uid)


def _read_one(path, folder, uid) -> Volume:
    series = [s for s in scan_series(folder) if uid is None or s.uid == uid]
    if not series:
        raise MedSegError("its series has no images with position information", str(path))
    chosen = series[0]
    if len(chosen.headers) < 2:
        raise MedSegError(
            f"holds only single 2D DICOM images ({len(series)} series, none with more than "
            "one slice at the same orientation); choose a folder with a 3D series",
            str(folder))
    if len(series) > 1:
        others = "; ".join(s.label() for s in series[1:6])
        if len(series) > 6:
            others += f"; and {len(series) - 6} more"
        msg = (f"{folder} holds {len(series)} DICOM series; opened the largest, "
               f"{chosen.label()}. Others: {others}")
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
    vol = _volume(chosen, folder)
    if len(series) > 1:
        vol.meta["warnings"].insert(0, msg)
    return vol
