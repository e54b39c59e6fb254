"""Which models are available, and loading one by name or path.

Sources, in order (the first of two models with one name wins):

1. ``builtin``: packages shipped in ``napari_medseg/models/builtin/<name>/``;
2. ``extra``: models that come with installed optional packages
   (``deepbet-brain`` when ``napari-medseg[deepbet]`` is installed);
3. ``user``: anything loadable in the user model folder
   (:func:`napari_medseg.paths.user_models_dir`, ``$NAPARI_MEDSEG_MODELS``);
4. ``totalseg``: TotalSegmentator tasks whose weights are in its weights folder
   (``$TOTALSEG_HOME_DIR/nnunet/results`` or ``~/.totalsegmentator/nnunet/results``;
   :mod:`napari_medseg.models.totalseg`);
5. ``path``: any path given to :func:`load_model`.

Listing reads cards only; weights are loaded by :func:`load_model`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import MedSegError
from .card import ModelCard
from .info import ModelInfo

__all__ = ["ModelInfo", "list_models", "load_model", "BUILTIN_DIR"]

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def _card_of(path: Path) -> ModelCard | None:
    """The card of a loadable model at ``path`` without loading weights; None if not one."""
    from .loaders import card_beside, detect_format, read_package_card
    from .card import read_card

    kind = detect_format(path)
    if kind == "package":
        return read_package_card(path)
    if kind == "file":
        c = card_beside(path)
        return read_card(c) if c else None
    if kind == "monai-bundle":
        from .bundle import bundle_card

        return bundle_card(path)
    if kind == "nnunet":
        from .nnunet import nnunet_card

        return nnunet_card(path)
    return None


def _scan(folder: Path, source: str) -> list[ModelInfo]:
    out = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() in (".yaml", ".yml", ".json"):
            continue
        try:
            card = _card_of(p)
        except MedSegError as exc:
            log.warning("skipping %s: %s", p, exc)
            continue
        except Exception as exc:  # a broken user file must not hide the other models
            log.warning("skipping %s: %s: %s", p, type(exc).__name__, exc)
            continue
        if card is not None:
            out.append(ModelInfo(card.name, card, source, str(p)))
    return out


def _extras() -> list[ModelInfo]:
    from .deepbet import deepbet_info

    info = deepbet_info()
    return [info] if info is not None else []


def _totalseg() -> list[ModelInfo]:
    from .totalseg import totalseg_infos

    try:
        return totalseg_infos()
    except Exception as exc:  # a broken weights folder must not hide the other models
        log.warning("skipping TotalSegmentator weights: %s: %s", type(exc).__name__, exc)
        return []


def list_models(include_user: bool = True) -> list[ModelInfo]:
    """All available models: built-in, optional extras, the user folder and TotalSegmentator's.

    Returns
    -------
    list of ModelInfo
        Sorted by source then name; names are unique (earlier sources win).
    """
    from ..paths import user_models_dir

    found = _scan(BUILTIN_DIR, "builtin") + _extras()
    if include_user:
        found += _scan(user_models_dir(), "user") + _totalseg()
    seen, out = set(), []
    for info in found:
        if info.name in seen:
            log.warning("model %s at %s is shadowed by an earlier one", info.name, info.path)
            continue
        seen.add(info.name)
        out.append(info)
    return out


def load_model(name_or_path):
    """Load a model by registry name or from a path.

    Parameters
    ----------
    name_or_path : str or path-like
        A name from :func:`list_models` (e.g. ``"abdomen-ct-small"``) or a path to
        a package folder / ``.zip``, a TorchScript or ONNX file with a card beside
        it, a MONAI bundle or an nnU-Net result folder.

    Returns
    -------
    Model
        Ready for :meth:`~napari_medseg.models.predictor.Model.predict`.

    Raises
    ------
    MedSegError
        Unknown name (the message lists the available ones) or a bad file.
    """
    from .loaders import load_path

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return load_path(path)
    models = list_models()
    for info in models:
        if info.name == text:
            if info.source == "extra":
                from .deepbet import load_deepbet

                return load_deepbet()
            if info.source == "totalseg":
                from .totalseg import load_totalseg

                return load_totalseg(info.name)
            return load_path(info.path)
    names = ", ".join(i.name for i in models) or "none"
    raise MedSegError(f"unknown model {text!r}: not a file or folder, and not one of the "
                      f"available models ({names}); run `napari-medseg models` to list them")
