"""A learned click model: a small 3D network from image + click maps to a mask.

The network sees three channels on a region around the clicks: the image,
normalised to the intensity under the first positive click and the spread of
the region (so it works on CT and MR alike), and one map each for positive and
negative clicks (Gaussian blobs). It returns mask logits for the region. It is
trained on the synthetic phantoms with simulated clicks by
``python -m napari_medseg.training.train_click_model`` and the weights ship in
the package (``click_model.pt``, a plain state dict read with
``weights_only=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from scipy import ndimage as ndi

from ..errors import MedSegError, check_cancel
from .base import Engine, Prompts, Region, roi_around

log = logging.getLogger(__name__)

__all__ = ["ClickNet", "ClickModelEngine", "click_channels", "WEIGHTS", "CLICK_SIGMA"]

#: The weights shipped with the package.
WEIGHTS = Path(__file__).with_name("click_model.pt")
#: Standard deviation (voxels) of the Gaussian blob drawn for each click.
CLICK_SIGMA = 2.0


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class ClickNet(nn.Module):
    """A small 3D U-Net: ``(B, 3, Z, Y, X)`` -> ``(B, 1, Z, Y, X)`` logits.

    The first convolution halves the in-plane resolution (CT and MR slices are
    usually finer than their spacing), the U-Net works on that grid and the
    logits are interpolated back. ``Z`` must be a multiple of 4 and ``Y``,
    ``X`` multiples of 8. About 0.2 M parameters.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv3d(3, w, 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.InstanceNorm3d(w, affine=True), nn.LeakyReLU(0.01, inplace=True))
        self.enc1 = _block(w, w)
        self.enc2 = _block(w, 2 * w)
        self.enc3 = _block(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.dec1 = _block(2 * w, w)
        self.head = nn.Conv3d(w, 1, 1)
        self.width = width

    def forward(self, x):
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(nn.functional.max_pool3d(e1, 2))
        e3 = self.enc3(nn.functional.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return nn.functional.interpolate(self.head(d1), size=x.shape[2:], mode="trilinear",
                                         align_corners=False)


def _click_map(points, shape, sigma=CLICK_SIGMA) -> np.ndarray:
    """Max of Gaussian blobs (peak 1) at ``points`` (array indices in ``shape``)."""
    out = np.zeros(shape, np.float32)
    r = int(np.ceil(3 * sigma))
    for p in points:
        c = np.round(p).astype(int)
        sl = tuple(slice(max(ci - r, 0), min(ci + r + 1, n)) for ci, n in zip(c, shape))
        if any(s.stop <= s.start for s in sl):
            continue
        grids = np.ogrid[sl]
        g = np.exp(-sum((gr - pi) ** 2 for gr, pi in zip(grids, p)) / (2 * sigma ** 2))
        out[sl] = np.maximum(out[sl], g.astype(np.float32))
    return out


def click_channels(crop: np.ndarray, positive, negative) -> np.ndarray:
    """The network input ``(3, Z, Y, X)`` float32 for an image crop and its clicks.

    Parameters
    ----------
    crop : (Z, Y, X) array
        Image region (any units).
    positive, negative : (N, 3) array
        Clicks in the crop's array indices; at least one positive.
    """
    crop = np.asarray(crop, np.float32)
    p0 = np.clip(np.round(positive[0]).astype(int), 0, np.array(crop.shape) - 1)
    sl = tuple(slice(max(c - 1, 0), c + 2) for c in p0)
    centre = float(np.median(crop[sl]))
    q25, q75 = np.percentile(crop[:: 2, :: 2, :: 2], [25, 75])
    scale = max(float(q75 - q25) / 1.35, 1e-3 * (float(np.ptp(crop)) + 1e-6), 1e-6)
    img = np.clip((crop - centre) / scale, -5.0, 5.0)
    return np.stack([img, _click_map(positive, crop.shape), _click_map(negative, crop.shape)])


def load_click_net(path=WEIGHTS) -> ClickNet:
    """Load the shipped (or a given) click network on the CPU, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise MedSegError(f"click model weights not found at {path}; train them with "
                          "`python -m napari_medseg.training.train_click_model`", str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    width = int(state.pop("_width").item()) if "_width" in state else 16
    net = ClickNet(width)
    net.load_state_dict(state)
    net.eval()
    return net


class ClickModelEngine(Engine):
    """The learned click model behind the engine interface.

    Parameters
    ----------
    weights : path, optional
        A state dict saved by the training script; the shipped one by default.
    roi_size : tuple of 3 int
        Smallest region (voxels) the network sees around the clicks.
    threads : int, optional
        Torch CPU threads (torch's default when None).
    """

    name = "click model"

    def __init__(self, weights=None, roi_size=(48, 96, 96), threads: int | None = None):
        super().__init__()
        self.weights = Path(weights) if weights is not None else WEIGHTS
        self.roi_size = tuple(int(v) for v in roi_size)
        self.threads = threads
        self._net: ClickNet | None = None

    @property
    def net(self) -> ClickNet:
        if self._net is None:
            self._net = load_click_net(self.weights)
        return self._net

    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        if not len(prompts.positive):
            raise MedSegError("the click model needs at least one positive click on the "
                              "object", "prompts")
        shape = image.shape
        size = list(self.roi_size)
        if prompts.mode == "2d":  # a slab around the slice, the full slice in-plane
            size[prompts.axis] = min(16, shape[prompts.axis])
        region = roi_around(prompts.all_points(), shape, size, margin=8)
        region = self._fit(region, shape)
        offset = np.array([s.start for s in region], float)
        crop = np.asarray(image[region], np.float32)
        x = click_channels(crop, prompts.positive - offset,
                           prompts.negative - offset if len(prompts.negative)
                           else np.zeros((0, 3)))
        check_cancel(cancel)
        pad = [(0, (-n) % m) for n, m in zip(crop.shape, (4, 8, 8))]
        x = np.pad(x, [(0, 0), *pad], mode="edge")
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            logits = self.net(torch.from_numpy(x)[None])[0, 0].numpy()
        check_cancel(cancel)
        mask = logits[tuple(slice(0, n) for n in crop.shape)] > 0
        seeds = np.zeros(crop.shape, bool)
        for p in np.round(prompts.positive - offset).astype(int):
            seeds[tuple(p)] = True
        lab, n = ndi.label(mask)
        if n:
            ids = np.unique(lab[seeds])
            ids = ids[ids > 0]
            if len(ids):
                mask = np.isin(lab, ids)
        for p in np.round(prompts.negative - offset).astype(int):
            mask[tuple(p)] = False
        if prompts.mode == "2d":
            k = prompts.index - region[prompts.axis].start
            mask = np.take(mask, [k], axis=prompts.axis)
            region = tuple(slice(prompts.index, prompts.index + 1) if a == prompts.axis
                           else region[a] for a in range(3))
        return mask, region

    @staticmethod
    def _fit(region: Region, shape) -> Region:
        """Grow ``region`` to multiples of 4 where the image allows."""
        out = []
        for s, n in zip(region, shape):
            length = s.stop - s.start
            want = min(int(np.ceil(length / 4) * 4), n)
            start = max(min(s.start, n - want), 0)
            out.append(slice(start, start + want))
        return tuple(out)
