"""A learned interactive model: a small 3D network from image, prompts and last mask to a mask.

The network sees six channels on a region around the prompts, resampled onto
a grid of a fixed voxel budget (:mod:`.click_roi`): the image twice (centred
on the object's intensity and scaled by the region's spread, so CT, MR and PET
look alike, and mapped by the region's percentiles, which keeps the order of
tissues), one map each for positive and negative clicks (Gaussian blobs), the
mask of the previous update (so each later click refines the last answer
instead of starting over) and the boxes. It returns mask logits on the grid,
which are interpolated back onto the image's voxels.

A 3D update looks at the box around the prompts and the previous mask (a
64 mm cube around a first click; a box's own extent, as deep as it is wide
for a box drawn on one slice) and grows it while the mask reaches its border;
a 2D update looks at a slab of :data:`~.click_roi.SLAB_2D` slices around the
slice. A positive click that a 3D refinement leaves outside its mask is
segmented again on its own, as a first click, and added.

The network never saw a real label in training: it learned from
domain-randomised synthetic volumes (:mod:`napari_medseg.training.synth`:
random shapes in random tissue maps with random intensities, textures,
resolution, blur, bias and noise, a third of them in CT Hounsfield ranges),
from the randomised CT and MR phantoms and, in its last phase, from
pseudo-objects made from the images alone of a few openly licensed real
scans (:mod:`napari_medseg.training.pseudo_objects`), with boxes and clicks
simulated RITM style (later clicks at the centre of its own largest error). The
training commands are in :mod:`napari_medseg.training.train_click_model` and
docs/models.md. Three sets of weights ship in the package (``click_model.pt``,
``click_model_inside.pt`` and ``click_model_wide.pt``: plain state dicts read
with ``weights_only=True``, tagged with :data:`ARCH`); the default engine
averages the logits of the last two (:data:`SHIPPED`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from ..errors import MedSegError, check_cancel
from . import click_roi as roi
from .base import Engine, Prompts, Region, scribble_clicks
from .edges import WEIGHT as EDGE_WEIGHT
from .edges import refine_edges

log = logging.getLogger(__name__)

__all__ = ["ClickNet", "ClickModelEngine", "click_channels", "load_click_net", "WEIGHTS",
           "SHIPPED", "CLICK_SIGMA", "ARCH", "FIRST_SIZES"]

#: The width-16 weights of training phase 8 (see docs/models.md), the start of phase 10.
WEIGHTS = Path(__file__).with_name("click_model.pt")
#: The default engine averages the logits of these weights: phase 10 (phase 8
#: trained on with first-click cubes inside the object) and a width-24 network
#: trained in one run of 23,000 examples (docs/models.md, "Width 24").
SHIPPED = (Path(__file__).with_name("click_model_inside.pt"),
           Path(__file__).with_name("click_model_wide.pt"))
#: Standard deviation (grid voxels) of the Gaussian blob drawn for each click.
CLICK_SIGMA = 2.0
#: Architecture tag stored in the weights; other tags are refused.
ARCH = "clicknet-v3"
#: Input channels: image around the object's intensity, image by the crop's
#: percentiles, positive clicks, negative clicks, previous mask, box.
IN_CHANNELS = 6
#: Sizes of the cube a first click is seen in, as multiples of the engine's
#: ``first_roi_mm`` (the network is trained on all three).
FIRST_SIZES = (1, 2, 4)


class _InstanceNorm(nn.InstanceNorm3d):
    """Instance norm computed in float32 under mixed precision.

    In bf16 the variance of a small feature map can round below zero and the
    normalisation turn into NaN; the statistics of a few hundred voxels cost
    nothing in float32.
    """

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def _conv(cin, cout, stride=1, norm=True, dilation=1):
    pad = dilation
    if not norm:  # the half-resolution level: normalising it would cost most of the time
        return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=pad,
                                       dilation=dilation),
                             nn.LeakyReLU(0.01, inplace=True))
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=pad, dilation=dilation, bias=False),
        _InstanceNorm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


class ClickNet(nn.Module):
    """A small 3D U-Net: ``(B, 6, Z, Y, X)`` -> ``(B, 1, Z, Y, X)`` logits.

    A strided first convolution brings the grid to half resolution, where a
    three-level U-Net runs (its deepest level adds dilated convolutions, so a
    64^3 grid is seen whole); its features are interpolated back to the grid
    and combined voxel by voxel with the input channels (so thin structures
    keep the grid's resolution). Every side must be a multiple of 8. About
    0.5 M parameters at ``width=16``.
    """

    def __init__(self, width: int = 16, in_channels: int = IN_CHANNELS):
        super().__init__()
        w = width
        self.width = width
        self.stem = _conv(in_channels, w, stride=2, norm=False)
        self.enc1 = _conv(w, w, norm=False)
        self.enc2 = nn.Sequential(_conv(w, 2 * w), _conv(2 * w, 2 * w))
        self.enc3 = nn.Sequential(_conv(2 * w, 4 * w), _conv(4 * w, 4 * w, dilation=2),
                                  _conv(4 * w, 4 * w, dilation=4))
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _conv(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.dec1 = _conv(2 * w, w, norm=False)
        self.head = nn.Sequential(nn.Conv3d(w + in_channels, 16, 1), nn.LeakyReLU(0.01, True),
                                  nn.Conv3d(16, 1, 1))

    def forward(self, x):
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(nn.functional.max_pool3d(e1, 2))
        e3 = self.enc3(nn.functional.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        f = nn.functional.interpolate(d1, size=x.shape[2:], mode="trilinear",
                                      align_corners=False)
        return self.head(torch.cat([f, x.to(f.dtype)], 1))


def _click_map(points, shape, sigma=CLICK_SIGMA) -> np.ndarray:
    """Max of Gaussian blobs (peak 1) at ``points`` (array indices in ``shape``)."""
    out = np.zeros(shape, np.float32)
    r = int(np.ceil(3 * sigma))
    for p in np.asarray(points, float).reshape(-1, 3):
        c = np.round(p).astype(int)
        sl = tuple(slice(max(ci - r, 0), min(ci + r + 1, n)) for ci, n in zip(c, shape))
        if any(s.stop <= s.start for s in sl):
            continue
        grids = np.ogrid[sl]
        g = np.exp(-sum((gr - pi) ** 2 for gr, pi in zip(grids, p)) / (2 * sigma ** 2))
        out[sl] = np.maximum(out[sl], g.astype(np.float32))
    return out


def box_map(boxes, shape) -> np.ndarray:
    """1 inside each box ``(2, 3)`` of grid indices (inclusive corners), else 0.

    A box flat along an axis (a 2D box drawn on one slice) covers the one grid
    slice nearest to it.
    """
    out = np.zeros(shape, np.float32)
    hi_idx = np.array(shape) - 1
    for b in np.asarray(boxes, float).reshape(-1, 2, 3):
        lo = np.clip(np.round(b.min(0)).astype(int), 0, hi_idx)
        hi = np.clip(np.round(b.max(0)).astype(int), lo, hi_idx)
        out[tuple(slice(a, c + 1) for a, c in zip(lo, hi))] = 1.0
    return out


def _object_intensity(crop, positive, boxes) -> float:
    """The intensity the object is expected to have: under the first click, else the box's core."""
    shape = np.array(crop.shape)
    if len(positive):
        p0 = np.clip(np.round(positive[0]).astype(int), 0, shape - 1)
        sl = tuple(slice(max(c - 1, 0), c + 2) for c in p0)
        return float(np.median(crop[sl]))
    b = np.asarray(boxes, float).reshape(-1, 2, 3)[0]
    lo, hi = b.min(0), b.max(0)
    c, h = (lo + hi) / 2, np.maximum((hi - lo) / 4, 0.5)
    a = np.clip(np.round(c - h).astype(int), 0, shape - 1)
    z = np.clip(np.round(c + h).astype(int), a, shape - 1)
    return float(np.median(crop[tuple(slice(i, j + 1) for i, j in zip(a, z))]))


def click_channels(crop: np.ndarray, positive, negative, previous=None,
                   boxes=None) -> np.ndarray:
    """The network input ``(6, Z, Y, X)`` float32 for a grid crop and its prompts.

    Parameters
    ----------
    crop : (Z, Y, X) array
        Image region on the network's grid (any units).
    positive, negative : (N, 3) array
        Clicks in the crop's array indices.
    previous : (Z, Y, X) array, optional
        The previous mask on the same grid (values in [0, 1]); zeros if None.
    boxes : (M, 2, 3) array, optional
        Boxes (inclusive corners) in the crop's array indices. At least one
        positive click or one box is needed.

    Notes
    -----
    Channel 0 is the image centred on the object's intensity (under the first
    positive click, else the median of the box's core) and scaled by the
    crop's robust spread, so CT, MR and PET look alike to the network;
    channel 1 is the image mapped by the crop's 0.5 and 99.5 percentiles to
    [0, 1], which keeps the absolute order of tissues.
    """
    crop = np.asarray(crop, np.float32)
    positive = np.asarray(positive, float).reshape(-1, 3)
    boxes = np.zeros((0, 2, 3)) if boxes is None else np.asarray(boxes, float).reshape(-1, 2, 3)
    if not len(positive) and not len(boxes):
        raise ValueError("click_channels needs a positive click or a box")
    centre = _object_intensity(crop, positive, boxes)
    sub = crop[::2, ::2, ::2]
    p_lo, q25, q75, p_hi = np.percentile(sub, [0.5, 25, 75, 99.5])
    spread = max(float(p_hi - p_lo), 1e-6)
    scale = max(float(q75 - q25) / 1.35, 1e-3 * spread, 1e-6)
    img = np.clip((crop - centre) / scale, -5.0, 5.0)
    rank = np.clip((crop - p_lo) / spread, 0.0, 1.0)
    prev = (np.zeros(crop.shape, np.float32) if previous is None
            else np.asarray(previous, np.float32))
    return np.stack([img, rank, _click_map(positive, crop.shape),
                     _click_map(negative, crop.shape), prev,
                     box_map(boxes, crop.shape)]).astype(np.float32)


def keep_clicked(mask: np.ndarray, positive, negative) -> np.ndarray:
    """The connected parts of ``mask`` under a positive click, negative clicks cleared."""
    mask = np.asarray(mask, bool)
    hi = np.array(mask.shape) - 1
    pos = np.clip(np.round(np.asarray(positive).reshape(-1, mask.ndim)), 0, hi).astype(int)
    lab, n = ndi.label(mask)
    if n:
        ids = np.unique(lab[tuple(pos.T)])
        ids = ids[ids > 0]
        if len(ids):
            mask = np.isin(lab, ids)
    for p in np.round(np.asarray(negative).reshape(-1, mask.ndim)).astype(int):
        if np.all(p >= 0) and np.all(p <= hi):
            mask[tuple(p)] = False
    return mask


def load_click_net(path=WEIGHTS) -> ClickNet:
    """Load the shipped (or a given) click network on the CPU, in eval mode.

    Raises
    ------
    MedSegError
        When the file is missing or holds another architecture's weights.
    """
    path = Path(path)
    if not path.is_file():
        raise MedSegError(f"click model weights not found at {path}; train them with "
                          "`python -m napari_medseg.training.train_click_model`", str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    arch = state.pop("_arch", None)
    arch = bytes(arch.tolist()).decode("ascii", "replace") if arch is not None else "v1"
    if arch != ARCH or not isinstance(state, dict):
        raise MedSegError(f"{path} holds click model weights of format {arch!r}, but this "
                          f"version reads {ARCH!r}; retrain them with `python -m "
                          "napari_medseg.training.train_click_model`", str(path))
    width = int(state.pop("_width").item())
    net = ClickNet(width)
    net.load_state_dict(state)
    net.eval()
    from ..core.convs import onednn_convolutions

    return onednn_convolutions(net)


def state_for_saving(net: ClickNet) -> dict:
    """A plain tensor state dict of ``net`` with its architecture tag and width."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["_width"] = torch.tensor(net.width)
    state["_arch"] = torch.tensor(list(ARCH.encode("ascii")), dtype=torch.uint8)
    return state


def _paste(src: np.ndarray, src_lo, lo, hi) -> np.ndarray:
    """Float array of shape ``hi - lo`` holding the part of ``src`` (at ``src_lo``) inside."""
    out = np.zeros(tuple(np.asarray(hi) - np.asarray(lo)), np.float32)
    a = np.maximum(np.asarray(src_lo), lo)
    b = np.minimum(np.asarray(src_lo) + np.asarray(src.shape), hi)
    if np.all(b > a):
        out[tuple(slice(i - j, k - j) for i, k, j in zip(a, b, lo))] = \
            src[tuple(slice(i - j, k - j) for i, k, j in zip(a, b, src_lo))]
    return out


def _mask_corners(mask: np.ndarray, start) -> np.ndarray:
    """The two corners (array indices) of the bounding box of ``mask`` placed at ``start``."""
    idx = np.argwhere(mask)
    if not len(idx):
        return np.zeros((0, mask.ndim))
    return np.stack([idx.min(0), idx.max(0)]) + np.asarray(start)


def _box_points(boxes, spacing) -> np.ndarray:
    """Corners of the region a box implies, ``(2M, 3)`` array indices.

    A 2D box (flat along an axis) says nothing about the object's depth: the
    region reaches half the box's mean in-plane size (mm) to either side of
    its slice, and grows later if the mask reaches that far.
    """
    sp = np.asarray(spacing, float)
    out = []
    for b in np.asarray(boxes, float).reshape(-1, 2, 3):
        lo, hi = b.min(0), b.max(0)
        ext_mm = (hi - lo + 1) * sp
        flat = (hi - lo) < 0.5
        if flat.any() and (~flat).any():
            depth = 0.5 * float(ext_mm[~flat].mean())
            lo = np.where(flat, lo - depth / sp, lo)
            hi = np.where(flat, hi + depth / sp, hi)
        out += [lo, hi]
    return np.array(out).reshape(-1, 3)


def _anchors(positive, boxes) -> np.ndarray:
    """Where the object surely is: the positive clicks, else the boxes' centres."""
    if len(positive):
        return np.asarray(positive, float).reshape(-1, 3)
    b = np.asarray(boxes, float).reshape(-1, 2, 3)
    return b.mean(1)


def _with_paint(mask, region, prompts) -> tuple[np.ndarray, Region]:
    """``mask`` on ``region`` with the object paint (1) of ``prompts`` added and
    the background paint (2) removed (on the prompts' slice in 2D mode); the
    region grows to take in object paint outside it."""
    part, start = prompts.paint_view()
    obj = np.argwhere(part == 1) + start
    lo = np.array([s.start for s in region])
    hi = np.array([s.stop for s in region])
    if len(obj):
        lo2, hi2 = np.minimum(lo, obj.min(0)), np.maximum(hi, obj.max(0) + 1)
        if np.any(lo2 < lo) or np.any(hi2 > hi):
            mask = _paste(mask, lo, lo2, hi2) > 0.5
            lo, hi = lo2, hi2
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    here = np.asarray(prompts.scribbles)[region]
    return (np.asarray(mask, bool) | (here == 1)) & (here != 2), region


class ClickModelEngine(Engine):
    """The learned click model behind the engine interface.

    Takes positive and negative clicks, boxes (a 2D box on one slice or a
    3D box) and scribbles, in 2D and 3D mode; a box or an object scribble
    alone is enough to start. The network was trained on clicks and boxes, so
    each painted stroke stands for a few clicks along it
    (:func:`~.base.scribble_clicks`), given one at a time as corrections where
    the last answer has them wrong; the painted voxels themselves are always
    in (object paint) or out (background paint) of the answer.

    Parameters
    ----------
    weights : path or sequence of paths, optional
        State dicts saved by the training script; several are an ensemble (their
        logits averaged). Default: the shipped pair :data:`SHIPPED`.
    budget : int
        Most grid voxels of a 3D update (:data:`~.click_roi.BUDGET_3D`).
    max_grow : int
        How often a 3D region may double towards borders the mask reaches.
    flips_3d : sequence of tuples of int
        Test-time augmentation of 3D updates: the logits are averaged over the
        input mirrored along each tuple's axes (``()``: as is).
    amp : str
        Mixed precision of the network (``"auto"``: bf16 on CPUs with native
        bf16, see :func:`napari_medseg.core.policy.resolve_amp`; ``"off"``).
    first_roi_mm : float
        Edge (mm) of the cube a first click looks at (it grows towards any
        border the mask reaches).
    first_size : int
        Index into :data:`FIRST_SIZES`: a first click is seen in a cube of
        ``first_roi_mm`` times that factor (64, 128 or 256 mm). Under a single
        click the object's size is ambiguous, as Segment Anything's multiple
        masks say: the 64 mm cube (the default, and the benchmarks' setting)
        keeps small objects whole but takes only a part of a large organ
        (real abdominal CT: liver 0.10 after one click), the wider cubes see
        a large organ whole (liver 0.66 at 128 mm) and spill from small ones.
        The Interactive widget lets the user step through them (key W).
        Later clicks refine the mask whatever the size.
    edge_weight : float
        Weight of the image's own intensities at the mask's boundary
        (:func:`.edges.refine_edges`: voxels within :data:`.edges.BAND_MM` of
        the boundary the network's interpolated logits draw are decided
        again with local inside / outside intensity models); 0 turns it off.

    Notes
    -----
    The last prompts and mask are cached: when new prompts extend them (a
    click added), the last mask is the network's previous-mask input; the
    image grid of an unchanged region is reused. The engine never changes
    process-wide torch settings (such as the thread count).
    """

    name = "click model"
    #: The network sees the previous mask and corrects it as a whole (RITM), so
    #: a click may grow an under-segmented first answer many times over; reach
    #: and share are bounded as for every engine, a click changes the mask only
    #: near itself (rule 4 of :mod:`.bounds`) and a positive click adds only
    #: what lies in the object's intensity range (rule 6).
    bounds = None

    def __init__(self, weights=None, budget: int = roi.BUDGET_3D, max_grow: int = 2,
                 flips_3d=((), (0, 1, 2)), amp: str = "auto",
                 first_roi_mm: float = roi.FIRST_ROI_MM, first_size: int = 0,
                 edge_weight: float = EDGE_WEIGHT):
        super().__init__()
        self.edge_weight = float(edge_weight)
        self.first_size = first_size
        if weights is None:
            weights = SHIPPED
        if isinstance(weights, (str, Path)):
            weights = (weights,)
        self.weights = tuple(Path(w) for w in weights)
        self.budget = int(budget)
        self.max_grow = int(max_grow)
        self.flips_3d = tuple(tuple(f) for f in flips_3d)
        self.amp = amp
        self.first_roi_mm = float(first_roi_mm)
        from .bounds import Bounds

        self.bounds = Bounds(growth=20.0, local=5.0, like=0.3)
        self._nets: list[ClickNet] | None = None
        self._last = None  # (key, positive, negative, boxes, mask, region)
        self._grid = None  # (key, lo, hi, grid shape, resampled crop)

    @property
    def first_size(self) -> int:
        """Which of :attr:`first_sizes_mm` a first click is seen in (0: the finest)."""
        return self._first_size

    @first_size.setter
    def first_size(self, value: int) -> None:
        value = int(value)
        if not 0 <= value < len(FIRST_SIZES):
            raise ValueError(f"first_size must be 0..{len(FIRST_SIZES) - 1}, not {value}")
        self._first_size = value

    @property
    def first_sizes_mm(self) -> tuple[float, ...]:
        """Edges (mm) of the cubes a first click may be seen in, finest first."""
        return tuple(self.first_roi_mm * f for f in FIRST_SIZES)

    @property
    def nets(self) -> list[ClickNet]:
        """The networks (loaded on first use); their logits are averaged."""
        if self._nets is None:
            # channels-last 3D: the CPU's convolutions and the trilinear
            # upsampling run about twice as fast on a 2D update's slab
            self._nets = [load_click_net(w).to(memory_format=torch.channels_last_3d)
                          for w in self.weights]
        return self._nets

    def _previous(self, key, prompts: Prompts):
        """The cached ``(mask, region, same)`` when ``prompts`` extend the cached ones."""
        if self._last is None or self._last[0] != key:
            return None
        _, pos, neg, boxes, mask, region = self._last
        if len(pos) > len(prompts.positive) or len(neg) > len(prompts.negative):
            return None
        if not (np.array_equal(pos, prompts.positive[:len(pos)])
                and np.array_equal(neg, prompts.negative[:len(neg)])
                and np.array_equal(boxes, prompts.boxes)):
            return None
        same = len(pos) == len(prompts.positive) and len(neg) == len(prompts.negative)
        return mask, region, same

    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        paint = prompts.scribbles
        painted = prompts
        if paint is not None:  # strokes become clicks; the painted voxels are kept below
            sp, sn = scribble_clicks(prompts, spacing)
            prompts = Prompts(np.concatenate([sp, prompts.positive]),
                              np.concatenate([sn, prompts.negative]), prompts.boxes,
                              mode=prompts.mode, axis=prompts.axis, index=prompts.index)
        if not len(prompts.positive) and not len(prompts.boxes):
            raise MedSegError("the click model needs a positive click, a box or an object "
                              "scribble on the object", "prompts")
        size = self.first_size  # read once: the widget may change it meanwhile
        key = (self.image_key(image, spacing), prompts.mode, prompts.axis, prompts.index, size)
        prev = self._previous(key, prompts)
        run = self._predict_2d if prompts.mode == "2d" else self._predict_3d
        if prev is not None and prev[2]:
            mask, region = prev[0].copy(), prev[1]
        elif prev is None and paint is not None:
            mask, region = self._replay(image, spacing, prompts, key, cancel,
                                        self.first_sizes_mm[size])
        else:
            mask, region = run(image, spacing, prompts, prev, key, cancel,
                               first_mm=self.first_sizes_mm[size])
        if paint is not None:
            mask, region = _with_paint(mask, region, painted)
        self._last = (key, prompts.positive.copy(), prompts.negative.copy(),
                      prompts.boxes.copy(), mask, region)
        return mask.copy(), region

    def _replay(self, image, spacing, prompts, key, cancel, first_mm):
        """The answer to many prompts given at once (a painted stroke's points),
        as the network was trained to take them: the first positive point (or
        the box), then each further point as a correction of the last answer,
        where that answer has it wrong. Each step's answer is bounded as a
        user's click would be (:meth:`bound`: a first click selects no more
        than the image supports, a later one adds or removes near itself);
        unbounded, a stroke's points flooded the real liver's neighbours
        (1.2 M voxels for a 367 k-voxel liver)."""
        from .bounds import _voxel

        run = self._predict_2d if prompts.mode == "2d" else self._predict_3d
        pos, neg = prompts.positive, prompts.negative
        steps = [(i, 0) for i in range(0 if len(prompts.boxes) else 1, len(pos) + 1)]
        steps += [(len(pos), j) for j in range(1, len(neg) + 1)]
        mask = region = None
        for i, j in steps:
            sub = Prompts(pos[:i], neg[:j], prompts.boxes, mode=prompts.mode,
                          axis=prompts.axis, index=prompts.index)
            if mask is not None:
                v = _voxel(pos[i - 1] if j == 0 else neg[j - 1], region)
                inside = v is not None and bool(mask[v])
                if inside == (j == 0):  # the answer already has this point right
                    mask, region = self.bound(image, spacing, sub, mask, region)
                    continue  # (bounded all the same: the next point's rules need it)
            prev = None if mask is None else (mask, region, False)
            mask, region = run(image, spacing, sub, prev, key, cancel, first_mm=first_mm)
            mask, region = self.bound(image, spacing, sub, mask, region)
        return mask, region

    # ----------------------------------------------------------------- steps
    def _grid_crop(self, key, vol, lo, hi, grid) -> np.ndarray:
        """``vol[lo:hi]`` resampled onto ``grid`` (cached for an unchanged region)."""
        c = self._grid
        if c is not None and c[0] == key and np.array_equal(c[1], lo) \
                and np.array_equal(c[2], hi) and c[3] == grid:
            return c[4]
        crop = np.asarray(vol[tuple(slice(a, b) for a, b in zip(lo, hi))], np.float32)
        out = roi.resample(crop, grid)
        self._grid = (key, lo.copy(), hi.copy(), grid, out)
        return out

    def _forward(self, crop_g, pos_g, neg_g, prev_g, box_g, flips=((),)) -> np.ndarray:
        """Grid logits, the mean over the mirrored inputs ``flips`` (axes of each)."""
        from ..core.policy import mirror_tta, resolve_amp

        device = torch.device("cpu")
        dtype = resolve_amp(self.amp, device)
        x = torch.from_numpy(click_channels(crop_g, pos_g, neg_g, prev_g, box_g))[None]
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                    enabled=dtype is not None):
            axes = [tuple(a + 2 for a in f) for f in flips]
            out = sum(mirror_tta(net, x, (), axes).float() for net in self.nets)
        return (out / len(self.nets))[0, 0].contiguous().numpy()

    def _on_edges(self, vol, lo, hi, logits, spacing) -> np.ndarray:
        """``logits`` (on ``vol[lo:hi]``'s voxels) with the boundary band decided
        again by the image (:func:`.edges.refine_edges`)."""
        if not self.edge_weight:
            return logits
        crop = np.asarray(vol[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))],
                          np.float32)
        return refine_edges(crop, logits, spacing, weight=self.edge_weight)

    @staticmethod
    def _boxes_to_grid(boxes, lo, hi, grid) -> np.ndarray:
        b = np.asarray(boxes, float).reshape(-1, 3)
        return roi.to_grid(b, lo, hi, grid).reshape(-1, 2, 3)

    def _predict_3d(self, image, spacing, prompts, prev, key, cancel, first_mm=None):
        pos, neg, boxes = prompts.positive, prompts.negative, prompts.boxes
        anchors = _anchors(pos, boxes)
        shape = np.array(image.shape)
        pts = np.concatenate([pos, neg, _box_points(boxes, spacing)])
        if prev is not None and not prev[0].any():
            prev = None  # nothing to refine: start afresh
        if prev is not None:
            start = [s.start for s in prev[1]]
            pts = np.concatenate([pts, _mask_corners(prev[0], start)])
            lo, hi = roi.box_around(pts, spacing, shape, margin_mm=6.0, rel=0.15)
        elif len(boxes):
            lo, hi = roi.box_around(pts, spacing, shape, margin_mm=6.0, rel=0.15)
        else:
            lo, hi = roi.box_around(pts, spacing, shape, min_mm=first_mm or self.first_roi_mm)
        for attempt in range(self.max_grow + 1):
            check_cancel(cancel)
            grid = roi.plan_grid(hi - lo, spacing, self.budget)
            crop_g = self._grid_crop(key, image, lo, hi, grid)
            prev_g = None
            if prev is not None:
                start = [s.start for s in prev[1]]
                prev_g = roi.resample(_paste(prev[0], start, lo, hi), grid)
            logits = self._forward(crop_g, roi.to_grid(pos, lo, hi, grid),
                                   roi.to_grid(neg, lo, hi, grid), prev_g,
                                   self._boxes_to_grid(boxes, lo, hi, grid), self.flips_3d)
            mask_g = keep_clicked(logits > 0, roi.to_grid(anchors, lo, hi, grid),
                                  np.zeros((0, 3)))
            faces = roi.touching_faces(mask_g, lo, hi, shape)
            if not faces or attempt == self.max_grow:
                break
            lo, hi = roi.grow_box(lo, hi, faces, shape)
        check_cancel(cancel)
        up = self._on_edges(image, lo, hi, roi.resample(logits, hi - lo), spacing)
        mask = keep_clicked(up > 0, anchors - lo, neg - lo)
        if prev is not None:
            mask, lo, hi = self._add_ignored(image, spacing, prompts, mask, lo, hi, key, cancel)
        return mask, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def _add_ignored(self, image, spacing, prompts, mask, lo, hi, key, cancel):
        """Honour the positive clicks a refinement left outside its mask.

        The network may answer a click inside a part it did not take as the
        object (a stomach's fluid under a click on its wall) by leaving the
        part out, and the simulated or real user then clicks there again and
        again. Each such click is segmented on its own, as a first click,
        and added to the mask; the bounds of :mod:`.bounds` still limit what
        it may add.
        """
        for p in prompts.positive:
            i = np.round(p).astype(int) - lo
            if np.any(i < 0) or np.any(i >= mask.shape) or mask[tuple(i)]:
                continue
            one = Prompts(positive=p[None], negative=prompts.negative, mode="3d")
            sub, region = self._predict_3d(image, spacing, one, None, key, cancel)
            if not sub.any():
                continue
            s_lo = np.array([r.start for r in region])
            n_lo, n_hi = np.minimum(lo, s_lo), np.maximum(hi, s_lo + np.array(sub.shape))
            mask = (_paste(mask.astype(np.float32), lo, n_lo, n_hi) > 0) | \
                (_paste(sub.astype(np.float32), s_lo, n_lo, n_hi) > 0)
            lo, hi = n_lo, n_hi
        return mask, lo, hi

    def _predict_2d(self, image, spacing, prompts, prev, key, cancel, first_mm=None):
        ax, idx = prompts.axis, int(prompts.index)
        order = [ax] + [a for a in range(3) if a != ax]
        vol = np.moveaxis(image, ax, 0) if isinstance(image, np.ndarray) else \
            np.moveaxis(np.asarray(image), ax, 0)
        sp = np.asarray(spacing, float)[order]
        pos, neg = prompts.positive[:, order], prompts.negative[:, order]
        boxes = prompts.boxes[:, :, order]
        anchors = _anchors(pos, boxes)
        shape = np.array(vol.shape)
        z0 = int(np.clip(idx - roi.SLAB_2D // 2, 0, max(shape[0] - roi.SLAB_2D, 0)))
        z1 = int(min(z0 + roi.SLAB_2D, shape[0]))
        pts = np.concatenate([pos, neg, boxes.reshape(-1, 3)])
        prev2 = None
        if prev is not None and prev[0].any():
            prev2 = (np.moveaxis(prev[0], ax, 0)[0], [prev[1][a].start for a in order[1:]])
            corners = _mask_corners(prev2[0], prev2[1])
            pts = np.concatenate([pts, np.insert(corners, 0, idx, axis=1)])
            lo, hi = roi.box_around(pts, sp, shape, margin_mm=6.0, rel=0.15)
        elif len(boxes):
            lo, hi = roi.box_around(pts, sp, shape, margin_mm=6.0, rel=0.15)
        else:
            lo, hi = roi.box_around(pts, sp, shape, min_mm=first_mm or self.first_roi_mm)
        lo[0], hi[0] = z0, z1
        k = idx - z0
        for attempt in range(self.max_grow + 1):
            check_cancel(cancel)
            grid = roi.plan_grid(hi - lo, sp, roi.INPLANE_2D, fixed=(0,))
            crop_g = self._grid_crop(key, vol, lo, hi, grid)
            prev_g = np.zeros(grid, np.float32)
            if prev2 is not None:
                prev_g[k] = roi.resample(_paste(prev2[0], prev2[1], lo[1:], hi[1:])[None],
                                         (1, *grid[1:]))[0]
            pad = roi.SLAB_2D - grid[0]
            if pad > 0:  # fewer slices than the slab: repeat the last one
                crop_g = np.pad(crop_g, [(0, pad), (0, 0), (0, 0)], mode="edge")
                prev_g = np.pad(prev_g, [(0, pad), (0, 0), (0, 0)])
            logits = self._forward(crop_g, roi.to_grid(pos, lo, hi, grid),
                                   roi.to_grid(neg, lo, hi, grid), prev_g,
                                   self._boxes_to_grid(boxes, lo, hi, grid))[k]
            a2 = roi.to_grid(anchors, lo, hi, grid)[:, 1:]
            mask_g = keep_clicked(logits > 0, a2, np.zeros((0, 2)))
            faces = roi.touching_faces(mask_g[None], lo, hi, shape, fixed=(0,))
            if not faces or attempt == self.max_grow:
                break
            lo, hi = roi.grow_box(lo, hi, faces, shape, fixed=(0,))
        check_cancel(cancel)
        up = roi.resample(logits[None], (1, *(hi[1:] - lo[1:])))[0]
        lo_k, hi_k = lo.copy(), hi.copy()
        lo_k[0], hi_k[0] = idx, idx + 1
        up = self._on_edges(vol, lo_k, hi_k, up[None], sp)[0]
        mask = keep_clicked(up > 0, anchors[:, 1:] - lo[1:], neg[:, 1:] - lo[1:])
        region = [None] * 3
        region[ax] = slice(idx, idx + 1)
        for a, l, h in zip(order[1:], lo[1:], hi[1:]):
            region[a] = slice(int(l), int(h))
        return np.expand_dims(mask, ax), tuple(region)
