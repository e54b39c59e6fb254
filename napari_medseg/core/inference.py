"""Sliding-window inference with Gaussian blending, stitched cell by cell.

:func:`sliding_window_inference` runs any predictor (a callable mapping a torch
batch ``(B, C, *patch)`` to logits ``(B, K, *patch)``) over a ``(C, Z, Y, X)``
volume in overlapping windows, blends the windows with a Gaussian importance
map (sigma = patch / 8, as nnU-Net and MONAI do) and returns the argmax labels.

Memory does not grow with *classes x whole volume*: the window borders cut the
volume into cells, and a cell's weighted logits are accumulated only from its
first window to its last. Windows run in Z, then Y, then X order; as soon as no
remaining window touches a cell, it is finalised (argmax to ``uint8`` /
``uint16``, optionally the foreground probability or an uncertainty map as
``float16``) and its buffer freed. The peak is below ``K x patch_z x Y x X``
floats (about 0.4-0.9 of it) instead of ``K x Z x Y x X``; with mixed precision,
or when a one-patch-deep slab would pass ``ACCUMULATOR_BUDGET_BYTES`` (many
classes), the cells are kept in ``float16``, and the windows per batch are capped
so a batch of logits stays below ``OUTPUT_BUDGET_BYTES``. On the CPU one window runs
at a time by default. When the network ends in a 1x1x1 convolution with fewer
inputs than classes (most segmentation networks with many classes), the cells
hold the features entering it and the convolution runs per finished cell, so
memory does not grow with the number of classes at all.

Other features: batches of windows, mirror test-time augmentation (all eight
flips of the three axes, logits averaged), mixed precision (bf16 autocast on
CPUs with AVX512-BF16 / AMX, bf16 or fp16 on CUDA), ``device="auto"``
(CUDA, then MPS, then CPU), a CUDA out-of-memory error retried with one window
per batch and the output kept on the CPU, a progress callback and a cancel flag
checked between batches.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedSegError, check_cancel
from . import policy
from .convs import plain_conv
from .policy import (amp_name, choose_device, is_out_of_memory, mirror_combinations,
                     out_of_memory_error, resolve_amp)

__all__ = [
    "InferenceResult",
    "sliding_window_inference",
    "pick_device",
    "resolve_amp",
    "window_starts",
    "gaussian_importance_map",
    "class_argmax",
]

log = logging.getLogger(__name__)

_FINALIZE_CHUNK = 4  # slices finalised at a time (bounds temporaries)
_ADD_CHUNK_ELEMENTS = 1 << 23  # window logits added at most this many values at a time
#: Above this size a float32 ring buffer is stored as float16 instead (many classes).
ACCUMULATOR_BUDGET_BYTES = 1 << 30
#: Voxels per batch (one 128^3 window) from which the heap is trimmed after every batch.
TRIM_VOXELS = 128 ** 3

#: Windows per batch are capped so one batch of float32 logits stays below this.
OUTPUT_BUDGET_BYTES = 256 << 20


@dataclass
class InferenceResult:
    """What :func:`sliding_window_inference` returns.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(Z, Y, X)`` ``uint8`` (``uint16`` above 255 classes) argmax labels.
    probability : numpy.ndarray or None
        ``(Z, Y, X)`` ``float16`` foreground probability (1 - p(background)), or
        the sigmoid for a one-class model; None unless asked for.
    uncertainty : numpy.ndarray or None
        ``(Z, Y, X)`` ``float16`` in [0, 1]: normalised entropy of the class
        probabilities (``"entropy"``) or the standard deviation of the
        foreground probability across test-time augmentations (``"tta"``).
    seconds : float
        Wall time of the run.
    n_windows : int
        Number of window positions.
    device : str
        Where the windows ran.
    amp : str
        ``"bf16"``, ``"fp16"`` or ``"off"``.
    batch_size : int
        Windows per batch actually used (1 after an out-of-memory retry).
    """

    labels: np.ndarray
    probability: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    seconds: float = 0.0
    n_windows: int = 0
    device: str = "cpu"
    amp: str = "off"
    batch_size: int = 1


# --------------------------------------------------------------------------- devices
def pick_device(device="auto") -> torch.device:
    """Resolve ``"auto"`` to CUDA, then Apple MPS, then CPU (see :func:`.policy.choose_device`)."""
    return choose_device(device)


_cpu_has_bf16 = policy._cpu_has_bf16  # noqa: E305 - kept for older callers


def _amp_name(dtype) -> str:
    return amp_name(dtype)


# --------------------------------------------------------------------------- windows
def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``roi`` covering ``size`` voxels.

    Steps of ``roi * (1 - overlap)`` voxels, the last window flush with the end
    (the same positions as MONAI's ``dense_patch_slices``).

    Examples
    --------
    >>> window_starts(10, 4, 0.5)
    [0, 2, 4, 6]
    >>> window_starts(9, 4, 0.5)
    [0, 2, 4, 5]
    """
    if roi >= size:
        return [0]
    step = max(int(roi * (1.0 - overlap)), 1)
    n = int(math.ceil((size - roi) / step)) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


def gaussian_importance_map(patch, sigma_scale: float = 0.125, device="cpu") -> torch.Tensor:
    """Separable Gaussian weights ``(pz, py, px)`` peaking at 1 in the window centre.

    Values are floored at 1e-3, as in MONAI's ``compute_importance_map``.

    Parameters
    ----------
    patch : tuple of 3 int
        Window size in voxels.
    sigma_scale : float
        Sigma as a fraction of the window size (1/8 as in nnU-Net).
    """
    axes = []
    for p in patch:
        c = (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-3)
        g = torch.exp(-0.5 * ((torch.arange(p, dtype=torch.float64) - c) / sigma) ** 2)
        axes.append(g / g.max())
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    # floor the far corners (as MONAI does) so every voxel keeps a usable weight
    w = torch.clamp(w, min=1e-3)
    return w.to(torch.float32).to(device)


def class_argmax(a: torch.Tensor) -> torch.Tensor:
    """``a.argmax(0)`` (the first of equal maxima), as ``uint8`` / ``int32`` indices.

    A running maximum over the classes: torch's ``argmax`` along the outermost
    axis of a ``(K, ...)`` array walks it with a stride of the whole volume and is
    3-4x slower on the CPU (14 classes x 8 x 256 x 256: 74 -> 19 ms).

    Parameters
    ----------
    a : torch.Tensor
        ``(K, ...)`` scores, any floating dtype, without NaNs.
    """
    k = a.shape[0]
    dtype = torch.uint8 if k <= 256 else torch.int32
    idx = torch.zeros(a.shape[1:], dtype=dtype, device=a.device)
    if k == 1:
        return idx
    best = a[0].clone()
    for c in range(1, k):
        better = torch.gt(a[c], best)
        idx.masked_fill_(better, c)
        torch.maximum(best, a[c], out=best)
    return idx


def _mirror_axes(tta: bool):
    return mirror_combinations((2, 3, 4)) if tta else [()]


# --------------------------------------------------------------------------- stitching
class _CellStitcher:
    """Accumulate weighted window logits per cell of the window grid.

    The window borders along each axis cut the volume into cells; every cell is
    covered by a fixed set of windows. A cell's buffer ``(K, dz, dy, dx)`` is
    allocated when its first window arrives and finalised (argmax, optional
    maps) and freed as soon as its last window has been added, so only the
    cells that still wait for windows are held: with windows in Z, then Y, then
    X order that is about 0.4-0.9 of ``K x patch_z x Y x X``. Sums run in window
    order, so the result equals whole-volume blending exactly.
    """

    def __init__(self, n_classes, shape, patch, starts, device, importance, want_prob,
                 uncertainty, low_precision=False, head=None, sink=None):
        self.k = n_classes
        self.head = head
        self.sink = sink
        # channels held per voxel: the logits, or the features entering a pointwise head
        self.c = head.in_channels if head is not None else n_classes
        self.shape = shape
        self.patch = patch
        self.g = importance
        self.device = device
        self.bounds = [sorted(set(st) | {s + p for s in st}) for st, p in zip(starts, patch)]
        z, y, x = shape
        self.acc_dtype = torch.float32
        if low_precision or self.c * patch[0] * y * x * 4 > ACCUMULATOR_BUDGET_BYTES:
            # halves the buffers; float16 sums (11-bit mantissa) round less than bf16
            # outputs (8 bits) already did, and ~3 significant digits suffice for argmax
            self.acc_dtype = torch.float16
            log.info("accumulating window outputs in float16 (%d channels)", self.c)
        # the weights as added to mixed-precision outputs (in the cells' dtype; nnU-Net's
        # Gaussian is float16 already) and as summed for the normalisation, consistently
        self.g_acc = importance.to(self.acc_dtype)
        self.g_w = self.g_acc.float()
        # windows still to come for each cell
        self.remaining = np.zeros([len(b) - 1 for b in self.bounds], dtype=np.int32)
        for w in itertools.product(*starts):
            self.remaining[self._block(w)] += 1
        self.cells = {}
        self.open_voxels = self.peak_open_voxels = 0
        self.want_w = want_prob or uncertainty is not None or head is not None \
            or sink is not None
        self.uncertainty = uncertainty
        dtype = np.uint8 if n_classes <= 255 else np.uint16
        self.labels = np.zeros(shape, dtype=dtype)
        self.prob = np.zeros(shape, dtype=np.float16) if want_prob else None
        self.unc = np.zeros(shape, dtype=np.float16) if uncertainty is not None else None
        self.log_k = math.log(max(n_classes, 2))

    def _block(self, start):
        """Cell index ranges ``(slice, slice, slice)`` covered by the window at ``start``."""
        return tuple(slice(b.index(s), b.index(s + p))
                     for b, s, p in zip(self.bounds, start, self.patch))

    def _cell(self, idx):
        cell = self.cells.get(idx)
        if cell is None:
            size = tuple(self.bounds[a][i + 1] - self.bounds[a][i] for a, i in enumerate(idx))
            acc = torch.zeros((self.c,) + size, dtype=self.acc_dtype, device=self.device)
            wsum = torch.zeros(size, device=self.device) if self.want_w else None
            uacc = torch.zeros(size, device=self.device) if self.uncertainty == "tta" else None
            cell = self.cells[idx] = (acc, wsum, uacc)
            self.open_voxels += math.prod(size)
            self.peak_open_voxels = max(self.peak_open_voxels, self.open_voxels)
        return cell

    def add(self, logits, start, spread=None):
        """Add one window's ``(K, pz, py, px)`` logits (or head features) at ``start``."""
        block = self._block(start)
        cells = []
        for idx in itertools.product(*[range(s.start, s.stop) for s in block]):
            acc = self._cell(idx)[0]
            lo = [self.bounds[a][i] - start[a] for a, i in enumerate(idx)]
            cells.append((idx, acc, tuple(slice(o, o + n) for o, n in zip(lo, acc.shape[1:]))))
        # torch computes mixed dtypes and layouts (bf16 channels-last outputs into float16
        # cells) through slow generic loops: mixed-precision outputs are first converted to
        # the cells' dtype and a contiguous layout (exact: bf16 values fit float16), a few
        # classes at a time, so every addition runs on one dtype (8x faster)
        convert = logits.dtype != torch.float32
        g = self.g_acc if convert else self.g
        step = max(1, _ADD_CHUNK_ELEMENTS // math.prod(logits.shape[1:]))
        for c in range(0, self.c, step):
            part = logits[c:c + step]
            if convert:
                part = part.to(self.acc_dtype, memory_format=torch.contiguous_format)
            for _, acc, win in cells:
                acc[c:c + step].addcmul_(part[(slice(None),) + win], g[win])
            del part
        gw = self.g_w if convert else self.g
        for idx, acc, win in cells:
            _, wsum, uacc = self.cells[idx]
            if wsum is not None:
                wsum += gw[win]
            if uacc is not None:
                uacc.addcmul_(spread[win], gw[win])
            self.remaining[idx] -= 1
            if self.remaining[idx] == 0:
                self._finalize(idx, *self.cells.pop(idx))
                self.open_voxels -= math.prod(acc.shape[1:])

    def finish(self):
        if self.cells or self.remaining.any():  # pragma: no cover - internal consistency
            raise RuntimeError("sliding window: some cells were not covered by every window")

    def _finalize(self, idx, acc, wsum, uacc):
        lo = [self.bounds[a][i] for a, i in enumerate(idx)]
        ys = slice(lo[1], lo[1] + acc.shape[2])
        xs = slice(lo[2], lo[2] + acc.shape[3])
        for c in range(0, acc.shape[1], _FINALIZE_CHUNK):
            n = min(_FINALIZE_CHUNK, acc.shape[1] - c)
            region = (slice(lo[0] + c, lo[0] + c + n), ys, xs)
            self._finalize_rows(acc[:, c:c + n], region,
                                None if wsum is None else wsum[c:c + n],
                                None if uacc is None else uacc[c:c + n])

    def _finalize_rows(self, a, region, wsum, uacc):
        if self.head is not None:  # blended features -> blended logits (times wsum)
            a = self.head.apply(a, wsum)
        if self.sink is not None:  # blended logits go on (e.g. to be resampled first)
            self.sink(region, a.float() / wsum)
            return
        if self.k == 1:
            lab = a[0] > 0
        else:
            lab = class_argmax(a)
        self.labels[region] = lab.to(torch.uint8 if self.k <= 255 else torch.int32) \
            .cpu().numpy()
        if wsum is None or (self.prob is None and self.unc is None):
            return
        logits = a.float() / wsum
        if self.k == 1:
            p1 = torch.sigmoid(logits[0])
            fg = p1
            ent = -(p1 * torch.log(p1.clamp_min(1e-12))
                    + (1 - p1) * torch.log((1 - p1).clamp_min(1e-12))) / self.log_k
        else:
            p = torch.softmax(logits, dim=0)
            fg = 1.0 - p[0]
            ent = -(p * torch.log(p.clamp_min(1e-12))).sum(0) / self.log_k if \
                self.uncertainty == "entropy" else None
        if self.prob is not None:
            self.prob[region] = fg.to(torch.float16).cpu().numpy()
        if self.uncertainty == "entropy":
            self.unc[region] = ent.clamp(0, 1).to(torch.float16).cpu().numpy()
        elif self.uncertainty == "tta":
            u = uacc / wsum
            self.unc[region] = u.clamp(0, 1).to(torch.float16).cpu().numpy()


# --------------------------------------------------------------------------- pointwise head
class _PointwiseHead:
    """A network's last layer when it is a 1x1x1 convolution, applied after blending.

    Gaussian blending is a weighted mean and a 1x1x1 convolution is affine, so
    blending the ``F`` features that enter the head and applying the head to each
    finished cell gives the logits that blending the head's ``K`` outputs gives,
    while the cells hold ``F`` channels instead of ``K`` (32 instead of 105 for a
    whole-body DynUNet). Found by :func:`_probe_head`, never assumed.
    """

    def __init__(self, parent: torch.nn.Module, name: str, conv: torch.nn.Conv3d):
        self.parent, self.name, self.conv = parent, name, conv
        w = conv.weight.detach()
        self.weight = w.reshape(w.shape[0], w.shape[1]).float()
        self.bias = None if conv.bias is None else conv.bias.detach().float()
        self.in_channels = int(conv.in_channels)

    def removed(self):
        """Run the network without its head (it returns the head's input features)."""
        return _stand_ins([(self.parent, self.name, self.conv)],
                          lambda conv: torch.nn.Identity())

    def apply(self, feats: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
        """Weighted logit sums ``(K, ...)`` from weighted feature sums ``(F, ...)``."""
        w = self.weight.to(feats.device)
        out = torch.tensordot(w, feats.float(), dims=([1], [0]))
        if self.bias is not None:
            out += self.bias.to(feats.device).view(-1, *([1] * wsum.ndim)) * wsum
        return out


def _head_candidates(predictor, n_classes: int) -> list:
    """``(parent, name, conv)`` for each 1x1x1 convolution that could end the network."""
    if not _uses_python_modules(predictor):
        return []
    return _children(predictor, lambda m: (
        plain_conv(m) and m.weight.ndim == 5 and tuple(m.kernel_size) == (1, 1, 1)
        and tuple(m.stride) == (1, 1, 1) and m.padding in ((0, 0, 0), "valid")
        and m.groups == 1 and m.out_channels == n_classes and m.in_channels < n_classes))


def _probe_head(predictor, batch, cands):
    """Run ``predictor`` once; return ``(head or None, its features, the output)``.

    A candidate (from :func:`_head_candidates`) is the head only when the
    network's output *is* that convolution's output (the same storage, at most
    viewed with its spatial axes permuted): nothing runs after it, so it may be
    moved after blending.
    """
    seen, hooks = {}, []
    for i, (_, _, conv) in enumerate(cands):
        def hook(mod, inp, out, i=i):
            seen[i] = (inp[0], out)
        hooks.append(conv.register_forward_hook(hook))
    try:
        y = predictor(batch)
    finally:
        for h in hooks:
            h.remove()
    y = y[0] if isinstance(y, (list, tuple)) else y
    for i, (feats, out) in seen.items():
        if (isinstance(y, torch.Tensor) and isinstance(out, torch.Tensor)
                and y.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                and y.numel() == out.numel() and y.shape[:2] == out.shape[:2]
                and y.stride(1) == out.stride(1)):
            parent, name, conv = cands[i]
            if y.shape[2:] != out.shape[2:]:  # spatial axes permuted like the output
                feats = _match_permutation(feats, out, y)
            return _PointwiseHead(parent, name, conv), feats, y
    return None, None, y


def _match_permutation(feats, out, y):
    """``feats`` with its spatial axes permuted the way ``out`` became ``y``."""
    strides = list(out.stride()[2:])
    order = [2 + strides.index(s) for s in y.stride()[2:]]
    return feats.permute(0, 1, *order)


# --------------------------------------------------------------------------- prediction
def _glibc_function(name: str, argtypes, restype=None):
    """A function of glibc, or None on other platforms and C libraries."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # pragma: no cover - exotic platforms
        return None
    fn.argtypes, fn.restype = list(argtypes), restype or ctypes.c_int
    return fn


def _glibc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries."""
    import ctypes
    import os

    if os.environ.get("NAPARI_MEDSEG_NO_TRIM"):
        return None
    return _glibc_function("malloc_trim", [ctypes.c_size_t])


_TRIM = _glibc_trim()
_KEEP_FREED = False


def keep_freed_memory(voxels: int = 0, bytes_per_voxel: int = 32) -> bool:
    """Let this process keep the memory it frees, for one-shot runs (the command line).

    Large arrays are otherwise mapped fresh for each use and given back when freed,
    and windows trim the heap (see :func:`_release_free_memory`): each reuse then
    touches new pages, which costs a few ms per MB on some virtual machines (a
    512 x 512 x 300 CT: 0.6 million page faults, 1.5-3 s of its 25 s). glibc is told
    to keep freed memory in its heap instead (``mallopt``; about 0.1 GB more at the
    peak). Not when a run of ``voxels`` input voxels (at ``bytes_per_voxel`` for the
    whole pipeline) would take more than half of the available memory, nor for
    long-lived processes (the viewer). Returns whether it did.
    """
    import ctypes

    from .planner import _mem_available

    global _KEEP_FREED
    avail = _mem_available()
    if _TRIM is None or avail is None or voxels * bytes_per_voxel > avail // 2:
        return False
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:  # pragma: no cover - glibc without mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(mallopt(m_trim_threshold, 2 ** 31 - 1)) and bool(
        mallopt(m_mmap_threshold, 2 ** 31 - 1))
    _KEEP_FREED = _KEEP_FREED or ok
    return ok


def _release_free_memory():
    """Hand freed heap pages back to the system between windows.

    A window frees hundreds of MB of temporaries of a few MB each; glibc keeps
    such chunks in its heap, where the next window's different sizes fragment
    them, and the resident size grows past what is in use (about 0.15 GiB at
    128^3 windows). ``malloc_trim`` returns the free pages; it takes about a
    millisecond. Setting ``NAPARI_MEDSEG_NO_TRIM`` turns it off (to measure it).
    """
    if _TRIM is not None and not _KEEP_FREED:
        _TRIM(0)


def _foreground(logits):
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0].float())
    return 1.0 - torch.softmax(logits.float(), dim=1)[:, 0]


def _run_predictor(predictor, batch, n_classes, axes_list, want_spread):
    """Logits ``(B, K, *patch)`` averaged over mirrors, and the foreground spread."""
    total, s1, s2 = None, None, None
    for axes, yi in policy.mirrored_outputs(predictor, batch, axes_list):
        if yi.shape[0] != batch.shape[0] or yi.shape[1] != n_classes \
                or tuple(yi.shape[2:]) != tuple(batch.shape[2:]):
            raise MedSegError(
                f"the model returned shape {tuple(yi.shape)} for input {tuple(batch.shape)}; "
                f"expected {n_classes} classes on the same window (check the model card)"
            )
        if axes:
            yi = torch.flip(yi, axes)
        if want_spread:
            fg = _foreground(yi)
            s1 = fg if s1 is None else s1 + fg
            s2 = fg * fg if s2 is None else s2 + fg * fg
        if len(axes_list) == 1:
            total = yi
        else:
            total = yi.float() if total is None else total.add_(yi)
    if len(axes_list) > 1:
        total /= len(axes_list)
    spread = None
    if want_spread:
        n = len(axes_list)
        spread = torch.sqrt(torch.clamp(s2 / n - (s1 / n) ** 2, min=0))
    return total, spread


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float32)
    else:
        a = np.asarray(x)
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if t.ndim != 4:
        raise MedSegError(
            f"expected a (C, Z, Y, X) array for inference, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise MedSegError("the input contains NaN or infinite values; fill them before inference")
    return t


def _pad_to_patch(t: torch.Tensor, patch):
    """Pad (zeros, split evenly) every axis smaller than the window; return the crop."""
    pads, crop = [], []
    for n, p in zip(t.shape[1:], patch):
        d = max(p - n, 0)
        pads.append((d // 2, d - d // 2))
        crop.append(slice(d // 2, d // 2 + n))
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        t = F.pad(t, flat, mode="constant", value=0.0)
    return t, tuple(crop)


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _GroupNormAsInstanceNorm(torch.nn.Module):
    """An ``InstanceNorm`` computed as a batch norm of one sample, or a group norm.

    The same function (statistics per sample and channel over all voxels); on the
    CPU, PyTorch's instance norm copies every activation to a contiguous layout and
    back (4x slower at 32 x 128^3, half of a U-Net window's time), while its batch and
    group norms have kernels for ``channels_last_3d`` bf16 tensors. A batch of one
    window (the CPU default) runs as a batch norm with batch statistics: the group
    norm kernel is slow on few channels or few voxels (2 cores, bf16: 8 channels at
    32 x 64 x 64, 3.6 against 0.7 ms; 320 channels at 8^3, 2.3 against 0.06 ms), which
    took half of the built-in CT model's time (a 512 x 512 x 300 CT: 24 -> 14 s with
    the per-class component step in bounding boxes).
    """

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        n = self.norm
        if x.shape[0] == 1:  # batch statistics of one sample are its instance statistics
            folded = _folded_instance_norm(x, n.weight, n.bias, n.eps)
            if folded is not None:
                return folded
            return F.batch_norm(x, None, None, n.weight, n.bias, training=True, eps=n.eps)
        return F.group_norm(x, x.shape[1], n.weight, n.bias, n.eps)


def _folded_instance_norm(x, weight, bias, eps, slow_below: int = 16, fold_to: int = 32):
    """Instance norm of one ``channels_last_3d`` sample with few channels, or None.

    PyTorch's CPU batch norm is slow on few channels (bf16, 2 cores, 8 channels at
    32 x 96 x 96: 5 ms, against 1.8 ms for 16 channels and twice the data; the four
    finest-level norms of the built-in CT model took 8 of its 27 s; folded to 32
    channels: 0.7 ms). The voxels are viewed, without a copy, as ``k`` times as many
    channels of ``1/k`` the voxels (voxel ``s`` of channel ``c`` goes to channel
    ``(s mod k) * C + c``), normalised there, and the ``k`` partial statistics of each
    channel are pooled into its own mean and variance by an affine fix-up of the
    output: the same function, at the speed of the wide case.
    """
    c = x.shape[1]
    k = 1
    while k * c < fold_to:
        k *= 2
    s = x.numel() // c
    if (c >= slow_below or x.dim() != 5 or s % k
            or not x.is_contiguous(memory_format=torch.channels_last_3d)):
        return None
    y = x.as_strided((1, k * c, s // k, 1, 1), (s * c, 1, k * c, k * c, k * c))
    out, mean, invstd = torch.native_batch_norm(y, None, None, None, None, True, 0.0, eps)
    if out.stride() != y.stride():
        return None
    mean = mean.float().view(k, c)
    var = invstd.float().view(k, c).pow(-2) - eps
    pooled_mean = mean.mean(0)
    pooled_inv = torch.rsqrt((var + (mean - pooled_mean) ** 2).mean(0) + eps)
    w = torch.ones(c) if weight is None else weight.detach().float()
    b = torch.zeros(c) if bias is None else bias.detach().float()
    # out = (x - m_f) * i_f for fold f; wanted (x - m) * i * w + b with pooled m, i
    scale = (pooled_inv * w / invstd.float().view(k, c)).reshape(-1)
    shift = ((mean - pooled_mean) * pooled_inv * w + b).reshape(-1)
    out = F.batch_norm(out, torch.zeros(k * c), torch.full((k * c,), 1.0 - eps), scale, shift,
                       training=False, eps=eps)
    return out.as_strided(x.shape, x.stride())


def _uses_python_modules(predictor) -> bool:
    return isinstance(predictor, torch.nn.Module) and not any(
        isinstance(m, torch.jit.ScriptModule) for m in predictor.modules())


def _children(predictor: torch.nn.Module, keep) -> list:
    """``(parent, name, module)`` for every submodule of ``predictor`` that ``keep`` accepts."""
    return [(parent, name, m) for parent in predictor.modules()
            for name, m in parent.named_children() if keep(m)]


@contextlib.contextmanager
def _stand_ins(found, make):
    """Put ``make(module)`` in place of each ``(parent, name, module)``; restore after."""
    for parent, name, m in found:
        setattr(parent, name, make(m))
    try:
        yield
    finally:
        for parent, name, m in found:
            setattr(parent, name, m)


@contextlib.contextmanager
def _cpu_fast_path(predictor, device, amp_dtype):
    """Run a CPU module in ``channels_last_3d`` with fast instance norms, then restore it.

    Under mixed precision on the CPU, oneDNN then convolves without reordering
    every activation to its blocked layout and back (about 0.1 GiB less at 128^3
    windows), and instance norms (without running statistics) run as group norms
    that keep that layout (a 5.6 M-parameter DynUNet window: 2.6 -> 1.25 s). Kept
    off in fp32 so fp32 results stay bit-identical to calling the model directly.
    Yields whether the inputs should be made ``channels_last_3d``.
    """
    if not (device.type == "cpu" and amp_dtype is not None and _uses_python_modules(predictor)):
        yield False
        return
    norms = _children(predictor, lambda m: (
        type(m) in (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
        and not m.track_running_stats))
    with _stand_ins(norms, _GroupNormAsInstanceNorm):
        predictor.to(memory_format=torch.channels_last_3d)
        try:
            yield True
        finally:
            predictor.to(memory_format=torch.contiguous_format)


def _run(t, predictor, patch, n_classes, overlap, batch_size, tta, device, amp_dtype,
         acc_device, uncertainty, want_prob, progress, cancel, split_head=True,
         starts_fn=None, importance=None, sink=None):
    shape = tuple(t.shape[1:])
    starts_fn = starts_fn or window_starts
    starts = [sorted(set(int(v) for v in starts_fn(s, p, overlap)))
              for s, p in zip(shape, patch)]
    windows = list(itertools.product(*starts))  # Z-major order
    total = len(windows)
    if importance is None:
        importance = gaussian_importance_map(patch, device=acc_device)
    else:
        importance = torch.as_tensor(importance, dtype=torch.float32).to(acc_device)
        if tuple(importance.shape) != tuple(patch):
            raise MedSegError(f"importance map of shape {tuple(importance.shape)} does not "
                              f"match the window {patch}")
    axes_list = _mirror_axes(tta or uncertainty == "tta")
    pz, py, px = patch
    # the heap is trimmed after every batch of large windows, every few batches of small
    # ones (their temporaries are a few MB; a trim costs about 2 ms)
    trim_every = max(1, TRIM_VOXELS // max(1, pz * py * px * batch_size))

    def make_batch(chunk):
        batch = torch.stack([t[:, z:z + pz, y:y + py, x:x + px] for z, y, x in chunk])
        return batch.contiguous(memory_format=torch.channels_last_3d) if cl else batch

    done = 0
    # the layout change happens outside inference mode: the weights stay trainable
    with _cpu_fast_path(predictor, device, amp_dtype) as cl, torch.inference_mode(), \
            _autocast(device, amp_dtype), contextlib.ExitStack() as stack:
        head, first = None, None
        cands = _head_candidates(predictor, n_classes) \
            if split_head and uncertainty != "tta" else []
        if cands:
            head, feats, logits = _probe_head(
                predictor, make_batch(windows[:batch_size]).to(device), cands)
            if head is not None and not tta:  # the probe already ran the first batch
                first = feats
            del feats, logits
            if head is not None:
                stack.enter_context(head.removed())
                log.info("blending %d features before the 1x1x1 head instead of %d logits",
                         head.in_channels, n_classes)
        n_out = head.in_channels if head is not None else n_classes
        stitch = _CellStitcher(n_classes, shape, patch, starts, acc_device, importance,
                               want_prob, uncertainty, low_precision=amp_dtype is not None,
                               head=head, sink=sink)
        for b in range(0, total, batch_size):
            check_cancel(cancel)
            chunk = windows[b:b + batch_size]
            if first is not None:
                logits, spread, first = first, None, None
            else:
                logits, spread = _run_predictor(predictor, make_batch(chunk).to(device), n_out,
                                                axes_list, uncertainty == "tta")
            logits = logits.to(acc_device)
            spread = None if spread is None else spread.to(acc_device)
            for i, start in enumerate(chunk):
                stitch.add(logits[i], start, None if spread is None else spread[i])
            del logits, spread
            if (b // batch_size) % trim_every == 0:
                _release_free_memory()
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        stitch.finish()
    return stitch, total


def sliding_window_inference(x, predictor, patch_size, n_classes, overlap=0.5, batch_size=None,
                             tta=False, device="auto", amp="auto", uncertainty=None,
                             return_probability=False, progress=None, cancel=None,
                             split_head=True, starts_fn=None, importance=None, cell_sink=None,
                             output_device=None):
    """Segment a volume window by window, blending windows with Gaussian weights.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        ``(C, Z, Y, X)`` preprocessed input (``float32``; see
        :func:`napari_medseg.core.preprocess.preprocess`).
    predictor : callable
        Maps a torch tensor ``(B, C, pz, py, px)`` to logits ``(B, K, pz, py, px)``
        (a ``torch.nn.Module`` in eval mode, a TorchScript module, any function).
    patch_size : tuple of 3 int
        Window size ``(pz, py, px)`` in voxels; axes of ``x`` smaller than this are
        padded with zeros for the run and cropped after.
    n_classes : int
        ``K``, the number of output channels (1 for a sigmoid model).
    overlap : float
        Fraction of a window shared with its neighbour along each axis, in [0, 1).
    batch_size : int, optional
        Windows per predictor call. None: one window on the CPU (a second window
        doubles the network's activations and buys little speed there), two on
        a GPU.
    tta : bool
        Mirror test-time augmentation: average the logits of all eight flips.
    device : str or torch.device
        Where the windows run: ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``...
    amp : str
        Mixed precision: ``"auto"`` (see :func:`resolve_amp`), ``"bf16"``, ``"fp16"``
        or ``"off"`` (fp32).
    uncertainty : {None, "entropy", "tta"}
        Also return an uncertainty map; ``"tta"`` implies ``tta=True``.
    return_probability : bool
        Also return the foreground probability.
    progress : callable, optional
        ``progress(windows_done, windows_total)`` after each batch.
    cancel : callable, optional
        Returns True to stop; checked between batches.
    split_head : bool
        When the predictor is a ``torch.nn.Module`` whose output comes straight
        from a 1x1x1 convolution with fewer inputs than classes (checked on the
        first window), blend that convolution's input features and apply it per
        finished cell: the same logits, with memory independent of the classes.
    starts_fn : callable, optional
        ``starts_fn(size, window, overlap) -> list of int``: window start indices
        along one axis of the (padded) volume; :func:`window_starts` by default
        (nnU-Net places its windows with its own rule).
    importance : array_like, optional
        ``(pz, py, px)`` blending weights (positive) instead of
        :func:`gaussian_importance_map`.
    cell_sink : callable, optional
        ``cell_sink(region, logits)``: receives each finished piece of the
        blended logits instead of the engine taking its argmax: ``region`` is
        three slices of the grid of ``x`` and ``logits`` a float32 ``(K, dz, dy,
        dx)`` tensor (the weighted mean of the windows' logits). Pieces arrive
        once each, roughly in Z order; the returned labels are then all 0. For
        callers that resample the logits before the argmax (nnU-Net's export).
    output_device : str or torch.device, optional
        Where the cells accumulate (default: the run's device). ``"cpu"`` keeps
        a GPU run's output in host memory (the memory planner's choice when GPU
        memory is short).

    Returns
    -------
    InferenceResult
        Labels ``(Z, Y, X)`` on the grid of ``x`` and the optional maps.

    Raises
    ------
    MedSegError
        On a bad input shape, NaNs, bad options or a model output of the wrong shape.
    Cancelled
        When ``cancel()`` returned True; nothing is kept.

    Examples
    --------
    >>> import numpy as np, torch
    >>> x = np.zeros((1, 9, 10, 11), np.float32); x[0, 3:6, 4:7, 5:8] = 1
    >>> net = lambda b: torch.cat([1 - b, b], dim=1)   # 2 "classes"
    >>> res = sliding_window_inference(x, net, (4, 4, 4), 2, device="cpu", amp="off")
    >>> int(res.labels.sum()), res.labels.dtype
    (27, dtype('uint8'))
    """
    t0 = time.perf_counter()
    if uncertainty not in (None, "entropy", "tta"):
        raise MedSegError(f"unknown uncertainty {uncertainty!r}; use None, 'entropy' or 'tta'")
    if not 0 <= float(overlap) < 1:
        raise MedSegError(f"overlap must be in [0, 1), got {overlap}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise MedSegError(f"patch size {patch_size} must be three positive integers")
    n_classes = int(n_classes)
    if n_classes < 1 or n_classes > 65535:
        raise MedSegError(f"n_classes must be between 1 and 65535, got {n_classes}")
    dev = pick_device(device)
    amp_dtype = resolve_amp(amp, dev)
    t = _as_tensor(x)
    t, crop = _pad_to_patch(t, patch)
    if batch_size is None:
        batch_size = 1 if dev.type == "cpu" else 2
    batch_size = max(int(batch_size), 1)
    per_window = n_classes * math.prod(patch) * 4 * (2 if tta or uncertainty == "tta" else 1)
    batch_size = min(batch_size, max(1, OUTPUT_BUDGET_BYTES // per_window))
    sink = None
    if cell_sink is not None:
        if uncertainty is not None or return_probability:
            raise MedSegError("cell_sink cannot be combined with uncertainty or probability maps")

        def sink(region, logits):  # padded grid -> grid of x
            out, sub = [], [slice(None)]
            for r, c in zip(region, crop):
                lo, hi = max(r.start, c.start), min(r.stop, c.stop)
                if hi <= lo:
                    return
                out.append(slice(lo - c.start, hi - c.start))
                sub.append(slice(lo - r.start, hi - r.start))
            cell_sink(tuple(out), logits[tuple(sub)])
    args = dict(predictor=predictor, patch=patch, n_classes=n_classes, overlap=float(overlap),
                tta=bool(tta), device=dev, amp_dtype=amp_dtype, uncertainty=uncertainty,
                want_prob=bool(return_probability), progress=progress, cancel=cancel,
                split_head=bool(split_head), starts_fn=starts_fn, importance=importance,
                sink=sink)
    try:
        acc_device = dev if output_device is None else torch.device(output_device)
        stitch, n = _run(t, batch_size=batch_size, acc_device=acc_device, **args)
    except Exception as exc:  # out of memory: one window at a time, output on the CPU
        if not is_out_of_memory(exc):
            raise
        if batch_size == 1 and dev.type == "cpu":
            raise out_of_memory_error(exc) from None
        log.warning("out of memory with %d windows per batch on %s; retrying with 1 window "
                    "and the output on the CPU", batch_size, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        batch_size = 1
        if hasattr(cell_sink, "reset"):  # the pieces it already had are sent again
            cell_sink.reset()
        stitch, n = _run(t, batch_size=1, acc_device=torch.device("cpu"), **args)
    labels = np.ascontiguousarray(stitch.labels[crop])
    prob = None if stitch.prob is None else np.ascontiguousarray(stitch.prob[crop])
    unc = None if stitch.unc is None else np.ascontiguousarray(stitch.unc[crop])
    seconds = time.perf_counter() - t0
    log.info("sliding window: %d windows of %s on %s (amp %s) in %.1f s", n, patch, dev,
             _amp_name(amp_dtype), seconds)
    return InferenceResult(labels=labels, probability=prob, uncertainty=unc, seconds=seconds,
                           n_windows=n, device=str(dev), amp=_amp_name(amp_dtype),
                           batch_size=batch_size)
