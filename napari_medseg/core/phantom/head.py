"""Synthetic T1-weighted-like head MR with tissue labels."""

from __future__ import annotations

import numpy as np

from ..volume import Volume
from ._common import (
    _CANONICAL_SEED,
    HEAD_COLORS,
    HEAD_LABELS,
    _blob,
    _Grid,
    _paint,
    _partial_volume_blur,
    _rotation,
    _Waves,
)
from .abdomen import _Jitter

__all__ = ["make_head_mr"]

# Relative T1 signal (white matter = 1).
_T1 = {"scalp": 0.78, "skull": 0.06, "diploe": 0.42, "csf": 0.16, "gm": 0.62,
       "deep_gm": 0.74, "wm": 1.0, "lesion": 0.33}
_FULL = (slice(None), slice(None), slice(None))


def make_head_mr(seed: int = 0, shape=(96, 112, 96), spacing=(1.5, 1.2, 1.2),
                 vary: bool = False) -> tuple[Volume, Volume]:
    """A synthetic T1-weighted-like head MR and its tissue labels.

    Parameters
    ----------
    seed : int
        Seed of all random choices (noise always; anatomy, contrast, bias
        field, noise level and blur too when ``vary``).
    shape : tuple of 3 int
        Array shape ``(Z, Y, X)``; the anatomy scales with the field of view.
    spacing : tuple of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    vary : bool
        Randomise anatomy, tissue contrast, bias field, noise and blur.

    Returns
    -------
    image : Volume
        float32 ``(Z, Y, X)`` signal (white matter about 800 arbitrary units),
        modality ``"MR"``, RAS-stored, with a smooth multiplicative bias field
        and Rician noise.
    labels : Volume
        uint8 ``(Z, Y, X)`` with :data:`HEAD_LABELS` ids, names and colours.

    Examples
    --------
    >>> img, lab = make_head_mr(shape=(24, 28, 24), spacing=(6.0, 4.8, 4.8))
    >>> img.modality, sorted(lab.label_names)
    ('MR', [1, 2, 3, 4])
    """
    grid = _Grid.make(shape, spacing, signs=(1, 1, 1))
    rng = np.random.default_rng(seed if vary else _CANONICAL_SEED)
    jit = _Jitter(rng, vary)
    t1 = {k: v * (1.0 + jit.normal(0.05)) for k, v in _T1.items()}
    t1["wm"] = 1.0
    img = np.zeros(grid.shape, dtype=np.float32)
    lab = np.zeros(grid.shape, dtype=np.uint8)
    brain = _head_layers(grid, img, lab, rng, jit, t1)
    _ventricles_and_nuclei(grid, img, lab, rng, jit, t1, brain)
    _lesion(grid, img, lab, rng, jit, t1, brain)

    img = _partial_volume_blur(img, grid.spacing, jit.uniform(0.2, 1.0, 0.5))
    hx, hy, hz = grid.half
    bias = _Waves(rng, n=4, wavelength=3.5)(grid.x / np.float32(hx), grid.y / np.float32(hy),
                                           grid.z / np.float32(hz))
    img *= np.exp(np.float32(jit.uniform(0.1, 0.35, 0.2)) * bias) * np.float32(800.0)
    noise_rng = np.random.default_rng([int(seed), 2])
    sigma = np.float32(800.0 * jit.uniform(0.01, 0.06, 0.025))
    n1 = noise_rng.standard_normal(grid.shape, dtype=np.float32) * sigma
    n2 = noise_rng.standard_normal(grid.shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # magnitude of complex noise: Rician

    meta = {"phantom": "head-mr", "seed": int(seed), "vary": bool(vary)}
    image = Volume(img.astype(np.float32, copy=False), grid.affine, modality="MR",
                   meta=dict(meta))
    labels = Volume(lab, grid.affine.copy(), modality="MR", is_label=True,
                    label_names=dict(HEAD_LABELS), label_colors=dict(HEAD_COLORS),
                    meta=dict(meta))
    return image, labels


def _head_layers(grid, img, lab, rng, jit, t1):
    """Scalp, skull, subarachnoid CSF, folded cortex and white matter."""
    hx, hy, hz = grid.half
    c = (jit.normal(2.0), 0.02 * hy + jit.normal(2.0), -0.04 * hz + jit.normal(2.0))
    axes = tuple(a * jit.uniform(0.92, 1.05, 1.0) for a in (0.82 * hx, 0.86 * hy, 0.86 * hz))
    rot = _rotation(jit.normal(4.0), rx=jit.normal(4.0))
    _, r, (u, v, w) = _blob(grid, c, axes, rot, _Waves(rng, 5, 1.5), 0.03, sl=_FULL)
    # flatter under the brain (skull base)
    r = r + np.float32(0.35) * np.clip(-w - 0.55, 0, None)
    depth = (1.0 - r) * np.float32(np.mean(axes))  # mm below the scalp surface
    head = depth >= 0
    img[head] = t1["scalp"]
    img[depth >= 4.0] = t1["skull"]
    img[(depth >= 5.5) & (depth < 8.0)] = t1["diploe"]
    csf = depth >= 9.5
    img[csf] = t1["csf"]
    lab[csf] = 1
    brain_depth = depth - np.float32(11.5)
    brain = brain_depth >= 0
    # Folding: where the field g is high a gyrus brings white matter close to
    # the surface; where it is low the cortex dips and a sulcus opens in it.
    g = _Waves(rng, n=16, wavelength=0.2)(u, v, w)
    wm_depth = np.float32(2.2) + np.float32(3.0) * np.clip(np.float32(1.0) - g, 0, 3)
    wm = brain & (brain_depth >= wm_depth)
    sulcus = brain & (g < -0.9) & (brain_depth < wm_depth - 1.5)
    gm = brain & ~wm & ~sulcus
    img[gm] = t1["gm"]
    lab[gm] = 2
    img[wm] = t1["wm"]
    lab[wm] = 3
    return {"center": c, "axes": axes, "rot": rot, "brain": brain}


def _ventricles_and_nuclei(grid, img, lab, rng, jit, t1, brain):
    """Curved lateral ventricles (CSF) and deep gray nuclei (gray matter)."""
    hx, hy, hz = grid.half
    for side in (-1.0, 1.0):
        c = (side * 0.17 * hx, -0.08 * hy + jit.normal(2.0), -0.02 * hz)
        sl, r, _ = _blob(grid, c, (0.1 * hx, 0.16 * hy, 0.1 * hz), _rotation(),
                         _Waves(rng, 4, 1.0), 0.08)
        _paint(img, lab, sl, (r < 1) & brain["brain"][sl], t1["deep_gm"], 2)
    for side in (-1.0, 1.0):
        c = (side * 0.09 * hx, -0.02 * hy, 0.14 * hz + jit.normal(2.0))
        axes = (0.075 * hx * jit.uniform(0.7, 1.6, 1.0), 0.34 * hy, 0.12 * hz)
        rot = _rotation(side * 8.0)
        sl, r, (u, v, w) = _blob(grid, c, axes, rot, _Waves(rng, 4, 1.0), 0.06)
        # bend into a "C": lift the middle, drop the horns
        r = np.sqrt(u * u + v * v + (w + np.float32(0.9) * v * v - 0.35) ** 2)
        _paint(img, lab, sl, (r < 1) & brain["brain"][sl], t1["csf"], 1)


def _lesion(grid, img, lab, rng, jit, t1, brain):
    """One or two T1-hypointense white-matter lesions (label 4)."""
    n = int(rng.integers(1, 3)) if jit.vary else 1
    hx = grid.half[0]
    for _ in range(n):
        d = rng.normal(size=3)
        d *= rng.uniform(0.3, 0.55) / np.linalg.norm(d)
        c = np.asarray(brain["center"]) + brain["rot"] @ (d * np.asarray(brain["axes"]))
        rad = float(rng.uniform(0.07, 0.13) * hx)
        sl, r, _ = _blob(grid, c, (rad, rad * 1.2, rad), _rotation(rng.uniform(0, 180)),
                         _Waves(rng, 4, 1.0), 0.15)
        inside = (r < 1) & np.isin(lab[sl], (2, 3))
        _paint(img, lab, sl, inside, t1["lesion"], 4)
