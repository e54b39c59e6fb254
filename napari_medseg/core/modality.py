"""Which imaging modality a volume is: CT, MR or PET.

One function, :func:`detect_modality`, answers for every part of the package
(the model input checks, window presets, exports). It looks, in order, at:

1. ``user``: a modality the user set (e.g. a layer's modality picked by hand);
2. ``dicom``: the DICOM header's ``Modality`` (0008,0060), which the DICOM
   reader stores as ``Volume.modality`` (``PT`` is read as ``PET``);
3. ``file``: what the file or our own metadata says: ``Volume.modality`` set by
   a reader or a generator, or a NIfTI ``descrip`` / intent name naming the
   modality (``vol.meta["nifti_description"]``, ``vol.meta["nifti_intent_name"]``);
4. ``intensities``: the voxel values, on a strided sample of at most about
   a million voxels (so a 512 x 512 x 300 volume is judged in milliseconds):

   * **CT**: the lowest values sit near air (-1000 HU, or the -1024 / -2048 /
     -3024 padding outside the reconstruction circle): the 0.5th percentile lies
     in [-3100, -500]; the values are integer-like Hounsfield units or a large
     part of them lies in air's range [-1200, -850], and the highest stay
     below 32767.
   * **PET**: no negative values; the foreground (values above 1% of the 99.9th
     percentile) is heavy-tailed, its 99th percentile at least 4 times its
     median and under 10% of it above half the 99.9th percentile (a few hot
     spots over a dim body, where MR has a bright tissue class), and its values
     are not integers (SUV or Bq/mL after decay correction).
   * **MR**: anything else with some contrast (MR signal has no absolute scale,
     so this is the fallback rather than a positive finding; the reason says so).
   * ``unknown``: empty, constant or non-finite images.

The rules are deliberately simple and documented in each guess's ``reason``;
they misread, for example, a CT stored without its rescale intercept (air at 0)
as MR, and a z-scored CT as MR. Qt- and napari-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["ModalityGuess", "MODALITIES", "detect_modality", "normalize_modality",
           "intensity_sample"]

#: The modalities :func:`detect_modality` answers with.
MODALITIES = ("CT", "MR", "PET", "unknown")

_ALIASES = {
    "CT": "CT", "CTA": "CT", "CBCT": "CT", "HU": "CT", "COMPUTED TOMOGRAPHY": "CT",
    "MR": "MR", "MRI": "MR", "T1": "MR", "T1W": "MR", "T1C": "MR", "T1CE": "MR",
    "T1GD": "MR", "T2": "MR", "T2W": "MR", "FLAIR": "MR", "PD": "MR", "DWI": "MR",
    "ADC": "MR", "MPRAGE": "MR", "SWI": "MR", "BOLD": "MR", "MAGNETIC RESONANCE": "MR",
    "PT": "PET", "PET": "PET", "SUV": "PET", "FDG": "PET",
}
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")


@dataclass(frozen=True)
class ModalityGuess:
    """What :func:`detect_modality` found.

    Attributes
    ----------
    modality : str
        ``"CT"``, ``"MR"``, ``"PET"`` or ``"unknown"``.
    source : str
        Where it came from: ``"user"``, ``"dicom"``, ``"file"`` or ``"intensities"``.
    reason : str
        One sentence a user can check, e.g. ``"DICOM header Modality CT"`` or
        ``"intensities: 0.5th percentile -1024 (air near -1000 HU) ..."``.
    """

    modality: str
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.modality} (from {self.source}: {self.reason})"


def normalize_modality(name) -> str:
    """Map a modality name to ``"CT"``, ``"MR"``, ``"PET"`` or ``"unknown"``.

    Accepts DICOM codes (``CT``, ``MR``, ``PT``), sequence names (``T1``,
    ``FLAIR``, ``T1c``) and common spellings, case-insensitively.

    Examples
    --------
    >>> normalize_modality("PT"), normalize_modality("t1"), normalize_modality("US")
    ('PET', 'MR', 'unknown')
    """
    text = str(name or "").strip().upper()
    if text in _ALIASES:
        return _ALIASES[text]
    for word in _WORD.findall(text):
        if word in _ALIASES:
            return _ALIASES[word]
    return "unknown"


def _from_text(text) -> str:
    """A modality named as a whole word in free text (NIfTI descrip), else unknown."""
    for word in _WORD.findall(str(text or "").upper()):
        if word in _ALIASES and len(word) >= 2:
            return _ALIASES[word]
    return "unknown"


def intensity_sample(data, max_voxels: int = 1_000_000) -> np.ndarray:
    """A strided sample of a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array as float64 (channel 0).

    Works on numpy arrays, memory maps and dask arrays without reading more
    than the sample. Non-finite values are dropped.
    """
    arr = data[0] if getattr(data, "ndim", 3) == 4 else data
    shape = tuple(int(s) for s in arr.shape)
    n = int(np.prod(shape)) if shape else 0
    step = max(1, int(np.ceil((n / max(max_voxels, 1)) ** (1.0 / 3.0)))) if n else 1
    sub = arr[::step, ::step, ::step]
    if hasattr(sub, "compute"):
        sub = sub.compute()
    vals = np.asarray(sub, dtype=np.float64).ravel()
    return vals[np.isfinite(vals)]


def _from_intensities(data) -> ModalityGuess:
    v = intensity_sample(data)
    if v.size < 64:
        return ModalityGuess("unknown", "intensities", "too few finite voxels to judge")
    p = np.percentile(v, [0.5, 50.0, 99.9])
    lo, hi = float(p[0]), float(p[2])
    if not np.ptp(v) > 0:
        return ModalityGuess("unknown", "intensities", f"constant image ({lo:g})")
    integer = float(np.mean(v == np.round(v)))
    air = float(np.mean((v >= -1200) & (v <= -850)))
    if -3100 <= lo <= -500 and float(v.max()) < 32768 and (integer >= 0.9 or air >= 0.01):
        return ModalityGuess(
            "CT", "intensities",
            f"0.5th percentile {lo:.0f} (air near -1000 HU), {100 * air:.0f}% of voxels "
            f"in air's range, {100 * integer:.0f}% integer values, up to {hi:.0f}: "
            "Hounsfield units")
    if lo >= 0 and float(v.min()) >= -1e-3 * max(abs(hi), 1.0):
        fg = v[v > 0.01 * hi] if hi > 0 else v
        if fg.size >= 64:
            q50, q99 = np.percentile(fg, [50.0, 99.0])
            tail = float(q99 / q50) if q50 > 0 else float("inf")
            fg_int = float(np.mean(fg == np.round(fg)))
            bright = float(np.mean(fg > 0.5 * hi))
            if tail >= 4.0 and bright < 0.1 and fg_int < 0.5:
                return ModalityGuess(
                    "PET", "intensities",
                    f"no negative values; the foreground is heavy-tailed (99th percentile "
                    f"{tail:.1f} x its median {q50:.3g}, {100 * bright:.1f}% above half the "
                    "99.9th percentile) and not integer: SUV-like uptake")
    return ModalityGuess(
        "MR", "intensities",
        f"values from {lo:.3g} to {hi:.3g} (0.5th to 99.9th percentile): no air at "
        "-1000 HU (not CT) and no heavy-tailed uptake (not PET); MR by elimination")


def detect_modality(volume, user: str | None = None) -> ModalityGuess:
    """Guess the modality of a volume (see the module notes for the rules).

    Parameters
    ----------
    volume : Volume or array_like
        A :class:`~napari_medseg.core.volume.Volume` (its ``modality`` and
        ``meta`` are used) or a bare ``(Z, Y, X)`` / ``(C, Z, Y, X)`` array
        (intensities only). For CT, values in Hounsfield units.
    user : str, optional
        A modality set by the user; it wins when it names a known modality.

    Returns
    -------
    ModalityGuess

    Examples
    --------
    >>> import numpy as np
    >>> ct = np.full((8, 32, 32), -1000, np.int16); ct[:, 8:24, 8:24] = 40
    >>> detect_modality(ct).modality
    'CT'
    >>> detect_modality(ct, user="MR").source
    'user'
    """
    if user is not None and normalize_modality(user) != "unknown":
        return ModalityGuess(normalize_modality(user), "user", f"set by the user ({user})")
    declared = getattr(volume, "modality", None)
    meta = getattr(volume, "meta", None) or {}
    known = normalize_modality(declared)
    if known != "unknown":
        if meta.get("format") == "dicom":
            return ModalityGuess(known, "dicom", f"DICOM header Modality {declared}")
        return ModalityGuess(known, "file", f"the volume's metadata says {declared}")
    for key in ("nifti_intent_name", "nifti_description", "description"):
        found = _from_text(meta.get(key))
        if found != "unknown":
            return ModalityGuess(found, "file", f"file {key.replace('_', ' ')} "
                                                f"{str(meta.get(key)).strip()!r}")
    data = volume if hasattr(volume, "ndim") else volume.data  # ndarray.data is a buffer
    return _from_intensities(data)
