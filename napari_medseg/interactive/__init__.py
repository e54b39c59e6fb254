"""Interactive segmentation: prompts (clicks, boxes, scribbles) -> mask of one object.

Every engine takes ``(image (Z, Y, X), spacing, Prompts)`` and returns a bool
mask (:class:`~napari_medseg.interactive.base.Engine`):

* ``"classical"``: seeded, edge-aware region growing; no weights, any modality;
* ``"click model"``: a small 3D network shipped with the package;
* ``"Segment Anything"``: SAM / MedSAM from a local checkpoint
  (``segment-anything`` package);
* ``"SAM2"``: SAM 2 / SAM 2.1 / MedSAM2 from a local checkpoint (``sam2``
  package), propagated through the slices by its video predictor;
* ``"nnInteractive"``: from a local model folder (``nninteractive`` package).

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
    "SAM2": True,
    "nnInteractive": True,
}


def make_engine(name: str, path=None, **kwargs) -> Engine:
    """Create an engine by its name in :data:`ENGINES`.

    Parameters
    ----------
    name : str
        Engine name.
    path : path, optional
        SAM / MedSAM / SAM2 checkpoint or nnInteractive model folder; for the click
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
    if name in ("Segment Anything", "SAM2", "nnInteractive"):
        if not path:
            what = "model folder" if name == "nnInteractive" else "checkpoint file"
            raise MedSegError(f"choose a local {what} for {name} first", name)
        if name == "Segment Anything":
            from .sam import SamEngine

            return SamEngine(path, **kwargs)
        if name == "SAM2":
            from .sam2 import Sam2Engine

            return Sam2Engine(path, **kwargs)
        from .nninteractive import NNInteractiveEngine

        return NNInteractiveEngine(path, **kwargs)
    raise MedSegError(f"unknown engine {name!r}; choose one of {list(ENGINES)}", "engine")
