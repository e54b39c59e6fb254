"""Display contrast by modality: CT window presets and percentile windows.

A CT window is given as width ``W`` and level ``L`` in Hounsfield units, as a
radiologist says it ("soft tissue W400/L40"); napari wants contrast limits
``(L - W/2, L + W/2)``. MR and PET have no absolute units, so their default
window spans robust percentiles of the intensities.

>>> window_limits(*WINDOW_PRESETS["soft tissue"])
(-160.0, 240.0)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "WINDOW_PRESETS",
    "PRESET_KEYS",
    "AUTO",
    "window_limits",
    "percentile_limits",
    "default_preset",
    "default_contrast",
    "contrast_for_preset",
    "PLANES",
    "plane_view",
]

#: CT windows, name -> (width, level) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft tissue": (400.0, 40.0),
    "liver": (150.0, 90.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
#: The percentile window (any modality; the default for MR and PET).
AUTO = "auto"
#: Keyboard shortcut of each preset (napari key names).
PRESET_KEYS: dict[str, str] = {
    "soft tissue": "Alt-1", "liver": "Alt-2", "lung": "Alt-3", "bone": "Alt-4",
    "brain": "Alt-5", AUTO: "Alt-0",
}


def window_limits(width: float, level: float) -> tuple[float, float]:
    """Contrast limits ``(low, high)`` of a window of ``width`` centred on ``level``."""
    return (float(level) - float(width) / 2.0, float(level) + float(width) / 2.0)


def _sample(data, max_values: int = 2_000_000) -> np.ndarray:
    """A strided sample of a (possibly lazy) array, read plane by plane."""
    shape = tuple(int(s) for s in data.shape)
    n = int(np.prod(shape)) if shape else 0
    if n == 0:
        return np.zeros(0, np.float32)
    step = max(1, int(round((n / max_values) ** (1.0 / max(1, len(shape))))))
    sub = data[tuple(slice(None, None, step) for _ in shape)]
    return np.asarray(sub, dtype=np.float32).ravel()


def percentile_limits(data, low: float = 0.5, high: float = 99.5,
                      max_values: int = 2_000_000) -> tuple[float, float]:
    """Contrast limits at the ``low`` / ``high`` percentiles of the non-background.

    Parameters
    ----------
    data : array_like
        ``(Z, Y, X)`` (or any shape) image; numpy, memory map or dask. At most
        about ``max_values`` voxels are read (a regular strided sample).
    low, high : float
        Percentiles in [0, 100].

    Returns
    -------
    tuple of float
        ``(low, high)``; ``high > low`` always (a flat image gets a unit window).

    Notes
    -----
    Voxels equal to the image minimum (the zero background of MR / PET around
    the body) are left out when they are less than 90 % of the sample, so the
    window spans the tissue rather than the air.
    """
    v = _sample(data, max_values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    vmin = float(v.min())
    body = v[v > vmin]
    if 0 < body.size and (v.size - body.size) < 0.9 * v.size:
        v = body
    lo, hi = (float(x) for x in np.percentile(v, [low, high]))
    if not hi > lo:
        hi = lo + 1.0
    return (lo, hi)


def default_preset(modality: str) -> str:
    """The preset an image of ``modality`` opens with: soft tissue for CT, else auto."""
    return "soft tissue" if str(modality).upper() == "CT" else AUTO


def contrast_for_preset(preset: str, data=None) -> tuple[float, float]:
    """Contrast limits for a preset name (``"auto"`` needs ``data``).

    Raises
    ------
    KeyError
        For an unknown preset name.
    """
    if preset == AUTO:
        if data is None:
            raise ValueError("the auto window needs the image data")
        return percentile_limits(data)
    return window_limits(*WINDOW_PRESETS[preset])


def default_contrast(data, modality: str) -> tuple[float, float]:
    """Contrast limits an image opens with: the soft-tissue window for CT, else
    the 0.5-99.5 percentile window of the non-background intensities.

    Parameters
    ----------
    data : array_like
        ``(Z, Y, X)`` or ``(C, Z, Y, X)`` image.
    modality : str
        ``"CT"``, ``"MR"``, ``"PT"``, ... (``"unknown"`` gets the percentile window).
    """
    return contrast_for_preset(default_preset(modality), data)


#: The three radiological planes.
PLANES = ("axial", "coronal", "sagittal")


def plane_view(plane: str, ndim: int = 3) -> tuple[tuple[int, ...], tuple[str, str]]:
    """napari ``dims.order`` and ``camera.orientation2d`` that show ``plane`` as a
    radiologist reads it.

    Layers made by napari-medseg live in a world whose last three axes are
    ``(S, P, L)`` (see :mod:`napari_medseg._napari.layers`). Axial: anterior up,
    the patient's right on the left of the screen; coronal: superior up, the
    patient's right on the left; sagittal: superior up, anterior on the left.

    Parameters
    ----------
    plane : {"axial", "coronal", "sagittal"}
    ndim : int
        The viewer's number of dimensions (leading ones, e.g. time, stay first).

    Examples
    --------
    >>> plane_view("coronal")
    ((1, 0, 2), ('up', 'right'))
    """
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    lead = tuple(range(ndim - 3))
    s, p, l = ndim - 3, ndim - 2, ndim - 1
    order = {"axial": (s, p, l), "coronal": (p, s, l), "sagittal": (l, s, p)}[plane]
    vertical = "down" if plane == "axial" else "up"
    return lead + order, (vertical, "right")
