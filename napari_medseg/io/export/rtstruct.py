"""DICOM RT Structure Sets (RTSTRUCT) from a label map on a DICOM series.

highdicom does not write RTSTRUCT, and rt-utils needs OpenCV, so this is
pydicom plus scikit-image: each class becomes one ROI; on every source slice
its outline is traced with :func:`skimage.measure.find_contours` (on the
pixel-edge midpoints, so a filled polygon gives back the same pixels) and
stored as ``CLOSED_PLANAR`` contours in patient coordinates (LPS mm), each
referencing its slice. Holes are inner contours; readers fill with the
even-odd rule, as :mod:`napari_medseg.io.rtstruct` does.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import numpy as np

from ...core.volume import Volume
from ...errors import MedSegError, check_cancel
from ..atomic import atomic_path, check_writable
from .dicomseg import _frame_index, read_source_headers, referenced_labels

log = logging.getLogger(__name__)

__all__ = ["export_rtstruct", "RTSTRUCT_SOP_CLASS"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_DEFAULT_COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                   (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines ``(N, 2)`` (row, col) of a 2D boolean mask, pixel centres as integers."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.uint8), 1)
    out = []
    for c in find_contours(padded, 0.5):
        c = c - 1.0  # undo the padding
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]  # DICOM closes the polygon itself
        if len(c) >= 3:
            out.append(c)
    return out


def _copy_patient_study(ds, ref) -> None:
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
               "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, kw, ref.get(kw, "") if kw != "StudyInstanceUID" else ref.StudyInstanceUID)


def export_rtstruct(path, labels: Volume, source=None, label_names=None, label_colors=None,
                    series_description=None, overwrite: bool = False, progress=None,
                    cancel=None) -> Path:
    """Write ``labels`` as an RTSTRUCT referencing the source DICOM series.

    Parameters
    ----------
    path : str or Path
        Target file (``.dcm``).
    labels : Volume
        ``(Z, Y, X)`` integer label map on the grid of the source series.
    source : Volume or sequence of paths, optional
        The image read from DICOM (its ``meta["dicom_files"]``) or its slice
        files; default ``labels.meta["dicom_files"]``.
    label_names, label_colors : dict, optional
        ROI names and RGB(A) colours in [0, 1] by class id (default: the
        Volume's own).
    series_description : str, optional
        Series Description of the structure set.
    overwrite : bool
        Replace an existing file.
    progress, cancel : callable, optional
        ``progress(done, total)`` and ``cancel() -> bool``.

    Returns
    -------
    Path
        The written file: one ROI per non-empty class, in class-id order, with
        ``ROINumber`` = class id.

    Raises
    ------
    MedSegError
        No DICOM source, labels off its grid, empty labels, or an unwritable target.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from ... import __version__

    path = check_writable(path, overwrite)
    files, lab, ids = referenced_labels(labels, source, path, "an RTSTRUCT")
    names = dict(label_names if label_names is not None else labels.label_names)
    colors = dict(label_colors if label_colors is not None else labels.label_colors)

    datasets = read_source_headers(files)
    ref = datasets[0]
    inv = np.linalg.inv(labels.affine)
    contours: dict[int, list] = {k: [] for k in ids}
    for n, ds in enumerate(datasets):
        check_cancel(cancel)
        try:
            plane = lab[_frame_index(ds, inv, lab.shape)]
        except (ValueError, AttributeError) as exc:
            raise MedSegError(f"the labels are not on the grid of the DICOM slice "
                              f"{Path(files[n]).name} ({exc}); export labels drawn on this "
                              "series", str(path)) from exc
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for k in np.unique(plane):
            if k <= 0:
                continue
            for rc in _contours(plane == k):
                pts = ipp[None] + np.outer(rc[:, 1] * dc, iop[:3]) + \
                    np.outer(rc[:, 0] * dr, iop[3:])
                contours[int(k)].append((ds, pts))
        if progress:
            progress(n + 1, len(datasets) + 1)

    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    _copy_patient_study(ds, ref)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(ref.get("SeriesNumber") or 0) + 200
    ds.SeriesDescription = (series_description or "Structure set")[:64]
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = ref.get("FrameOfReferenceUID", "")
    ds.Manufacturer = "napari-medseg"
    ds.ManufacturerModelName = "napari-medseg"
    ds.SoftwareVersions = __version__
    ds.StructureSetLabel = "napari-medseg"
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")

    def contour_image(d):
        item = Dataset()
        item.ReferencedSOPClassUID = d.SOPClassUID
        item.ReferencedSOPInstanceUID = d.SOPInstanceUID
        return item

    series = Dataset()
    series.SeriesInstanceUID = ref.SeriesInstanceUID
    series.ContourImageSequence = Sequence([contour_image(d) for d in datasets])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    study.ReferencedSOPInstanceUID = ref.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ds.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois, roi_contours, observations = [], [], []
    for n, k in enumerate(ids):
        roi = Dataset()
        roi.ROINumber = k
        roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
        roi.ROIName = str(names.get(k, f"label {k}"))[:64]
        roi.ROIGenerationAlgorithm = "SEMIAUTOMATIC"
        rois.append(roi)
        rc = Dataset()
        c = colors.get(k)
        rgb = ([int(round(255 * float(v))) for v in tuple(c)[:3]] if c is not None
               else list(_DEFAULT_COLORS[n % len(_DEFAULT_COLORS)]))
        rc.ROIDisplayColor = rgb
        rc.ReferencedROINumber = k
        items = []
        for d, pts in contours[k]:
            item = Dataset()
            item.ContourImageSequence = Sequence([contour_image(d)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(pts)
            item.ContourData = [float(f"{v:.4f}") for v in pts.ravel()]
            items.append(item)
        rc.ContourSequence = Sequence(items)
        roi_contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = k
        obs.ReferencedROINumber = k
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    check_cancel(cancel)
    with atomic_path(path, overwrite=overwrite) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    if progress:
        progress(len(datasets) + 1, len(datasets) + 1)
    log.info("wrote RTSTRUCT with %d ROIs to %s", len(ids), path)
    return path
