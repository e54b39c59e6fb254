"""Shared pieces of the phantom generators: grid, deformed blobs, blur."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..volume import make_affine


#: Class ids of :func:`make_abdomen_ct` labels.
ABDOMEN_LABELS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "lesion"}
#: RGB colours (floats in [0, 1]) of the abdomen classes.
ABDOMEN_COLORS = {
    1: (0.72, 0.31, 0.24),  # liver: brownish red
    2: (0.58, 0.36, 0.76),  # spleen: purple
    3: (0.98, 0.82, 0.25),  # left kidney: yellow
    4: (0.98, 0.58, 0.18),  # right kidney: orange
    5: (0.25, 0.88, 0.36),  # lesion: green
}
#: Class ids of :func:`make_head_mr` labels.
HEAD_LABELS = {1: "csf", 2: "gray_matter", 3: "white_matter", 4: "lesion"}
#: RGB colours (floats in [0, 1]) of the head classes.
HEAD_COLORS = {
    1: (0.30, 0.62, 0.98),  # CSF: blue
    2: (0.86, 0.52, 0.58),  # gray matter: pink
    3: (0.96, 0.94, 0.80),  # white matter: cream
    4: (0.25, 0.88, 0.36),  # lesion: green
}

_CANONICAL_SEED = 20240611  # anatomy of the vary=False phantoms


# --------------------------------------------------------------------- grid
@dataclass
class _Grid:
    """World RAS coordinates (mm) of the voxel centres, one broadcastable axis each.

    ``x`` has shape ``(1, 1, X)``, ``y`` ``(1, Y, 1)``, ``z`` ``(Z, 1, 1)``; the
    volume centre is at the world origin. ``half`` is the half field of view in
    mm along ``(x, y, z)``.
    """

    shape: tuple
    spacing: tuple
    affine: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    half: np.ndarray

    @classmethod
    def make(cls, shape, spacing, signs):
        """Grid of ``shape`` (Z, Y, X) with voxel size ``spacing`` (mm).

        ``signs`` are the RAS directions of voxel axes ``i, j, k``:
        ``(-1, -1, 1)`` is DICOM's LPS identity, ``(1, 1, 1)`` is RAS.
        """
        shape = tuple(int(n) for n in shape)
        spacing = tuple(float(s) for s in spacing)
        if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or min(spacing) <= 0:
            raise ValueError(f"need a 3D shape of at least 8 voxels per axis and positive "
                             f"spacing, got shape={shape}, spacing={spacing}")
        n_ijk = np.array(shape[::-1], float)
        s_ijk = np.array(spacing[::-1], float)
        signs = np.asarray(signs, float)
        origin = -signs * (n_ijk - 1) / 2 * s_ijk
        affine = make_affine(spacing, origin, np.diag(signs))
        axes = [(origin[a] + signs[a] * np.arange(n_ijk[a]) * s_ijk[a]).astype(np.float32)
                for a in range(3)]
        return cls(shape, spacing, affine,
                   axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None],
                   n_ijk * s_ijk / 2)

    def sub(self, sl):
        """Coordinates restricted to the box ``sl`` (tuple of 3 slices, Z, Y, X)."""
        return self.x[:, :, sl[2]], self.y[:, sl[1], :], self.z[sl[0], :, :]

    def box(self, center, radius):
        """Slices (Z, Y, X) of the voxels within ``radius`` mm of ``center`` (x, y, z)."""
        out = []
        for coord, c in ((self.z.ravel(), center[2]), (self.y.ravel(), center[1]),
                         (self.x.ravel(), center[0])):
            idx = np.nonzero(np.abs(coord - c) <= radius)[0]
            out.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0))
        return tuple(out)


def _rotation(rz=0.0, rx=0.0, ry=0.0) -> np.ndarray:
    """Rotation matrix (degrees) about z, then x, then y; columns are local axes."""
    a, b, c = np.deg2rad([rz, rx, ry])
    mz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    mx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    my = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return my @ mx @ mz


class _Waves:
    """A smooth random field: a sum of plane waves with random directions and phases.

    Evaluated on broadcastable coordinate axes, so it costs a few array
    operations per wave; values are roughly in ``[-1, 1]``.
    """

    def __init__(self, rng, n=6, wavelength=1.0):
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        k = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.4, size=n))
        self.k = (d * k[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
        self.amp = np.float32(np.sqrt(2.0 / n))

    def __call__(self, u, v, w):
        out = None
        for (ku, kv, kw), ph in zip(self.k, self.phase):
            t = np.sin((u * ku + ph) + v * kv + w * kw)
            out = t if out is None else out + t
        return out * self.amp


def _blob(grid, center, axes, rot, waves, amp, sl=None):
    """Normalised radius of a deformed ellipsoid (< 1 inside) on its bounding box.

    Parameters
    ----------
    grid : _Grid
    center, axes : sequence of 3 float
        Centre (RAS mm) and semi-axes (mm) along the local axes.
    rot : (3, 3) array
        Columns are the local axes in RAS.
    waves : _Waves
        Deformation field, evaluated in local normalised coordinates.
    amp : float
        Deformation amplitude (fraction of the radius).
    sl : tuple of 3 slices, optional
        Box to evaluate on; by default the ellipsoid's bounding box.

    Returns
    -------
    sl : tuple of 3 slices
    r : numpy.ndarray
        Normalised radius on ``sl`` (float32).
    local : tuple of 3 arrays
        Local normalised coordinates on ``sl``.
    """
    if sl is None:
        sl = grid.box(center, max(axes) * (1.0 + 2 * amp) + 1.0)
    x, y, z = grid.sub(sl)
    dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
    local = []
    for a in range(3):
        r0, r1, r2 = (np.float32(v / axes[a]) for v in rot[:, a])
        local.append(dx * r0 + dy * r1 + dz * r2)
    u, v, w = local
    r = np.sqrt(u * u + v * v + w * w)
    if amp:
        r = r + np.float32(amp) * waves(u, v, w)
    return sl, r, (u, v, w)


def _paint(img, lab, sl, mask, value, label=None):
    """Set ``img[sl][mask] = value`` (scalar or array on ``sl``) and the label."""
    view = img[sl]
    if np.ndim(value):
        view[mask] = value[mask]
    else:
        view[mask] = value
    if label is not None and lab is not None:
        lab[sl][mask] = label


def _partial_volume_blur(img, spacing, sigma_mm):
    """Gaussian blur of ``sigma_mm`` (mm) plus the voxel's own box response."""
    sig = [float(np.sqrt((sigma_mm / s) ** 2 + 0.29 ** 2)) for s in spacing]
    return ndi.gaussian_filter(img, sig, truncate=3.0)


def _check_args(shape, spacing):
    if len(tuple(shape)) != 3 or len(tuple(spacing)) != 3:
        raise ValueError("shape and spacing must have 3 entries (Z, Y, X)")
