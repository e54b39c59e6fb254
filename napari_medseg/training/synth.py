"""Domain-randomised synthetic volumes for training interactive models.

In the manner of SynthSeg / SynthStrip (Billot et al.; Hoopes et al.), a
network that never sees the same appearance twice cannot lean on any one
appearance: every example here is a random *label map* (a tissue partition
from smoothed random fields, with blobs, tubes, shells, multi-part and tiny
objects placed in it, all deformed by a random smooth field) turned into an
image with random per-structure intensities and textures, then degraded like
a scanner would: partial volume and anisotropic resolution, blur, bias field,
gamma and noise. One example in three draws its intensities from CT-realistic
Hounsfield ranges (air, fat, soft tissue, enhanced organs and vessels, bone),
with neighbours of nearly equal intensity made on purpose, as liver and
stomach, pancreas and bowel, or a vessel and its organ are on real CT.

Label maps are made directly on the network's grid (``(Z, Y, X)`` voxels of
any shape), so an object's size relative to the grid covers what inference
meets: a tiny lesion in a 64 mm cube, or an organ larger than the region.

Everything is numpy / scipy and seeded by the caller's ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["random_label_map", "random_image", "labels_to_image", "synth_example"]


# ------------------------------------------------------------------ fields
def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field smoothed with ``sigma`` voxels.

    Drawn on a grid coarsened by up to 4x and interpolated up: the same field
    at a fraction of the cost for large ``sigma``.
    """
    shape = tuple(int(s) for s in shape)
    f = int(np.clip(np.floor(np.min(sigma) / 2.0), 1, 4))
    small = tuple(max(2, -(-s // f)) for s in shape)
    noise = rng.standard_normal(small).astype(np.float32)
    sig = np.maximum(np.asarray(sigma, float) / f, 0.5)
    noise = ndi.gaussian_filter(noise, sig, mode="wrap")
    if f > 1:
        zoom = [s / m for s, m in zip(shape, small)]
        noise = ndi.zoom(noise, zoom, order=1, grid_mode=True, mode="grid-wrap")
        noise = noise[tuple(slice(0, s) for s in shape)]
        if noise.shape != shape:
            noise = np.pad(noise, [(0, s - n) for s, n in zip(shape, noise.shape)], mode="edge")
    std = float(noise.std())
    return (noise - float(noise.mean())) / (std if std > 0 else 1.0)


def _coords(shape):
    return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")


def _deform(labels: np.ndarray, rng, strength: float) -> np.ndarray:
    """``labels`` warped by a random smooth displacement (``strength`` voxels)."""
    if strength <= 0:
        return labels
    shape = labels.shape
    sigma = rng.uniform(4, 10)
    disp = [_smooth_noise(shape, sigma, rng) * strength for _ in range(3)]
    grid = _coords(shape)
    pts = [g + d for g, d in zip(grid, disp)]
    return ndi.map_coordinates(labels, pts, order=0, mode="nearest")


# ------------------------------------------------------------------ shapes
def _rotation(rng) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


def _ellipsoid_field(shape, centre, radii, rng, grid) -> np.ndarray:
    """Signed field: < 1 inside a randomly rotated, bumpy ellipsoid."""
    rot = _rotation(rng)
    d = np.stack([g - c for g, c in zip(grid, centre)], -1) @ rot.T
    r = np.sqrt(sum((d[..., i] / max(radii[i], 0.5)) ** 2 for i in range(3)))
    bump = rng.uniform(0.0, 0.25)
    if bump > 0:
        r = r * (1 + bump * _smooth_noise(shape, max(min(radii) / 1.5, 1.5), rng))
    return r


def _blob(shape, grid, rng, scale) -> np.ndarray:
    centre = [rng.uniform(0.1, 0.9) * s for s in shape]
    radii = [scale * rng.uniform(0.5, 1.5) for _ in range(3)]
    return _ellipsoid_field(shape, centre, radii, rng, grid) < 1.0


def _shell(shape, grid, rng, scale) -> np.ndarray:
    centre = [rng.uniform(0.3, 0.7) * s for s in shape]
    radii = [scale * rng.uniform(0.8, 1.5) for _ in range(3)]
    r = _ellipsoid_field(shape, centre, radii, rng, grid)
    t = rng.uniform(1.5, 4.0) / max(np.mean(radii), 1.0)
    return (r < 1.0) & (r > 1.0 - t)


def _tube(shape, grid, rng, scale) -> np.ndarray:
    """A curved tube: a smooth random path dilated to a (slowly varying) radius."""
    n = 24
    start = np.array([rng.uniform(0, s) for s in shape])
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    step = max(shape) / n * rng.uniform(0.6, 1.3)
    pts = [start]
    for _ in range(n):
        direction = direction + rng.normal(0, 0.35, 3)
        direction /= np.linalg.norm(direction)
        pts.append(pts[-1] + step * direction)
    pts = np.array(pts)
    radius = np.clip(scale * rng.uniform(0.15, 0.5), 1.0, 10.0)
    out = np.zeros(shape, bool)
    seeds = np.zeros(shape, bool)
    for a, b in zip(pts[:-1], pts[1:]):
        for t in np.linspace(0, 1, 8):
            p = np.round(a + t * (b - a)).astype(int)
            if np.all(p >= 0) and np.all(p < np.array(shape)):
                seeds[tuple(p)] = True
    if not seeds.any():
        return out
    dist = ndi.distance_transform_edt(~seeds)
    wobble = 1 + 0.2 * _smooth_noise(shape, 6, rng)
    return dist < radius * wobble


def _multipart(shape, grid, rng, scale) -> np.ndarray:
    out = np.zeros(shape, bool)
    for _ in range(rng.integers(2, 5)):
        out |= _blob(shape, grid, rng, scale * rng.uniform(0.3, 0.6))
    return out


def _tiny(shape, grid, rng, scale) -> np.ndarray:
    return _blob(shape, grid, rng, rng.uniform(1.2, 3.0))


def _large(shape, grid, rng, scale) -> np.ndarray:
    centre = [rng.uniform(-0.2, 1.2) * s for s in shape]
    radii = [max(shape) * rng.uniform(0.4, 1.0) for _ in range(3)]
    return _ellipsoid_field(shape, centre, radii, rng, grid) < 1.0


_SHAPES = {"blob": (_blob, 0.35), "tube": (_tube, 0.15), "shell": (_shell, 0.08),
           "multipart": (_multipart, 0.12), "tiny": (_tiny, 0.12), "large": (_large, 0.18)}


def random_label_map(shape, rng, n_objects: int | None = None) -> np.ndarray:
    """A random label map of ``shape``: tissue background plus inserted objects.

    Parameters
    ----------
    shape : sequence of 3 int
        ``(Z, Y, X)`` voxels.
    rng : numpy.random.Generator
    n_objects : int, optional
        Objects inserted over the background (2-7 by default).

    Returns
    -------
    (Z, Y, X) int16 array
        Background tissues have ids 1..K; inserted objects follow, later ones
        drawn over earlier ones. Every id present is >= 1.
    """
    shape = tuple(int(s) for s in shape)
    grid = _coords(shape)
    k = int(rng.integers(3, 9))
    sig = rng.uniform(4, 14)
    fields = np.stack([_smooth_noise(shape, sig * rng.uniform(0.6, 1.4), rng)
                       for _ in range(k)])
    labels = (np.argmax(fields, 0) + 1).astype(np.int16)
    n = int(rng.integers(2, 8)) if n_objects is None else int(n_objects)
    names = list(_SHAPES)
    weights = np.array([_SHAPES[s][1] for s in names])
    scale_ref = float(min(shape))
    for i in range(n):
        kind = names[rng.choice(len(names), p=weights / weights.sum())]
        scale = scale_ref * rng.uniform(0.08, 0.45)
        m = _SHAPES[kind][0](shape, grid, rng, scale)
        if m.sum() < 4:
            continue
        labels[m] = k + 1 + i
        if rng.random() < 0.25:  # an inner structure of another appearance
            inner = _blob(shape, grid, rng, scale * rng.uniform(0.15, 0.4)) & m
            labels[inner] = k + 1 + n + i
    return _deform(labels, rng, rng.uniform(0.0, 3.0))


# -------------------------------------------------------------- appearance
#: Hounsfield ranges of the tissue kinds a CT-like example draws from.
_HU_KINDS = {
    "air": (-1000, -900), "lung": (-900, -700), "fat": (-130, -70),
    "fluid": (-5, 20), "soft": (20, 70), "organ": (60, 130), "enhanced": (120, 220),
    "vessel": (150, 400), "bone": (250, 1200),
}
_HU_P = {"air": 0.05, "lung": 0.03, "fat": 0.17, "fluid": 0.1, "soft": 0.25, "organ": 0.2,
         "enhanced": 0.1, "vessel": 0.05, "bone": 0.05}


def labels_to_image(labels: np.ndarray, rng, ct: bool = False,
                    similar: tuple = ()) -> np.ndarray:
    """A randomised image of ``labels``: per-label intensity and texture.

    Parameters
    ----------
    labels : (Z, Y, X) int array
    rng : numpy.random.Generator
    ct : bool
        Draw intensities from Hounsfield ranges (:data:`_HU_KINDS`) instead of [0, 1].
    similar : sequence of int
        Ids given nearly the intensity of the first one in the sequence (weak
        edges between neighbours).
    """
    ids = np.unique(labels)
    lut_mean = np.zeros(int(ids.max()) + 1, np.float32)
    lut_std = np.zeros_like(lut_mean)
    if ct:
        kinds = list(_HU_KINDS)
        p = np.array([_HU_P[k] for k in kinds])
        for i in ids:
            lo, hi = _HU_KINDS[kinds[rng.choice(len(kinds), p=p / p.sum())]]
            lut_mean[i] = rng.uniform(lo, hi)
            lut_std[i] = rng.uniform(0, 25)
        span = 300.0
    else:
        lut_mean[ids] = rng.uniform(0, 1, len(ids))
        lut_std[ids] = rng.uniform(0, 0.08, len(ids))
        span = 1.0
    if len(similar) > 1:
        base = lut_mean[similar[0]]
        for i in similar[1:]:
            lut_mean[i] = base + rng.choice([-1, 1]) * span * rng.uniform(0.01, 0.08)
    img = lut_mean[labels]
    # per-structure texture: smooth noise scaled by the structure's own std
    tex = _smooth_noise(labels.shape, rng.uniform(0.7, 3.0), rng)
    img = img + tex * lut_std[labels]
    return img.astype(np.float32)


def _degrade(img: np.ndarray, rng, ct: bool) -> np.ndarray:
    """Scanner effects: partial volume / thick slices, blur, bias, gamma, noise."""
    shape = img.shape
    if rng.random() < 0.4:  # thick slices along one axis: average then interpolate back
        ax = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
        f = rng.uniform(1.5, 4.0)
        sig = np.zeros(3)
        sig[ax] = f / 2.355
        img = ndi.gaussian_filter(img, sig)
        n = max(2, int(round(shape[ax] / f)))
        zoom = np.ones(3)
        zoom[ax] = n / shape[ax]
        small = ndi.zoom(img, zoom, order=1, grid_mode=True, mode="nearest")
        back = np.ones(3)
        back[ax] = shape[ax] / small.shape[ax]
        img = ndi.zoom(small, back, order=1, grid_mode=True, mode="nearest")
        img = img[tuple(slice(0, s) for s in shape)]
        if img.shape != shape:
            img = np.pad(img, [(0, s - n) for s, n in zip(shape, img.shape)], mode="edge")
    if rng.random() < 0.7:
        img = ndi.gaussian_filter(img, rng.uniform(0.0, 1.2, 3))
    lo, hi = np.percentile(img[::2, ::2, ::2], [1, 99])
    rngspan = max(float(hi - lo), 1e-3)
    if not ct:
        if rng.random() < 0.6:  # multiplicative bias field (MR)
            bias = np.exp(rng.uniform(0.05, 0.4) * _smooth_noise(shape, rng.uniform(10, 30), rng))
            img = (img - lo) * bias + lo
        if rng.random() < 0.5:  # gamma
            x = np.clip((img - lo) / rngspan, 0, None)
            img = lo + rngspan * x ** np.exp(rng.normal(0, 0.3))
    sigma = rngspan * rng.uniform(0.0, 0.12) if not ct else rng.uniform(3, 35)
    noise = rng.standard_normal(shape).astype(np.float32) * sigma
    if rng.random() < 0.3:  # correlated noise (reconstruction kernels)
        noise = ndi.gaussian_filter(noise, rng.uniform(0.5, 1.0)) * 2.0
    img = img + noise
    if not ct and rng.random() < 0.3:  # Rician-like magnitude floor
        img = np.abs(img)
    return img.astype(np.float32)


def random_image(labels: np.ndarray, rng, target: int | None = None,
                 ct: bool | None = None) -> np.ndarray:
    """A degraded, domain-randomised image of ``labels``.

    With probability 0.35 a neighbour of ``target`` (an id touching it) gets
    nearly the target's intensity, so the network learns to follow weak edges
    and shape as well as contrast.
    """
    if ct is None:
        ct = bool(rng.random() < 0.35)
    similar = ()
    if target is not None and rng.random() < 0.35:
        m = labels == target
        ring = ndi.binary_dilation(m, iterations=2) & ~m
        neigh = np.unique(labels[ring])
        neigh = neigh[neigh != target]
        if len(neigh):
            similar = (target, int(rng.choice(neigh)))
    img = labels_to_image(labels, rng, ct=ct, similar=similar)
    return _degrade(img, rng, ct)


def synth_example(shape, rng, min_voxels: int = 20, centre: bool = False):
    """One random ``(image, target mask, click)`` on a grid of ``shape``.

    Parameters
    ----------
    shape : sequence of 3 int
    rng : numpy.random.Generator
    min_voxels : int
        Least size of the target.
    centre : bool
        The target is the connected part of whatever structure lies at the
        grid's centre, clicked there (``click`` is the centre, jittered by a
        voxel): as at inference, where a first click is the centre of its
        region, whether the object is a small lesion or an organ filling the
        whole region. Otherwise the target is a label that does not cover
        most of the grid: its largest connected part, or (one time in three)
        all its parts, as a multi-part object, and ``click`` is None.

    Returns
    -------
    tuple or None
        None when the draw has no suitable target (draw again).
    """
    labels = random_label_map(shape, rng)
    if centre:
        c = np.array(labels.shape) // 2 + rng.integers(-1, 2, 3)
        c = np.clip(c, 0, np.array(labels.shape) - 1)
        target = int(labels[tuple(c)])
        cc, _ = ndi.label(labels == target)
        mask = cc == cc[tuple(c)]
        if mask.sum() < min_voxels:
            return None
        return random_image(labels, rng, target=target), mask, c.astype(float)
    counts = np.bincount(labels.ravel())
    total = labels.size
    ids = [i for i in range(1, len(counts)) if min_voxels <= counts[i] < 0.7 * total]
    if not ids:
        return None
    # small and mid-sized structures are the interesting ones: favour them
    w = np.array([3.0 if counts[i] < 0.3 * total else 1.0 for i in ids])
    target = int(ids[rng.choice(len(ids), p=w / w.sum())])
    mask = labels == target
    if rng.random() > 1 / 3:
        cc, n = ndi.label(mask)
        if n > 1:
            mask = cc == (np.argmax(np.bincount(cc.ravel())[1:]) + 1)
    if mask.sum() < min_voxels:
        return None
    return random_image(labels, rng, target=target), mask, None
