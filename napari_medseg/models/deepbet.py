"""``deepbet-brain``: the deepbet brain-extraction models (MIT) as a zoo entry.

The ``deepbet`` wheel ships two TorchScript networks in ``<site-packages>/data/models``:
``bbox_model.pt`` finds the head on a coarse 128^3 grid, ``model.pt`` segments
the brain inside that box on a 256^3 grid. This module reproduces the authors'
pipeline (``deepbet.BrainExtraction.run_model`` and ``postprocess``) on a
:class:`~napari_medseg.core.volume.Volume`, so the mask lands on the input's voxels:

1. reorient to RAS by axis flips/permutations (``nibabel.as_closest_canonical``);
2. nearest-exact resize to 128^3, clip to the 0.5 / 99.5 % quantiles, scale to
   [0, 1], z-score, then ``0.226 x + 0.449``; bounding-box network; largest
   component; box grown by 10 % each side;
3. the box resized to 256^3, normalised with the same quantiles, brain network,
   resized back (nearest-exact), threshold 0.5;
4. largest connected component and hole filling inside the box;
5. back to the input's axis order.

Only available when ``deepbet`` is installed (``napari-medseg[deepbet]``); the
networks are TorchScript, so no pickle is read.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path


from ..errors import MedSegError
from .card import ModelCard

__all__ = ["deepbet_card", "deepbet_info", "deepbet_model_dir", "load_deepbet"]

log = logging.getLogger(__name__)

NAME = "deepbet-brain"


def deepbet_model_dir() -> Path | None:
    """Folder holding deepbet's TorchScript files, or None when deepbet is not installed."""
    spec = importlib.util.find_spec("deepbet")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).resolve().parents[1] / "data" / "models"  # deepbet.utils.DATA_PATH
    if (folder / "model.pt").is_file() and (folder / "bbox_model.pt").is_file():
        return folder
    return None


def deepbet_card() -> ModelCard:
    """The card of the deepbet brain-extraction model."""
    try:
        from importlib.metadata import version

        ver = version("deepbet")
    except Exception:  # pragma: no cover - metadata missing
        ver = "unknown"
    return ModelCard(
        name=NAME, version=ver,
        task="brain extraction (skull stripping) of T1-weighted MRI",
        license="MIT",
        channels=[{"name": "T1", "modality": "MR"}],
        target_spacing=None, orientation="RAS",
        normalization=[{"kind": "percentile", "percentiles": [0.5, 99.5],
                        "then": "scale to [0, 1], z-score, 0.226 x + 0.449"}],
        patch_size=(256, 256, 256),
        classes={1: {"name": "brain", "color": [0.95, 0.6, 0.2]}},
        format="deepbet", weights="model.pt",
        training=("deepbet by Lukas Fisch et al. (University of Muenster), 'deepbet: Fast "
                  "brain extraction of T1-weighted MRI using Convolutional Neural Networks'. "
                  "Two U-Nets (bounding box at 128^3, brain at 256^3) trained by the authors "
                  "on T1-weighted MRI; weights shipped in the deepbet wheel (MIT). The "
                  "pipeline here follows deepbet.BrainExtraction.run_model."),
        metrics={"note": "see the deepbet publication for the authors' evaluation"},
        body_region="brain",  # head T1 MR only: a CT or a trunk gets a warning
        mirror_axes=(),
    )


def deepbet_info():
    """A registry entry for deepbet-brain, or None when deepbet is not installed."""
    folder = deepbet_model_dir()
    if folder is None:
        return None
    from .info import ModelInfo

    return ModelInfo(NAME, deepbet_card(), "extra", str(folder))


def load_deepbet() -> "DeepbetModel":
    """Load the deepbet networks (TorchScript).

    Raises
    ------
    MedSegError
        When deepbet is not installed.
    """
    folder = deepbet_model_dir()
    if folder is None:
        raise MedSegError("deepbet-brain needs the deepbet package; install "
                          "napari-medseg[deepbet]")
    from .deepbet_model import DeepbetModel
    from .weights import load_torchscript

    bbox = load_torchscript(folder / "bbox_model.pt", str(folder / "bbox_model.pt"))
    brain = load_torchscript(folder / "model.pt", str(folder / "model.pt"))
    return DeepbetModel(deepbet_card(), bbox, brain, str(folder))
