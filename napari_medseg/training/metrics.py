"""Evaluation metrics shared by the training scripts and fine-tuning."""

from __future__ import annotations

import numpy as np


def dice_per_class(pred: np.ndarray, ref: np.ndarray, names: dict) -> dict:
    """Dice per class name; classes absent from both maps are left out.

    Parameters
    ----------
    pred, ref : np.ndarray
        Integer label maps of the same shape, e.g. ``(Z, Y, X)``.
    names : dict
        Class id -> name.

    Returns
    -------
    dict
        Class name -> Dice, rounded to 4 decimals.
    """
    out = {}
    for cid, name in names.items():
        a, b = pred == cid, ref == cid
        s = int(a.sum()) + int(b.sum())
        if s:
            out[name] = round(2.0 * int((a & b).sum()) / s, 4)
    return out
