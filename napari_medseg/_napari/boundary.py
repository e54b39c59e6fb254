"""The one boundary between napari layers and the domain objects.

Everything that crosses from a napari layer into ``core`` / ``io`` / ``models``
(and back) goes through here, and this is the only module that knows the keys
napari-medseg keeps in ``layer.metadata``:

``"medseg"`` (:data:`META_KEY`)
    The exact RAS affine, modality, source path, ``is_label``, class names and
    the reader's extra facts (``dicom_*``, ``nifti_*``) of a layer we made.
``"medseg_prediction"`` (:data:`PREDICTION_KEY`)
    The model's original ``(Z, Y, X)`` prediction of a model output layer (the
    correction ledger's reference).
``"medseg_model"`` (:data:`MODEL_KEY`)
    The model card of a model output layer, stored as its plain dict
    (:meth:`ModelCard.to_dict`) and read back as a :class:`ModelCard`.

Into napari: :func:`volume_to_layer_data` (a Volume as a LayerDataTuple; its
geometry arithmetic, napari transform <-> RAS affine, is in :mod:`.layers`),
:func:`~napari_medseg._napari.prediction.prediction_layer_data` and
:func:`store_prediction`. Out of napari: :func:`volume_from_layer` (a layer,
labels with names and colours), :func:`volume_from_attributes` (what napari
hands a writer), :func:`card_of`, :func:`prediction_of`, :func:`ledger_of` and
:func:`modality_of`. Every widget, the reader, the writer and the exports use
these; none reads layer metadata by hand. No Qt.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from ..core.volume import Volume
from .layers import (
    META_KEY,
    _transform_parts,
    affine_from_layer_attributes,
    label_colormap_dict,
    layer_kwargs,
    volume_to_layer_data,
)

log = logging.getLogger(__name__)

__all__ = [
    "META_KEY",
    "PREDICTION_KEY",
    "MODEL_KEY",
    "layer_kwargs",
    "label_colormap_dict",
    "volume_to_layer_data",
    "layer_attributes",
    "exact_affine",
    "affine_from_layer",
    "volume_from_attributes",
    "volume_from_layer",
    "modality_of",
    "prediction_of",
    "card_of",
    "store_prediction",
    "ledger_of",
    "adopt_geometry",
    "watch_viewer",
    "current_layers",
    "slicing_axis",
    "current_slice",
]

#: Layer metadata key holding the model's original ``(Z, Y, X)`` prediction.
PREDICTION_KEY = "medseg_prediction"
#: Layer metadata key holding the model card (as its plain dict).
MODEL_KEY = "medseg_model"

_STANDARD = ("affine", "modality", "source", "is_label", "label_names")


# ------------------------------------------------------------ out of napari
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


def layer_attributes(layer) -> dict:
    """A layer's state in the form napari hands a writer (transform, metadata, classes)."""
    out = {
        "scale": layer.scale,
        "translate": layer.translate,
        "rotate": layer.rotate,
        "shear": layer.shear,
        "affine": layer.affine.affine_matrix,
        "metadata": getattr(layer, "metadata", {}),
    }
    for key in ("features", "colormap"):
        if hasattr(layer, key):
            out[key] = getattr(layer, key)
    return out


def _stored(attributes: dict) -> dict:
    return (attributes.get("metadata") or {}).get(META_KEY) or {}


def _matches_transform(attributes: dict, affine: np.ndarray) -> bool:
    """True when the layer transform is exactly what :func:`layer_kwargs` gives ``affine``."""
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


def _stored_affine(attributes: dict, candidates=()) -> tuple[np.ndarray | None, dict]:
    """The stored affine (and that layer's stored facts) that agrees with the transform."""
    for attrs in (attributes, *candidates):
        stored = _stored(attrs).get("affine")
        if stored is not None:
            stored = np.asarray(stored, dtype=float)
            if _matches_transform(attributes, stored):
                return stored, _stored(attrs)
    return None, {}


def exact_affine(attributes: dict, candidates=()) -> np.ndarray:
    """The exact RAS affine for a layer's attributes.

    Uses the affine stored in the layer's ``metadata["medseg"]`` (or, failing
    that, in one of ``candidates``: attribute dicts of other layers, e.g. the
    image a Labels layer was drawn on) when napari's transform still agrees with
    it; otherwise derives it from the transform alone (which cannot hold an
    axis swap: see :func:`adopt_geometry`).
    """
    stored, _ = _stored_affine(attributes, candidates)
    return stored if stored is not None else affine_from_layer_attributes(attributes)


def _candidates(layer=None, viewer=None) -> list[dict]:
    layers = list(viewer.layers) if viewer is not None else current_layers()
    return [layer_attributes(lyr) for lyr in layers if lyr is not layer]


def affine_from_layer(layer, viewer=None) -> np.ndarray:
    """The exact RAS affine of a napari layer (see :func:`exact_affine`).

    The other layers' stored geometry (of ``viewer``, or of napari's current
    viewer) is used when the layer itself has none (a Labels layer napari made
    from an image).
    """
    return exact_affine(layer_attributes(layer), _candidates(layer, viewer))


def _names(attributes: dict) -> dict[int, str]:
    feats = attributes.get("features")
    if feats is not None and len(feats) and "index" in feats and "name" in feats:
        return {int(i): str(n) for i, n in zip(feats["index"], feats["name"]) if int(i)}
    meta = _stored(attributes)
    return {int(k): str(v) for k, v in (meta.get("label_names") or {}).items()}


def _colors(attributes: dict, ids) -> dict[int, tuple]:
    """RGB colours of ``ids`` from a direct label colormap (napari's own cycle: none)."""
    cmap = attributes.get("colormap")
    color_dict = getattr(cmap, "color_dict", None)
    if not color_dict:
        return {}
    out = {}
    for i in ids:
        c = color_dict.get(int(i))
        if c is not None:
            out[int(i)] = tuple(float(v) for v in np.asarray(c)[:3])
    return out


def volume_from_attributes(data, attributes: dict, candidates=(), is_label: bool = True
                           ) -> Volume:
    """A Volume from a layer's data and attributes (napari writer form).

    Parameters
    ----------
    data : array_like
        The layer data, ``(Z, Y, X)`` (or ``(C, Z, Y, X)`` for images).
    attributes : dict
        ``scale``, ``translate``, ``rotate``, ``shear``, ``affine``, ``metadata``
        and, for labels, ``features`` and ``colormap``.
    candidates : sequence of dict
        Attributes of other layers whose stored geometry may be borrowed.
    is_label : bool
        Labels keep class names (``features``, else our metadata) and colours
        (a direct colormap).
    """
    stored, donor = _stored_affine(attributes, candidates)
    affine = stored if stored is not None else affine_from_layer_attributes(attributes)
    meta = dict(_stored(attributes))
    names = _names(attributes) if is_label else {}
    return Volume(
        data=data,
        affine=affine,
        modality=meta.get("modality", donor.get("modality", "unknown")),
        is_label=bool(is_label),
        label_names=names,
        label_colors=_colors(attributes, names) if is_label else {},
        source=meta.get("source"),
        meta={k: v for k, v in meta.items() if k not in _STANDARD},
    )


def volume_from_layer(layer, is_label: bool | None = None, viewer=None) -> Volume:
    """Wrap a napari Image or Labels layer as a Volume on its true grid.

    Labels keep their class names and colours. ``viewer`` (default: napari's
    current viewer) lets a layer without stored geometry borrow the exact
    affine of another layer on the same transform.
    """
    if is_label is None:
        is_label = layer.__class__.__name__ == "Labels"
    return volume_from_attributes(layer.data, layer_attributes(layer),
                                  _candidates(layer, viewer), is_label=bool(is_label))


def modality_of(layer, default: str = "unknown") -> str:
    """The modality recorded for a layer (``"CT"``, ``"MR"``, ...) or ``default``."""
    meta = (getattr(layer, "metadata", None) or {}).get(META_KEY) or {}
    return str(meta.get("modality") or default)


# ------------------------------------------------------------- view state
def slicing_axis(viewer) -> int:
    """The ``(Z, Y, X)`` data axis the 2D view slices along (0 = axial by default).

    The last axis napari does not display, counted on the layers' last three
    axes; 0 in a 3D view.
    """
    not_shown = list(viewer.dims.not_displayed)
    if not not_shown:
        return 0
    axis = int(not_shown[-1]) - (int(viewer.dims.ndim) - 3)
    return min(max(axis, 0), 2)


def current_slice(viewer, layer) -> tuple[int, int]:
    """``(axis, index)`` of the slice of ``layer`` shown in the 2D view."""
    axis = slicing_axis(viewer)
    pos = layer.world_to_data(viewer.dims.point)[-3:]
    n = int(layer.data.shape[-3:][axis])
    return axis, int(np.clip(round(float(pos[axis])), 0, n - 1))


# ----------------------------------------------------- model output layers
def prediction_of(layer) -> np.ndarray | None:
    """The model's original ``(Z, Y, X)`` prediction kept on a layer, or None."""
    pred = (getattr(layer, "metadata", None) or {}).get(PREDICTION_KEY)
    return None if pred is None else np.asarray(pred)


def card_of(layer):
    """The :class:`~napari_medseg.models.card.ModelCard` of a model output layer, or None."""
    from ..models.card import ModelCard

    stored = (getattr(layer, "metadata", None) or {}).get(MODEL_KEY)
    if not stored:
        return None
    if isinstance(stored, ModelCard):
        return stored
    try:
        return ModelCard.from_dict(dict(stored))
    except Exception:  # noqa: BLE001 - a foreign or damaged card: treat as none
        log.warning("layer '%s' holds an unreadable model card", getattr(layer, "name", "?"))
        return None


def _card_dict(card) -> dict:
    if card is None:
        return {}
    if isinstance(card, dict):
        return dict(card)
    return dict(card.to_dict())


def store_prediction(target, prediction, card=None) -> None:
    """Keep the original prediction and the model card on a layer (or its metadata dict).

    Parameters
    ----------
    target : napari layer or dict
        The layer, or the ``metadata`` dict of a LayerDataTuple being built.
    prediction : (Z, Y, X) integer array
        Stored as is (pass a copy when the layer data will change).
    card : ModelCard, optional
        Stored as its plain dict.
    """
    metadata = target if isinstance(target, dict) else target.metadata
    metadata[PREDICTION_KEY] = prediction
    metadata[MODEL_KEY] = _card_dict(card)


def ledger_of(layer, spacing, names=None):
    """The :class:`~napari_medseg.core.ledger.CorrectionLedger` of a model output layer.

    Returns None when the layer holds no original prediction.
    """
    from ..core.ledger import CorrectionLedger

    pred = prediction_of(layer)
    if pred is None:
        return None
    card = card_of(layer)
    meta = {} if card is None else {"model": card.name, "model_version": card.version}
    return CorrectionLedger(pred, spacing, names, meta={k: v for k, v in meta.items() if v})


# -------------------------------------------------- geometry of new layers
_WATCHED: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def adopt_geometry(layer, layers) -> bool:
    """Give a layer without stored geometry that of a layer in ``layers`` on its transform.

    napari's transform cannot hold an axis swap (a sagittal or coronal
    acquisition), so a Labels layer napari makes from such an image ("New
    labels layer") only knows its exact affine while the image is open. Copying
    the image's stored geometry (affine and modality) into the new layer when it
    is added keeps File > Save exact after the image is closed.

    Returns
    -------
    bool
        True when geometry was copied.
    """
    meta = getattr(layer, "metadata", None)
    if meta is None or (meta.get(META_KEY) or {}).get("affine") is not None:
        return False
    try:
        attrs = layer_attributes(layer)
        stored, donor = _stored_affine(
            attrs, [layer_attributes(lyr) for lyr in layers if lyr is not layer])
    except Exception:  # noqa: BLE001 - a layer of another kind: leave it alone
        return False
    if stored is None:
        return False
    meta[META_KEY] = {**(meta.get(META_KEY) or {}),  # keep a role set at creation
                      "affine": stored.tolist(), "modality": donor.get("modality", "unknown"),
                      "is_label": layer.__class__.__name__ == "Labels"}
    return True


def watch_viewer(viewer) -> None:
    """Make every layer added to ``viewer`` adopt the geometry of the layer it was made from.

    Called by the reader and by each dock widget; connecting twice is harmless.
    """
    if viewer is None:
        return
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari's proxy for plugin widgets
    if _WATCHED.get(id(viewer)) is viewer:
        return
    _WATCHED[id(viewer)] = viewer
    layers = viewer.layers

    def on_inserted(event):
        adopt_geometry(event.value, list(layers))

    layers.events.inserted.connect(on_inserted)
    for lyr in list(layers):
        adopt_geometry(lyr, list(viewer.layers))
