"""npe2 writer: save a Labels layer with the exact geometry of its source image.

The Volume comes from :func:`~napari_medseg._napari.boundary.volume_from_attributes`:
the affine stored with the layer (or, for a Labels layer napari made from an
image, that of an image layer in the current viewer on the same transform, or
the geometry the layer adopted when it was added: see
:func:`~napari_medseg._napari.boundary.adopt_geometry`), class names from the
layer's ``features`` (or our metadata), colours from its colormap. napari's save
dialog has already asked before replacing a file, so existing files are
overwritten here.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core.volume import Volume
from .boundary import current_layers, layer_attributes, volume_from_attributes

log = logging.getLogger(__name__)

__all__ = ["write_labels", "labels_volume_from_attributes"]


def labels_volume_from_attributes(data, attributes: dict, candidates=()) -> Volume:
    """A label Volume from a Labels layer's data and napari writer attributes.

    Kept for compatibility; see
    :func:`~napari_medseg._napari.boundary.volume_from_attributes`.
    """
    return volume_from_attributes(np.asarray(data), attributes, candidates, is_label=True)


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

    candidates = [layer_attributes(lyr) for lyr in current_layers()]
    vol = volume_from_attributes(np.asarray(data), attributes, candidates, is_label=True)
    vol.source = None
    out = _write(path, vol, overwrite=True, verify=True)
    return [str(out)]
