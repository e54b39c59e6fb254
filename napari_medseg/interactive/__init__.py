"""Interactive segmentation: prompts (clicks, boxes, scribbles) -> mask of one object.

Every engine takes ``(image (Z, Y, X), spacing, Prompts)`` and returns a bool
mask (:class:`~napari_medseg.interactive.base.Engine`):

* ``"classical"``: seeded, edge-aware region growing; no weights, any modality;
* ``"click model"``: a small 3D network shipped with the package;
* ``"Segment Anything"``: SAM / MedSAM from a local checkpoint
  (``segment-anything`` package);
* ``"nnInteractive"``: from a local model folder (``nnInteractive`` package).

Importing this package loads no torch; the engines load their own dependencies.
"""

from __future__ import annotations

from .base import Engine, Prompts, check_image

__all__ = ["Engine", "Prompts", "check_image", "ENGINES", "make_engine"]

#: Engine names in the order the widget offers them, and whether each needs a
#: path (checkpoint file or model folder) from the user.
ENGINES = {
    "classical": False,
    "click model": False,
    "Segment Anything": True,
    "nnInteractive": True,
}


def make_engine(name: str, path=None, **kwargs) -> Engine:
    """Create an engine by its name in :data:`ENGINES`.

    Parameters
    ----------
    name : str
        Engine name.
    path : path, optional
        SAM / MedSAM checkpoint or nnInteractive model folder; for the click
        model, other weights than the shipped ones.

    Raises
    ------
    MedSegError
        For an unknown name or a missing path.
    """
    from ..errors import MedSegError

    if name == "classical":
        from .classical import ClassicalEngine

        return ClassicalEngine(**kwargs)
    if name == "click model":
        from .click_model import ClickModelEngine

        return ClickModelEngine(weights=path, **kwargs)
    if name in ("Segment Anything", "nnInteractive"):
        if not path:
            what = "checkpoint file" if name == "Segment Anything" else "model folder"
            raise MedSegError(f"choose a local {what} for {name} first", name)
        if name == "Segment Anything":
            from .sam import SamEngine

            return SamEngine(path, **kwargs)
        from .nninteractive import NNInteractiveEngine

        return NNInteractiveEngine(path, **kwargs)
    raise MedSegError(f"unknown engine {name!r}; choose one of {list(ENGINES)}", "engine")
