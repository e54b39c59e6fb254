"""Model cards, loaders, the registry and the built-in models.

>>> from napari_medseg.models import list_models, load_model
>>> [m.name for m in list_models()]                       # doctest: +SKIP
['abdomen-ct-small', 'deepbet-brain']
>>> model = load_model("abdomen-ct-small")                  # doctest: +SKIP
>>> pred = model.predict(ct_volume)                         # doctest: +SKIP
>>> pred.labels.data.shape == ct_volume.shape3              # doctest: +SKIP
True

Importing this package is light (no torch); torch loads with the first model.
"""

from __future__ import annotations

from .card import ModelCard

__all__ = ["ModelCard", "ModelInfo", "list_models", "load_model", "Model", "Prediction"]


def __getattr__(name):
    if name in ("ModelInfo", "list_models", "load_model"):
        from . import registry

        return getattr(registry, name)
    if name in ("Model", "Prediction"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
