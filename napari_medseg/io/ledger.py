"""Writing a correction ledger folder (atomically); reading is in the core.

:class:`~napari_medseg.core.ledger.CorrectionLedger` works on arrays; this
writes what it records next to an exported training case.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..core.ledger import CORRECTIONS_FILE, JSON_FILE, PREDICTION_FILE, CorrectionLedger
from ..errors import MedSegError
from .atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = ["save_ledger", "load_ledger"]


def save_ledger(ledger: CorrectionLedger, folder, current=None) -> Path:
    """Write ``ledger`` into ``folder`` (created if missing); return the folder.

    Parameters
    ----------
    ledger : CorrectionLedger
    folder : path
    current : (Z, Y, X) integer array, optional
        The labels as they are now; adds the user's diff and the per-class summary.

    Notes
    -----
    Files: ``prediction.npz`` (compressed original prediction), ``ledger.json``
    (spacing, names, meta and, with ``current``, the per-class summary and
    totals) and, with ``current``, ``corrections.npz`` (flat indices of the
    changed voxels and their new labels). Each file is written atomically.

    Raises
    ------
    MedSegError
        The folder cannot be created.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSegError(f"cannot create the ledger folder ({exc.strerror}); choose "
                          "a writable folder", str(folder)) from exc
    info = ledger.record(current)
    with atomic_path(folder / PREDICTION_FILE, overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, prediction=np.asarray(ledger.prediction))
    if current is not None:
        index, value = ledger.diff(current)
        with atomic_path(folder / CORRECTIONS_FILE, overwrite=True) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, index=index, value=value)
    with atomic_path(folder / JSON_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    log.info("saved correction ledger to %s", folder)
    return folder


def load_ledger(folder) -> CorrectionLedger:
    """Read a ledger written by :func:`save_ledger` (see :meth:`CorrectionLedger.load`)."""
    return CorrectionLedger.load(folder)
