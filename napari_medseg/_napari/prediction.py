"""A model prediction as napari layers, and the regions a user can segment.

Everything here works on napari layer *models* (no Qt), so it is usable from
scripts and tests as well as from the Segment dock widget:

* :func:`prediction_layer_data` turns a model's prediction into LayerDataTuples:
  one Labels layer on exactly the image's grid, with the model card's class
  names and colours, plus an optional uncertainty Image layer (hidden).
* :func:`is_corrected`, :func:`merge_prediction` and :func:`apply_labels`
  re-run a model on a layer the user has already corrected without losing the
  corrections, as a single undo step.
* :func:`view_region` and :func:`shapes_region` turn "what I am looking at" or
  "the box I drew" into array slices of the image.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core.volume import Volume
from ..errors import MedSegError
from .boundary import prediction_of, store_prediction, volume_to_layer_data

log = logging.getLogger(__name__)

__all__ = [
    "result_layer_name",
    "prediction_layer_data",
    "is_corrected",
    "merge_prediction",
    "apply_labels",
    "view_region",
    "shapes_region",
    "region_shape",
]

Region = tuple[slice, slice, slice]


def result_layer_name(image_name: str, model_name: str) -> str:
    """The name of the Labels layer a model writes for an image: ``"<image> <model>"``."""
    return f"{image_name} {model_name}"


def prediction_layer_data(pred, image_name: str, model_name: str, card=None,
                          uncertainty_visible: bool = False) -> list[tuple]:
    """LayerDataTuples for a model prediction.

    Parameters
    ----------
    pred : Prediction
        ``pred.labels`` is a label Volume ``(Z, Y, X)`` on the input image's grid;
        ``pred.uncertainty`` a float Volume on the same grid or None.
    image_name, model_name : str
        Used to name the layers ``"<image> <model>"`` (and ``... uncertainty``).
    card : ModelCard, optional
        Class names and colours (when the labels carry none), and the card kept
        with the layer (:func:`~napari_medseg._napari.boundary.store_prediction`).
        Defaults to ``pred.card``.
    uncertainty_visible : bool
        Whether the uncertainty layer starts visible (hidden by default).

    Returns
    -------
    list of tuple
        ``[(labels, kwargs, "labels")]`` plus ``(map, kwargs, "image")`` when there
        is an uncertainty map. The labels keep a copy of the prediction and the
        card (read back with :func:`~napari_medseg._napari.boundary.prediction_of`
        and :func:`~napari_medseg._napari.boundary.card_of`).
    """
    card = card if card is not None else getattr(pred, "card", None)
    labels: Volume = pred.labels
    names = card.label_names if card is not None else {}
    colors = card.label_colors if card is not None else {}
    if names and not labels.label_names:
        labels = labels.with_data(labels.data, label_names=names)
    if colors and not labels.label_colors:
        labels = labels.with_data(labels.data, label_colors=colors)
    data = np.asarray(labels.data)
    if data.ndim == 4:
        data = data[0]
    labels = labels.with_data(data)
    name = result_layer_name(image_name, model_name)
    _, kwargs, kind = volume_to_layer_data(labels, name=name)
    store_prediction(kwargs["metadata"], data.copy(), card)
    out = [(data, kwargs, kind)]
    unc = getattr(pred, "uncertainty", None)
    if unc is not None:
        umap = np.asarray(unc.data, dtype=np.float32)
        _, ukw, _ = volume_to_layer_data(unc.with_data(umap, is_label=False),
                                         name=f"{name} uncertainty")
        ukw.update(visible=bool(uncertainty_visible), colormap="magma",
                   blending="additive", contrast_limits=_limits(umap))
        out.append((umap, ukw, "image"))
    return out


def _limits(arr: np.ndarray) -> tuple[float, float]:
    hi = float(np.nanmax(arr)) if arr.size else 1.0
    return (0.0, hi if hi > 0 else 1.0)


# ------------------------------------------------------------- re-running
def is_corrected(layer) -> bool:
    """True when a model output layer's data differs from its stored prediction."""
    original = prediction_of(layer)
    if original is None:
        return False
    data = np.asarray(layer.data)
    return data.shape != np.shape(original) or bool(np.any(data != original))


def merge_prediction(current: np.ndarray, original: np.ndarray, new: np.ndarray,
                     mode: str = "replace", region: Region | None = None):
    """Combine a new prediction with a layer that may hold user corrections.

    Parameters
    ----------
    current : (Z, Y, X) integer array
        The layer's data now (prediction plus the user's edits).
    original : (Z, Y, X) integer array
        The prediction the layer started from (:func:`.boundary.prediction_of`).
    new : (Z, Y, X) integer array
        The new prediction on the same grid.
    mode : {"replace", "untouched"}
        ``"replace"`` takes the new prediction; ``"untouched"`` takes it only
        where the user has not edited (``current == original``).
    region : tuple of 3 slices, optional
        Only voxels inside change; the rest keep ``current``.

    Returns
    -------
    data, prediction : (Z, Y, X) arrays
        The layer's new data and the new stored prediction.
    """
    if mode not in ("replace", "untouched"):
        raise ValueError(f"mode must be 'replace' or 'untouched', not {mode!r}")
    region = region or (slice(None),) * 3
    data = np.array(current, copy=True)
    prediction = np.array(original, copy=True)
    cur = data[region]
    take = np.ones(cur.shape, bool) if mode == "replace" else cur == original[region]
    cur[take] = new[region][take].astype(cur.dtype, copy=False)
    prediction[region] = new[region].astype(prediction.dtype, copy=False)
    return data, prediction


def apply_labels(layer, data: np.ndarray) -> int:
    """Write ``data`` into a Labels layer as one undo step; return voxels changed."""
    changed = np.nonzero(np.asarray(layer.data) != data)
    if changed[0].size == 0:
        return 0
    with layer.block_history():
        layer.data_setitem(changed, data[changed])
    return int(changed[0].size)


# ---------------------------------------------------------------- regions
def region_shape(region: Region | None, shape) -> tuple[int, int, int]:
    """The ``(Z, Y, X)`` size of ``region`` within an array of ``shape``."""
    if region is None:
        return tuple(int(s) for s in shape[-3:])
    return tuple(len(range(*sl.indices(int(n)))) for sl, n in zip(region, shape[-3:]))


def _bbox_region(points_data: np.ndarray, shape, margin, what: str) -> Region:
    """Slices covering data-coordinate points, widened by ``margin`` voxels per axis."""
    shape = np.asarray(shape[-3:], dtype=int)
    lo = np.floor(points_data.min(axis=0) + 0.5).astype(int) - np.asarray(margin, int)
    hi = np.floor(points_data.max(axis=0) + 0.5).astype(int) + 1 + np.asarray(margin, int)
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        raise MedSegError(f"{what} lies outside the image; move it over the image or "
                          "segment the whole volume")
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def view_region(image_layer, viewer, margin_slices: int = 8) -> Region | None:
    """The part of an image shown in the canvas, as array slices ``(Z, Y, X)``.

    In a 2D view this is the visible field of view on the current slice,
    widened by ``margin_slices`` slices along the axis being sliced through (so
    the model sees some context). In a 3D view it is the whole volume (None).

    Raises
    ------
    MedSegError
        When the image is not in view.
    """
    if viewer.dims.ndisplay != 2:
        return None
    displayed = list(viewer.dims.displayed)
    point = np.asarray(viewer.dims.point, dtype=float)
    scene = getattr(viewer, "scene", None)  # napari >= 0.9; older: viewer.camera
    camera = scene.camera if scene is not None else viewer.camera
    center = np.asarray(camera.center, dtype=float)[-2:]
    half = np.asarray(viewer.canvas.size, dtype=float) / max(camera.zoom, 1e-12) / 2
    corners = []
    for s0 in (-1, 1):
        for s1 in (-1, 1):
            p = point.copy()
            p[displayed[0]] = center[0] + s0 * half[0]
            p[displayed[1]] = center[1] + s1 * half[1]
            corners.append(p)
    nd = image_layer.ndim
    pts = np.array([np.asarray(image_layer.world_to_data(c[-nd:]))[-3:] for c in corners])
    extent = pts.max(axis=0) - pts.min(axis=0)
    margin = np.where(extent < 1.0, int(margin_slices), 0)  # the sliced axis
    return _bbox_region(pts, image_layer.data.shape, margin,
                        f"the current view of layer '{image_layer.name}'")


def shapes_region(image_layer, shapes_layer, margin_slices: int = 8) -> Region:
    """The box around the shapes of a Shapes layer, as array slices of the image.

    Selected shapes are used when there are any, else all shapes. A rectangle
    drawn on one slice gives that slice ``+- margin_slices``; shapes on several
    slices give their 3D extent.

    Raises
    ------
    MedSegError
        When the layer has no shapes, or they lie outside the image.
    """
    shapes = list(shapes_layer.data)
    if not shapes:
        raise MedSegError(f"Shapes layer '{shapes_layer.name}' has no shapes; draw a "
                          "rectangle around the region to segment")
    selected = sorted(getattr(shapes_layer, "selected_data", set()) or [])
    if selected:
        shapes = [shapes[i] for i in selected]
    nd = image_layer.ndim
    pts = []
    for verts in shapes:
        for v in np.asarray(verts, dtype=float):
            world = shapes_layer.data_to_world(v)
            if len(world) < nd:
                raise MedSegError(f"Shapes layer '{shapes_layer.name}' is 2D; draw the box "
                                  f"in a Shapes layer with {nd} dimensions")
            pts.append(np.asarray(image_layer.world_to_data(world[-nd:]))[-3:])
    pts = np.array(pts)
    extent = pts.max(axis=0) - pts.min(axis=0)
    margin = np.where(extent < 1.0, int(margin_slices), 0)
    return _bbox_region(pts, image_layer.data.shape, margin,
                        f"the box in Shapes layer '{shapes_layer.name}'")
