"""Where napari-medseg keeps user files (models, autosave, recovery)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["user_dir", "user_models_dir", "recovery_dir"]

ENV_HOME = "NAPARI_MEDSEG_HOME"


def user_dir() -> Path:
    """The per-user data folder: ``$NAPARI_MEDSEG_HOME`` or the platform data dir."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-medseg", appauthor=False))


def user_models_dir() -> Path:
    """Folder scanned for user models (``$NAPARI_MEDSEG_MODELS`` overrides it)."""
    env = os.environ.get("NAPARI_MEDSEG_MODELS")
    return Path(env).expanduser() if env else user_dir() / "models"


def recovery_dir() -> Path:
    """Folder holding autosaved label layers for crash recovery."""
    return user_dir() / "recovery"
