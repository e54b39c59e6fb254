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
:func:`affine_from_layer_attributes` recovers the exact file affine from any
layer, with or without our metadata. Nothing here imports Qt.
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
    "affine_from_layer",
    "exact_affine",
    "volume_from_layer",
    "label_colormap_dict",
    "current_layers",
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
    if vol.modality == "CT":
        kwargs.setdefault("contrast_limits", (-160.0, 240.0))  # abdomen window (HU)
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


def current_layers() -> list:
    """Layers of napari's current viewer, or ``[]`` when there is none.

    Readers and writers get no viewer from npe2; they use this to find the
    image a labels file belongs to.
    """
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no napari, no viewer: nothing to match
        return []
    return [] if viewer is None else list(viewer.layers)


def _layer_attributes(layer) -> dict:
    return {
        "scale": layer.scale,
        "translate": layer.translate,
        "rotate": layer.rotate,
        "shear": layer.shear,
        "affine": layer.affine.affine_matrix,
        "metadata": getattr(layer, "metadata", {}),
    }


def _matches_transform(attributes: dict, affine: np.ndarray) -> bool:
    """True when the layer transform is exactly what ``layer_kwargs`` gives ``affine``."""
    scale, translate, naff = _transform_parts(affine)
    rot = attributes.get("rotate")
    shear = attributes.get("shear")
    lay_aff = attributes.get("affine")
    lay_aff = np.asarray(getattr(lay_aff, "affine_matrix", lay_aff)
                         if lay_aff is not None else np.eye(4), dtype=float)
    return (
        np.allclose(np.asarray(attributes.get("scale"), float)[-3:], scale, atol=1e-6)
        and np.allclose(np.asarray(attributes.get("translate"), float)[-3:], translate,
                        atol=1e-4)
        and np.allclose(lay_aff[-4:, -4:], naff, atol=1e-6)
        and (rot is None or np.allclose(np.asarray(rot, float)[-3:, -3:], np.eye(3)))
        and (shear is None or not np.any(np.asarray(shear, float)))
    )


def exact_affine(attributes: dict, candidates=()) -> np.ndarray:
    """The exact RAS affine for a layer's attributes.

    Uses the affine stored in the layer's ``metadata["medseg"]`` (or, failing
    that, in one of ``candidates``: attribute dicts of other layers, e.g. the
    image a Labels layer was drawn on) when napari's transform still agrees with
    it; otherwise derives it from the transform alone.
    """
    for attrs in (attributes, *candidates):
        meta = (attrs.get("metadata") or {}).get(META_KEY) or {}
        stored = meta.get("affine")
        if stored is not None:
            stored = np.asarray(stored, dtype=float)
            if _matches_transform(attributes, stored):
                return stored
    return affine_from_layer_attributes(attributes)


def affine_from_layer(layer, viewer=None) -> np.ndarray:
    """The exact RAS affine of a napari layer (see :func:`exact_affine`).

    With ``viewer``, the other layers' stored geometry is used when the layer
    itself has none (a Labels layer napari made from an image).
    """
    others = []
    if viewer is not None:
        others = [_layer_attributes(lyr) for lyr in viewer.layers if lyr is not layer]
    return exact_affine(_layer_attributes(layer), others)


def volume_from_layer(layer, is_label: bool | None = None, viewer=None) -> Volume:
    """Wrap a napari Image or Labels layer as a Volume on its true grid.

    ``viewer`` lets a layer without stored geometry borrow the exact affine of
    another layer on the same transform (see :func:`affine_from_layer`).
    """
    meta = dict(layer.metadata.get(META_KEY, {})) if hasattr(layer, "metadata") else {}
    if is_label is None:
        is_label = layer.__class__.__name__ == "Labels"
    names = {}
    colors = {}
    if is_label:
        feats = getattr(layer, "features", None)
        if feats is not None and len(feats) and "name" in feats and "index" in feats:
            names = {int(i): str(n) for i, n in zip(feats["index"], feats["name"]) if int(i)}
        elif "label_names" in meta:
            names = {int(k): v for k, v in meta["label_names"].items()}
    return Volume(
        data=layer.data,
        affine=affine_from_layer(layer, viewer),
        modality=meta.get("modality", "unknown"),
        is_label=bool(is_label),
        label_names=names,
        label_colors=colors,
        source=meta.get("source"),
        meta={k: v for k, v in meta.items()
              if k not in ("affine", "modality", "source", "is_label", "label_names")},
    )
