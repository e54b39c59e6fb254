"""Preprocessing for a model, and its exact inverse on the way back.

:func:`preprocess` takes the input volumes to the grid a model expects:

1. **reorient** by axis flips and permutations only (read from the affine), so
   that the voxel axes point the way the model card says (e.g. ``"LPS"``); an
   oblique volume keeps its obliquity: the grid is never resampled to undo a
   rotation;
2. **normalise** each channel as the card says (CT window, MR percentile clip
   and z-score, plain z-score or nothing);
3. **resample** to the card's target spacing (separable linear interpolation,
   done in chunks along Z so memory stays bounded);
4. **pad** so each axis is divisible by a given number, if asked.

Everything needed to go back travels in a :class:`PreprocessInfo`.
:func:`restore_labels` undoes the steps for a label map (nearest neighbour,
exact when no resampling happened) and :func:`restore_map` for a float map
(linear, ``float16``), so results land on the input's voxels.

Shapes: volumes are ``(Z, Y, X)`` (or ``(C, Z, Y, X)``); the preprocessed
array is ``(C, Z, Y, X)`` ``float32``. Spacings are in mm, in array order.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import MedSegError
from .volume import Volume, same_grid

__all__ = [
    "PreprocessInfo",
    "model_grid",
    "preprocess",
    "restore_labels",
    "restore_map",
    "orientation_transform",
    "apply_orientation",
    "undo_orientation",
    "normalize_channel",
    "resample_linear",
    "resample_nearest",
]

log = logging.getLogger(__name__)

#: Orientation letter -> (RAS world axis, sign).
_LETTERS = {"L": (0, -1), "R": (0, 1), "P": (1, -1), "A": (1, 1), "I": (2, -1), "S": (2, 1)}
_CHUNK_Z = 16  # output slices resampled at a time


@dataclass
class PreprocessInfo:
    """How an input grid was taken to a model grid (everything needed to undo it).

    Attributes
    ----------
    input_shape : tuple of int
        Spatial shape ``(Z, Y, X)`` of the input volumes.
    input_affine : numpy.ndarray
        ``(4, 4)`` voxel-to-RAS affine of the input.
    perm : tuple of int
        ``reoriented = input.transpose(perm)`` (array axes, before flips).
    flips : tuple of bool
        Axes of the transposed array that were then reversed.
    reoriented_shape : tuple of int
        Shape ``(Z, Y, X)`` after reorientation.
    reoriented_spacing : tuple of float
        Voxel size (mm) after reorientation.
    reoriented_affine : numpy.ndarray
        Affine of the reoriented grid.
    resampled_shape : tuple of int
        Shape after resampling to ``target_spacing`` (before padding).
    target_spacing : tuple of float
        Spacing (mm) of the model grid.
    pad : tuple of (int, int)
        Padding ``(before, after)`` added to each axis.
    model_affine : numpy.ndarray
        Affine of the (padded) model grid.
    source : str or None
        The input's file name, for messages.
    """

    input_shape: tuple
    input_affine: np.ndarray
    perm: tuple
    flips: tuple
    reoriented_shape: tuple
    reoriented_spacing: tuple
    reoriented_affine: np.ndarray
    resampled_shape: tuple
    target_spacing: tuple
    pad: tuple = ((0, 0), (0, 0), (0, 0))
    model_affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    source: str | None = None

    @property
    def model_shape(self) -> tuple:
        """Spatial shape ``(Z, Y, X)`` of the padded model-grid array."""
        return tuple(s + a + b for s, (a, b) in zip(self.resampled_shape, self.pad))

    @property
    def resampled(self) -> bool:
        """True when the model grid differs in size from the reoriented input."""
        return tuple(self.resampled_shape) != tuple(self.reoriented_shape)


# --------------------------------------------------------------------------- orientation
def orientation_transform(affine, orientation: str | None):
    """Axis permutation and flips that take an array to ``orientation``.

    Parameters
    ----------
    affine : (4, 4) array_like
        Voxel ``(i, j, k)`` to RAS affine of a ``(Z, Y, X)`` array.
    orientation : str or None
        Three letters for voxel axes ``i, j, k`` (e.g. ``"LPS"``, ``"RAS"``),
        as :meth:`Volume.orientation_code` writes them. None keeps the array.

    Returns
    -------
    perm : tuple of int
        Array axes for ``numpy.transpose``.
    flips : tuple of bool
        Axes of the transposed array to reverse.

    Examples
    --------
    >>> import numpy as np
    >>> orientation_transform(np.diag([-1.0, -1.0, 1.0, 1.0]), "RAS")
    ((0, 1, 2), (False, True, True))
    """
    if orientation is None:
        return (0, 1, 2), (False, False, False)
    code = str(orientation).upper()
    if len(code) != 3 or set(code) - set(_LETTERS) or len({_LETTERS[c][0] for c in code}) != 3:
        raise MedSegError(f"orientation {orientation!r} is not a valid code such as 'LPS' or 'RAS'")
    m = np.asarray(affine, dtype=float)[:3, :3]
    d = np.abs(m / np.linalg.norm(m, axis=0)[None, :])
    # world axis served by each voxel axis: the permutation with the best alignment
    best = max(itertools.permutations(range(3)), key=lambda p: sum(d[p[a], a] for a in range(3)))
    world_of_voxel = list(best)
    perm_ijk, flip_ijk = [], []
    for letter in code:
        w, sign = _LETTERS[letter]
        a = world_of_voxel.index(w)
        perm_ijk.append(a)
        flip_ijk.append(bool(np.sign(m[w, a]) != sign))
    # array axes are voxel axes reversed: array axis n <-> voxel axis 2 - n
    perm = tuple(2 - perm_ijk[2 - n] for n in range(3))
    flips = tuple(flip_ijk[2 - n] for n in range(3))
    return perm, flips


def _reoriented_affine(affine, shape, perm, flips):
    """Affine of ``array.transpose(perm)`` with ``flips`` applied (shape = input shape)."""
    aff = np.asarray(affine, dtype=float)
    out = np.eye(4)
    out[:3, 3] = aff[:3, 3]
    for n in range(3):
        src_voxel = 2 - perm[n]
        col = aff[:3, src_voxel].copy()
        if flips[n]:
            out[:3, 3] += (shape[perm[n]] - 1) * col
            col = -col
        out[:3, 2 - n] = col
    return out


def _resampled_affine(affine, shape, new_shape):
    """Affine of a grid resampled from ``shape`` to ``new_shape`` (same physical extent)."""
    out = np.asarray(affine, dtype=float).copy()
    for n in range(3):
        scale = shape[n] / new_shape[n]  # old voxels per new voxel
        if scale != 1:
            col = affine[:3, 2 - n]
            out[:3, 2 - n] = col * scale
            out[:3, 3] += (0.5 * scale - 0.5) * col
    return out


def apply_orientation(a, perm, flips):
    """Transpose then flip the last three axes of ``a`` (views only).

    ``perm`` and ``flips`` come from :func:`orientation_transform`.
    """
    lead = a.ndim - 3
    a = a.transpose(tuple(range(lead)) + tuple(lead + p for p in perm))
    for n, f in enumerate(flips):
        if f:
            a = np.flip(a, axis=lead + n)
    return a


def undo_orientation(a, perm, flips):
    """Inverse of :func:`apply_orientation` for a ``(Z, Y, X)`` array (a contiguous copy)."""
    for n, f in enumerate(flips):
        if f:
            a = np.flip(a, axis=n)
    return np.ascontiguousarray(a.transpose(np.argsort(perm)))


_apply_orientation = apply_orientation  # older private names, kept for callers
_undo_orientation = undo_orientation


# --------------------------------------------------------------------------- normalisation
def normalize_channel(a: np.ndarray, spec: dict | None, source=None) -> np.ndarray:
    """Normalise one ``(Z, Y, X)`` float32 channel in place as a model card says.

    Parameters
    ----------
    a : numpy.ndarray
        ``float32`` intensities (HU for CT), modified in place.
    spec : dict or None
        ``{"kind": "ct", "window": [lo, hi]}``: clip to the HU window and scale
        to [0, 1], or, with ``"mean"`` and ``"std"`` keys, clip and z-score with
        those statistics (as nnU-Net does for CT);
        ``{"kind": "mr"}``: clip to the 0.5 / 99.5 percentiles (``"percentiles"``
        overrides) of the nonzero voxels and z-score over them (zeros stay 0);
        ``{"kind": "zscore"}``: z-score over the whole volume;
        ``{"kind": "none"}`` or None: unchanged.

    Returns
    -------
    numpy.ndarray
        ``a``.
    """
    kind = "none" if spec is None else str(spec.get("kind", "none")).lower()
    if kind == "ct":
        lo, hi = (float(v) for v in spec.get("window", (-1000.0, 1000.0)))
        if hi <= lo:
            raise MedSegError(f"CT window {lo, hi} is empty; the upper bound must exceed the lower")
        np.clip(a, lo, hi, out=a)
        if "mean" in spec and "std" in spec:
            a -= float(spec["mean"])
            a /= max(float(spec["std"]), 1e-8)
        else:
            a -= lo
            a /= hi - lo
    elif kind == "mr":
        p_lo, p_hi = spec.get("percentiles", (0.5, 99.5))
        mask = a != 0
        fg = a[mask]
        if fg.size == 0:
            return a
        lo, hi = np.percentile(fg, [p_lo, p_hi])
        fg = np.clip(fg, lo, hi)
        mean, std = float(fg.mean()), float(fg.std())
        np.clip(a, lo, hi, out=a)
        a -= mean
        a /= max(std, 1e-8)
        a[~mask] = 0.0  # the background stays zero, as nnU-Net does with a mask
    elif kind == "zscore":
        mean, std = float(a.mean()), float(a.std())
        a -= mean
        a /= max(std, 1e-8)
    elif kind != "none":
        raise MedSegError(
            f"unknown normalization kind {kind!r}; use 'ct', 'mr', 'zscore' or 'none'", source
        )
    return a


# --------------------------------------------------------------------------- resampling
def _linear_weights(n_in: int, n_out: int):
    """Source indices and weights for linear interpolation, voxel centres aligned."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    return i0, i1, w


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel (voxel centres aligned)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def _lerp_axis(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    if a.shape[axis] == n_out:
        return a
    i0, i1, w = _linear_weights(a.shape[axis], n_out)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    lo = np.take(a, i0, axis=axis)
    hi = np.take(a, i1, axis=axis)
    hi -= lo
    hi *= w
    lo += hi
    return lo


def resample_linear(a: np.ndarray, shape, out_dtype=np.float32) -> np.ndarray:
    """Resample a ``(Z, Y, X)`` array to ``shape`` by separable linear interpolation.

    Voxel centres are aligned the way ``torch.nn.functional.interpolate`` does with
    ``align_corners=False``. The work is done ``_CHUNK_Z`` output slices at a time so
    temporary memory stays a few slabs.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(a.shape) == shape:
        return np.asarray(a, dtype=out_dtype)
    out = np.empty(shape, dtype=out_dtype)
    i0, i1, w = _linear_weights(a.shape[0], shape[0])
    for z0 in range(0, shape[0], _CHUNK_Z):
        z1 = min(z0 + _CHUNK_Z, shape[0])
        lo = a[i0[z0:z1]].astype(np.float32)
        hi = a[i1[z0:z1]].astype(np.float32)
        hi -= lo
        hi *= w[z0:z1, None, None]
        lo += hi
        out[z0:z1] = _lerp_axis(_lerp_axis(lo, 1, shape[1]), 2, shape[2])
    return out


def resample_nearest(a: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resampling of a ``(Z, Y, X)`` array (dtype kept)."""
    shape = tuple(int(s) for s in shape)
    if tuple(a.shape) == shape:
        return np.asarray(a)
    out = np.asarray(a)
    for axis in range(3):
        if out.shape[axis] != shape[axis]:
            out = np.take(out, _nearest_index(out.shape[axis], shape[axis]), axis=axis)
    return out


# --------------------------------------------------------------------------- main entry
def _stack_channels(volumes) -> tuple[list, Volume]:
    if isinstance(volumes, Volume):
        volumes = [volumes]
    volumes = list(volumes)
    if not volumes:
        raise MedSegError("no input volume given")
    ref = volumes[0]
    channels = []
    for v in volumes:
        if not same_grid(v, ref):
            raise MedSegError(
                f"input channels are not on one voxel grid ({v.shape3} vs {ref.shape3}); "
                "resample them to a common grid first", v.source or ref.source
            )
        data = v.data
        if data.ndim == 3:
            channels.append(data)
        else:
            channels.extend(data[c] for c in range(data.shape[0]))
    return channels, ref


def _target_shape(shape, spacing, target_spacing):
    if target_spacing is None:
        return tuple(shape), tuple(spacing)
    target = tuple(float(t) for t in target_spacing)
    if len(target) != 3 or min(target) <= 0:
        raise MedSegError(f"target spacing {target_spacing} must be three positive numbers (mm)")
    out = []
    for n, s, t in zip(shape, spacing, target):
        # keep the grid when the spacing already matches (to 0.1 %)
        out.append(n if abs(s - t) <= 1e-3 * t else max(1, int(round(n * s / t))))
    return tuple(out), target


def model_grid(volumes, target_spacing=None, orientation=None, normalization=None,
               divisible_by=None):
    """The channels, their normalisation specs and the grids of :func:`preprocess`.

    No voxel is read (lazy arrays stay lazy); the lazy big-volume path
    (:class:`napari_medseg.bigvolume.LazyModelGrid`) shares this.

    Returns
    -------
    channels : list of array-like
        ``(Z, Y, X)`` arrays of the input, one per model channel.
    specs : list
        One normalisation spec per channel.
    info : PreprocessInfo

    Raises
    ------
    MedSegError
        Channels on different grids, or a normalisation list of the wrong length.
    """
    channels, ref = _stack_channels(volumes)
    specs = normalization if isinstance(normalization, (list, tuple)) else [normalization]
    if len(specs) == 1:
        specs = list(specs) * len(channels)
    if len(specs) != len(channels):
        raise MedSegError(
            f"the model normalises {len(specs)} channel(s) but {len(channels)} were given; "
            "pass one image per model input channel", ref.source
        )
    perm, flips = orientation_transform(ref.affine, orientation)
    shape = ref.shape3
    r_shape = tuple(shape[p] for p in perm)
    r_spacing = tuple(ref.spacing[p] for p in perm)
    r_affine = _reoriented_affine(ref.affine, shape, perm, flips)
    m_shape, m_spacing = _target_shape(r_shape, r_spacing, target_spacing)
    div = divisible_by if isinstance(divisible_by, (list, tuple)) else [divisible_by or 1] * 3
    pad = tuple((0, (-n) % int(d)) for n, d in zip(m_shape, div))
    info = PreprocessInfo(
        input_shape=tuple(shape), input_affine=ref.affine.copy(), perm=tuple(perm),
        flips=tuple(flips), reoriented_shape=r_shape, reoriented_spacing=r_spacing,
        reoriented_affine=r_affine, resampled_shape=m_shape, target_spacing=m_spacing,
        pad=pad, model_affine=_resampled_affine(r_affine, r_shape, m_shape),
        source=ref.source,
    )
    return list(channels), list(specs), info


def preprocess(volumes, target_spacing=None, orientation=None, normalization=None,
               divisible_by=None):
    """Take input volumes to a model's grid and intensity scale.

    Parameters
    ----------
    volumes : Volume or list of Volume
        The model's input channels, all on one voxel grid; a ``(C, Z, Y, X)``
        Volume counts as ``C`` channels.
    target_spacing : tuple of 3 float, optional
        Model voxel size in mm along ``(Z, Y, X)`` of the reoriented grid; None
        keeps the input spacing.
    orientation : str, optional
        Orientation code the model expects (e.g. ``"LPS"``); None keeps the input's.
    normalization : list of dict, dict or None
        One spec per channel (see :func:`normalize_channel`); a single spec applies
        to every channel.
    divisible_by : int or tuple of 3 int, optional
        Pad (zeros, after normalisation, at the end of each axis) so every axis
        is a multiple of this.

    Returns
    -------
    x : numpy.ndarray
        ``(C, Z, Y, X)`` ``float32`` on the model grid.
    info : PreprocessInfo
        What :func:`restore_labels` and :func:`restore_map` need to go back.

    Raises
    ------
    MedSegError
        On NaNs, channels on different grids, a bad normalisation spec or a
        normalisation list whose length does not match the channels.
    """
    channels, specs, info = model_grid(volumes, target_spacing, orientation, normalization,
                                       divisible_by)
    perm, flips, m_shape, pad = info.perm, info.flips, info.resampled_shape, info.pad
    shape = info.input_shape
    x = np.zeros((len(channels),) + tuple(n + p[1] for n, p in zip(m_shape, pad)), np.float32)
    for c, (data, spec) in enumerate(zip(channels, specs)):
        a = np.array(data, dtype=np.float32)  # a copy: materialises lazy arrays
        if not np.isfinite(a).all():
            raise MedSegError(
                "the image contains NaN or infinite values; fill or mask them before "
                "running a model", info.source
            )
        a = np.ascontiguousarray(apply_orientation(a, perm, flips))
        normalize_channel(a, spec, info.source)
        x[c, : m_shape[0], : m_shape[1], : m_shape[2]] = resample_linear(a, m_shape)
        del a

    log.debug("preprocess %s -> %s (perm %s flips %s)", shape, x.shape, perm, flips)
    return x, info


def _crop_to_resampled(a, info: PreprocessInfo, what: str):
    a = np.asarray(a)
    if a.ndim != 3:
        raise MedSegError(f"{what} must be a (Z, Y, X) array, got shape {a.shape}", info.source)
    if tuple(a.shape) == tuple(info.model_shape):
        z, y, x = info.resampled_shape
        return a[:z, :y, :x]
    if tuple(a.shape) == tuple(info.resampled_shape):
        return a
    raise MedSegError(
        f"{what} of shape {a.shape} is not on the model grid {info.model_shape}", info.source
    )


def restore_labels(labels, info: PreprocessInfo) -> np.ndarray:
    """Bring a label map from the model grid back onto the input's voxels.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(Z, Y, X)`` integer labels on the model grid (padded or not).
    info : PreprocessInfo
        From :func:`preprocess`.

    Returns
    -------
    numpy.ndarray
        Labels of shape ``info.input_shape`` (dtype kept), by nearest neighbour;
        exact when the model grid was not resampled.
    """
    a = _crop_to_resampled(labels, info, "labels")
    a = resample_nearest(a, info.reoriented_shape)
    return undo_orientation(a, info.perm, info.flips)


def restore_map(values, info: PreprocessInfo) -> np.ndarray:
    """Bring a float map (probability, uncertainty) back onto the input's voxels.

    Parameters
    ----------
    values : numpy.ndarray
        ``(Z, Y, X)`` map on the model grid (padded or not).
    info : PreprocessInfo
        From :func:`preprocess`.

    Returns
    -------
    numpy.ndarray
        ``float16`` map of shape ``info.input_shape`` (linear interpolation).
    """
    a = _crop_to_resampled(values, info, "map")
    a = resample_linear(a, info.reoriented_shape, out_dtype=np.float16)
    return undo_orientation(a, info.perm, info.flips)
