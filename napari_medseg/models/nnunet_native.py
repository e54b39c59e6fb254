"""nnU-Net v2 result folders run through the plugin's own inference engine.

The pipeline is nnU-Net's, step by step, so the labels are the ones
``nnUNetPredictor`` gives (see ``tests/test_nnunet_native.py``):

1. **Preprocessing** as nnU-Net's ``DefaultPreprocessor.run_case_npy`` does it,
   with the same numbers and less memory (:func:`preprocess_case`; other
   preprocessor classes are run as they are): transpose by ``transpose_forward``,
   crop to the non-zero bounding box, the normalisation the plans name (CT:
   clip to the fingerprint's 0.5 / 99.5 percentiles, then its mean / std from
   ``foreground_intensity_properties_per_channel``), resampling to the plans'
   spacing with its order and its anisotropy rule (a low-resolution axis more
   than 3x coarser is resampled on its own, nearest neighbour).
2. **Sliding window** in :func:`~napari_medseg.core.inference.sliding_window_inference`
   with nnU-Net's window positions (:func:`nnunet_window_starts`, step
   ``1 - overlap``, 0.5 by default) and its Gaussian (:func:`nnunet_gaussian`:
   sigma = window / 8, computed as nnU-Net does, float16-rounded), zero padding
   of axes smaller than the window, mirror TTA over the axes the checkpoint
   allows (none for ``NoMirroring`` trainers), folds averaged per window.
   The engine stitches cell by cell, with its bf16 / channels-last CPU paths,
   progress and cancel; nnU-Net instead holds ``classes x volume`` float16
   logits.
3. **Export** as nnU-Net does it (``convert_predicted_logits_to_segmentation_with_correct_shape``):
   the logits are resampled to the cropped input grid (linear in-plane, the
   anisotropic axis nearest neighbour, as ``resample_data_or_seg_to_shape``
   with order 1 / order_z 0), then argmax, put back into the crop box and
   transposed back. :class:`LogitResampler` does this slab by slab as the
   engine finishes cells, so no ``classes x volume`` array is ever held; when
   no resampling is needed the engine's own per-cell argmax is used directly.

Plans whose probability resampling is not nnU-Net's default order-1 function,
and region-based (sigmoid) models, fall back to nnU-Net's own export of a whole
logit array (correct, without the memory bound).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..core.logit_resample import LogitResampler

__all__ = ["nnunet_window_starts", "nnunet_gaussian", "LogitResampler", "NativeResult",
           "EnsembleNetwork", "Network2D", "LeanUNet", "preprocess_case", "run_native"]

log = logging.getLogger(__name__)



# ------------------------------------------------------------------ windows
def nnunet_window_starts(size: int, window: int, overlap: float) -> list[int]:
    """nnU-Net's window start indices along one axis (``compute_steps_for_sliding_window``).

    The step is at most ``window * (1 - overlap)``; the windows are spread
    evenly so the last one ends flush with the volume (rounded half to even).

    Examples
    --------
    >>> nnunet_window_starts(110, 64, 0.5)
    [0, 23, 46]
    >>> nnunet_window_starts(40, 64, 0.5)
    [0]
    """
    step = 1.0 - float(overlap)
    if size <= window:
        return [0]
    n = int(np.ceil((size - window) / (window * step))) + 1
    actual = (size - window) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


@functools.lru_cache(maxsize=8)
def _gaussian(patch: tuple) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1.0
    g = gaussian_filter(tmp, [p / 8.0 for p in patch], 0, mode="constant", cval=0.0)
    g = torch.from_numpy(g / (g.max() / 10.0)).to(torch.float16)
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    return g.float().numpy()


def nnunet_gaussian(patch) -> torch.Tensor:
    """nnU-Net's blending weights for a window (``compute_gaussian``), as float32.

    A unit impulse at ``patch // 2`` filtered with sigma = patch / 8 (scipy,
    zero outside), scaled to a peak of 10, rounded to float16 as nnU-Net
    stores it, zeros replaced by the smallest non-zero weight.

    Parameters
    ----------
    patch : sequence of int
        Window size (2 or 3 axes).
    """
    return torch.from_numpy(_gaussian(tuple(int(p) for p in patch)).copy())


# ------------------------------------------------------------------ networks
class EnsembleNetwork(torch.nn.Module):
    """The mean of several networks' logits (nnU-Net's fold ensemble, per window).

    nnU-Net averages whole-volume logits of each fold; blending is linear, so
    averaging each window's logits first gives the same result.
    """

    def __init__(self, networks):
        super().__init__()
        self.members = torch.nn.ModuleList(networks)

    def forward(self, x):
        out = None
        for net in self.members:
            y = net(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            out = y.float() if out is None else out + y
        return out / len(self.members)


class Network2D(torch.nn.Module):
    """A 2D nnU-Net network as a ``(B, C, 1, Y, X) -> (B, K, 1, Y, X)`` module."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        y = self.network(x[:, :, 0])
        y = y[0] if isinstance(y, (list, tuple)) else y
        return y[:, :, None]


class LeanUNet(torch.nn.Module):
    """A ``PlainConvUNet`` run so that each skip and concatenation is let go once used.

    ``dynamic_network_architectures``' decoder keeps every encoder output until
    the whole forward pass ends, and each concatenation alive through all the
    convolutions of its stage. Here the same modules run in the same order on
    the same tensors (the same numbers), but a skip is dropped once concatenated
    and the concatenation once the stage's first block has used it: at the
    full-resolution stage that is one block's input and output instead of two
    skips, a concatenation and both blocks' tensors (64 x 128 x 128 windows with
    16 features: about 60 MB less). Use :meth:`fits` first.

    In CPU bf16 runs (``split_concat="auto"``) each decoder stage's first
    convolution skips the concatenation: its weight is split by input channels
    and the two halves convolve the upsampled tensor and the skip, the second
    added into the first's output by oneDNN (:func:`_concat_conv`). PyTorch's
    channels-last concatenation is slow (30 ms of a 0.47 s 64 x 128 x 128
    window) and the two narrower convolutions together are faster than the
    wide one (full-resolution stage: 120 -> 89 ms with the concatenation).
    The sums are the same up to rounding (one more bf16 rounding of half the
    sum); fp32 runs keep the stock order of operations and their exact numbers.

    Parameters
    ----------
    network : PlainConvUNet
    split_concat : {"auto", True, False}
        Split the concatenating convolutions: ``"auto"`` when the decoder's
        tensors are bf16 on the CPU, ``True`` always (tests), ``False`` never.
    """

    def __init__(self, network, split_concat="auto"):
        super().__init__()
        self.network = network
        self.split_concat = split_concat

    def _splits(self, up: torch.Tensor) -> bool:
        if self.split_concat == "auto":
            return up.device.type == "cpu" and up.dtype == torch.bfloat16
        return bool(self.split_concat)

    @staticmethod
    def fits(network) -> bool:
        """Whether ``network`` is a plain U-Net this forward reproduces exactly."""
        try:
            from dynamic_network_architectures.architectures.unet import PlainConvUNet
            from dynamic_network_architectures.building_blocks.plain_conv_encoder import \
                PlainConvEncoder
            from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
        except ImportError:  # pragma: no cover - an nnunetv2 dependency
            return False
        enc, dec = getattr(network, "encoder", None), getattr(network, "decoder", None)
        return (type(network) is PlainConvUNet and type(enc) is PlainConvEncoder
                and type(dec) is UNetDecoder and bool(enc.return_skips)
                and not dec.deep_supervision)

    def forward(self, x):
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import \
            StackedConvBlocks

        enc, dec = self.network.encoder, self.network.decoder
        skips = []
        for stage in enc.stages:
            x = stage(x)
            skips.append(x)
        del x
        lres = skips.pop()
        for s, stage in enumerate(dec.stages):
            up = dec.transpconvs[s](lres)
            del lres
            if type(stage) is StackedConvBlocks:  # its forward is self.convs(x)
                blocks = list(stage.convs)
                if self._splits(up) and _concat_conv_splits(blocks[0]):
                    x = _concat_conv(blocks[0], up, skips.pop())  # no concatenation
                else:
                    x = blocks[0](torch.cat((up, skips.pop()), 1))  # freed once used
                del up
                for blk in blocks[1:]:
                    x = blk(x)
            else:  # pragma: no cover - other stage types
                x = stage(torch.cat((up, skips.pop()), 1))
                del up
            lres = x
            del x
        return dec.seg_layers[-1](lres)


def _concat_conv_splits(block) -> bool:
    """Whether :func:`_concat_conv` can run ``block`` (a conv, norm, nonlin block)."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import \
        ConvDropoutNormReLU

    from ..core.convs import plain_conv

    conv = getattr(block, "conv", None)
    return (type(block) is ConvDropoutNormReLU and plain_conv(conv)
            and block.all_modules[0] is conv and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


#: Per dtype, whether oneDNN's in-place "convolve and add" op gives ``out + conv(x)``
#: here (checked once against the unfused sum; missing: not tried yet).
_FUSED_ADD: dict = {}


def _conv_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv) -> torch.Tensor:
    """``out + conv(x, weight)`` (no bias), written into ``out``; one oneDNN call where it can.

    The fused op is the one ``torch.compile``'s CPU backend uses for a
    convolution followed by an add (``torch.ops.mkldnn._convolution_pointwise_``);
    the first call checks it against the plain sum and falls back for good if
    it is missing or disagrees.
    """
    w = weight.to(x.dtype).contiguous()
    fn = torch.nn.functional.conv3d if x.ndim == 5 else torch.nn.functional.conv2d

    def plain():
        return fn(x, w, None, conv.stride, conv.padding, conv.dilation)

    def fused(o):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            o, x, w, None, list(conv.padding), list(conv.stride), list(conv.dilation), 1,
            "add", None, None, [], None)

    ok = _FUSED_ADD.get(x.dtype)
    usable = (ok is not False and x.device.type == "cpu" and out.dtype == x.dtype
              and x.dtype in (torch.float32, torch.bfloat16) and x.ndim == 5
              and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_convolution_pointwise_"))
    if usable and ok:
        return fused(out)
    if usable:  # first use: compare with the plain sum once
        ref = out + plain()
        try:
            got = fused(out.clone())
            err = (got.float() - ref.float()).abs().max()
            ok = bool(err <= 0.02 * ref.float().abs().max() + 1e-6)
        except (RuntimeError, NotImplementedError):
            ok = False
        _FUSED_ADD[x.dtype] = ok
        if not ok:
            log.info("oneDNN's fused convolution + add is not usable for %s; adding separately",
                     x.dtype)
        out.copy_(got if ok else ref)
        return out
    return out.add_(plain())


def _concat_conv(block, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``block(torch.cat((up, skip), 1))`` without the concatenation.

    The convolution's weight is split by input channels: ``conv(cat(a, b), W) =
    conv(a, W_a) + conv(b, W_b)``, the second added in place into the first's
    output, then the block's other modules (dropout, norm, nonlinearity) run as
    they are. See :class:`LeanUNet`.
    """
    conv = block.conv
    c = up.shape[1]
    w = conv.weight
    f = torch.nn.functional.conv3d if up.ndim == 5 else torch.nn.functional.conv2d
    y = f(up, w[:, :c], conv.bias, conv.stride, conv.padding, conv.dilation)
    y = _conv_add_(y, skip.to(y.dtype), w[:, c:], conv)
    del skip
    for m in list(block.all_modules)[1:]:
        y = m(y)
    return y


class _FullResolution(torch.nn.Module):
    """Only the full-resolution output of a network (deep supervision lists)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        y = self.network(x)
        return y[0] if isinstance(y, (list, tuple)) else y


# ------------------------------------------------------------------ preprocessing
def _resize_data(a: np.ndarray, new_shape, order: int) -> np.ndarray:
    """nnU-Net's resize of one image channel, as float32, without its float64 copies.

    nnU-Net calls ``skimage.transform.resize(a.astype(float), new_shape, order,
    mode="edge", anti_aliasing=False)`` (``scipy.ndimage.zoom`` with
    ``grid_mode=True``, mode ``"nearest"``, then the output clipped to the input's
    range) and stores the float64 result in a float32 array. scipy converts each
    value to float64 exactly and computes in float64 whatever the array types, and
    rounding to float32 commutes with clipping to float32 bounds, so zooming the
    float32 channel straight into a float32 output and clipping it gives the same
    numbers without the float64 copy of the input, its float64 padding and the
    float64 output (0.2 GiB less at 200 x 256 x 256).
    """
    from scipy import ndimage

    factors = np.divide(a.shape, new_shape)
    out = ndimage.zoom(a, [1 / f for f in factors], order=order, mode="nearest",
                       grid_mode=True, output=np.float32)
    np.clip(out, np.min(a), np.max(a), out=out)
    return out


def _lean_resampling(cm, current_spacing, new_spacing):
    """Whether :func:`_resize_data` reproduces the plans' data resampling here."""
    from nnunetv2.preprocessing.resampling.default_resampling import \
        determine_do_sep_z_and_axis

    cfg = cm.configuration
    kw = dict(cfg.get("resampling_fn_data_kwargs") or {})
    if cfg.get("resampling_fn_data") != "resample_data_or_seg_to_shape" or kw.get("is_seg") \
            or set(kw) - {"is_seg", "order", "order_z", "force_separate_z",
                          "separate_z_anisotropy_threshold"}:
        return None
    sep, _ = determine_do_sep_z_and_axis(kw.get("force_separate_z", False), current_spacing,
                                         new_spacing, kw.get("separate_z_anisotropy_threshold", 3))
    return None if sep else int(kw.get("order", 3))


def preprocess_case(pm, cm, dataset_json, x: np.ndarray, spacing):
    """nnU-Net's ``DefaultPreprocessor.run_case_npy`` for an image without labels, leaner.

    The same steps and the same numbers (see ``tests/test_nnunet_native.py``):
    float32 copy, ``transpose_forward``, crop to the non-zero box, the plans'
    normalisation, resampling to the plans' spacing. The differences are in what
    is left out or kept smaller: the label map that ``run_case_npy`` also
    resamples (empty at inference, and dropped by ``nnUNetPredictor``) is not
    resampled, and the image is resampled by :func:`_resize_data` where the plans
    name nnU-Net's default resampling without a separate z axis (other cases call
    the plans' own function). Plans naming another preprocessor class run it.

    Returns
    -------
    (numpy.ndarray, dict)
        ``(C, z, y, x)`` float32 network input and nnU-Net's properties dict.
    """
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    pre = cm.preprocessor_class(verbose=False)
    props = {"spacing": [float(s) for s in spacing]}
    if type(pre) is not DefaultPreprocessor:
        data, _, props = pre.run_case_npy(np.asarray(x), None, props, pm, cm, dataset_json)
        return data, props
    data = np.asarray(x).astype(np.float32)
    data = data.transpose([0, *[i + 1 for i in pm.transpose_forward]])
    original_spacing = [props["spacing"][i] for i in pm.transpose_forward]
    props["shape_before_cropping"] = data.shape[1:]
    data, seg, bbox = crop_to_nonzero(data, None)
    props["bbox_used_for_cropping"] = bbox
    props["shape_after_cropping_and_before_resampling"] = data.shape[1:]
    target = cm.spacing
    if len(target) < len(data.shape[1:]):
        target = [original_spacing[0]] + list(target)
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target)
    data = pre._normalize(data, seg, cm, pm.foreground_intensity_properties_per_channel)
    del seg
    order = _lean_resampling(cm, original_spacing, target)
    if order is None:
        data = cm.resampling_fn_data(data, new_shape, original_spacing, target)
    elif np.any(np.array(data.shape[1:]) != np.array(new_shape)):
        out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
        for c in range(data.shape[0]):
            out[c] = _resize_data(data[c], new_shape, order)
        data = out
    return data, props


# ------------------------------------------------------------------ pipeline
@dataclass
class NativeResult:
    """What :func:`run_native` returns.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(Z, Y, X)`` labels on the input grid.
    uncertainty : numpy.ndarray or None
        ``(Z, Y, X)`` float16 normalised entropy, when asked for.
    info : dict
        Run details (device, amp, windows, shapes, seconds per step).
    logits : numpy.ndarray or None
        ``(K, z, y, x)`` resampled logits in nnU-Net's cropped and transposed
        frame (``keep_logits=True`` only).
    bbox : list or None
        nnU-Net's crop box in the transposed frame.
    """

    labels: np.ndarray
    uncertainty: np.ndarray | None
    info: dict
    logits: np.ndarray | None = None
    bbox: list | None = None


def _probability_resampling(cm):
    """``(modes or None, kwargs)``: streamable axis modes of the plans' probability resampling."""
    cfg = cm.configuration
    name = str(cfg.get("resampling_fn_probabilities", "resample_data_or_seg_to_shape"))
    kw = dict(cfg.get("resampling_fn_probabilities_kwargs") or {})
    if name != "resample_data_or_seg_to_shape" or kw.get("is_seg") or \
            int(kw.get("order", 1)) != 1 or int(kw.get("order_z", 0)) not in (0, 1):
        return None, kw
    return kw, kw


def run_native(model, x: np.ndarray, spacing, device="cpu", overlap=0.5, tta=False, amp="auto",
               uncertainty=None, progress=None, cancel=None, keep_logits=False) -> NativeResult:
    """Run an nnU-Net result folder on one case in the plugin's engine.

    Parameters
    ----------
    model : napari_medseg.models.nnunet.NnunetModel
        The loaded folder (plans, dataset json, networks).
    x : numpy.ndarray
        ``(C, Z, Y, X)`` input in nnU-Net's axis order (SimpleITK's: ``z, y, x``).
    spacing : sequence of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    device, amp : str
        As :func:`~napari_medseg.core.inference.sliding_window_inference`.
    overlap : float
        ``1 - tile_step_size``; 0.5 is nnU-Net's default.
    tta : bool
        Mirror over the axes the checkpoint allows.
    uncertainty : {None, "entropy"}
        Normalised entropy of the class probabilities on the input grid.
    progress, cancel : callable, optional
    keep_logits : bool
        Also return the resampled logits (for comparisons on small volumes).

    Returns
    -------
    NativeResult
    """
    import time

    from nnunetv2.preprocessing.resampling.default_resampling import \
        determine_do_sep_z_and_axis

    from ..core.inference import pick_device, resolve_amp, sliding_window_inference

    t0 = time.perf_counter()
    pm, cm = model.plans_manager, model.configuration_manager
    data, props = preprocess_case(pm, cm, model.dataset_json, x, spacing)
    t_pre = time.perf_counter() - t0
    data = np.ascontiguousarray(data, dtype=np.float32)
    is_2d = len(cm.patch_size) == 2
    patch = (1, *cm.patch_size) if is_2d else tuple(cm.patch_size)
    net_shape = data.shape[1:]
    out_shape = tuple(int(s) for s in props["shape_after_cropping_and_before_resampling"])
    k = model.n_outputs
    spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
    current = list(cm.spacing) if len(cm.spacing) == 3 else [spacing_t[0], *cm.spacing]

    dev = pick_device(device)
    kw, all_kw = _probability_resampling(cm)
    resample_needed = tuple(net_shape) != out_shape
    resampler = None
    whole = None
    if resample_needed or keep_logits:
        if kw is not None and not model.has_regions:
            sep, axis = determine_do_sep_z_and_axis(
                kw.get("force_separate_z"), current, spacing_t,
                kw.get("separate_z_anisotropy_threshold", 3))
            modes = ["linear"] * 3
            if sep and int(kw.get("order_z", 0)) == 0:
                modes[int(axis)] = "nearest"
            resampler = LogitResampler(k, net_shape, out_shape, modes, keep_logits=keep_logits,
                                       entropy=uncertainty is not None,
                                       store_dtype=torch.float32 if resolve_amp(amp, dev) is None
                                       else torch.float16)
        else:  # nnU-Net's own export of the whole array (no memory bound)
            whole = LogitResampler(k, net_shape, net_shape, ["linear"] * 3, keep_logits=True)
    net = model.native_network(dev)
    axes = model.mirror_axes_nn if tta else None
    engine_tta = False
    if axes:
        axes = tuple(int(a) + (1 if is_2d else 0) for a in axes)
        if set(axes) == {0, 1, 2}:
            engine_tta = True
        else:
            from .predictor import mirror_tta

            net = mirror_tta(net, axes)
    sink = resampler or whole
    with torch.inference_mode():
        res = sliding_window_inference(
            data, net, patch_size=patch, n_classes=k, overlap=overlap, batch_size=model.batch_size,
            tta=engine_tta, device=dev, amp=amp,
            uncertainty=None if sink is not None else uncertainty,
            progress=progress, cancel=cancel,
            starts_fn=nnunet_window_starts, importance=nnunet_gaussian(patch),
            cell_sink=sink)
    del data
    unc = None
    logits = None
    if resampler is not None:
        seg = resampler.finish()
        unc = resampler.entropy
        logits = resampler.logits
    elif whole is not None:
        whole.finish()
        from nnunetv2.inference.export_prediction import \
            convert_predicted_logits_to_segmentation_with_correct_shape as _export

        lab = _export(torch.from_numpy(whole.logits), pm, cm, model.label_manager, props)
        return NativeResult(np.asarray(lab), None, {
            "device": res.device, "amp": res.amp, "windows": res.n_windows,
            "inference_seconds": res.seconds, "preprocess_seconds": t_pre,
            "export": "nnunetv2"}, None, props["bbox_used_for_cropping"])
    else:
        seg = res.labels
        unc = res.uncertainty
    full = np.zeros(tuple(props["shape_before_cropping"]), dtype=seg.dtype)
    box = tuple(slice(int(a), int(b)) for a, b in props["bbox_used_for_cropping"])
    full[box] = seg
    full = full.transpose(pm.transpose_backward)
    if unc is not None:
        u = np.zeros(tuple(props["shape_before_cropping"]), np.float16)
        u[box] = unc
        unc = u.transpose(pm.transpose_backward)
    info = {"device": res.device, "amp": res.amp, "windows": res.n_windows,
            "inference_seconds": res.seconds, "preprocess_seconds": t_pre,
            "network_shape": list(net_shape), "export": "streamed" if resampler else "direct",
            "seconds": time.perf_counter() - t0}
    if resampler is not None:
        info["export_peak_slices"] = resampler.peak_slices
    return NativeResult(np.ascontiguousarray(full), unc, info, logits,
                        props["bbox_used_for_cropping"])
