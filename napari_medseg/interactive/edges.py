"""Boundary refinement of a learned mask by the image's own intensities.

The click model sees the image on a grid that is often coarser than the
image (a region of a few centimetres on at most 32 x 64 x 64 voxels), and its
logits are interpolated back onto the image's voxels. Where the object's
edge shows in the image, the voxels right at the interpolated boundary are
the least certain ones. :func:`refine_edges` decides them again with the
image: it learns two intensity histograms, one from a ring of voxels just
inside the boundary and one from a ring just outside it, and adds their log
likelihood ratio to the logits of the voxels in a thin band around the
boundary (a naive-Bayes combination of the network's answer with a local
intensity model, in the spirit of the colour models of GrabCut). Only that
band can change, so the mask moves by at most its width; where the inside and
the outside look alike (an isodense tumour) the ratio is near zero and
nothing changes.

numpy and scipy only (no torch, Qt or napari).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["refine_edges", "BAND_MM", "RING_MM", "WEIGHT"]

#: Width of the band that may change, on each side of the boundary (mm).
BAND_MM = 1.5
#: Outer limit of the rings that the intensity models learn from (mm).
RING_MM = 6.0
#: Weight of the intensity log likelihood ratio added to the logits.
WEIGHT = 1.0
#: Fewest voxels in each ring for a model (fewer: the logits stay as they are).
MIN_VOXELS = 50
_BINS = 32


def refine_edges(image: np.ndarray, logits: np.ndarray, spacing, band_mm: float = BAND_MM,
                 ring_mm: float = RING_MM, weight: float = WEIGHT,
                 min_voxels: int = MIN_VOXELS) -> np.ndarray:
    """The logits with the boundary band re-decided by local intensity models.

    Parameters
    ----------
    image : ndarray
        The image on the logits' voxels (2D or 3D).
    logits : ndarray
        Object logits (> 0 inside), same shape as ``image``.
    spacing : sequence of float
        Voxel size (mm) per axis of ``image``.
    band_mm : float
        Voxels within this distance of the boundary (on either side) may change.
        A voxel larger than it along every axis has no band: images coarser
        than ``band_mm`` are left alone.
    ring_mm : float
        The inside and outside intensity models learn from the voxels between
        ``band_mm`` and ``ring_mm`` from the boundary.
    weight : float
        Factor of the log likelihood ratio (0: no change).
    min_voxels : int
        Fewest voxels in each ring; with fewer the logits come back unchanged.

    Returns
    -------
    ndarray
        float32 logits of the same shape; outside the band equal to ``logits``.
    """
    logits = np.asarray(logits, np.float32)
    image = np.asarray(image, np.float32)
    if image.shape != logits.shape:
        raise ValueError(f"image {image.shape} and logits {logits.shape} differ in shape")
    mask = logits > 0
    if weight == 0 or mask.all() or not mask.any():
        return logits
    sp = np.broadcast_to(np.asarray(spacing, float), (mask.ndim,))
    foot = _ball(sp, band_mm)
    if foot.sum() <= 1:  # voxels coarser than the band along every axis
        return logits
    near_out = ndi.binary_dilation(~mask, foot)
    near_in = ndi.binary_dilation(mask, foot)
    band = (mask & near_out) | (~mask & near_in)
    inner, outer = _rings(mask, sp, band_mm, ring_mm)
    a, b = image[inner], image[outer]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < min_voxels or b.size < min_voxels:
        return logits
    lo, hi = np.percentile(np.concatenate([a, b]), [1, 99])
    if not hi > lo:
        return logits
    edges = np.linspace(lo, hi, _BINS + 1)
    ha = np.histogram(np.clip(a, lo, hi), edges)[0] + 1.0  # Laplace smoothing
    hb = np.histogram(np.clip(b, lo, hi), edges)[0] + 1.0
    llr = ndi.gaussian_filter1d(np.log(ha / ha.sum()) - np.log(hb / hb.sum()), 1.0)
    values = np.nan_to_num(image[band], nan=lo, posinf=hi, neginf=lo)
    idx = np.clip(np.digitize(np.clip(values, lo, hi), edges) - 1, 0, _BINS - 1)
    out = logits.copy()
    out[band] += np.float32(weight) * llr[idx].astype(np.float32)
    return out


def _ball(spacing, radius_mm: float) -> np.ndarray:
    """Footprint of the voxel offsets within ``radius_mm`` (an ellipsoid in voxels)."""
    reach = [int(np.floor(radius_mm / s)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(reach, spacing)],
                        indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


#: Most voxels the ring distances are computed on (a strided view beyond it).
_RING_VOXELS = 262_144


def _rings(mask: np.ndarray, spacing, band_mm: float, ring_mm: float):
    """Index arrays of the voxels between ``band_mm`` and ``ring_mm`` inside and
    outside the boundary. The intensity models need samples, not every voxel: on
    a large region the distances are taken on every ``k``-th voxel (counted over the
    axes longer than one voxel, so a one-slice 3D array strides as its 2D slice)."""
    dims = max(1, sum(n > 1 for n in mask.shape))
    k = max(1, int(np.ceil((mask.size / _RING_VOXELS) ** (1.0 / dims))))
    view = tuple(slice(None, None, k) for _ in range(mask.ndim))
    m = mask[view]
    sp = np.asarray(spacing, float) * k
    d_in = ndi.distance_transform_edt(m, sampling=sp)
    d_out = ndi.distance_transform_edt(~m, sampling=sp)
    inner = np.nonzero(m & (d_in > band_mm) & (d_in <= ring_mm))
    outer = np.nonzero(~m & (d_out > band_mm) & (d_out <= ring_mm))
    return (tuple(i * k for i in inner), tuple(i * k for i in outer))
