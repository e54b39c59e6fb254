"""The review-and-retrain loop's worklist (no napari, no Qt).

:class:`Worklist` keeps the cases of a folder (images, DICOM series or an
nnU-Net raw dataset) with their status, annotator, time spent and edits in one
SQLite file (:mod:`.store`); :mod:`napari_medseg.core.review` ranks cases and
regions by uncertainty.
"""

from __future__ import annotations

from .core import CaseRecord, Worklist, work_dir_for
from .store import STATUSES

__all__ = ["Worklist", "CaseRecord", "STATUSES", "work_dir_for"]
