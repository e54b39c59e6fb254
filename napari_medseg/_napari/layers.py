"""Volume <-> napari layer data: the geometry lives in napari's own transform.

napari shows a layer in *world* coordinates given by ``affine @ (scale * index
+ translate)``. We choose napari's world axes ``(w0, w1, w2)`` to be
``(S, P, L)`` in patient space, i.e. ``(z, -y, -x)`` of RAS, so that an axial
CT stored the DICOM way (LPS, identity direction) shows exactly as stored, with
the anterior at the top and the patient's right on the left of the screen (the
radiological convention), and a RAS-stored NIfTI shows the same way.

* ``scale`` is the voxel size in mm along ``(Z, Y, X)``;
* ``translate`` places voxel ``(0, 0, 0)`` (it equals the origin when the
  volume has the DICOM-standard orientation);
* ``affine`` carries only what is left: flips and rotations (identity for the
  common case).

Because the whole voxel-to-world mapping is napari's own transform, a Labels
layer that napari creates from the image ("New labels layer") inherits it, and
:func:`affine_from_layer_attributes` recovers the file affine from any layer
(exactly, unless the orientation swaps axes). Turning a layer back into a
Volume, with the stored geometry, names and colours, is
:mod:`napari_medseg._napari.boundary`. Nothing here imports Qt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.volume import Volume

__all__ = [
    "DISPLAY_FROM_RAS",
    "layer_kwargs",
    "volume_to_layer_data",
    "affine_from_layer_attributes",
    "label_colormap_dict",
]

#: RAS point -> napari world point ``(S, P, L)``.
DISPLAY_FROM_RAS = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
#: Array index ``(k, j, i)`` <-> voxel index ``(i, j, k)``.
_REVERSE = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

META_KEY = "medseg"


def _transform_parts(affine: np.ndarray):
    """Split a RAS affine into napari ``scale``, ``translate`` and ``affine``."""
    m = DISPLAY_FROM_RAS @ affine[:3, :3] @ _REVERSE
    scale = np.linalg.norm(m, axis=0)
    rot = m / scale[None, :]
    # napari slices 2D views along data axes: a rotation that swaps axes (a
    # sagittal or coronal acquisition) makes its 2D transform singular. Keep
    # flips and small obliquity in napari's transform and leave the axis
    # permutation out; the exact affine then travels in the layer metadata.
    closest = np.argmax(np.abs(rot), axis=0)
    if not np.array_equal(closest, np.arange(3)):
        perm = np.zeros((3, 3))
        perm[closest, np.arange(3)] = 1.0
        rot = perm.T @ rot
    if np.allclose(rot, np.eye(3), atol=1e-9):
        rot = np.eye(3)
    origin = DISPLAY_FROM_RAS @ affine[:3, 3]
    translate = np.linalg.solve(rot, origin)
    napari_affine = np.eye(4)
    napari_affine[:3, :3] = rot
    return scale, translate, napari_affine


def layer_kwargs(vol: Volume) -> dict[str, Any]:
    """napari layer keyword arguments that place ``vol`` at its true position.

    Returns ``scale``, ``translate``, ``affine``, ``units`` and ``metadata``
    (which holds the exact affine and the source information under ``"medseg"``).
    """
    scale, translate, naff = _transform_parts(vol.affine)
    meta = {
        META_KEY: {
            "affine": vol.affine.tolist(),
            "modality": vol.modality,
            "source": vol.source,
            "is_label": vol.is_label,
            **{k: v for k, v in vol.meta.items() if _jsonable(v)},
        }
    }
    return {
        "scale": tuple(float(s) for s in scale),
        "translate": tuple(float(t) for t in translate),
        "affine": naff,
        "units": "mm",
        "metadata": meta,
    }


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool, list, tuple, dict, type(None)))


def label_colormap_dict(vol: Volume) -> dict | None:
    """``{label: rgba}`` for napari's Labels ``colormap`` (None when no colours)."""
    if not vol.label_colors:
        return None
    cmap: dict = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for k, c in vol.label_colors.items():
        c = tuple(float(x) for x in c)
        cmap[int(k)] = c if len(c) == 4 else (*c, 1.0)
    return cmap


def volume_to_layer_data(vol: Volume, name: str | None = None, **extra) -> tuple:
    """A napari LayerDataTuple ``(data, kwargs, "image" | "labels")`` for ``vol``."""
    kwargs = layer_kwargs(vol)
    if name is None and vol.source:
        from pathlib import Path

        base = Path(vol.source).name
        for ext in (".nii.gz", ".seg.nrrd", ".ome.tiff", ".ome.tif"):
            if base.lower().endswith(ext):
                base = base[: -len(ext)]
                break
        else:
            base = Path(base).stem if Path(base).suffix else base
        name = base
    if name:
        kwargs["name"] = name
    data = vol.data
    if vol.is_label:
        if vol.data.ndim != 3:
            data = vol.data[0]
        cmap = label_colormap_dict(vol)
        if cmap is not None:
            from napari.utils.colormaps import DirectLabelColormap

            kwargs["colormap"] = DirectLabelColormap(color_dict=cmap)
        if vol.label_names:
            ids = [0, *sorted(int(k) for k in vol.label_names if int(k) != 0)]
            kwargs["features"] = {
                "index": ids,
                "name": ["background" if i == 0 else vol.label_names.get(i, str(i))
                         for i in ids],
            }
            kwargs["metadata"][META_KEY]["label_names"] = {
                str(k): v for k, v in vol.label_names.items()}
        kwargs.update(extra)
        return (data, kwargs, "labels")
    if vol.data.ndim == 4:
        kwargs["channel_axis"] = 0
        kwargs["name"] = [f"{name} [{i}]" for i in range(vol.n_channels)] if name else None
        if kwargs["name"] is None:
            kwargs.pop("name")
    if vol.data.ndim == 3:  # CT: soft-tissue window; MR / PET / unknown: percentiles
        from ..core.display import default_contrast

        kwargs.setdefault("contrast_limits", default_contrast(vol.data, vol.modality))
    kwargs.update(extra)
    return (data, kwargs, "image")


def affine_from_layer_attributes(attributes: dict, ndim: int = 3) -> np.ndarray:
    """Recover the RAS voxel-to-world affine from napari layer attributes.

    ``attributes`` is the dict napari hands a writer (or ``layer._get_state()``):
    ``scale``, ``translate``, ``rotate``, ``shear`` and ``affine``. Only the last
    three spatial axes are used.
    """
    def last3(v, default):
        a = np.asarray(v if v is not None else default, dtype=float)
        return a[-3:]

    scale = last3(attributes.get("scale"), np.ones(3))
    translate = last3(attributes.get("translate"), np.zeros(3))
    rotate = attributes.get("rotate")
    rot = np.eye(3) if rotate is None else np.asarray(rotate, dtype=float)[-3:, -3:]
    shear = attributes.get("shear")
    sh = np.eye(3)
    if shear is not None:
        shear = np.asarray(shear, dtype=float)
        if shear.ndim == 2:
            sh = shear[-3:, -3:]
        elif shear.size:
            vals = shear[-3:] if shear.size >= 3 else np.zeros(3)
            sh = np.array([[1, vals[0], vals[1]], [0, 1, vals[2]], [0, 0, 1]], dtype=float)
    aff = attributes.get("affine")
    if aff is None:
        aff = np.eye(4)
    aff = np.asarray(getattr(aff, "affine_matrix", aff), dtype=float)
    n = aff.shape[0] - 1
    lin = aff[n - 3:n, n - 3:n]
    off = aff[n - 3:n, n]
    m = lin @ rot @ sh @ np.diag(scale)
    c = lin @ translate + off
    out = np.eye(4)
    out[:3, :3] = DISPLAY_FROM_RAS.T @ m @ _REVERSE
    out[:3, 3] = DISPLAY_FROM_RAS.T @ c
    return out
