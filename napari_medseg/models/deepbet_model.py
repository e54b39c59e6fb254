"""The deepbet pipeline on a Volume (see :mod:`napari_medseg.models.deepbet`)."""

from __future__ import annotations

import numpy as np

from ..core.policy import largest_component
from ..errors import MedSegError, check_cancel
from .predictor import Model

__all__ = ["DeepbetModel"]


def _normalize(x, low, high):
    x = ((x - low) / (high - low)).clamp(0, 1)
    x = (x - x.mean()) / x.std().clamp_min(1e-8)
    return 0.226 * x + 0.449


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """deepbet keeps the largest face-connected piece (:func:`.core.policy.largest_component`)."""
    return largest_component(mask, connectivity=1)


def _box_with_margin(mask_small: np.ndarray, shape, margin=0.1):
    """deepbet's ``get_bbox_with_margin``: box of mean-profile > 0.02, grown by ``margin``."""
    rs = [np.nonzero(mask_small.mean(axis=dims) > 0.02)[0] for dims in [(1, 2), (0, 2), (0, 1)]]
    if any(r.size == 0 for r in rs):
        raise MedSegError("deepbet found no head in the image; is it a T1-weighted brain MRI?")
    scale = np.asarray(shape, float) / np.asarray(mask_small.shape, float)
    box = []
    for r, s, n in zip(rs, scale, shape):
        centre = s * (r.max() + 1 + r.min()) / 2
        size = s * ((r.max() + 1) - r.min()) * (1 + 2 * margin)
        centre, size = np.round(centre), np.round(size)
        box.append(slice(max(0, int(centre - size / 2)), min(n, int(centre + size / 2))))
    return tuple(box)


class DeepbetModel(Model):
    """deepbet's two-stage brain extraction behind the :class:`Model` API.

    ``overlap`` and ``tta`` are ignored (the networks see the whole head);
    ``uncertainty`` gives the binary entropy of the brain probability.
    """

    def __init__(self, card, bbox_net, brain_net, source):
        super().__init__(card, source)
        self.bbox_net, self.brain_net = bbox_net.eval(), brain_net.eval()

    def _predict_array(self, vols, device, overlap, tta, uncertainty, progress, cancel):
        import torch
        import torch.nn.functional as F

        from ..core.inference import pick_device
        from ..core.preprocess import _apply_orientation, _undo_orientation, \
            orientation_transform

        ref = vols[0]
        dev = pick_device(device)
        a = np.asarray(ref.data, dtype=np.float32)
        if not np.isfinite(a).all():
            raise MedSegError("the image contains NaN or infinite values; fill them before "
                              "running a model", ref.source)
        perm, flips = orientation_transform(ref.affine, "RAS")
        # our (Z, Y, X) RAS array -> deepbet's (i, j, k) = (R, A, S) array
        x = np.ascontiguousarray(_apply_orientation(a, perm, flips).transpose(2, 1, 0))
        xt = torch.from_numpy(x).to(dev)
        with torch.inference_mode():
            small = F.interpolate(xt[None, None], (128, 128, 128), mode="nearest-exact")[0, 0]
            low, high = small.quantile(0.005), small.quantile(0.995)
            if not high > low:
                raise MedSegError("the image is constant; deepbet needs a T1-weighted MRI",
                                  ref.source)
            p_small = self.bbox_net.to(dev)(_normalize(small, low, high)[None, None])[0, 1]
            if progress:
                progress(1, 3)
            check_cancel(cancel)
            m_small = _largest_component((p_small > 0.5).cpu().numpy())
            box = _box_with_margin(m_small.astype(np.float32), x.shape)
            crop = F.interpolate(xt[box][None, None], (256, 256, 256), mode="nearest-exact")
            p = self.brain_net.to(dev)(_normalize(crop[0, 0], low, high)[None, None])[0, 1]
            p_box = F.interpolate(p[None, None].float(), xt[box].shape,
                                  mode="nearest-exact")[0, 0].cpu().numpy()
        if progress:
            progress(2, 3)
        check_cancel(cancel)
        mask = np.zeros(x.shape, bool)
        mask[box] = _fill(_largest_component(p_box > 0.5))
        labels = _undo_orientation(mask.transpose(2, 1, 0).astype(np.uint8), perm, flips)
        unc = None
        if uncertainty is not None:
            prob = np.zeros(x.shape, np.float32)
            prob[box] = np.clip(p_box, 1e-6, 1 - 1e-6)
            ent = -(prob * np.log2(prob) + (1 - prob) * np.log2(1 - prob))
            ent[prob == 0] = 0
            unc = _undo_orientation(ent.transpose(2, 1, 0).astype(np.float16), perm, flips)
        if progress:
            progress(3, 3)
        return labels, unc, {"device": str(dev), "amp": "off", "windows": 2}


def _fill(mask: np.ndarray) -> np.ndarray:
    try:
        import fill_voids

        return fill_voids.fill(mask.astype(bool))
    except ImportError:  # pragma: no cover - deepbet depends on fill_voids
        from scipy import ndimage

        return ndimage.binary_fill_holes(mask)
