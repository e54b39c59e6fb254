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

__all__ = ["Engine", "Prompts", "check_image", "ENGINES", "DEFAULT_ENGINE", "make_engine",
           "engine_info", "engine_names", "register_engine", "EngineInfo", "EngineCard"]

#: Engine names in the order the widget offers them, and whether each needs a
#: path (checkpoint file or model folder) from the user. Kept in step with the
#: registry (:mod:`.registry`), which also holds each engine's card and
#: capabilities.
ENGINES: dict[str, bool] = {}

#: The engine the Interactive widget starts with: the one with the best figures on
#: real scans (``benchmarks/bench_interactive.py --real``, 60 objects of the shared
#: CT, MR and PET scans: Dice after 5 clicks 0.67 against the classical engine's 0.54,
#: after a 2D box and 5 clicks 0.70 against 0.63).
DEFAULT_ENGINE = "click model"

from .registry import (  # noqa: E402 - ENGINES first: registering fills it
    _BUILTIN,
    EngineCard,
    EngineInfo,
    engine_info,
    engine_names,
    register_engine,
)

for _info in _BUILTIN:
    register_engine(_info)
del _info


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
    return engine_info(name).make(path, **kwargs)
