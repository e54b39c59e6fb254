"""Segment volumes bigger than memory: read what is needed, write labels chunk by chunk.

:func:`predict_to_zarr` runs a model on a lazy volume (an OME-Zarr / Zarr store,
a large TIFF, a memory-mapped NIfTI: any :class:`~napari_medseg.core.volume.Volume`
whose data is a dask array or a memory map) and writes the labels to an
OME-Zarr label store:

1. **streamed preprocessing**: the model grid is made a few slices at a time.
   Each output slice of the model grid needs two input slices (linear
   interpolation), so only those are read, converted to float32, normalised
   and interpolated; the input is never in memory as a whole. Orientation
   flips and axis swaps are applied to the lazy array (views).
2. **windows on the model grid, a slab at a time** with the standard engine
   (:func:`~napari_medseg.core.inference.sliding_window_inference`, cell
   stitching): the float32 model grid is made one slab of window rows at a
   time (about 64 MiB, :func:`~napari_medseg.core.planner.lazy_slab_rows`),
   and each slab keeps the slices that only its windows cover; slabs share
   the window rows at their borders (:func:`slab_plan`), so every slice gets
   exactly the windows of a whole run. The only array of volume size held is
   the labels on the model grid (one byte a voxel, at the model's spacing: a
   1024^3 volume at 0.5 mm is a 205 x 341 x 341 grid at the built-in model's
   2.5 x 1.5 x 1.5 mm, 24 MB).
3. **streamed restore**: the labels go back to the input's voxels (nearest
   neighbour, the orientation undone) one slab of output chunks at a time,
   each slab written to the store, then a multiscale pyramid is added for
   display.

The labels equal those of :meth:`Model.predict` on the volume loaded in memory
(same arithmetic, only in pieces), except for whole-volume post-processing: the
card's ``largest_component`` step needs the whole label map and is skipped with
a warning (run it on a region you load, or on a smaller copy).

A run that does not fit the memory planner's budget even so is refused with
one line (segment a region or use a coarser copy).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import MedSegError, check_cancel

__all__ = ["predict_to_zarr", "preprocess_lazy", "restore_labels_to", "LazyModelGrid",
           "slab_plan"]

log = logging.getLogger(__name__)

_ROWS = 4  # model-grid slices made at a time


def _as_dask(data):
    import dask.array as da

    if isinstance(data, da.Array):
        return data
    chunks = (16,) + tuple(data.shape[1:]) if data.ndim == 3 else \
        (1, 16) + tuple(data.shape[2:])
    return da.from_array(data, chunks=chunks)


def _norm_stats(channel, spec):
    """Whole-volume statistics a normalisation needs (None for per-voxel kinds)."""
    kind = "none" if spec is None else str(spec.get("kind", "none")).lower()
    if kind in ("none", "ct"):
        return spec
    if kind == "zscore":
        a = channel.astype(np.float64)
        mean, std = float(a.mean().compute()), float(a.std().compute())
        return {"kind": "zscore_fixed", "mean": mean, "std": std}
    raise MedSegError(f"the lazy path normalises CT windows, z-scores or nothing; a "
                      f"{kind!r} normalisation needs the whole volume in memory (use a "
                      "region or a smaller copy)")


def _normalize(rows, spec, source):
    from .core.preprocess import normalize_channel

    if spec is not None and spec.get("kind") == "zscore_fixed":
        rows -= spec["mean"]
        rows /= max(spec["std"], 1e-8)
        return rows
    return normalize_channel(rows, spec, source)


class LazyModelGrid:
    """The model grid of a lazy volume, made a few slices at a time on demand.

    The arithmetic of :func:`~napari_medseg.core.preprocess.preprocess` (no
    ``divisible_by``): orientation as views of the lazy array, normalisation,
    linear resampling from the two input slices each model slice needs.

    Attributes
    ----------
    shape : tuple of 3 int
        ``(Z, Y, X)`` of the model grid.
    n_channels : int
    info : PreprocessInfo
        What :func:`restore_labels_to` needs to map labels back.
    """

    def __init__(self, volumes, target_spacing=None, orientation=None, normalization=None):
        from .core.preprocess import _linear_weights, apply_orientation, model_grid

        channels, specs, self.info = model_grid(volumes, target_spacing, orientation,
                                                normalization)
        self.shape = tuple(int(s) for s in self.info.resampled_shape)
        self.n_channels = len(channels)
        self.source = self.info.source
        self._lerp = _linear_weights(self.info.reoriented_shape[0], self.shape[0])
        self._channels = []
        for data, spec in zip(channels, specs):
            a = apply_orientation(_as_dask(data), self.info.perm, self.info.flips)
            self._channels.append((a, _norm_stats(a, spec)))

    def rows(self, z0: int, z1: int, cancel=None) -> np.ndarray:
        """Model-grid slices ``z0..z1-1`` as a float32 ``(C, z1 - z0, Y, X)`` array."""
        from .core.preprocess import _lerp_axis

        i0, i1, w = self._lerp
        _, my, mx = self.shape
        x = np.zeros((self.n_channels, z1 - z0, my, mx), np.float32)
        for c, (a, spec) in enumerate(self._channels):
            for r0 in range(z0, z1, _ROWS):
                check_cancel(cancel)
                r1 = min(r0 + _ROWS, z1)
                need = np.unique(np.concatenate([i0[r0:r1], i1[r0:r1]]))  # two per slice
                rows = np.asarray(a[need]).astype(np.float32)
                if not np.isfinite(rows).all():
                    raise MedSegError("the image contains NaN or infinite values; fill or "
                                      "mask them before running a model", self.source)
                _normalize(rows, spec, self.source)
                lo = rows[np.searchsorted(need, i0[r0:r1])]
                hi = rows[np.searchsorted(need, i1[r0:r1])]
                del rows
                hi -= lo
                hi *= w[r0:r1, None, None]
                lo += hi
                x[c, r0 - z0:r1 - z0] = _lerp_axis(_lerp_axis(lo, 1, my), 2, mx)
        return x


def preprocess_lazy(volumes, target_spacing=None, orientation=None, normalization=None,
                    cancel=None):
    """:func:`~napari_medseg.core.preprocess.preprocess` reading the input a few slices at a time.

    Parameters and returns as for ``preprocess`` (no ``divisible_by``); the whole
    model-grid array ``(C, Z, Y, X)`` float32 is in memory, the input is not
    (:func:`predict_to_zarr` holds only a slab of it: :class:`LazyModelGrid`).
    """
    grid = LazyModelGrid(volumes, target_spacing, orientation, normalization)
    return grid.rows(0, grid.shape[0], cancel=cancel), grid.info


def slab_plan(starts, patch_z: int, size: int, max_rows: int) -> list:
    """Split the windows' z rows into slabs that give the labels of the whole run.

    A model-grid slice is final once every window covering it has run, so each
    slab runs a group of consecutive window rows and keeps the slices that only
    those windows cover; groups share the window rows at their borders.

    Parameters
    ----------
    starts : list of int
        Sorted z starts of the whole run's windows (the last one flush with the end).
    patch_z : int
        Window depth.
    size : int
        ``Z`` of the model grid (at least ``patch_z``).
    max_rows : int
        Slices a slab should not exceed (a slab is at least what progress needs).

    Returns
    -------
    list of (i, j, lo, hi)
        Window rows ``starts[i..j]`` run on slices ``starts[i]..starts[j] + patch_z``;
        slices ``lo..hi-1`` are kept. The ``lo..hi`` ranges tile ``0..size``.
    """
    n = len(starts)
    out, i, lo = [], 0, 0
    while lo < size:
        j = i
        while j + 1 < n and starts[j + 1] + patch_z - starts[i] <= max_rows:
            j += 1
        while j + 1 < n and starts[j + 1] <= lo:  # at least one new slice
            j += 1
        hi = size if j == n - 1 else starts[j + 1]
        out.append((i, j, lo, hi))
        lo = hi
        # the next group: its first window row is the last whose earlier rows all end by lo
        i = max(k for k in range(n) if k == 0 or starts[k - 1] + patch_z <= lo)
    return out


class _FixedZStarts:
    """``starts_fn`` for the engine: the given z starts, the default rule in y and x.

    The engine asks for the axes in the order z, y, x on each run.
    """

    def __init__(self, z_starts):
        self.z_starts, self.calls = list(z_starts), 0

    def __call__(self, size, window, overlap):
        from .core.inference import window_starts

        axis, self.calls = self.calls % 3, self.calls + 1
        return self.z_starts if axis == 0 else window_starts(size, window, overlap)


def _restore_index(info, axis: int, lo: int, hi: int) -> np.ndarray:
    """Model-grid indices of input positions ``lo..hi-1`` along input ``axis``."""
    from .core.preprocess import _nearest_index

    n = list(info.perm).index(axis)  # the reoriented axis that came from this input axis
    idx = np.arange(lo, hi)
    if info.flips[n]:
        idx = info.reoriented_shape[n] - 1 - idx
    m = info.resampled_shape[n]
    return _nearest_index(m, info.reoriented_shape[n])[idx] if m != \
        info.reoriented_shape[n] else idx


def restore_labels_to(labels, info, write, slab: int = 64, cancel=None) -> None:
    """:func:`~napari_medseg.core.preprocess.restore_labels` one input slab at a time.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(Z, Y, X)`` labels on the model grid.
    info : PreprocessInfo
    write : callable
        ``write(region, values)`` with ``region`` three slices of the input grid.
    slab : int
        Input slices per write.
    """
    shape = info.input_shape
    iy = _restore_index(info, 1, 0, shape[1])
    ix = _restore_index(info, 2, 0, shape[2])
    inv = np.argsort(info.perm)
    for z0 in range(0, shape[0], slab):
        check_cancel(cancel)
        z1 = min(z0 + slab, shape[0])
        iz = _restore_index(info, 0, z0, z1)
        per_input = {0: iz, 1: iy, 2: ix}
        # index arrays in reoriented-axis order: reoriented axis n came from input perm[n]
        idx = [per_input[info.perm[n]] for n in range(3)]
        sub = labels[np.ix_(*idx)]
        write((slice(z0, z1), slice(0, shape[1]), slice(0, shape[2])),
              np.ascontiguousarray(sub.transpose(inv)))


def predict_to_zarr(model, volumes, out, device="auto", overlap=None, tta=None, fast=False,
                    progress=None, cancel=None, memory_limit=None, overwrite=False,
                    chunks=(64, 128, 128), slab_rows=None):
    """Segment a (lazy) volume and write the labels to an OME-Zarr label store.

    Parameters
    ----------
    model : Model
        A loaded model (standard pipeline: not an nnU-Net / deepbet folder).
    volumes : Volume or list of Volume
        The model's input channels; data may be dask arrays or memory maps.
    out : str or Path
        The store to write (``*.ome.zarr``); built beside it, renamed at the end.
    device, overlap, tta, fast, progress, cancel :
        As for :meth:`Model.predict`. The labels of the model grid come back by
        nearest neighbour (``Model.predict(restore="labels")``): interpolating the
        class scores would keep ``K`` scores a model-grid voxel instead of one byte.
    memory_limit : int or str, optional
        Cap for the memory planner (see :mod:`napari_medseg.core.planner`).
    overwrite : bool
        Replace an existing store.
    chunks : tuple of 3 int
        Chunk shape of the label store.
    slab_rows : int, optional
        Model-grid slices held as float32 at a time (default
        :func:`~napari_medseg.core.planner.lazy_slab_rows`: about 64 MiB).

    Returns
    -------
    dict
        ``path``, ``shape``, ``seconds``, ``windows``, ``warnings``, ``memory_plan``.

    Raises
    ------
    MedSegError
        When the model grid does not fit in memory, the normalisation needs the
        whole volume, the output exists, or the model runs its own pipeline.
    """
    from .core.inference import pick_device, window_starts
    from .core.planner import lazy_slab_rows
    from .io.zarr import ZarrLabelWriter
    from .models.predictor import Model

    t0 = time.perf_counter()
    if type(model)._predict_array is not Model._predict_array:
        raise MedSegError(f"{model.card.name} runs its own pipeline; the lazy big-volume path "
                          "needs a model on the standard pipeline (use predict on a region)")
    vols = model._check_inputs(volumes)
    ref = vols[0]
    card = model.card
    tta = bool(card.default_tta) if tta is None else bool(tta)
    overlap = card.overlap(overlap)
    if fast:
        overlap, tta = min(float(overlap), 0.25), False
    dev = pick_device(device)
    plan = model.plan_memory(vols, device=dev, tta=tta, memory_limit=memory_limit,
                             lazy_output=True)
    if plan.device is not None:
        dev = pick_device(plan.device)
    if plan.fast:
        overlap, tta = min(float(overlap), 0.25), False
    notes = []
    if (card.postprocessing or {}).get("largest_component"):
        msg = ("largest-component post-processing skipped on the lazy path (it needs the "
               "whole label map); run it on a region you load")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        notes.append(msg)
    grid = LazyModelGrid(vols, target_spacing=card.target_spacing,
                         orientation=card.orientation, normalization=card.normalization)
    run = model.window_runner(dev, tta, None, plan)
    dtype = np.uint8 if card.n_classes <= 256 else np.uint16
    labels = np.zeros(grid.shape, dtype)  # one byte a model-grid voxel
    patch = tuple(int(p) for p in card.patch_size)
    zs = sorted(set(window_starts(max(grid.shape[0], patch[0]), patch[0], overlap)))
    rows = lazy_slab_rows(grid.shape, grid.n_channels, patch) if slab_rows is None \
        else int(slab_rows)
    slabs = [(0, len(zs) - 1, 0, grid.shape[0])] if grid.shape[0] <= max(rows, patch[0]) \
        else slab_plan(zs, patch[0], grid.shape[0], rows)
    n_windows = 0
    per_slab = math.prod(len(window_starts(max(n, p), p, overlap))
                         for n, p in zip(grid.shape[1:], patch[1:]))
    total = sum(j - i + 1 for i, j, _, _ in slabs) * per_slab

    def prog(done, _total, base=0):
        if progress is not None:
            progress(base + done, total)

    for i, j, lo, hi in slabs:  # the float32 model grid one slab of window rows at a time
        check_cancel(cancel)
        whole = len(slabs) == 1
        a, b = (0, grid.shape[0]) if whole else (zs[i], zs[j] + patch[0])
        x = grid.rows(a, b, cancel=cancel)
        res = run(x, overlap, progress=functools.partial(prog, base=n_windows), cancel=cancel,
                  starts_fn=None if whole else _FixedZStarts([z - a for z in zs[i:j + 1]]))
        del x
        labels[lo:hi] = res.labels[lo - a:hi - a]
        n_windows += res.n_windows
        del res
    pinfo = grid.info
    with ZarrLabelWriter(out, ref, dtype, card.label_names, card.label_colors, chunks=chunks,
                         overwrite=overwrite, extra_meta={"model": card.name}) as w:
        restore_labels_to(labels, pinfo, w.write, slab=w.chunks[0], cancel=cancel)
    return {"path": str(Path(out)), "shape": tuple(ref.shape3),
            "seconds": time.perf_counter() - t0, "windows": n_windows, "slabs": len(slabs),
            "model_grid": tuple(int(s) for s in labels.shape), "warnings": notes,
            "memory_plan": plan.to_dict()}



def cmd_predict_zarr(args, progress_bar=None) -> int:
    """``napari-medseg predict IN -m MODEL -o OUT.ome.zarr``: the lazy path, from parsed args."""
    import sys

    from .io import read_volume
    from .models import load_model

    if getattr(args, "uncertainty", None):
        raise MedSegError("uncertainty maps are not written on the lazy .zarr path; "
                          "drop --uncertainty or write a .nii.gz")
    from .models.run import set_model_options

    model = set_model_options(load_model(args.model), backend=getattr(args, "backend", None),
                              roi_subset=getattr(args, "roi_subset", None), name=args.model,
                              precision=getattr(args, "precision", None))
    vols = [read_volume(p, lazy=True) for p in args.input]
    from .models.checks import check_input

    for text in check_input(model.card, vols):  # wrong input: one warning line each
        print(f"warning: {text}", file=sys.stderr)
    bar = progress_bar(f"{model.card.name}") if progress_bar else None
    try:
        info = predict_to_zarr(model, vols, args.output, device=args.device,
                               overlap=args.overlap, tta=args.tta, fast=args.fast,
                               progress=bar, overwrite=args.overwrite)
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {info['path']} ({info['seconds']:.1f} s; model grid "
          f"{' x '.join(map(str, info['model_grid']))}; multiscale labels)", file=sys.stderr)
    return 0
