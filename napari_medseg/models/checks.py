"""Does the input suit the model, and does its output look like anatomy?

Every mismatch is a warning: one line of text naming what looks wrong and
what the image seems to be. The run still goes ahead (the user may know
better), but the widget and the command line always show the warnings
(``warning: ...`` on stderr); nothing here is silent.

Before a run, :func:`check_input` compares the images with the card:

* **channel count**: the card's ``channels`` against the channels given;
* **modality**: each image's modality
  (:func:`~napari_medseg.core.modality.detect_modality`: DICOM header, file,
  intensities) against the card's ``channels[i].modality`` (``T1``, ``FLAIR``...
  count as MR; ``unknown`` on either side never warns);
* **body region**: the image's region
  (:func:`~napari_medseg.core.body_region.detect_body_region`: a skull ring,
  a long-bone shaft in a limb-narrow body, the body's width) against the
  card's ``body_region`` (``any`` never warns; an image whose region cannot be
  told never warns).

After a run, :func:`check_prediction` compares each class's predicted volume
(mL) with the card's ``plausible_ml`` ``{class: [low, high]}``: above ``high``
always warns; below ``low`` only when the class lies wholly inside the image
(an organ cut by the field of view may be small); an absent class never warns.

Volume ranges alone do not catch a wrong input (794 mL of "liver" in a head, or
1.4 L in a thigh, is a plausible liver volume): the modality and region checks do.
"""

from __future__ import annotations

import numpy as np

from ..core.body_region import detect_body_region, region_fits
from ..core.labelmap import label_counts
from ..core.modality import detect_modality, normalize_modality

__all__ = ["check_input", "check_prediction", "model_fits_modality"]


def _vols(volumes) -> list:
    if volumes is None:
        return []
    return list(volumes) if isinstance(volumes, (list, tuple)) else [volumes]


def model_fits_modality(card, modality: str) -> bool:
    """True when the card's first channel takes ``modality`` (unknown on either side fits)."""
    want = normalize_modality(card.channels[0].get("modality")) if card.channels else "unknown"
    modality = normalize_modality(modality)
    return "unknown" in (want, modality) or want == modality


def check_input(card, volumes, user_modality: str | None = None) -> list[str]:
    """Warnings about images that do not suit the model (empty when all fits).

    Parameters
    ----------
    card : ModelCard
    volumes : Volume or list of Volume
        The images in the card's channel order, ``(Z, Y, X)`` or ``(C, Z, Y, X)``.
    user_modality : str, optional
        A modality the user set for the (first) image; it overrides detection.

    Returns
    -------
    list of str
        One line per mismatch.
    """
    vols = _vols(volumes)
    out = []
    n = sum(int(getattr(v, "n_channels", 1)) for v in vols)
    if n != card.n_channels:
        want = ", ".join(f"{c['name']} ({c['modality']})" for c in card.channels)
        out.append(f"model {card.name} takes {card.n_channels} channel(s) [{want}] but "
                   f"{n} image channel(s) were given")
    guesses = []
    for i, v in enumerate(vols):
        g = detect_modality(v, user=user_modality if i == 0 else None)
        guesses.append(g)
        if i >= len(card.channels):
            continue
        want = normalize_modality(card.channels[i].get("modality"))
        if "unknown" not in (want, g.modality) and want != g.modality:
            name = getattr(v, "source", None) or f"image {i + 1}"
            out.append(f"{name} looks like {g.modality} ({g.source}: {g.reason}) but model "
                       f"{card.name} expects {card.channels[i].get('modality')} for its "
                       f"'{card.channels[i].get('name')}' channel; its output will be "
                       "meaningless")
    region = str(getattr(card, "body_region", "any") or "any")
    if vols and region != "any":
        rg = detect_body_region(vols[0], modality=guesses[0].modality)
        if not region_fits(rg.region, region):
            name = getattr(vols[0], "source", None) or "the image"
            out.append(f"{name} looks like a {rg.region} ({rg.reason}) but model {card.name} "
                       f"is made for the {region}; its output will be meaningless")
    return out


def check_prediction(card, labels, whole: bool = True) -> list[str]:
    """Warnings about predicted volumes outside the card's ``plausible_ml`` ranges.

    Parameters
    ----------
    card : ModelCard
    labels : Volume
        The ``(Z, Y, X)`` label map on the input grid (``Prediction.labels``).
    whole : bool
        False when only a region of the image was segmented: then only the
        upper bounds are checked (the region may cut an organ).

    Returns
    -------
    list of str
    """
    ranges = getattr(card, "plausible_ml", None) or {}
    if not ranges:
        return []
    data = np.asarray(labels.data)
    ml = float(labels.voxel_volume_ml)
    counts = label_counts(data, minlength=card.n_classes)
    out = []
    for cid, name in card.label_names.items():
        if name not in ranges or cid >= counts.size or not counts[cid]:
            continue
        lo, hi = ranges[name]
        vol = float(counts[cid]) * ml
        if vol > hi:
            out.append(f"{name}: {vol:.0f} mL predicted, more than the plausible "
                       f"{lo:g}-{hi:g} mL of model {card.name}; check the input and the result")
        elif vol < lo and whole and not _touches_border(data == cid):
            out.append(f"{name}: {vol:.1f} mL predicted, less than the plausible "
                       f"{lo:g}-{hi:g} mL of model {card.name} for a whole {name}; "
                       "check the result")
    return out


def _touches_border(mask: np.ndarray) -> bool:
    """True when the mask reaches the first or last index of any axis (cut by the image)."""
    for ax in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if idx.size and (idx[0] == 0 or idx[-1] == mask.shape[ax] - 1):
            return True
    return False
