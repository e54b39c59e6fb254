"""npe2 writer: save a Labels layer with the exact geometry of its source image.

The affine comes from :func:`~napari_medseg._napari.layers.exact_affine`: the
layer's own stored geometry, or that of an image layer in the current viewer
on the same transform (a Labels layer napari made from an image), or napari's
transform itself. Class names come from the layer's ``features`` (or our
metadata), colours from its colormap. napari's save dialog has already asked
before replacing a file, so existing files are overwritten here.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core.volume import Volume
from .layers import META_KEY, _layer_attributes, current_layers, exact_affine

log = logging.getLogger(__name__)

__all__ = ["write_labels", "labels_volume_from_attributes"]


def _candidates():
    return [_layer_attributes(lyr) for lyr in current_layers()]


def _names(attributes: dict) -> dict[int, str]:
    feats = attributes.get("features")
    if feats is not None and len(feats) and "index" in feats and "name" in feats:
        return {int(i): str(n) for i, n in zip(feats["index"], feats["name"]) if int(i)}
    meta = (attributes.get("metadata") or {}).get(META_KEY) or {}
    return {int(k): str(v) for k, v in (meta.get("label_names") or {}).items()}


def _colors(attributes: dict, ids) -> dict[int, tuple]:
    cmap = attributes.get("colormap")
    color_dict = getattr(cmap, "color_dict", None)
    if not color_dict:
        return {}
    out = {}
    for i in ids:
        c = color_dict.get(i)
        if c is not None:
            out[int(i)] = tuple(float(v) for v in np.asarray(c)[:3])
    return out


def labels_volume_from_attributes(data, attributes: dict, candidates=()) -> Volume:
    """A label Volume from a Labels layer's data and napari writer attributes."""
    meta = (attributes.get("metadata") or {}).get(META_KEY) or {}
    names = _names(attributes)
    return Volume(
        data=np.asarray(data),
        affine=exact_affine(attributes, candidates),
        modality=meta.get("modality", "unknown"),
        is_label=True,
        label_names=names,
        label_colors=_colors(attributes, names),
        source=None,
        meta={k: v for k, v in meta.items() if k.startswith("dicom_")
              or k.startswith("nifti_")},
    )


def write_labels(path: str, data, attributes: dict) -> list[str]:
    """npe2 single-layer writer for Labels (NIfTI, NRRD, .seg.nrrd, MHA, TIFF).

    Returns
    -------
    list of str
        The written path.

    Raises
    ------
    MedSegError
        Unknown extension, non-3D data, non-integer values, unwritable folder.
    """
    from ..io import write_labels as _write

    vol = labels_volume_from_attributes(data, attributes, _candidates())
    out = _write(path, vol, overwrite=True, verify=True)
    return [str(out)]
