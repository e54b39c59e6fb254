"""What a layer is for, kept in its ``metadata["medseg"]``: modality, role, locked classes.

Small accessors so that no widget reads or writes these metadata keys by hand:

* ``modality`` of an image layer (``"CT"``, ``"MR"``, ``"PT"``, ...), set by the
  reader or by the user in the Display widget, read by the exports;
* ``role`` of a layer: ``"prompt"`` for the Points / Shapes / Labels layers the
  Interactive widget creates for clicks, boxes and scribbles, which editing
  tools must never take for a segmentation;
* ``locked`` classes of a Labels layer, whose voxels no edit may change.

Nothing here imports Qt.
"""

from __future__ import annotations

from .layers import META_KEY

__all__ = [
    "layer_modality",
    "set_layer_modality",
    "PROMPT_ROLE",
    "mark_prompt_layer",
    "prompt_metadata",
    "is_prompt_layer",
    "is_segmentation_layer",
    "locked_classes",
    "set_locked_classes",
]

PROMPT_ROLE = "prompt"


def _meta(layer, create: bool = False) -> dict:
    md = getattr(layer, "metadata", None)
    if md is None:
        return {}
    sub = md.get(META_KEY)
    if not isinstance(sub, dict):
        if not create:
            return {}
        sub = {}
        md[META_KEY] = sub
    return sub


def layer_modality(layer) -> str:
    """The layer's modality (``"unknown"`` when none is recorded)."""
    return str(_meta(layer).get("modality") or "unknown")


def set_layer_modality(layer, modality: str, source: str = "user") -> None:
    """Record ``modality`` on the layer (the exports read it from there).

    ``source`` says who decided (``"user"`` for a choice made by hand).
    """
    m = _meta(layer, create=True)
    m["modality"] = str(modality)
    m["modality_source"] = str(source)


def mark_prompt_layer(layer, tool: str = "interactive") -> None:
    """Mark ``layer`` as holding prompts (clicks, boxes, scribbles) of ``tool``."""
    m = _meta(layer, create=True)
    m["role"] = PROMPT_ROLE
    m["prompt_tool"] = str(tool)


def prompt_metadata(tool: str = "interactive") -> dict:
    """A fresh ``metadata`` dict for a new prompt layer (marked before it is added,
    so no widget ever lists it as a segmentation)."""
    return {META_KEY: {"role": PROMPT_ROLE, "prompt_tool": str(tool)}}


def is_prompt_layer(layer) -> bool:
    """True for layers marked with :func:`mark_prompt_layer`."""
    return _meta(layer).get("role") == PROMPT_ROLE


def is_segmentation_layer(layer) -> bool:
    """True for a Labels layer that holds a segmentation (not prompts)."""
    return layer.__class__.__name__ == "Labels" and not is_prompt_layer(layer)


def locked_classes(layer) -> frozenset[int]:
    """Class ids of a Labels layer that edits must leave as they are."""
    return frozenset(int(v) for v in _meta(layer).get("locked_classes") or ())


def set_locked_classes(layer, classes) -> None:
    """Record the locked class ids of a Labels layer (0, the background, included if given)."""
    _meta(layer, create=True)["locked_classes"] = sorted({int(v) for v in classes})
