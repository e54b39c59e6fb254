"""MONAI-style datalist JSON: ``{"training": [{"image": ..., "label": ...}, ...]}``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ...errors import MedSegError
from ._util import folder_lock, read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["append_datalist"]


def _rel(p, base: Path) -> str:
    p = Path(p)
    try:
        return Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return str(p.resolve())


def append_datalist(datalist_path, images, label, key: str = "training",
                    extra: dict | None = None, modality: dict | None = None) -> Path:
    """Append one case to a MONAI datalist JSON file, atomically.

    The file follows the decathlon layout read by
    ``monai.data.load_decathlon_datalist``: paths are stored relative to the
    datalist's folder (its default ``base_dir``). A case already listed (same
    label file) is not added twice.

    Parameters
    ----------
    datalist_path : str or Path
        The JSON file (created when missing).
    images : path or sequence of paths
        Image file(s) of the case; one path is stored as a string, several as a list.
    label : path
        Label file of the case.
    key : str
        Section to append to (``"training"``).
    extra : dict, optional
        More JSON-able fields for the entry (e.g. ``{"case": "case_003"}``).
    modality : dict, optional
        Channel index to modality, e.g. ``{"0": "CT"}``, stored as the
        datalist's top-level ``"modality"`` (the Medical Segmentation Decathlon
        layout, which MONAI's ``DecathlonDataset`` reads); an existing entry is kept.

    Returns
    -------
    Path
        The datalist file.
    """
    datalist_path = Path(datalist_path)
    base = datalist_path.parent
    if not base.is_dir():
        raise MedSegError(f"folder {base} does not exist; create it first", str(datalist_path))
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    imgs = [_rel(p, base) for p in images]
    entry = {"image": imgs[0] if len(imgs) == 1 else imgs, "label": _rel(label, base)}
    entry.update(extra or {})
    with folder_lock(base):
        data = read_json(datalist_path, default={})
        if not isinstance(data, dict) or not isinstance(data.get(key, []), list):
            raise MedSegError(f"not a MONAI datalist (expected an object with a "
                              f"'{key}' list); choose another file", str(datalist_path))
        if modality and not data.get("modality"):
            data["modality"] = {str(k): str(v) for k, v in modality.items()}
        cases = data.setdefault(key, [])
        if any(c.get("label") == entry["label"] for c in cases if isinstance(c, dict)):
            log.info("%s already lists %s", datalist_path, entry["label"])
            return datalist_path
        cases.append(entry)
        write_json(datalist_path, data)
    log.info("added %s to %s", entry["label"], datalist_path)
    return datalist_path
