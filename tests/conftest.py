"""Shared fixtures. napari's ``make_napari_viewer`` comes from napari's pytest plugin."""

from __future__ import annotations

import os

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
