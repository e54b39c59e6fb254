"""Checks a run makes before it spends time on a model: where its outputs go, and
whether its input images hold anything to segment.

:func:`check_outputs` validates every output path (format from the suffix,
folder exists and is writable, not a folder, no existing file unless
overwriting) and refuses an output that is one of the inputs (compared after
resolving links, and with :func:`os.path.samefile`), *before* the model runs.

:func:`check_image_values` refuses an image that is constant (all zeros
included) or whose values lie outside any real intensity range for CT or MR
(``|value| > 1e6``), and returns a one-line warning for such values in other
modalities.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import MedSegError
from .atomic import check_writable

__all__ = ["check_outputs", "check_image_values", "MAX_REAL_INTENSITY"]

#: No CT (HU, about -1024..+30000) or MR image holds values beyond this.
MAX_REAL_INTENSITY = 1e6


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_outputs(outputs, inputs=(), overwrite: bool = False,
                  extensions=None, others=()) -> list[Path]:
    """Validate output paths before any work is done; return them as Paths.

    Parameters
    ----------
    outputs : sequence of str or Path (None entries are skipped)
        The files a run will write.
    inputs : sequence of str or Path
        The files (or DICOM folders) it reads; no output may be one of them
        (even with ``overwrite``).
    overwrite : bool
        Existing outputs may be replaced (inputs never are).
    extensions : tuple of str, optional
        Suffixes that can be written; default
        :data:`napari_medseg.io.WRITE_EXTENSIONS`.
    others : sequence of str or Path
        Outputs of the same run checked by another call (with other
        extensions); none of ``outputs`` may be one of them.

    Raises
    ------
    MedSegError
        One line naming the output and what to do.
    """
    if extensions is None:
        from . import WRITE_EXTENSIONS as extensions
    outs = [Path(o) for o in outputs if o is not None]
    earlier = [Path(o) for o in others if o is not None]
    ins = [Path(i) for i in inputs]
    for i, out in enumerate(outs):
        if not out.name.lower().endswith(tuple(extensions)):
            raise MedSegError("cannot be written: the file name must end with one of "
                              + ", ".join(extensions), str(out))
        for src in ins:
            if _same(out, src):
                raise MedSegError(f"is also an input ({src}); writing it would replace the "
                                  "image; choose another output name", str(out))
        for other in earlier + outs[:i]:
            if _same(out, other):
                raise MedSegError("is given for two outputs; choose different names",
                                  str(out))
        check_writable(out, overwrite)
    return outs


def check_image_values(vol, name: str, modality: str | None = None) -> list[str]:
    """Refuse an image with nothing to segment; return one-line warnings.

    Parameters
    ----------
    vol : Volume
        The image (its voxels are read).
    name : str
        The file or layer, for the messages.
    modality : str, optional
        The modality the model expects (``CT``, ``MR``, ...); with the image's
        own modality it decides whether out-of-range values are an error.

    Returns
    -------
    list of str
        Warnings (values beyond 1e6 in a PET / unknown image).

    Raises
    ------
    MedSegError
        A constant image (all zeros included), an image without finite
        values, or a CT / MR image with values beyond ``1e6``.
    """
    from ..core.modality import normalize_modality

    data = np.asarray(vol.data)
    if data.size == 0:
        raise MedSegError("holds no voxels", name)
    with np.errstate(all="ignore"):
        if data.dtype.kind == "f":
            finite = np.isfinite(data)
            if not finite.any():
                raise MedSegError("holds no finite values (all NaN or infinite); check the "
                                  "file", name)
            lo = float(np.min(data, where=finite, initial=np.inf))
            hi = float(np.max(data, where=finite, initial=-np.inf))
            big = float(np.max(np.abs(data), where=~np.isnan(data), initial=0.0))
        else:
            lo, hi = float(data.min()), float(data.max())
            big = max(abs(lo), abs(hi))
    if lo == hi:
        what = "all zero" if lo == 0 else f"constant (every voxel {lo:g})"
        raise MedSegError(f"is {what}: there is nothing to segment; check that this is the "
                          "right file and that it was exported correctly", name)
    if big > MAX_REAL_INTENSITY:
        kinds = {normalize_modality(modality), normalize_modality(getattr(vol, "modality", ""))}
        text = (f"holds values up to {big:.3g}, beyond any real CT or MR intensity "
                f"(|value| <= {MAX_REAL_INTENSITY:.0e})")
        if kinds & {"CT", "MR"}:
            raise MedSegError(f"{text}; the file is corrupt or not an image; check it", name)
        return [f"{name}: {text}; results may be meaningless"]
    return []
