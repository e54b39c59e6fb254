"""Negative prompts in the classical engine: local removal and watershed splits."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._arrays import bbox, connected

__all__ = ["click_components", "remove_negative", "split"]


def click_components(bg: np.ndarray, max_voxels: int = 30) -> np.ndarray:
    """The small parts of ``bg``: negative clicks (not scribbles or box edges)."""
    if not bg.any():
        return bg
    box = bbox(bg)
    lab, n = ndi.label(bg[box])
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = sizes <= max_voxels
    small[0] = False
    out = np.zeros(bg.shape, bool)
    out[box] = small[lab]
    return out


def remove_negative(sm, grown, clicks, means, seeds, spacing, reach_mm: float
                    ) -> np.ndarray:
    """Take out what each negative click says is not object.

    Only the connected region around a negative click whose intensity is
    closer to the click's own intensity than to every object intensity is
    removed; a negative click never acts elsewhere, so the object's far side
    stays whatever the click's intensity. The region is looked for within
    ``2 * reach_mm`` of the click, and one holding an object seed is kept.

    Parameters
    ----------
    sm : (Z, Y, X) or (Y, X) float array
        Smoothed image.
    grown, clicks, seeds : bool arrays like ``sm``
        The object, the negative clicks and every object seed.
    means : list of float
        Object intensities.
    spacing : sequence of float
        Voxel size (mm).
    reach_mm : float
        Half the window (mm) searched around each click.
    """
    box = bbox(grown)
    box = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
    g, c, sd, img = grown[box].copy(), clicks[box], seeds[box], sm[box]
    reach = [int(np.ceil(2 * reach_mm / s)) for s in spacing]
    lab, _ = ndi.label(c)
    d_obj = np.min([np.abs(img - np.float32(m)) for m in means], axis=0)
    removed = False
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        click = lab[sl] == i
        neg = np.float32(np.median(img[sl][click]))
        if not np.any(click & g[sl] & (np.abs(img[sl] - neg) < d_obj[sl])):
            continue
        # within a window around the click (its neighbourhood, and fast)
        win = tuple(slice(max(a.start - r, 0), a.stop + r) for a, r in zip(sl, reach))
        closer = g[win] & (np.abs(img[win] - neg) < d_obj[win])
        region = connected(closer, (lab[win] == i) & closer)
        if region.any() and not (region & sd[win]).any():
            g[win] &= ~region
            removed = True
    out = np.zeros(grown.shape, bool)
    out[box] = connected(g, sd & g) if removed else g
    return out


def split(sm, grown, seeds, bg, spacing=None, reach_mm: float | None = None
          ) -> np.ndarray:
    """Marker watershed on the gradient magnitude inside ``grown`` between
    object ``seeds`` and background seeds ``bg`` (two touching structures of
    one intensity split at the strongest edge between the seeds).

    With ``reach_mm`` (mm) given, a split that would take more of the object
    than it leaves counts as no split of two structures (on a thin ribbon,
    whose every voxel is edge, a marker in a low-gradient spot floods nearly
    all of it): then only what lies within ``reach_mm`` of a background seed
    is taken.
    """
    from skimage.segmentation import watershed

    box = bbox(grown)
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    g = grown[box]
    markers = np.zeros(g.shape, np.int32)
    markers[bg[box] & g] = 2
    markers[seeds[box] & g] = 1
    grad = ndi.gaussian_gradient_magnitude(sm[box], 1.0)
    lab = watershed(grad, markers, mask=g)
    kept = connected(lab == 1, seeds[box] & (lab == 1))
    lost = int(g.sum()) - int(kept.sum())
    if reach_mm is not None and lost > kept.sum():
        near = ndi.distance_transform_edt(~bg[box], sampling=spacing) <= reach_mm
        kept = connected(kept | (g & ~near), seeds[box])
    out = np.zeros(grown.shape, bool)
    out[box] = kept
    return out
