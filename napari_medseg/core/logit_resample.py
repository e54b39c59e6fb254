"""Resample blended logits to another grid and take the argmax, slab by slab.

A model that runs on a coarser (or finer) grid than its input gives the best
labels on the input's voxels when its class scores, not its labels, are
interpolated there and the argmax taken afterwards: nnU-Net does so with its
softmax, which needs the whole ``(K, Z, Y, X)`` array in memory.
:class:`LogitResampler` does it with linear interpolation of the logits, fed
piece by piece by :func:`~napari_medseg.core.inference.sliding_window_inference`
(its ``cell_sink``), so memory stays a few slices of ``K`` logits whatever the
volume. The built-in pipeline (:meth:`napari_medseg.models.Model.predict`) and
the native nnU-Net pipeline both use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .inference import class_argmax

__all__ = ["LogitResampler", "SLAB_BUDGET_BYTES"]

#: One slab of resampled logits stays below this (float32 bytes); the resampling
#: holds about four such arrays at once (both source rows and the result per axis).
SLAB_BUDGET_BYTES = 16 << 20


# ------------------------------------------------------------------ resampling
def _axis_map(n_in: int, n_out: int, mode: str):
    """Source indices and weights along one axis: ``out[o] = (1-w) x[i0] + w x[i1]``.

    ``linear`` follows scikit-image's ``resize`` (``order=1``, ``mode="edge"``:
    scipy's ``zoom`` with ``grid_mode=True``); ``nearest`` follows nnU-Net's
    separate-axis step (``map_coordinates(order=0, mode="nearest")`` at
    ``in / out * (o + 0.5) - 0.5``).
    """
    o = np.arange(n_out, dtype=np.float64)
    c = float(n_in) / n_out * (o + 0.5) - 0.5
    if n_in == n_out:
        idx = np.arange(n_in)
        return idx, idx, np.zeros(n_out)
    if mode == "nearest":
        from scipy.ndimage import map_coordinates

        idx = map_coordinates(np.arange(n_in, dtype=np.float64), [c], order=0,
                              mode="nearest").astype(np.int64)
        return idx, idx, np.zeros(n_out)
    lo = np.floor(c)
    w = c - lo
    i0 = np.clip(lo, 0, n_in - 1).astype(np.int64)
    i1 = np.clip(lo + 1, 0, n_in - 1).astype(np.int64)
    return i0, i1, w


def _interp(t: torch.Tensor, dim: int, amap) -> torch.Tensor:
    i0, i1, w = amap
    if t.shape[dim] == len(i0) and np.array_equal(i0, np.arange(len(i0))) and not w.any():
        return t
    a = t.index_select(dim, torch.from_numpy(i0))
    if not w.any():
        return a
    b = t.index_select(dim, torch.from_numpy(i1))
    shape = [1] * t.ndim
    shape[dim] = len(w)
    wt = torch.from_numpy(w.astype(np.float32)).view(shape)
    return torch.lerp(a, b, wt)


class LogitResampler:
    """Resample blended logits to the cropped input grid and take the argmax, slab by slab.

    The engine hands finished pieces of the logits (:meth:`__call__`, its
    ``cell_sink``); complete slices along axis 0 are kept until every output
    slice that needs them is done, so memory is a few slices of ``K`` logits.

    Parameters
    ----------
    n_classes : int
    in_shape, out_shape : tuple of 3 int
        The network grid and the cropped input grid.
    modes : sequence of 3 str
        ``"linear"`` or ``"nearest"`` per axis.
    keep_logits : bool
        Also keep the resampled ``(K, *out_shape)`` logits (small volumes, tests).
    entropy : bool
        Also compute the normalised entropy of the softmax on the output grid.
    store_dtype : torch.dtype
        How the received slices are kept until used: float32, or float16 for
        mixed-precision runs, whose blended logits come from float16 sums and
        bf16 outputs already (half the memory; the resampling itself runs in
        float32 either way).
    """

    def __init__(self, n_classes, in_shape, out_shape, modes, keep_logits=False,
                 entropy=False, store_dtype=torch.float32):
        self.store_dtype = store_dtype
        self.k = int(n_classes)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        self.maps = [_axis_map(i, o, m) for i, o, m in zip(self.in_shape, self.out_shape, modes)]
        self.keep_logits = keep_logits
        self.want_entropy = entropy
        per_slice = self.k * max(self.in_shape[1], self.out_shape[1]) \
            * max(self.in_shape[2], self.out_shape[2]) * 4
        self.slab = max(1, SLAB_BUDGET_BYTES // max(per_slice, 1))
        i0, i1, w = self.maps[0]
        self.needed = np.zeros(self.in_shape[0], dtype=bool)
        self.needed[i0] = True
        self.needed[i1[w > 0]] = True
        self.reset()

    def reset(self):
        """Forget everything received (before a run starts again)."""
        z, y, x = self.out_shape
        self.labels = np.zeros(self.out_shape, dtype=np.uint8 if self.k <= 255 else np.uint16)
        self.logits = np.zeros((self.k, z, y, x), np.float32) if self.keep_logits else None
        self.entropy = np.zeros(self.out_shape, np.float16) if self.want_entropy else None
        self.slices = {}
        self.filled = np.zeros(self.in_shape[0], dtype=np.int64)
        self.next_out = 0
        self.peak_slices = 0

    def __call__(self, region, logits):
        zs, ys, xs = region
        plane = self.in_shape[1] * self.in_shape[2]
        for i, z in enumerate(range(zs.start, zs.stop)):
            self.filled[z] += (ys.stop - ys.start) * (xs.stop - xs.start)
            if not self.needed[z]:  # no output slice samples it
                continue
            buf = self.slices.get(z)
            if buf is None:
                buf = self.slices[z] = torch.empty((self.k,) + self.in_shape[1:],
                                                   dtype=self.store_dtype)
                self.peak_slices = max(self.peak_slices, len(self.slices))
            buf[:, ys, xs] = logits[:, i].to("cpu", self.store_dtype)
            if self.filled[z] > plane:  # pragma: no cover - internal consistency
                raise RuntimeError("logit resampling: a slice was received twice")
        self._emit()

    def _ready(self, o):
        i0, i1 = self.maps[0][0][o], self.maps[0][1][o]
        return self.filled[i0] == self.in_shape[1] * self.in_shape[2] and \
            self.filled[i1] == self.in_shape[1] * self.in_shape[2]

    def _emit(self):
        n_out = self.out_shape[0]
        while self.next_out < n_out and self._ready(self.next_out):
            stop = self.next_out
            while stop < n_out and stop - self.next_out < self.slab and self._ready(stop):
                stop += 1
            self._compute(self.next_out, stop)
            self.next_out = stop
            # later output slices need input slices from i0[stop] on (i0 <= i1, both rising)
            keep_from = int(self.maps[0][0][stop]) if stop < n_out else self.in_shape[0]
            for z in [z for z in self.slices if z < keep_from]:
                del self.slices[z]

    def _compute(self, start, stop):
        i0, i1, w = (a[start:stop] for a in self.maps[0])
        # axis 0: each output slice straight from its one or two input slices
        v = torch.empty((self.k, stop - start) + self.in_shape[1:], dtype=torch.float32)
        for j in range(stop - start):
            a = self.slices[int(i0[j])].float()
            if w[j] > 0:
                torch.lerp(a, self.slices[int(i1[j])].float(), float(np.float32(w[j])),
                           out=v[:, j])
            else:
                v[:, j] = a
        v = _interp(v, 2, self.maps[1])
        # axis 2 on the transposed view: torch gathers whole rows much faster than
        # single values along the last axis (the same numbers, about 2x less time);
        # vt is (K, n, Xo, Yo), contiguous
        vt = _interp(v.transpose(2, 3), 2, self.maps[2])
        del v
        out = slice(start, stop)
        self.labels[out] = class_argmax(vt).transpose(1, 2).numpy()
        if self.logits is not None:
            self.logits[:, out] = vt.transpose(2, 3).numpy()
        if self.entropy is not None:
            p = torch.softmax(vt, 0)
            ent = -(p * torch.log(p.clamp_min(1e-12))).sum(0) / math.log(max(self.k, 2))
            self.entropy[out] = ent.clamp(0, 1).transpose(1, 2).numpy().astype(np.float16)

    def finish(self):
        """Check every output slice was made; return the labels ``(Z, Y, X)``."""
        if self.next_out != self.out_shape[0]:  # pragma: no cover - internal consistency
            raise RuntimeError("logit resampling: some output slices were never completed")
        return self.labels
