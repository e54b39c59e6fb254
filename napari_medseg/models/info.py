"""One entry of the model registry: a model's name, card and where it loads from.

Kept apart from :mod:`.registry` so that the model sources (deepbet,
TotalSegmentator, ...) can build entries without importing the registry that
imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .card import ModelCard

__all__ = ["ModelInfo"]


@dataclass
class ModelInfo:
    """One entry of :func:`list_models`.

    Attributes
    ----------
    name : str
    card : ModelCard
    source : str
        ``"builtin"``, ``"extra"``, ``"user"`` or ``"path"``.
    path : str
        Folder or file it loads from.
    """

    name: str
    card: ModelCard
    source: str
    path: str

    def to_dict(self) -> dict:
        """JSON-safe summary (the card included).

        ``metrics_real`` (figures on real scans) comes before ``metrics_synthetic``
        (on phantoms), read from the card in its new or its legacy layout.
        """
        return {"name": self.name, "source": self.source, "path": self.path,
                "body_region": self.card.body_region,
                "metrics_real": self.card.real_metrics,
                "metrics_synthetic": self.card.synthetic_metrics,
                "card": self.card.to_dict()}
