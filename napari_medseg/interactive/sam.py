"""Segment Anything-style models (SAM, MedSAM) behind the engine interface.

Used when the ``segment-anything`` package is installed (``pip install
napari-medseg[sam]``) and the user has a checkpoint on disk: an original SAM
``vit_b`` / ``vit_l`` / ``vit_h`` state dict or a MedSAM one (same layout).
Nothing is downloaded. Checkpoints are read with ``weights_only=True``.

SAM is a 2D model: in 2D mode it segments the prompted slice; in 3D mode it
segments the slice holding the first positive click (or box) and propagates
slice by slice, prompting each next slice with the box and centre of the mask
on the previous one plus any clicks the user put on it. Image embeddings are
computed once per slice and cached.

A checkpoint whose architecture is not one of the published ones can carry a
JSON file beside it (``model.pth`` + ``model.json``) with the keys of
:data:`SAM_DEFAULTS`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from ..errors import MedSegError, check_cancel
from ._checkpoint import read_state_dict
from .base import Engine, Prompts, Region

log = logging.getLogger(__name__)

__all__ = ["SamEngine", "build_sam", "SAM_DEFAULTS", "sam_available"]

#: Architecture of SAM ViT-B; other sizes override a few keys.
SAM_DEFAULTS = {
    "image_size": 1024, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
    "global_attn_indexes": [2, 5, 8, 11], "window_size": 14, "prompt_embed_dim": 256,
    "mlp_dim": 2048,
}
_SIZES = {
    768: {},
    1024: {"depth": 24, "num_heads": 16, "global_attn_indexes": [5, 11, 17, 23]},
    1280: {"depth": 32, "num_heads": 16, "global_attn_indexes": [7, 15, 23, 31]},
}


def sam_available() -> bool:
    """True when the ``segment-anything`` package is installed."""
    return importlib.util.find_spec("segment_anything") is not None


def _modeling():
    """The ``segment_anything.modeling`` classes.

    The package's ``__init__`` also imports its torchvision-based helpers,
    which this adapter does not use; when torchvision is missing or broken the
    model classes are imported on their own.
    """
    if not sam_available():
        raise MedSegError("the Segment Anything engine needs the `segment-anything` "
                          "package: pip install segment-anything", "SAM")
    try:
        return importlib.import_module("segment_anything.modeling")
    except (ImportError, RuntimeError, OSError) as exc:
        log.warning("segment_anything helpers unavailable (%s); loading its model "
                    "classes only", exc)
        for name in [m for m in sys.modules if m.split(".")[0] == "segment_anything"]:
            del sys.modules[name]
        spec = importlib.util.find_spec("segment_anything")
        sys.modules["segment_anything"] = importlib.util.module_from_spec(spec)
        return importlib.import_module("segment_anything.modeling")


def build_sam(config: dict | None = None) -> torch.nn.Module:
    """A SAM network (random weights) for ``config`` (keys of :data:`SAM_DEFAULTS`)."""
    m = _modeling()
    c = {**SAM_DEFAULTS, **(config or {})}
    img, pe = int(c["image_size"]), int(c["prompt_embed_dim"])
    emb = img // int(c["patch_size"])
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=int(c["depth"]), embed_dim=int(c["embed_dim"]), img_size=img, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=int(c["num_heads"]),
            patch_size=int(c["patch_size"]), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(c["global_attn_indexes"]),
            window_size=int(c["window_size"]), out_chans=pe),
        prompt_encoder=m.PromptEncoder(embed_dim=pe, image_embedding_size=(emb, emb),
                                       input_image_size=(img, img), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=pe,
                                            mlp_dim=int(c["mlp_dim"]), num_heads=8),
            transformer_dim=pe, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


def _config_for(checkpoint: Path, state: dict) -> dict:
    side = checkpoint.with_suffix(".json")
    if side.is_file():
        return json.loads(side.read_text())
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None or int(w.shape[0]) not in _SIZES:
        raise MedSegError("not a SAM / MedSAM checkpoint of a known size; put a JSON file "
                          "with its architecture beside it", str(checkpoint))
    pos = state.get("image_encoder.pos_embed")
    cfg = dict(_SIZES[int(w.shape[0])], embed_dim=int(w.shape[0]))
    if pos is not None:
        cfg["image_size"] = int(pos.shape[1]) * int(w.shape[-1])
    return cfg


def load_sam(checkpoint) -> torch.nn.Module:
    """Build SAM from a local state-dict checkpoint (never unpickles objects)."""
    checkpoint = Path(checkpoint)
    state = read_state_dict(checkpoint, "SAM", ".pth")
    sam = build_sam(_config_for(checkpoint, state))
    try:
        sam.load_state_dict(state)
    except RuntimeError as exc:
        raise MedSegError(f"checkpoint does not fit the SAM architecture: {exc}",
                          str(checkpoint)) from exc
    return sam.eval()


class SamEngine(Engine):
    """SAM / MedSAM on slices, propagated through the volume in 3D mode.

    Parameters
    ----------
    checkpoint : path
        Local SAM or MedSAM state dict.
    max_slices : int
        How far (slices each way) 3D mode propagates at most.
    cache_slices : int
        How many slice embeddings to keep.
    """

    name = "Segment Anything"

    def __init__(self, checkpoint, max_slices: int = 64, cache_slices: int = 32):
        super().__init__()
        self.checkpoint = Path(checkpoint)
        self.max_slices = int(max_slices)
        self.cache_slices = int(cache_slices)
        self._sam = None
        self._emb: OrderedDict = OrderedDict()
        self._window = (0.0, 1.0)

    @property
    def sam(self):
        if self._sam is None:
            self._sam = load_sam(self.checkpoint)
        return self._sam

    def set_image(self, image, spacing) -> None:
        super().set_image(image, spacing)
        self._emb.clear()
        sub = np.asarray(image[:: max(image.shape[0] // 16, 1), ::4, ::4], np.float32)
        lo, hi = np.percentile(sub, [0.5, 99.5])
        self._window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)

    # ------------------------------------------------------------ embeddings
    def _embedding(self, image, axis: int, index: int):
        key = (axis, index)
        if key in self._emb:
            self._emb.move_to_end(key)
            return self._emb[key]
        sl = np.asarray(np.take(image, index, axis), np.float32)
        lo, hi = self._window
        rgb = np.clip((sl - lo) / (hi - lo), 0, 1) * 255.0
        t = torch.from_numpy(rgb)[None, None].repeat(1, 3, 1, 1)
        size = self.sam.image_encoder.img_size
        scale = size / max(sl.shape)
        new = (max(int(sl.shape[0] * scale + 0.5), 1), max(int(sl.shape[1] * scale + 0.5), 1))
        with torch.inference_mode():
            t = torch.nn.functional.interpolate(t, size=new, mode="bilinear",
                                                align_corners=False, antialias=True)
            feats = self.sam.image_encoder(self.sam.preprocess(t))
        self._emb[key] = (feats, new, sl.shape, scale)
        if len(self._emb) > self.cache_slices:
            self._emb.popitem(last=False)
        return self._emb[key]

    def _segment_slice(self, image, axis, index, pos, neg, box) -> np.ndarray:
        """Mask of one slice; ``pos``/``neg`` (N, 2) and ``box`` (4,) in (row, col)."""
        feats, new, shape, scale = self._embedding(image, axis, index)
        pts = [np.asarray(pos, float).reshape(-1, 2), np.asarray(neg, float).reshape(-1, 2)]
        coords = np.concatenate(pts)[:, ::-1] * scale  # SAM wants (x, y)
        labels = np.concatenate([np.ones(len(pts[0])), np.zeros(len(pts[1]))])
        points = None
        if len(coords):
            points = (torch.as_tensor(coords[None] + 0.5 * scale, dtype=torch.float32),
                      torch.as_tensor(labels[None], dtype=torch.int64))
        boxes = None
        if box is not None:
            r0, c0, r1, c1 = box
            boxes = torch.as_tensor([[c0, r0, c1 + 1, r1 + 1]], dtype=torch.float32) * scale
        multi = boxes is None and len(coords) == 1
        with torch.inference_mode():
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            low, iou = self.sam.mask_decoder(
                image_embeddings=feats, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multi)
            best = int(torch.argmax(iou[0])) if multi else 0
            masks = self.sam.postprocess_masks(low[:, best:best + 1], new, tuple(shape))
        return (masks[0, 0] > self.sam.mask_threshold).numpy()

    # --------------------------------------------------------------- predict
    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        self.ensure_image(image, spacing)
        axis = prompts.axis if prompts.mode == "2d" else 0
        rest = [a for a in range(3) if a != axis]

        def on(k, pts):
            sel = pts[np.abs(pts[:, axis] - k) <= 0.5] if len(pts) else pts
            return sel[:, rest]

        def box_on(k):
            for lo, hi in prompts.boxes:
                if lo[axis] - 0.5 <= k <= hi[axis] + 0.5 or prompts.mode == "3d" and \
                        hi[axis] - lo[axis] < 1:
                    return np.round([lo[rest[0]], lo[rest[1]], hi[rest[0]], hi[rest[1]]])
            return None

        if prompts.mode == "2d":
            k = prompts.index
            if not len(on(k, prompts.positive)) and box_on(k) is None:
                raise MedSegError("Segment Anything needs a positive click or a box on "
                                  f"slice {k}", "prompts")
            m = self._segment_slice(image, axis, k, on(k, prompts.positive),
                                    on(k, prompts.negative), box_on(k))
            region = tuple(slice(k, k + 1) if a == axis else slice(0, image.shape[a])
                           for a in range(3))
            return np.expand_dims(m, axis), region
        return self._propagate(image, prompts, on, box_on, cancel)

    def _propagate(self, image, prompts, on, box_on, cancel):
        n = image.shape[0]
        if len(prompts.positive):
            start = int(round(prompts.positive[0, 0]))
        elif len(prompts.boxes):
            start = int(round(prompts.boxes[0, :, 0].mean()))
        else:
            raise MedSegError("Segment Anything needs a positive click or a box",
                              "prompts")
        out = np.zeros(image.shape, bool)
        first = self._segment_slice(image, 0, start, on(start, prompts.positive),
                                    on(start, prompts.negative), box_on(start))
        out[start] = first
        area0 = max(int(first.sum()), 1)
        for step in (1, -1):
            prev = first
            for k in range(start + step, start + step * (self.max_slices + 1), step):
                if not 0 <= k < n or prev.sum() < 0.1 * area0:
                    break
                check_cancel(cancel)
                rows, cols = np.nonzero(prev)
                box = np.array([rows.min() - 2, cols.min() - 2, rows.max() + 2,
                                cols.max() + 2])
                centre = np.argwhere(prev)[np.argmax(ndi.distance_transform_edt(prev)[prev])]
                pos = np.concatenate([on(k, prompts.positive), centre[None]])
                prev = self._segment_slice(image, 0, k, pos, on(k, prompts.negative), box)
                out[k] = prev
        zs = np.nonzero(out.any(axis=(1, 2)))[0]
        if not len(zs):
            return np.zeros((1, *image.shape[1:]), bool), (slice(start, start + 1),
                                                           slice(0, image.shape[1]),
                                                           slice(0, image.shape[2]))
        region = (slice(int(zs[0]), int(zs[-1]) + 1), slice(0, image.shape[1]),
                  slice(0, image.shape[2]))
        return out[region], region
