"""npe2 reader: NIfTI, NRRD / .seg.nrrd, MHA / MHD, TIFF / OME-TIFF and DICOM folders.

``get_reader`` only looks at the path (and, for folders or extension-less
files, a few bytes); it returns ``None`` for anything napari-medseg does not
read and never raises. The returned function reads the volume and raises
:class:`~napari_medseg.errors.MedSegError` for bad input, which napari reports
as a notification while the viewer keeps running.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import MedSegError
from .boundary import affine_from_layer, current_layers, volume_to_layer_data, watch_viewer

log = logging.getLogger(__name__)

__all__ = ["get_reader", "read_layer_data"]


def _single_path(path):
    """One path to read, or None (several unrelated files)."""
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        if len(paths) == 1:
            return paths[0]
        parents = {p.parent for p in paths}
        if len(parents) == 1 and all(p.suffix.lower() == ".dcm" for p in paths):
            return paths[0].parent  # several slices of one series: read the folder
        return None
    return Path(os.fspath(path))


def get_reader(path):
    """Return :func:`read_layer_data` bound to ``path``, or None when not ours."""
    try:
        from ..io import format_of

        p = _single_path(path)
        if p is None or not p.exists() or format_of(p) is None:
            return None
    except Exception:  # never raise here: napari would try no other reader
        log.debug("napari-medseg does not read %s", path, exc_info=True)
        return None
    return lambda _path: read_layer_data(p)


def _image_layers():
    """Image layers of the current viewer that carry our geometry."""
    return [lyr for lyr in current_layers()
            if lyr.__class__.__name__ == "Image" and lyr.ndim >= 3]


def _check_label_grid(vol) -> None:
    """Refuse labels whose grid matches none of the open images (when there are some)."""
    from ..core.volume import same_grid

    images = _image_layers()
    grids = []
    for lyr in images:
        try:
            grids.append((lyr.name, tuple(lyr.data.shape[-3:]), affine_from_layer(lyr)))
        except Exception:
            continue
    if not grids or any(same_grid(vol, (shape, aff)) for _, shape, aff in grids):
        return
    name, shape, aff = grids[-1]
    spacing = tuple(round(float(s), 3) for s in np.linalg.norm(aff[:3, :3], axis=0)[::-1])
    raise MedSegError(
        f"the labels' grid (shape {vol.shape3}, spacing "
        f"{tuple(round(s, 3) for s in vol.spacing)} mm) does not match image layer "
        f"'{name}' (shape {shape}, spacing {spacing} mm); open the labels saved for this "
        "image, or close the image to view the labels on their own", vol.source)


def _watch_current_viewer() -> None:
    try:
        import napari

        watch_viewer(napari.current_viewer())
    except Exception:  # noqa: BLE001 - no viewer (a script): nothing to watch
        log.debug("no viewer to watch", exc_info=True)


def _note_modality(vol) -> None:
    """Fill in an image's modality when its file does not say (NIfTI, NRRD, TIFF).

    :func:`~napari_medseg.core.modality.detect_modality` decides from the file's
    metadata or the intensities (air at -1000 HU is CT); how it decided is kept in
    ``meta["modality_source"]`` / ``meta["modality_reason"]``.
    """
    from ..core.modality import detect_modality, normalize_modality

    if normalize_modality(vol.modality) != "unknown":
        return
    guess = detect_modality(vol)
    vol.modality = guess.modality
    vol.meta["modality_source"] = guess.source
    vol.meta["modality_reason"] = guess.reason
    log.info("%s: modality %s", vol.source, guess)


def _open_dicom_images() -> list:
    """Open image layers read from DICOM, as Volumes (candidate referenced series)."""
    from .boundary import volume_from_layer

    out = []
    for lyr in _image_layers():
        try:
            vol = volume_from_layer(lyr, is_label=False)
        except Exception:  # noqa: BLE001 - a layer we cannot wrap is no candidate
            continue
        if vol.meta.get("dicom_sop_instance_uids"):
            out.append(vol)
    return out


def _object_layer_data(vols, path: Path) -> list[tuple]:
    out = []
    for v in vols:
        group = v.meta.get("overlap_group")
        name = path.stem if group is None else f"{path.stem} ({group})"
        for note in v.meta.get("warnings", []):
            log.warning(note)
        out.append(volume_to_layer_data(v, name=name, opacity=0.5))
    return out


def _dicom_object_layers(path: Path) -> list[tuple] | None:
    """Labels layers of a DICOM SEG / RTSTRUCT file, or None for anything else.

    They lie on the referenced series' grid when that series is open or in the
    same folder, else (SEG only) on the SEG's own frame geometry.
    """
    if not path.is_file():
        return None
    from ..io.dicom_objects import dicom_object_kind, read_dicom_object

    if dicom_object_kind(path) is None:
        return None
    return _object_layer_data(read_dicom_object(path, candidates=_open_dicom_images()),
                              path)


def _objects_beside(folder: Path, vol) -> list[tuple]:
    """Labels layers of the SEG / RTSTRUCT files in a series folder that refer to ``vol``."""
    from ..io.dicom_objects import (dicom_object_kind, find_dicom_objects, read_dicom_seg,
                                    read_rtstruct, referenced_series_uid)

    out = []
    for p in find_dicom_objects(folder):
        try:
            import pydicom

            ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
            if referenced_series_uid(ds) != vol.meta.get("dicom_series_instance_uid"):
                continue
            reader = read_dicom_seg if dicom_object_kind(p) == "SEG" else read_rtstruct
            out += _object_layer_data(reader(p, reference=vol), p)
        except (MedSegError, ImportError) as exc:
            log.warning("%s: not opened (%s)", p, exc)
    return out


def read_layer_data(path) -> list[tuple]:
    """Read ``path`` and return napari layer data tuples (one per volume).

    Label maps become Labels layers with names and colours; they are checked
    against the images already open (same shape and affine). The current viewer
    is watched so that a Labels layer napari makes from the image keeps its
    exact geometry (:func:`~napari_medseg._napari.boundary.watch_viewer`).
    """
    from ..io import read_volume

    _watch_current_viewer()

    from ..io import format_of

    if format_of(path) == "zarr":  # lazy; a label store shows multiscale
        from .bigvolume import zarr_layer_data

        return zarr_layer_data(path)
    objects = _dicom_object_layers(Path(path))
    if objects is not None:  # a DICOM SEG or RTSTRUCT file
        return objects
    vol = read_volume(path, lazy=True)
    if vol.is_label:
        _check_label_grid(vol)
        data = np.asarray(vol.data)
        if not data.flags.writeable or isinstance(data, np.memmap):
            data = np.array(data)  # painting needs a writable in-memory array
        vol = vol.with_data(data)
    else:
        _note_modality(vol)
    for note in vol.meta.get("warnings", []):
        log.warning(note)
    layers = [volume_to_layer_data(vol)]
    if Path(path).is_dir() and vol.meta.get("format") == "dicom":
        layers += _objects_beside(Path(path), vol)
    return layers
