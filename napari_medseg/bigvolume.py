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
2. **windows on the model grid** with the standard engine
   (:func:`~napari_medseg.core.inference.sliding_window_inference`, cell
   stitching), so the model grid (float32) and its labels (one byte a voxel)
   are the only arrays of volume size held, at the model's spacing: a
   1024^3 volume at 0.5 mm is a 205 x 341 x 341 grid at the built-in model's
   2.5 x 1.5 x 1.5 mm (95 MB).
3. **streamed restore**: the labels go back to the input's voxels (nearest
   neighbour, the orientation undone) one slab of output chunks at a time,
   each slab written to the store, then a multiscale pyramid is added for
   display.

The labels equal those of :meth:`Model.predict` on the volume loaded in memory
(same arithmetic, only in pieces), except for whole-volume post-processing: the
card's ``largest_component`` step needs the whole label map and is skipped with
a warning (run it on a region you load, or on a smaller copy).

A run whose model grid itself does not fit the memory planner's budget is
refused with one line (segment a region or use a coarser copy).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import MedSegError, check_cancel

__all__ = ["predict_to_zarr", "preprocess_lazy", "restore_labels_to"]

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


def preprocess_lazy(volumes, target_spacing=None, orientation=None, normalization=None,
                    cancel=None):
    """:func:`~napari_medseg.core.preprocess.preprocess` reading the input a few slices at a time.

    Parameters and returns as for ``preprocess`` (no ``divisible_by``); the
    model-grid array ``(C, Z, Y, X)`` float32 is in memory, the input is not.
    """
    from .core.preprocess import (PreprocessInfo, _linear_weights, _lerp_axis,
                                  _reoriented_affine, _resampled_affine, _stack_channels,
                                  _target_shape, apply_orientation, orientation_transform)

    channels, ref = _stack_channels(volumes)
    specs = normalization if isinstance(normalization, (list, tuple)) else [normalization]
    if len(specs) == 1:
        specs = list(specs) * len(channels)
    if len(specs) != len(channels):
        raise MedSegError(f"the model normalises {len(specs)} channel(s) but {len(channels)} "
                          "were given; pass one image per model input channel", ref.source)
    perm, flips = orientation_transform(ref.affine, orientation)
    shape = ref.shape3
    r_shape = tuple(shape[p] for p in perm)
    r_spacing = tuple(ref.spacing[p] for p in perm)
    r_affine = _reoriented_affine(ref.affine, shape, perm, flips)
    m_shape, m_spacing = _target_shape(r_shape, r_spacing, target_spacing)
    x = np.zeros((len(channels),) + tuple(m_shape), np.float32)
    i0, i1, w = _linear_weights(r_shape[0], m_shape[0])
    for c, (data, spec) in enumerate(zip(channels, specs)):
        a = apply_orientation(_as_dask(data), perm, flips)
        spec = _norm_stats(a, spec)
        for z0 in range(0, m_shape[0], _ROWS):
            check_cancel(cancel)
            z1 = min(z0 + _ROWS, m_shape[0])
            need = np.unique(np.concatenate([i0[z0:z1], i1[z0:z1]]))  # two per output slice
            rows = np.asarray(a[need]).astype(np.float32)
            if not np.isfinite(rows).all():
                raise MedSegError("the image contains NaN or infinite values; fill or mask "
                                  "them before running a model", ref.source)
            _normalize(rows, spec, ref.source)
            lo = rows[np.searchsorted(need, i0[z0:z1])]
            hi = rows[np.searchsorted(need, i1[z0:z1])]
            del rows
            hi -= lo
            hi *= w[z0:z1, None, None]
            lo += hi
            x[c, z0:z1] = _lerp_axis(_lerp_axis(lo, 1, m_shape[1]), 2, m_shape[2])
    info = PreprocessInfo(
        input_shape=tuple(shape), input_affine=ref.affine.copy(), perm=tuple(perm),
        flips=tuple(flips), reoriented_shape=r_shape, reoriented_spacing=r_spacing,
        reoriented_affine=r_affine, resampled_shape=tuple(m_shape), target_spacing=m_spacing,
        pad=((0, 0), (0, 0), (0, 0)), model_affine=_resampled_affine(r_affine, r_shape,
                                                                       m_shape),
        source=ref.source)
    return x, info


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


def predict_to_zarr(model, volumes, out, device="auto", overlap=0.5, tta=False, fast=False,
                    progress=None, cancel=None, memory_limit=None, overwrite=False,
                    chunks=(64, 128, 128)):
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
        As for :meth:`Model.predict`.
    memory_limit : int or str, optional
        Cap for the memory planner (see :mod:`napari_medseg.core.planner`).
    overwrite : bool
        Replace an existing store.
    chunks : tuple of 3 int
        Chunk shape of the label store.

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
    import torch

    from .core.inference import pick_device, sliding_window_inference
    from .io.zarr import ZarrLabelWriter
    from .models.predictor import Model

    t0 = time.perf_counter()
    if type(model)._predict_array is not Model._predict_array:
        raise MedSegError(f"{model.card.name} runs its own pipeline; the lazy big-volume path "
                          "needs a model on the standard pipeline (use predict on a region)")
    vols = model._check_inputs(volumes)
    ref = vols[0]
    card = model.card
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
    x, pinfo = preprocess_lazy(vols, target_spacing=card.target_spacing,
                               orientation=card.orientation,
                               normalization=card.normalization, cancel=cancel)
    own_tta, engine_tta, _ = model._tta_setup(tta, None)
    predictor = model.make_predictor(dev)
    if own_tta:
        from .models.predictor import mirror_tta

        predictor = mirror_tta(predictor, card.mirror_axes)
    with torch.inference_mode():
        res = sliding_window_inference(
            x, predictor, patch_size=card.patch_size, n_classes=card.n_classes,
            overlap=overlap, batch_size=plan.batch_size or model.batch_size, tta=engine_tta,
            device=dev, amp=model.amp, progress=progress, cancel=cancel,
            output_device="cpu" if plan.output_on_cpu else None)
    del x
    dtype = np.uint8 if card.n_classes <= 256 else np.uint16
    labels = res.labels.astype(dtype, copy=False)
    with ZarrLabelWriter(out, ref, dtype, card.label_names, card.label_colors, chunks=chunks,
                         overwrite=overwrite, extra_meta={"model": card.name}) as w:
        restore_labels_to(labels, pinfo, w.write, slab=w.chunks[0], cancel=cancel)
    return {"path": str(Path(out)), "shape": tuple(ref.shape3),
            "seconds": time.perf_counter() - t0, "windows": res.n_windows,
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
                              roi_subset=getattr(args, "roi_subset", None), name=args.model)
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
