"""Export: training cases (nnU-Net v2, MONAI datalist), DICOM SEG, statistics CSV.

Every function here writes atomically (see :mod:`napari_medseg.io.atomic`): a
failure leaves no partial file behind, and files that existed before are
unchanged. Nothing here imports napari or Qt.
"""

from __future__ import annotations

from .csvstats import STAT_COLUMNS, write_statistics_csv
from .monai import append_datalist
from .nnunet import dataset_folder, export_training_case, read_dataset_json

__all__ = [
    "STAT_COLUMNS",
    "append_datalist",
    "dataset_folder",
    "export_dicom_seg",
    "export_training_case",
    "read_dataset_json",
    "write_statistics_csv",
]


def export_dicom_seg(*args, **kwargs):
    """Write a DICOM SEG; see :func:`napari_medseg.io.export.dicomseg.export_dicom_seg`."""
    from .dicomseg import export_dicom_seg as _export  # highdicom is an optional extra

    return _export(*args, **kwargs)
