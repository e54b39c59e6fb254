"""DICOM series from a folder, through pydicom."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["is_dicom_file", "looks_like_dicom_folder"]


def is_dicom_file(path) -> bool:
    """True when ``path`` starts with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_dicom_folder(path, max_probe: int = 50) -> bool:
    """True when a folder (or its sub-folders) holds at least one DICOM file."""
    n = 0
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            if p.suffix.lower() == ".dcm" or is_dicom_file(p):
                return True
            n += 1
            if n >= max_probe:
                break
    return False
