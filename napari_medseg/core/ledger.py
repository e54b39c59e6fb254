"""The correction ledger: what the user changed in a model's prediction.

A Labels layer produced by a model keeps the original prediction.
:class:`CorrectionLedger` compares
the current labels with it: per class, the voxels the user added and removed,
the Dice overlap between prediction and current labels, and the region that
changed. The ledger is saved beside exported training cases so that every
correction can be counted (and reused) when the model is retrained; writing it
is :func:`napari_medseg.io.ledger.save_ledger` (atomic writes live in ``io``),
reading it back is :meth:`CorrectionLedger.load`. Nothing here knows napari's
layer metadata: :func:`napari_medseg._napari.boundary.ledger_of` builds the
ledger of a layer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import MedSegError
from .labelmap import label_counts

log = logging.getLogger(__name__)

__all__ = ["CorrectionLedger", "LEDGER_VERSION", "PREDICTION_FILE", "CORRECTIONS_FILE",
           "JSON_FILE"]

LEDGER_VERSION = 1
#: Files of a saved ledger folder: the compressed original prediction, the
#: user's diff (flat indices and new labels) and the JSON record.
PREDICTION_FILE = "prediction.npz"
CORRECTIONS_FILE = "corrections.npz"
JSON_FILE = "ledger.json"
_PRED_FILE, _DIFF_FILE, _JSON_FILE = PREDICTION_FILE, CORRECTIONS_FILE, JSON_FILE


def _bbox(mask: np.ndarray):
    """Half-open ``(z0, y0, x0, z1, y1, x1)`` of the True voxels, or None."""
    if not mask.any():
        return None
    lo, hi = [], []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return tuple(lo + hi)


class CorrectionLedger:
    """Compare current labels with the model's original prediction.

    Parameters
    ----------
    prediction : array_like of int
        ``(Z, Y, X)`` original model output (kept read-only, not copied).
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    names : dict[int, str], optional
        Class id to name.
    meta : dict, optional
        Extra JSON-able information saved with the ledger (model card name,
        source image, ...).

    Examples
    --------
    >>> pred = np.zeros((2, 3, 3), np.uint8); pred[0] = 1
    >>> cur = pred.copy(); cur[1, 0, 0] = 1; cur[0, 2, 2] = 0
    >>> row = CorrectionLedger(pred, (1, 1, 1), {1: "liver"}).summary(cur)[0]
    >>> row["added_voxels"], row["removed_voxels"], round(row["dice"], 3)
    (1, 1, 0.889)
    """

    def __init__(self, prediction, spacing, names=None, meta=None):
        pred = np.asarray(prediction)
        if pred.ndim != 3 or not (np.issubdtype(pred.dtype, np.integer)
                                  or pred.dtype == bool):
            raise MedSegError(f"the prediction must be a 3D integer label map, got "
                              f"{pred.dtype} {pred.shape}")
        view = pred.view()
        view.flags.writeable = False
        self.prediction = view
        self.spacing = tuple(float(s) for s in spacing)
        self.names = {int(k): str(v) for k, v in (names or {}).items()}
        self.meta = dict(meta or {})
        self._pred_counts = label_counts(pred)

    # ------------------------------------------------------------- analysis
    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing)) / 1000.0

    def _check(self, current) -> np.ndarray:
        cur = np.asarray(current)
        if cur.shape != self.prediction.shape:
            raise MedSegError(f"labels of shape {cur.shape} do not match the prediction "
                              f"{self.prediction.shape}; the ledger only compares labels "
                              "on the prediction's grid")
        return cur

    def changed_mask(self, current) -> np.ndarray:
        """``(Z, Y, X)`` bool: voxels whose label differs from the prediction."""
        return self._check(current) != self.prediction

    def changed_region(self, current):
        """Half-open bounding box ``(z0, y0, x0, z1, y1, x1)`` of all changes, or None."""
        return _bbox(self.changed_mask(current))

    def summary(self, current) -> list[dict]:
        """Per-class corrections of ``current`` relative to the prediction.

        Parameters
        ----------
        current : array_like of int
            ``(Z, Y, X)`` labels as they are now.

        Returns
        -------
        list of dict
            One row per class found in either map or in ``names``, sorted by
            id, with ``label``, ``name``, ``predicted_voxels``,
            ``current_voxels``, ``added_voxels`` (now this class, predicted
            otherwise), ``removed_voxels`` (predicted this class, now not),
            ``corrected_voxels`` (added + removed), ``added_ml`` /
            ``removed_ml`` (mL), ``dice`` (prediction vs current; None when the
            class is empty in both) and ``changed_bbox`` (half-open voxel box
            of this class's changes, or None).
        """
        cur = self._check(current)
        diff = cur != self.prediction
        box = _bbox(diff)
        cur_counts = label_counts(cur)
        if box is not None:
            sl = tuple(slice(box[i], box[i + 3]) for i in range(3))
            d = diff[sl]
            cur_d, pred_d = cur[sl], self.prediction[sl]
            added = np.bincount(cur_d[d].astype(np.int64, copy=False))
            removed = np.bincount(pred_d[d].astype(np.int64, copy=False))
        else:
            added = removed = np.zeros(1, np.int64)

        def get(arr, k):
            return int(arr[k]) if k < len(arr) else 0

        ids = {k for k in range(1, len(self._pred_counts)) if self._pred_counts[k]}
        ids |= {k for k in range(1, len(cur_counts)) if cur_counts[k]}
        ids |= {k for k in self.names if k != 0}
        rows = []
        for k in sorted(ids):
            p, c = get(self._pred_counts, k), get(cur_counts, k)
            a, r = get(added, k), get(removed, k)
            inter = p - r
            kbox = None
            if a or r:
                kbox = _bbox(d & ((cur_d == k) | (pred_d == k)))
                kbox = tuple(int(v) + box[i % 3] for i, v in enumerate(kbox))
            rows.append({
                "label": k, "name": self.names.get(k, f"label {k}"),
                "predicted_voxels": p, "current_voxels": c,
                "added_voxels": a, "removed_voxels": r, "corrected_voxels": a + r,
                "added_ml": a * self.voxel_ml, "removed_ml": r * self.voxel_ml,
                "dice": (2.0 * inter / (p + c)) if (p + c) else None,
                "changed_bbox": kbox,
            })
        return rows

    def totals(self, current) -> dict:
        """Whole-volume figures: ``changed_voxels``, ``changed_ml``, ``changed_bbox``."""
        diff = self.changed_mask(current)
        n = int(diff.sum())
        return {"changed_voxels": n, "changed_ml": n * self.voxel_ml,
                "changed_bbox": _bbox(diff)}

    # ------------------------------------------------------------ save/load
    def record(self, current=None) -> dict:
        """The JSON record of the ledger (what ``ledger.json`` holds).

        ``version``, ``shape``, ``dtype``, ``spacing``, ``names``, ``meta`` and,
        with ``current``, the per-class ``summary`` and the ``totals``.
        """
        info = {"version": LEDGER_VERSION, "shape": list(self.prediction.shape),
                "dtype": str(self.prediction.dtype), "spacing": list(self.spacing),
                "names": {str(k): v for k, v in self.names.items()}, "meta": self.meta}
        if current is not None:
            cur = self._check(current)
            info["summary"] = self.summary(cur)
            info["totals"] = self.totals(cur)
        return info

    def diff(self, current) -> tuple[np.ndarray, np.ndarray]:
        """The user's edits: flat indices of the changed voxels and their new labels."""
        cur = self._check(current)
        flat = np.flatnonzero(cur != self.prediction)
        return flat, cur.ravel()[flat]

    @classmethod
    def load(cls, folder) -> "CorrectionLedger":
        """Read a ledger written by :func:`napari_medseg.io.ledger.save_ledger`."""
        folder = Path(folder)
        try:
            info = json.loads((folder / _JSON_FILE).read_text())
            with np.load(folder / _PRED_FILE, allow_pickle=False) as z:
                pred = z["prediction"]
        except (OSError, ValueError, KeyError) as exc:
            raise MedSegError(f"not a readable correction ledger ({exc}); choose the "
                              "folder that holds ledger.json", str(folder)) from exc
        names = {int(k): v for k, v in info.get("names", {}).items()}
        return cls(pred, info["spacing"], names, meta=info.get("meta"))

    @staticmethod
    def load_current(folder) -> np.ndarray | None:
        """The corrected labels saved with the ledger (prediction + diff), or None."""
        folder = Path(folder)
        if not (folder / _DIFF_FILE).exists():
            return None
        led = CorrectionLedger.load(folder)
        cur = np.array(led.prediction)
        with np.load(folder / _DIFF_FILE, allow_pickle=False) as z:
            cur.ravel()[z["index"]] = z["value"]
        return cur
