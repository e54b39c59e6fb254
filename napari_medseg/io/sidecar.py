"""Class names and colours of a NIfTI label map, in a JSON file beside it.

NIfTI has no place for segment names or colours, so a label map
``case.nii.gz`` gets ``case.json`` next to it (the BIDS habit of same-stem
JSON sidecars)::

    {"napari_medseg": "label-sidecar", "version": 1,
     "labels": [{"value": 1, "name": "liver", "color": [0.9, 0.4, 0.3, 1.0]}, ...]}

Colours are RGB(A) floats in [0, 1]. The reader takes names and colours back
from a sidecar that carries the ``"napari_medseg"`` marker; any other JSON
file of that name (a BIDS sidecar, say) is left alone, and a damaged one is
reported in a warning and ignored (the labels themselves are intact).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = ["sidecar_path", "write_label_sidecar", "read_label_sidecar", "MARKER"]

MARKER = "label-sidecar"
_MAX_BYTES = 4 << 20  # 4 MiB: thousands of classes; anything larger is not ours


def sidecar_path(path) -> Path:
    """``case.json`` for ``case.nii.gz`` / ``case.nii``."""
    p = Path(path)
    low = p.name.lower()
    for ext in (".nii.gz", ".nii"):
        if low.endswith(ext):
            return p.with_name(p.name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


def _is_ours(path: Path) -> bool:
    try:
        if path.stat().st_size > _MAX_BYTES:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("napari_medseg") == MARKER


def write_label_sidecar(path, names: dict, colors: dict, overwrite: bool = True) -> Path | None:
    """Write the sidecar of label file ``path`` (atomically); None when nothing to say.

    Parameters
    ----------
    path : str or Path
        The label file (``.nii.gz`` / ``.nii``) the sidecar describes.
    names : dict[int, str]
        Class id to name.
    colors : dict[int, tuple]
        Class id to RGB(A) floats in [0, 1].
    overwrite : bool
        Replace an existing sidecar of ours; a JSON file that is not ours is
        never replaced (a warning says so).
    """
    ids = sorted({int(k) for k in (*names, *colors) if int(k) != 0})
    if not ids:
        return None
    target = sidecar_path(path)
    if target.exists() and not (overwrite and _is_ours(target)):
        log.warning("%s exists and is not a napari-medseg sidecar (or may not be "
                    "replaced); class names and colours were not written", target)
        return None
    labels = []
    for i in ids:
        entry = {"value": i, "name": str(names.get(i, names.get(str(i), f"label_{i}")))}
        c = colors.get(i, colors.get(str(i)))
        if c is not None:
            rgba = [float(x) for x in c][:4]
            entry["color"] = rgba if len(rgba) == 4 else [*rgba, 1.0]
        labels.append(entry)
    text = json.dumps({"napari_medseg": MARKER, "version": 1, "labels": labels}, indent=1)
    with atomic_path(target, overwrite=True) as tmp:
        Path(tmp).write_text(text + "\n", encoding="utf-8")
    return target


def read_label_sidecar(path) -> tuple[dict, dict]:
    """``(names, colors)`` from the sidecar of label file ``path`` (empty when none).

    Never raises: a missing, foreign or malformed sidecar gives empty dicts
    (malformed ones with a warning naming the file).
    """
    target = sidecar_path(path)
    if not target.is_file() or not _is_ours(target):
        return {}, {}
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
        names, colors = {}, {}
        for e in data.get("labels", []):
            v = int(e["value"])
            if v <= 0:
                continue
            names[v] = str(e.get("name", f"label_{v}"))[:256]
            c = e.get("color")
            if c is not None:
                rgba = np.asarray(c, dtype=float).ravel()
                if rgba.size in (3, 4) and np.all(np.isfinite(rgba)):
                    colors[v] = tuple(float(x) for x in np.clip(rgba, 0.0, 1.0))
        return names, colors
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        log.warning("%s: class names and colours not read (%s)", target, exc)
        return {}, {}
