"""Small sample volumes shipped with the package, and how to regenerate them.

The samples are the canonical phantoms of :mod:`napari_medseg.core.phantom`
(``seed=0``, ``vary=False``, default shapes), stored as gzipped NIfTI: the image
as int16 (HU for the CT) and the labels as uint8, each file under 2 MB. They
live beside this module so they work from an installed wheel; the repository
keeps identical copies in ``sample_data/`` for the documentation.

>>> from napari_medseg.data import load_sample
>>> img, lab = load_sample("abdomen-ct")      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.phantom import (
    ABDOMEN_COLORS,
    ABDOMEN_LABELS,
    HEAD_COLORS,
    HEAD_LABELS,
    make_abdomen_ct,
    make_head_mr,
)
from ..core.volume import Volume

__all__ = ["SAMPLES", "Sample", "DATA_DIR", "sample_files", "load_sample", "generate_sample",
           "write_sample_files"]

log = logging.getLogger(__name__)

#: Folder of the shipped sample files.
DATA_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sample:
    """One sample volume: how to make it and what its files are called."""

    key: str
    stem: str
    make: Callable
    modality: str
    names: dict
    colors: dict
    title: str

    def paths(self, folder=DATA_DIR) -> tuple[Path, Path]:
        """``(image, labels)`` file paths in ``folder``."""
        folder = Path(folder)
        return folder / f"{self.stem}.nii.gz", folder / f"{self.stem}_seg.nii.gz"


SAMPLES = {
    s.key: s
    for s in (
        Sample("abdomen-ct", "abdomen_ct", make_abdomen_ct, "CT", ABDOMEN_LABELS,
               ABDOMEN_COLORS, "abdomen CT"),
        Sample("head-mr", "head_mr", make_head_mr, "MR", HEAD_LABELS, HEAD_COLORS,
               "head MR"),
    )
}


def _sample(key: str) -> Sample:
    try:
        return SAMPLES[key]
    except KeyError:
        raise KeyError(f"unknown sample {key!r}; choose one of {sorted(SAMPLES)}") from None


def sample_files(key: str) -> tuple[Path, Path] | None:
    """The shipped ``(image, labels)`` files of sample ``key``, or None if absent."""
    paths = _sample(key).paths()
    return paths if all(p.is_file() for p in paths) else None


def generate_sample(key: str) -> tuple[Volume, Volume]:
    """Generate sample ``key`` exactly as stored: int16 image, uint8 labels.

    Returns
    -------
    image, labels : Volume
        ``(Z, Y, X)`` arrays on the phantom's grid.
    """
    s = _sample(key)
    img, lab = s.make(seed=0, vary=False)
    data = np.clip(np.rint(img.data), -32768, 32767).astype(np.int16)
    return img.with_data(data), lab


def _read_nifti(path: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    nii = nib.load(str(path))
    data = np.asarray(nii.dataobj, dtype=dtype)  # (i, j, k)
    # The header stores the affine as float32; the samples' grids are exact to
    # 1e-5 mm, so rounding gives back the generator's affine exactly.
    affine = np.round(nii.affine.astype(float), 5)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine


def load_sample(key: str, prefer_files: bool = True) -> tuple[Volume, Volume]:
    """The sample ``key`` as ``(image, labels)`` Volumes with names and colours.

    Reads the shipped NIfTI files when present (and ``prefer_files``), else
    generates the identical phantom (a few tenths of a second).
    """
    s = _sample(key)
    files = sample_files(key) if prefer_files else None
    if files is None:
        log.info("sample %s: no shipped files, generating it", key)
        img, lab = generate_sample(key)
        img.source = lab.source = None
    else:
        data, affine = _read_nifti(files[0], np.int16)
        ldata, laffine = _read_nifti(files[1], np.uint8)
        img = Volume(data, affine, modality=s.modality, source=str(files[0]))
        lab = Volume(ldata, laffine, modality=s.modality, is_label=True, source=str(files[1]))
    meta = {"sample": key}
    img.meta.update(meta)
    lab.meta.update(meta)
    lab.label_names = dict(s.names)
    lab.label_colors = dict(s.colors)
    return img, lab


def write_sample_files(folder, keys=None, overwrite: bool = True) -> list[Path]:
    """Write the sample files (gzipped NIfTI) of ``keys`` (default: all) to ``folder``.

    Writes are atomic; the gzip header carries no time stamp, so regenerating
    gives byte-identical files.

    Returns
    -------
    list of Path
        The files written.
    """
    from ..io.atomic import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for key in keys or SAMPLES:
        img, lab = generate_sample(key)
        for vol, path in zip((img, lab), _sample(key).paths(folder)):
            with atomic_path(path, overwrite=overwrite) as tmp:
                _write_nifti(tmp, vol)
                os.chmod(tmp, 0o644)  # plain data files, readable by everyone
            out.append(path)
            log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    return out


def _write_nifti(path: Path, vol: Volume) -> None:
    import gzip

    import nibabel as nib

    nii = nib.Nifti1Image(np.asarray(vol.data).transpose(2, 1, 0), vol.affine)
    nii.set_qform(vol.affine, code=1)
    nii.set_sform(vol.affine, code=1)
    nii.header.set_xyzt_units("mm", "sec")
    nii.header.set_data_dtype(vol.data.dtype)
    raw = nii.to_bytes()
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0,
                                               filename="", compresslevel=9) as gz:
        gz.write(raw)
