"""Intensity statistics of the classical engine: object and background classes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._arrays import bbox, dilate, kmeans_1d
from .seeds import neighbourhood

__all__ = ["background_means", "is_blend", "is_homogeneous", "negative_classes",
           "same_tissue"]


def _shell_values(sm, grown, box) -> np.ndarray:
    """Intensities 3-5 voxels outside ``grown`` (inside the boxes' reach)."""
    if not grown.any():
        return np.zeros(0, sm.dtype)
    sl = bbox(grown)
    sl = tuple(slice(max(s.start - 6, 0), s.stop + 6) for s in sl)
    g = grown[sl]
    near = dilate(g, 2)
    shell = dilate(near, 3) & ~near
    if box is not None:
        shell &= dilate(box[sl], 2)
    return sm[sl][shell]


def background_means(sm, grown, bg, box, means, tol: float, veto=(),
                     rims: bool = False) -> list:
    """Intensities around the object that are clearly not object.

    The shell 3-5 voxels outside the first growth is clustered (1D k-means,
    3 classes: it often holds several tissues); each background seed adds its
    own median. Classes within ``tol`` of a seed are dropped, and shell
    classes near the intensity of a later positive click (``veto``: the user
    said that intensity is object, e.g. a kidney's cortex around its medulla),
    or between two such intensities (the blur between medulla and cortex).

    Parameters
    ----------
    sm : (Z, Y, X) or (Y, X) float array
        Smoothed image.
    grown, bg : bool arrays like ``sm``
        The object grown so far and the background seeds.
    box : bool array like ``sm`` or None
        Inside the boxes.
    means : list of float
        Object intensities.
    tol : float
        Intensity distance under which a class counts as object.
    veto : list of (float, float)
        ``(intensity, tolerance)`` of later clicks vouching for an intensity.
    rims : bool
        Drop a shell class 40-75 % of the way from the object to a farther
        shell class on the same side: in a strongly smoothed image, the
        blurred rim of a growth that stopped short (a low-contrast lesion).
        A class holding half the shell or more is kept: it is the tissue
        around the object (a vein inside the liver), not a rim.
    """
    def separable(b):
        return all(abs(b - m) > tol for m in means)

    vouched = sorted(list(means) + [v for v, _ in veto])

    def blend(c):
        return any(a < c < b for a, b in zip(vouched[:-1], vouched[1:]))

    def rim(c, n, shell):
        # a class part-way between the object and a farther class on the same
        # side is the blurred rim of a growth stopped short, not a tissue;
        # a class holding most of the shell is the tissue around the object
        if n >= 0.5 * vals.size:
            return False
        m = min(means, key=lambda v: abs(v - c))
        return any(0.4 < (c - m) / (b - m) < 0.75 for b, _ in shell
                   if abs(b - m) > abs(c - m))

    vals = _shell_values(sm, grown, box)
    out = []
    if vals.size >= 8:
        vals = vals[np.min([np.abs(vals - m) for m in means], axis=0) > tol]
    if vals.size >= 8:
        shell = [(c, n) for c, n in kmeans_1d(vals, 3) if n >= 0.1 * vals.size
                 and separable(c) and all(abs(c - v) > t for v, t in veto) and not blend(c)]
        out += [c for c, n in shell if not (rims and rim(c, n, shell))]
    if bg.any():
        lab, _ = ndi.label(bg)
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            b = float(np.median(sm[sl][lab[sl] == i]))
            if separable(b):
                out.append(b)
    return out


def is_homogeneous(sm, seed, spacing, tol: float, spread: float, radius_mm: float) -> bool:
    """True when a click's intensity is a class of its own, not a blend of
    its neighbours.

    A click on a blurred edge lies strictly between the darker and the
    brighter side around it; a click on a thin layer (a kidney's cortex
    between medulla and fat) does not. ``tol`` is the engine's ``k * noise``,
    ``spread`` its ``global_spread`` (0: never), ``radius_mm`` the
    neighbourhood looked at.
    """
    if spread <= 0:
        return False
    c = float(np.median(sm[seed]))
    lo, hi = np.percentile(sm[neighbourhood(seed, spacing, radius_mm)], [5, 95])
    margin = max(tol, 0.15 * float(hi - lo)) * spread / 2
    return not (lo + margin < c < hi - margin)


def same_tissue(m: float, bg_means, tol: float) -> float:
    """How far from object intensity ``m`` a voxel still counts as the same
    tissue: ``tol``, or a quarter of the way to the nearest background class."""
    if not bg_means:
        return tol
    return max(tol, 0.25 * min(abs(b - m) for b in bg_means))


def is_blend(c: float, means, bg_means) -> bool:
    """True when intensity ``c`` lies more than a quarter of the way from every
    object intensity towards a background class on its side (a voxel on the
    blurred edge between them, not the object's own tissue)."""
    return all(any(0.25 < (c - m) / (b - m) for b in bg_means if (b - m) * (c - m) > 0)
               for m in means)


def negative_classes(neg_means, means, bg_means, tol: float) -> list:
    """Intensities of negative clicks that are background everywhere.

    A negative click whose intensity lies in the middle between the object's
    and a background class (a click on a blurred edge, or on a thin layer of
    partial volume) is no intensity class of its own: it only acts around
    itself (:func:`~.negative.remove_negative`); nor is one within ``tol`` of
    an object intensity or a quarter of the way from it to the nearest
    background class (the same tissue: :func:`~.negative.split` parts it).
    """
    out = []
    for c in neg_means:
        # near an object intensity (a quarter of the way to the nearest
        # background class): the same tissue, split off by the watershed
        if any(abs(c - m) <= same_tissue(m, bg_means, tol) for m in means):
            continue
        if any(0.25 < (c - m) / (b - m) < 0.75 for m in means for b in bg_means
               if abs(b - m) > 2 * tol):
            continue
        out.append(c)
    return out
