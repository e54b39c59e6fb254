"""A loaded model and how it turns volumes into labels on the input's grid.

:class:`Model` holds a :class:`~napari_medseg.models.card.ModelCard` and a way
to run windows (:meth:`Model.make_predictor`). :meth:`Model.predict` is the one
entry used by the widgets, the CLI and the tests:

checks (3D, channel count, NaNs) -> optional region crop with a margin ->
:func:`~napari_medseg.core.preprocess.preprocess` (reorient, normalise,
resample as the card says) -> :func:`~napari_medseg.core.inference.sliding_window_inference`
-> :func:`~napari_medseg.core.preprocess.restore_labels` -> paste the region back.

Formats that run their own pipeline (nnU-Net, deepbet) override
:meth:`Model._predict_array`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.policy import check_inputs, keep_largest_components
from ..core.policy import mirror_tta as _mirror_tta
from ..core.volume import Volume
from ..errors import MedSegError, check_cancel
from .card import ModelCard

__all__ = ["Model", "TorchModel", "Prediction", "mirror_tta", "postprocess_labels"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The output of :meth:`Model.predict`.

    Attributes
    ----------
    labels : Volume
        ``(Z, Y, X)`` label Volume (``uint8``/``uint16``) on the input grid (same
        shape and affine), with the card's class names and colours. Voxels
        outside the requested region are 0.
    uncertainty : Volume or None
        ``(Z, Y, X)`` ``float16`` map in [0, 1] on the input grid, when asked for.
    seconds : float
        Wall time of the whole call.
    info : dict
        Run details: device, amp, windows, overlap, tta.
    card : ModelCard or None
        The card of the model that made it.
    """

    labels: Volume
    uncertainty: Volume | None = None
    seconds: float = 0.0
    info: dict | None = None
    card: ModelCard | None = None


def mirror_tta(predictor: Callable, axes) -> Callable:
    """Wrap a predictor so it averages the logits of mirrored inputs.

    Parameters
    ----------
    predictor : callable
        ``(B, C, z, y, x)`` tensor -> ``(B, K, z, y, x)`` logits.
    axes : sequence of int
        Spatial axes (0 = z, 1 = y, 2 = x) allowed for mirroring; every subset
        of them is used (``2 ** len(axes)`` passes).
    """
    dims = [2 + int(a) for a in axes]
    if isinstance(predictor, torch.nn.Module):
        # a module, so the engine's CPU fast path (channels-last, fast norms) reaches the
        # network inside: as a plain function it ran every mirror at the slow defaults
        return _MirrorTTA(predictor, dims)

    def run(x):
        return _mirror_tta(predictor, x, dims).float()

    return run


class _MirrorTTA(torch.nn.Module):
    """``predictor`` averaged over the mirror images of its input (see :func:`mirror_tta`)."""

    def __init__(self, predictor: torch.nn.Module, dims):
        super().__init__()
        self.predictor = predictor
        self.dims = list(dims)

    def forward(self, x):
        return _mirror_tta(self.predictor, x, self.dims).float()


class Model:
    """A model ready to run: its card plus the means to evaluate windows.

    Subclasses implement :meth:`make_predictor`, or override
    :meth:`_predict_array` when the format brings its own pipeline.

    Parameters
    ----------
    card : ModelCard
        What the model expects and outputs.
    source : str
        Where it was loaded from (a name or a path), for messages.
    """

    batch_size = None  # the engine's default: 1 window on the CPU, 2 on a GPU
    amp = "auto"
    #: Whether :attr:`amp` steers this model's run (``--precision``).
    precision_option = False

    def __init__(self, card: ModelCard, source: str = ""):
        self.card = card
        self.source = str(source or card.name)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}({self.card.name!r}, source={self.source!r})"

    # ---------------------------------------------------------------- API
    def make_predictor(self, device: torch.device) -> Callable:
        """Return a callable ``(B, C, *patch) -> (B, K, *patch)`` logits on ``device``."""
        raise NotImplementedError

    def predict(self, volumes, device="auto", overlap=None, tta=None, fast=False, region=None,
                uncertainty=None, progress=None, cancel=None, memory_limit=None,
                crop_to_body=False, restore="scores") -> Prediction:
        """Segment ``volumes`` and return labels on the input's voxel grid.

        Parameters
        ----------
        volumes : Volume or list of Volume
            The model's input channels on one grid, ``(Z, Y, X)`` each (a
            ``(C, Z, Y, X)`` Volume counts as ``C`` channels). Intensities in
            the card's units (HU for CT).
        device : str
            ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        overlap : float, optional
            Window overlap in [0, 1); ``None``: the card's ``default_overlap``
            (0.5 where the card has none).
        tta : bool, optional
            Mirror test-time augmentation (only along the card's ``mirror_axes``);
            ``None``: the card's ``default_tta``.
        fast : bool
            Quick preview: overlap at most 0.25 and no test-time augmentation
            (an uncertainty of ``"tta"`` becomes ``"entropy"``).
        region : tuple of 3 slice, optional
            Only segment this box of the input array ``(Z, Y, X)``; it is run
            with a margin of context around it and labels outside it are 0.
        uncertainty : {None, "entropy", "tta"}
            Also return an uncertainty map.
        crop_to_body : bool
            For a one-channel CT model without a ``region``: run only on the box
            around the body (:func:`~napari_medseg.core.body_region.body_box`, plus
            1 cm), when that leaves out a fifth of the voxels or more; labels
            outside are 0 and ``info["body_crop"]`` holds the box. The command
            line and the Segment widget ask for it.
        restore : {"scores", "labels"}
            How labels come back from a resampled model grid: ``"scores"``
            interpolates the class scores linearly onto the input's voxels and
            takes the argmax there (nnU-Net's way; the default); ``"labels"``
            resamples the model grid's argmax by nearest neighbour, as the lazy
            big-volume path (:func:`~napari_medseg.bigvolume.predict_to_zarr`)
            does. A mirror-disagreement uncertainty (``"tta"``) and one-class
            models always restore labels.
        progress, cancel : callable, optional
            ``progress(done, total)`` windows; ``cancel()`` True stops the run
            (raises :class:`~napari_medseg.errors.Cancelled`, nothing is kept).
        memory_limit : int or str, optional
            Cap on the memory the run may use (bytes or ``"2G"``; default:
            ``NAPARI_MEDSEG_MEMORY_LIMIT`` or what is free). The memory planner
            (:mod:`napari_medseg.core.planner`) checks the run against it first
            and re-plans (one window per batch, output on the CPU, fast mode,
            CPU instead of GPU) or refuses with a MedSegError.

        Returns
        -------
        Prediction

        Raises
        ------
        MedSegError
            2D input, wrong number of channels, NaNs, channels on different
            grids, a bad region, or an unavailable device.
        """
        import time

        t0 = time.perf_counter()
        vols = self._check_inputs(volumes)
        ref = vols[0]
        tta = bool(self.card.default_tta) if tta is None else bool(tta)
        overlap = self.card.overlap(overlap)
        if restore not in ("scores", "labels"):
            raise MedSegError(f"unknown restore {restore!r}; use 'scores' or 'labels'")
        if fast:
            overlap = min(float(overlap), 0.25)
            tta = False
            uncertainty = "entropy" if uncertainty == "tta" else uncertainty
        box = _parse_region(region, ref.shape3, ref.source)
        crop = None if box is None else self._with_margin(box, ref)
        body = None
        if box is None and crop_to_body:  # a CT model need not look at the air around
            body = box = crop = self._body_crop(vols)
        run_vols = vols if crop is None else [_crop_volume(v, crop) for v in vols]
        plan = self.plan_memory(run_vols, device=device, tta=tta, uncertainty=uncertainty,
                                memory_limit=memory_limit)
        if plan.device is not None:
            device = plan.device
        if plan.fast and not fast:
            overlap, tta = min(float(overlap), 0.25), False
            uncertainty = "entropy" if uncertainty == "tta" else uncertainty
        check_cancel(cancel)
        self._plan, self._restore = plan, restore
        try:
            labels, unc, info = self._predict_array(run_vols, device=device, overlap=overlap,
                                                    tta=tta, uncertainty=uncertainty,
                                                    progress=progress, cancel=cancel)
        finally:
            self._plan, self._restore = None, "scores"
        info = dict(info or {}, memory_plan=plan.to_dict())
        labels = postprocess_labels(np.asarray(labels), self.card.postprocessing)
        dtype = np.uint8 if self.card.n_classes <= 256 else np.uint16
        if crop is not None:
            labels, unc = _paste(labels, unc, crop, box, ref.shape3, dtype)
        labels = labels.astype(dtype, copy=False)
        lab_vol = ref.like_labels(labels, self.card.label_names, self.card.label_colors)
        lab_vol.meta["model"] = self.card.name
        unc_vol = None
        if unc is not None:
            unc_vol = ref.with_data(np.asarray(unc, dtype=np.float16), is_label=False,
                                    label_names={}, label_colors={})
            unc_vol.meta["uncertainty"] = uncertainty
        info = dict(info or {}, model=self.card.name, overlap=overlap, tta=bool(tta),
                    region=None if region is None else [(s.start, s.stop) for s in box],
                    body_crop=None if body is None else [(s.start, s.stop) for s in body])
        return Prediction(lab_vol, unc_vol, time.perf_counter() - t0, info, self.card)

    # ----------------------------------------------------------- pipeline
    _plan = None  # the memory plan of the run in progress
    _restore = "scores"  # how the run in progress restores its labels (see predict)

    def plan_memory(self, volumes, device="auto", tta=False, uncertainty=None,
                    memory_limit=None, lazy_output=False):
        """The memory plan for running ``volumes`` (see :mod:`napari_medseg.core.planner`).

        Raises
        ------
        MedSegError
            When the run cannot fit the free memory in any plan.
        """
        from ..core.inference import pick_device
        from ..core.planner import plan_for_model

        return plan_for_model(self, volumes, device=pick_device(device), tta=tta,
                              uncertainty=uncertainty, memory_limit=memory_limit,
                              lazy_output=lazy_output)

    def _check_inputs(self, volumes, names=None) -> list:
        """3D inputs, the card's channel count, one grid (see ``core.policy.check_inputs``)."""
        return check_inputs(volumes, self.card.n_channels, self.card.name,
                            [f"{c['name']} ({c['modality']})" for c in self.card.channels],
                            names=names)

    def _body_crop(self, vols, margin_mm: float = 10.0):
        """The box around the body (plus ``margin_mm``) for a one-channel CT model, or None.

        CT models clip air to the bottom of their window, the value the engine
        pads with, so the air around the body adds windows but nothing the
        network can use; labels outside the box are 0. None when the box would
        leave out less than a fifth of the voxels, or the model is not a CT one.
        """
        from ..core.body_region import body_box

        norm = self.card.normalization[0] if self.card.normalization else {}
        if (norm.get("kind") != "ct" or len(vols) != 1 or vols[0].n_channels != 1
                or float(norm["window"][0]) < -500.0):
            return None
        ref = vols[0]
        box = body_box(ref.data)
        if box is None:
            return None
        out = []
        for sl, n, sp in zip(box, ref.shape3, ref.spacing):
            m = int(math.ceil(margin_mm / max(sp, 1e-6)))
            out.append(slice(max(0, sl.start - m), min(n, sl.stop + m)))
        return tuple(out)

    def _with_margin(self, box, ref: Volume):
        """Grow the region by half a model window (in mm) of context, clipped to the image."""
        spacing_mm = self.card.target_spacing or ref.spacing
        half_mm = 0.5 * max(p * s for p, s in zip(self.card.patch_size, spacing_mm))
        out = []
        for sl, n, sp in zip(box, ref.shape3, ref.spacing):
            m = int(math.ceil(half_mm / max(sp, 1e-6)))
            out.append(slice(max(0, sl.start - m), min(n, sl.stop + m)))
        return tuple(out)

    def _tta_setup(self, tta, uncertainty):
        """Engine TTA flags, or a wrapper when the card forbids some mirror axes."""
        if (tta or uncertainty == "tta") and set(self.card.mirror_axes) != {0, 1, 2}:
            if uncertainty == "tta":
                log.info("%s allows mirroring only along axes %s; using entropy uncertainty",
                         self.card.name, self.card.mirror_axes)
                uncertainty = "entropy"
            return True, False, uncertainty
        return False, bool(tta), uncertainty

    def window_runner(self, device, tta=False, uncertainty=None, plan=None):
        """The engine on the model grid with this model's network, TTA and memory plan.

        Parameters
        ----------
        device : str or torch.device
        tta : bool
            Mirror test-time augmentation (the model's own or the engine's).
        uncertainty : {None, "entropy", "tta"}
        plan : Plan, optional
            The memory plan (windows per batch, output on the CPU).

        Returns
        -------
        callable
            ``run(x, overlap, progress=None, cancel=None, **engine_options)`` on a
            ``(C, Z, Y, X)`` float32 model-grid array, returning the
            :class:`~napari_medseg.core.inference.InferenceResult`; engine options
            are those of :func:`~napari_medseg.core.inference.sliding_window_inference`
            (e.g. ``starts_fn``).
        """
        from ..core.inference import pick_device, sliding_window_inference

        card = self.card
        dev = pick_device(device)
        own_tta, engine_tta, uncertainty = self._tta_setup(tta, uncertainty)
        predictor = self.make_predictor(dev)
        if own_tta:
            predictor = mirror_tta(predictor, card.mirror_axes)

        def run(x, overlap, progress=None, cancel=None, **engine_options):
            with torch.inference_mode():
                return sliding_window_inference(
                    x, predictor, patch_size=card.patch_size, n_classes=card.n_classes,
                    overlap=overlap, batch_size=_plan_batch(plan, self.batch_size),
                    tta=engine_tta, device=dev, amp=self.amp, uncertainty=uncertainty,
                    progress=progress, cancel=cancel,
                    output_device="cpu" if plan is not None and plan.output_on_cpu else None,
                    **engine_options)
        return run

    def _predict_array(self, vols, device, overlap, tta, uncertainty, progress, cancel):
        """Run the standard pipeline; return ``(labels, uncertainty or None, info)``."""
        from ..core.preprocess import preprocess, restore_labels, restore_map

        card = self.card
        x, pinfo = preprocess(vols, target_spacing=card.target_spacing,
                              orientation=card.orientation, normalization=card.normalization)
        sink = None
        if pinfo.resampled and card.n_classes > 1 and uncertainty in (None, "entropy") \
                and self._restore == "scores":
            sink = _LogitRestorer(card.n_classes, pinfo, entropy=uncertainty == "entropy")
            run = self.window_runner(device, tta, None, self._plan)  # entropy: the sink's
            res = run(x, overlap, progress=progress, cancel=cancel, cell_sink=sink)
        else:
            run = self.window_runner(device, tta, uncertainty, self._plan)
            res = run(x, overlap, progress=progress, cancel=cancel)
        del x
        if sink is not None:  # class scores interpolated onto the input grid, then argmax
            labels, unc = sink.finish()
        else:
            labels = restore_labels(res.labels, pinfo)
            unc = None if res.uncertainty is None else restore_map(res.uncertainty, pinfo)
        info = {"device": res.device, "amp": res.amp, "windows": res.n_windows,
                "inference_seconds": res.seconds,
                "restore": "linear logits" if sink is not None else "nearest labels"}
        return labels, unc, info


class _LogitRestorer:
    """``cell_sink`` of the standard pipeline: the blended logits of the model grid,
    linearly interpolated onto the (reoriented) input grid and argmax-ed there slab
    by slab (:class:`~napari_medseg.core.logit_resample.LogitResampler`), as
    nnU-Net resamples its class probabilities, instead of resampling the argmax
    labels by nearest neighbour: boundaries fall between the model's voxels, where
    the scores cross, not on its coarser grid. The padding of the model grid is
    dropped on the way in; :meth:`finish` undoes the reorientation.
    """

    def __init__(self, n_classes: int, pinfo, entropy: bool = False):
        from ..core.logit_resample import LogitResampler

        self.pinfo = pinfo
        self.lo = [int(a) for a, _ in pinfo.pad]
        self.shape = tuple(int(s) for s in pinfo.resampled_shape)
        self.resampler = LogitResampler(n_classes, self.shape, pinfo.reoriented_shape,
                                        ["linear"] * 3, entropy=entropy)

    def reset(self):
        self.resampler.reset()

    def __call__(self, region, logits):
        out, sub = [], [slice(None)]
        for r, lo, n in zip(region, self.lo, self.shape):
            a, b = max(r.start - lo, 0), min(r.stop - lo, n)
            if b <= a:
                return  # all padding
            out.append(slice(a, b))
            sub.append(slice(a + lo - r.start, b + lo - r.start))
        self.resampler(tuple(out), logits[tuple(sub)])

    def finish(self):
        """``(labels, entropy or None)`` on the input's voxels."""
        from ..core.preprocess import undo_orientation

        info = self.pinfo
        labels = undo_orientation(self.resampler.finish(), info.perm, info.flips)
        ent = self.resampler.entropy
        if ent is not None:
            ent = undo_orientation(ent, info.perm, info.flips)
        return labels, ent


class TorchModel(Model):
    """A model backed by a ``torch.nn.Module`` (state_dict network or TorchScript).

    Parameters
    ----------
    card : ModelCard
    network : torch.nn.Module
        Maps ``(B, C, *patch)`` to ``(B, K, *patch)`` logits.
    source : str
    axis_order : {"zyx", "xyz"}
        Axis order the network was trained with. MONAI bundles read with
        nibabel work in ``(x, y, z)``; the predictor transposes around them.
    """

    precision_option = True

    def __init__(self, card: ModelCard, network: torch.nn.Module, source: str = "",
                 axis_order: str = "zyx"):
        super().__init__(card, source)
        from ..core.convs import onednn_convolutions

        self.network = onednn_convolutions(network.eval())
        self.axis_order = axis_order

    def make_predictor(self, device):
        return _ZyxNetwork(self.network.to(device), self.axis_order)


class _ZyxNetwork(torch.nn.Module):
    """The network as a ``(B, C, Z, Y, X) -> (B, K, Z, Y, X)`` module.

    Transposes around networks trained in ``(x, y, z)`` order and keeps only the
    full-resolution output of deep-supervision networks. A module rather than a
    closure, so the inference engine can change its memory layout and find a
    1x1x1 output convolution to apply after blending.
    """

    def __init__(self, network: torch.nn.Module, axis_order: str = "zyx"):
        super().__init__()
        self.network = network
        self.xyz = axis_order == "xyz"

    def forward(self, x):
        if self.xyz:
            x = x.permute(0, 1, 4, 3, 2)
        y = self.network(x)
        y = y[0] if isinstance(y, (list, tuple)) else y
        return y.permute(0, 1, 4, 3, 2) if self.xyz else y


def _plan_batch(plan, default):
    """Windows per batch: the memory plan's choice, else the model's default."""
    return plan.batch_size if plan is not None and plan.batch_size else default


# ------------------------------------------------------------ postprocessing
def postprocess_labels(labels: np.ndarray, steps: dict) -> np.ndarray:
    """Apply a card's ``postprocessing`` to a ``(Z, Y, X)`` label array (in place).

    ``largest_component``: for each listed class keep the largest 26-connected
    piece; smaller pieces become background.
    """
    return keep_largest_components(labels, (steps or {}).get("largest_component"))


# ------------------------------------------------------------------ regions
def _parse_region(region, shape, source):
    if region is None:
        return None
    try:
        box = tuple(region)
    except TypeError:
        box = ()
    if len(box) != 3 or not all(isinstance(s, slice) for s in box):
        raise MedSegError("region must be three slices (z, y, x) of the image array", source)
    out = []
    for s, n in zip(box, shape):
        start, stop, step = s.indices(n)
        if step != 1 or stop <= start:
            raise MedSegError(f"region {region} is empty or strided inside an image of shape "
                              f"{shape}; draw a box inside the image", source)
        out.append(slice(start, stop))
    return tuple(out)


def _crop_volume(v: Volume, crop) -> Volume:
    """The sub-volume ``crop`` (3 slices) with its affine shifted to match."""
    data = v.data[(Ellipsis,) + tuple(crop)]
    aff = v.affine.copy()
    start_ijk = np.array([crop[2].start, crop[1].start, crop[0].start], dtype=float)
    aff[:3, 3] = v.affine[:3, :3] @ start_ijk + v.affine[:3, 3]
    return v.with_data(data, affine=aff)


def _paste(labels, unc, crop, box, shape, dtype):
    """Put the region ``box`` of crop-grid outputs into full-size arrays."""
    inner = tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, crop))
    full = np.zeros(shape, dtype=dtype)
    full[box] = labels[inner]
    full_unc = None
    if unc is not None:
        full_unc = np.zeros(shape, dtype=np.float16)
        full_unc[box] = np.asarray(unc)[inner]
    return full, full_unc
