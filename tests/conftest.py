"""Shared fixtures. napari's ``make_napari_viewer`` comes from napari's pytest plugin."""

from __future__ import annotations

import numpy as np
import pytest



@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory, monkeypatch):
    """Keep user model folders and autosave out of the real home directory."""
    home = tmp_path_factory.mktemp("medseg_home")
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(home))
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def totalseg_home(tmp_path_factory):
    """TotalSegmentator's weights folder with tiny random-weight part models
    (``_tiny_totalseg``; needs nnunetv2)."""
    from _tiny_totalseg import make_totalseg_home

    return make_totalseg_home(tmp_path_factory.mktemp("totalseg_home"))


@pytest.fixture
def totalseg_env(totalseg_home, monkeypatch):
    """``TOTALSEG_HOME_DIR`` pointing at :func:`totalseg_home` (what the registry reads)."""
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(totalseg_home))
    return totalseg_home


def write_tiny_abdomen_model(folder, spacing, patch, **card_fields):
    """A small random-weight U-Net package for abdominal CT (fast to fine-tune) in ``folder``.

    ``card_fields`` are extra :class:`~napari_medseg.models.card.ModelCard` fields.
    Returns ``folder``.
    """
    import torch

    from napari_medseg.core.phantom import ABDOMEN_LABELS
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.networks import UNet3D

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    card = ModelCard(
        name="tiny-abdomen", version="1.0.0", channels=[{"name": "CT", "modality": "CT"}],
        target_spacing=spacing, orientation="LPS",
        normalization=[{"kind": "ct", "window": [-200, 300]}], patch_size=patch,
        classes={k: {"name": v} for k, v in ABDOMEN_LABELS.items()}, weights="model.pt",
        network={"class": "UNet3D", "kwargs": {"in_channels": 1, "out_channels": 6,
                                               "features": [4, 8, 16]}},
        mirror_axes=(0, 1), **card_fields)
    torch.save(UNet3D(1, 6, (4, 8, 16)).state_dict(), folder / "model.pt")
    card.save(folder / "card.yaml")
    return folder
