"""DICOM Segmentation (SEG) objects that reference the source CT / MR series.

Needs the ``dicomseg`` extra (highdicom). The labels must lie on the grid of a
volume read from a DICOM series: its ``meta["dicom_files"]`` lists the slice
files. Each SEG frame is matched to its source slice by geometry (the slice's
position and orientation mapped onto the label grid), so any reordering or
flip applied by the reader is undone exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ...core.volume import LPS_TO_RAS, Volume
from ...errors import MedSegError, check_cancel
from ..atomic import atomic_path, check_writable

log = logging.getLogger(__name__)

__all__ = ["export_dicom_seg", "source_files"]

ALGORITHM_TYPES = ("MANUAL", "SEMIAUTOMATIC", "AUTOMATIC")

# name (lower case, "_" for spaces) -> (category, type) SNOMED CT keywords
_PROPERTY = {
    "liver": ("Organ", "Liver"), "spleen": ("Organ", "Spleen"),
    "kidney": ("Organ", "Kidney"), "kidney_left": ("Organ", "Kidney"),
    "kidney_right": ("Organ", "Kidney"), "lesion": ("MorphologicallyAbnormalStructure",
                                                    "Lesion"),
    "tumor": ("MorphologicallyAbnormalStructure", "Neoplasm"),
    "csf": ("Tissue", "CerebrospinalFluid"), "white_matter": ("Tissue", "WhiteMatter"),
}


def read_source_headers(files) -> list:
    """Headers of the source slices, with a missing SOP Class UID taken from the file meta.

    Some scanners and anonymisers leave (0008,0016) empty in the data set while
    the file meta information (0002,0002) holds it; references need it.
    """
    import pydicom

    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        meta_uid = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if not str(ds.get("SOPClassUID", "")) and meta_uid:
            ds.SOPClassUID = meta_uid
        meta_sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", ""))
        if not str(ds.get("SOPInstanceUID", "")) and meta_sop:
            ds.SOPInstanceUID = meta_sop
        out.append(ds)
    return out


def source_files(vol: Volume | None) -> list[str]:
    """The DICOM slice files a Volume was read from ([] when not from DICOM)."""
    if vol is None:
        return []
    return [str(f) for f in vol.meta.get("dicom_files") or []]


def referenced_labels(labels: Volume, source, path, what: str):
    """The source series' files, the label array and its class ids for a DICOM export.

    Parameters
    ----------
    labels : Volume
        3D integer labels on the source series' grid.
    source : Volume or sequence of paths, optional
        The DICOM image (or its files); by default the files ``labels`` was read with.
    path : path
        The output, named in errors.
    what : str
        The object written ("a DICOM SEG", "an RTSTRUCT"), named in errors.

    Raises
    ------
    MedSegError
        No DICOM source, labels that are not a 3D integer map, or empty labels.
    """
    files = source_files(source) if isinstance(source, Volume) else \
        [str(f) for f in (source or [])]
    files = files or source_files(labels)
    if not files:
        raise MedSegError(f"the image was not read from a DICOM series, so {what} cannot "
                          "reference it; open the DICOM folder, or export NIfTI / NRRD "
                          "instead", str(path))
    lab = np.asarray(labels.data)
    if lab.ndim != 3 or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise MedSegError(f"labels must be a 3D integer map, got {lab.dtype} {lab.shape}",
                          str(path))
    ids = [int(v) for v in np.unique(lab) if v > 0]
    if not ids:
        raise MedSegError("the labels are empty; draw or predict something first", str(path))
    return files, lab, ids


def _codes(name: str):
    from pydicom.sr.codedict import codes

    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    cat, typ = _PROPERTY.get(key, ("Tissue", "Tissue"))
    return getattr(codes.SCT, cat), getattr(codes.SCT, typ)


def _frame_index(ds, inv_affine: np.ndarray, shape3) -> tuple[np.ndarray, ...]:
    """Label-array indices ``(k, j, i)`` of every pixel of one source slice.

    Returns three ``(rows, cols)`` int arrays. Raises when the slice does not
    lie on the label grid.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = ipp[:, None, None] + iop[:3, None, None] * (c * dc) + iop[3:, None, None] * (r * dr)
    ras = np.tensordot(LPS_TO_RAS, lps, axes=1)
    ijk = np.tensordot(inv_affine[:3, :3], ras, axes=1) + inv_affine[:3, 3, None, None]
    idx = np.rint(ijk)
    if np.abs(ijk - idx).max() > 0.05:
        raise ValueError("off grid")
    idx = idx.astype(np.int64)
    for ax, n in zip(range(3), shape3[::-1]):
        if idx[ax].min() < 0 or idx[ax].max() >= n:
            raise ValueError("outside")
    return idx[2], idx[1], idx[0]


def _display_color(rgb):
    """A class colour (RGB floats in [0, 1]) as the segment's recommended CIELab colour."""
    if rgb is None:
        return None
    import highdicom as hd

    r, g, b = (int(round(255 * min(max(float(c), 0.0), 1.0))) for c in tuple(rgb)[:3])
    return hd.color.CIELabColor.from_rgb(r, g, b)


def export_dicom_seg(path, labels: Volume, source=None, label_names=None,
                     algorithm_type: str = "SEMIAUTOMATIC", algorithm_name: str | None = None,
                     algorithm_version: str | None = None, series_description=None,
                     overwrite: bool = False, progress=None, cancel=None) -> Path:
    """Write ``labels`` as a DICOM SEG referencing the source DICOM series.

    Parameters
    ----------
    path : str or Path
        Target file (``.dcm``).
    labels : Volume
        ``(Z, Y, X)`` integer label map on the grid of the source series.
    source : Volume or sequence of paths, optional
        The image read from DICOM (its ``meta["dicom_files"]``) or the slice
        files; default: ``labels.meta["dicom_files"]``.
    label_names : dict[int, str], optional
        Segment labels (default ``labels.label_names``).
    algorithm_type : {"MANUAL", "SEMIAUTOMATIC", "AUTOMATIC"}
        How the segments were made: SEMIAUTOMATIC for corrected model output.
    algorithm_name, algorithm_version : str, optional
        The model (required by DICOM unless the type is MANUAL; default
        ``"napari-medseg"``).
    series_description : str, optional
        Series Description of the SEG.
    overwrite : bool
        Replace an existing file.
    progress, cancel : callable, optional
        ``progress(done, total)`` and ``cancel() -> bool``.

    Returns
    -------
    Path
        The written file. Each non-empty class becomes one segment, numbered
        1..N in class-id order; its label is the class name.

    Raises
    ------
    MedSegError
        No DICOM source, labels off the source grid, no labelled voxels, an
        unknown algorithm type, or an unwritable target.
    """
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError as exc:  # pragma: no cover - optional extra
        raise MedSegError("DICOM SEG export needs highdicom: pip install "
                          "'napari-medseg[dicomseg]'") from exc
    from ... import __version__

    path = check_writable(path, overwrite)
    algorithm_type = str(algorithm_type).upper()
    if algorithm_type not in ALGORITHM_TYPES:
        raise MedSegError(f"algorithm type must be one of {', '.join(ALGORITHM_TYPES)}",
                          str(path))
    files, lab, ids = referenced_labels(labels, source, path, "a DICOM SEG")
    names = dict(label_names if label_names is not None else labels.label_names)
    lut = np.zeros(int(max(ids)) + 1, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1)

    datasets = read_source_headers(files)
    inv = np.linalg.inv(labels.affine)
    frames = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)),
                      np.uint8 if len(ids) < 256 else np.uint16)
    for n, ds in enumerate(datasets):
        check_cancel(cancel)
        try:
            frames[n] = lut[lab[_frame_index(ds, inv, lab.shape)]]
        except (ValueError, AttributeError) as exc:
            raise MedSegError(f"the labels are not on the grid of the DICOM slice "
                              f"{Path(files[n]).name} ({exc}); export labels drawn on "
                              "this series", str(path)) from exc
        if progress:
            progress(n + 1, len(datasets) + 1)

    algo = None
    if algorithm_type != "MANUAL":
        algo = hd.AlgorithmIdentificationSequence(
            name=algorithm_name or "napari-medseg",
            version=algorithm_version or __version__,
            family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    colors = dict(labels.label_colors or {})
    for seg_no, k in enumerate(ids, start=1):
        name = str(names.get(k, f"label {k}"))
        cat, typ = _codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=seg_no, segment_label=name[:64], segmented_property_category=cat,
            segmented_property_type=typ, algorithm_type=algorithm_type,
            algorithm_identification=algo, tracking_id=f"class {k}",
            tracking_uid=hd.UID(), display_color=_display_color(colors.get(k))))
    number = int(datasets[0].get("SeriesNumber") or 0) + 100
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="napari-medseg", manufacturer_model_name="napari-medseg",
        software_versions=__version__, device_serial_number="none",
        series_description=(series_description or "Segmentation")[:64])
    check_cancel(cancel)
    with atomic_path(path, overwrite=overwrite) as tmp:
        seg.save_as(tmp)
    if progress:
        progress(len(datasets) + 1, len(datasets) + 1)
    log.info("wrote DICOM SEG with %d segments to %s", len(ids), path)
    return path
