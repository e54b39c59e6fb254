"""SAM 2 / SAM 2.1 (and MedSAM2) behind the engine interface.

Used when the ``sam2`` package is installed (``pip install
napari-medseg[sam2]``) and the user has a checkpoint on disk (nothing is
downloaded): a published ``sam2[.1]_hiera_{t,s,b+,l}.pt`` (the architecture is
recognised from the weights), or any other SAM 2 checkpoint with its YAML
model config beside it (``model.pt`` + ``model.yaml``, the package's config
format; needed e.g. for MedSAM2's 512-pixel model). Checkpoints are read with
``weights_only=True``; only ``sam2.*`` classes are built from a config.

The volume is handed to SAM 2's video predictor as a stack of slices: in 2D
mode the prompted slice is segmented from its own prompts (SAM 2's image
path, no memory); in 3D mode every slice with prompts is a conditioning frame
and the mask is propagated through the slices along ``Z`` both ways, until it
vanishes or ``max_slices`` from the prompts. Scribbles become clicks (a few
per slice). Image features are computed once per slice and kept in an LRU
cache for the image, so later clicks only run the prompt encoder, the mask
decoder and the memory modules.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from pathlib import Path
from types import MethodType
from typing import Callable

import numpy as np
import torch

from ..core.policy import choose_device
from ..errors import MedSegError, check_cancel
from ._checkpoint import read_state_dict
from .base import Engine, Prompts, Region

log = logging.getLogger(__name__)

__all__ = ["Sam2Engine", "load_sam2", "sam2_available", "sam2_config"]

#: trunk width, number of Hiera blocks -> published config name (without version).
_PUBLISHED = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+",
              (144, 48): "hiera_l"}
_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
#: As ``build_sam2_video_predictor`` sets them (hole filling needs a CUDA extension: off).
_PREDICTOR = {"_target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
              "binarize_mask_from_pts_for_mem_enc": True, "fill_hole_area": 0}
_DECODER = {"dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98}


def sam2_available() -> bool:
    """True when the ``sam2`` package is installed."""
    return importlib.util.find_spec("sam2") is not None


def _need_sam2():
    if not sam2_available():
        raise MedSegError("the SAM2 engine needs the `sam2` package: pip install "
                          "napari-medseg[sam2]", "SAM2")


def _check_targets(node, where: str) -> None:
    """Refuse a config that would build anything but SAM 2's own classes."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith("sam2."):
            raise MedSegError(f"the model config names {target!r}; only sam2.* classes are "
                              "built", where)
        for v in node.values():
            _check_targets(v, where)
    elif isinstance(node, list):
        for v in node:
            _check_targets(v, where)


def sam2_config(checkpoint, state: dict | None = None) -> dict:
    """The model config (``_target_`` tree) for a checkpoint, as a plain dict.

    Read from ``<checkpoint>.yaml`` when present, else the package's config of
    the published model whose architecture the weights have.
    """
    from omegaconf import OmegaConf

    _need_sam2()
    checkpoint = Path(checkpoint)
    side = checkpoint.with_suffix(".yaml")
    if side.is_file():
        src = side
    else:
        state = read_state_dict(checkpoint, "SAM2", ".pt") if state is None else state
        w = state.get("image_encoder.trunk.patch_embed.proj.weight")
        blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
        key = None if w is None else (int(w.shape[0]), len(blocks))
        if key not in _PUBLISHED:
            raise MedSegError("not a published SAM2 model size; put its YAML config beside "
                              "the checkpoint (same name, .yaml)", str(checkpoint))
        v21 = "no_obj_embed_spatial" in state
        name = f"sam2.1_{_PUBLISHED[key]}" if v21 else f"sam2_{_PUBLISHED[key]}"
        spec = importlib.util.find_spec("sam2")
        src = (Path(spec.origin).parent / "configs" / ("sam2.1" if v21 else "sam2")
               / f"{name}.yaml")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(src), resolve=True)
    except Exception as exc:  # noqa: BLE001 - YAML and interpolation errors alike
        raise MedSegError(f"cannot read the model config ({exc})", str(src)) from exc
    model = cfg.get("model", cfg) if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or "image_encoder" not in model:
        raise MedSegError("not a SAM2 model config (no model.image_encoder)", str(src))
    _check_targets(model, str(src))
    return model


def load_sam2(checkpoint, device: str = "cpu") -> torch.nn.Module:
    """A ``SAM2VideoPredictor`` with the checkpoint's weights (never unpickles objects)."""
    from hydra.utils import instantiate

    _need_sam2()
    checkpoint = Path(checkpoint)
    state = read_state_dict(checkpoint, "SAM2", ".pt")
    cfg = dict(sam2_config(checkpoint, state), **_PREDICTOR)
    cfg["sam_mask_decoder_extra_args"] = dict(cfg.get("sam_mask_decoder_extra_args") or {},
                                              **_DECODER)
    try:
        model = instantiate(cfg, _recursive_=True)
    except Exception as exc:  # noqa: BLE001 - hydra wraps the constructor's error
        raise MedSegError(f"cannot build the SAM2 model from its config: {exc}",
                          str(checkpoint)) from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MedSegError("checkpoint does not fit the SAM2 architecture: "
                          f"{str(exc).splitlines()[0]}", str(checkpoint)) from exc
    return model.to(device).eval()


def _scribble_points(sc: np.ndarray, n: int = 4) -> np.ndarray:
    """Up to ``n`` evenly spaced voxels of a 2D scribble, ``(k, 2)`` (row, col)."""
    idx = np.argwhere(sc)
    if len(idx) <= n:
        return idx.astype(float)
    return idx[np.linspace(0, len(idx) - 1, n).round().astype(int)].astype(float)


class Sam2Engine(Engine):
    """SAM 2 on slices; 3D masks by its video propagation through ``Z``.

    Parameters
    ----------
    checkpoint : path
        A SAM 2 / SAM 2.1 / MedSAM2 checkpoint (``{"model": state_dict}``).
    device : str
        ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
    max_slices : int
        How far (slices each way from the prompted ones) 3D mode propagates.
    cache_slices : int
        How many slice features to keep.
    """

    name = "SAM2"

    def __init__(self, checkpoint, device: str = "auto", max_slices: int = 64,
                 cache_slices: int = 64):
        super().__init__()
        self.checkpoint = Path(checkpoint)
        self.device = choose_device(device, allow_mps=False)
        self.max_slices = int(max_slices)
        self.cache_slices = int(cache_slices)
        self._model = None
        self._features: OrderedDict = OrderedDict()
        self._states: dict = {}
        self._image = None
        self._window = (0.0, 1.0)

    @property
    def model(self):
        """The SAM 2 video predictor (built on first use)."""
        if self._model is None:
            model = load_sam2(self.checkpoint, self.device)
            model._get_image_feature = MethodType(_cached_feature(self), model)
            self._model = model
        return self._model

    def set_image(self, image, spacing) -> None:
        """Forget features of another image; choose the intensity window once."""
        super().set_image(image, spacing)
        self._features.clear()
        self._states.clear()
        self._image = image
        sub = np.asarray(image[:: max(image.shape[0] // 16, 1), ::4, ::4], np.float32)
        lo, hi = np.percentile(sub, [0.5, 99.5])
        self._window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)

    # -------------------------------------------------------------- frames
    def frame(self, axis: int, index: int) -> torch.Tensor:
        """Slice ``index`` along ``axis`` as SAM 2 wants it: ``(3, S, S)``, normalised."""
        sl = torch.from_numpy(np.asarray(np.take(self._image, index, axis), np.float32))
        lo, hi = self._window
        sl = ((sl - lo) / (hi - lo)).clamp_(0, 1)
        size = int(self.model.image_size)
        sl = torch.nn.functional.interpolate(sl[None, None], size=(size, size),
                                             mode="bilinear", align_corners=False,
                                             antialias=True)[0]
        return (sl.expand(3, -1, -1) - _MEAN) / _STD

    def _state(self, axis: int) -> dict:
        """The video predictor's state for the slices along ``axis`` (frames lazy)."""
        if axis not in self._states:
            shape = [s for a, s in enumerate(self._image.shape) if a != axis]
            st = {"images": _Frames(self, axis), "num_frames": self._image.shape[axis],
                  "offload_video_to_cpu": False, "offload_state_to_cpu": False,
                  "video_height": shape[0], "video_width": shape[1],
                  "device": self.device, "storage_device": self.device,
                  "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
                  "cached_features": {}, "constants": {}, "obj_id_to_idx": OrderedDict(),
                  "obj_idx_to_id": OrderedDict(), "obj_ids": [], "output_dict_per_obj": {},
                  "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
                  "axis": axis}
            self._states[axis] = st
        st = self._states[axis]
        self.model.reset_state(st)
        return st

    # ------------------------------------------------------------- prompts
    def _frame_prompts(self, prompts: Prompts, axis: int) -> dict:
        """``{slice: (points (N, 2) as (x, y), labels (N,), box or None)}``."""
        rest = [a for a in range(3) if a != axis]
        out: dict = {}

        def add(k, rc, label):
            pts, labels, box = out.setdefault(int(k), ([], [], None))
            pts.extend(np.asarray(rc, float).reshape(-1, 2)[:, ::-1] + 0.5)
            labels.extend([label] * len(np.asarray(rc).reshape(-1, 2)))

        for pts, label in ((prompts.positive, 1), (prompts.negative, 0)):
            for p in pts:
                add(round(p[axis]), p[rest], label)
        if prompts.scribbles is not None:
            sc = np.asarray(prompts.scribbles)
            for value, label in ((1, 1), (2, 0)):
                for k in np.nonzero(np.moveaxis(sc == value, axis, 0).any(axis=(1, 2)))[0]:
                    add(k, _scribble_points(np.take(sc, k, axis) == value), label)
        for lo, hi in prompts.boxes:
            r0, c0, r1, c1 = lo[rest[0]], lo[rest[1]], hi[rest[0]], hi[rest[1]]
            for k in range(int(round(lo[axis])), int(round(hi[axis])) + 1):
                pts, labels, _ = out.setdefault(k, ([], [], None))
                out[k] = (pts, labels, [c0, r0, c1 + 1, r1 + 1])
        return out

    def _add(self, st, prompts: Prompts, axis: int, cancel) -> dict:
        per_frame = self._frame_prompts(prompts, axis)
        if not any(box is not None or 1 in labels for _, labels, box in per_frame.values()):
            raise MedSegError("SAM2 needs a positive click, a box or an object scribble",
                              "prompts")
        masks = {}
        for k, (pts, labels, box) in sorted(per_frame.items()):
            check_cancel(cancel)
            _, _, m = self.model.add_new_points_or_box(
                st, frame_idx=k, obj_id=1,
                points=np.asarray(pts, np.float32).reshape(-1, 2) if pts else None,
                labels=np.asarray(labels, np.int32) if pts else None, box=box)
            masks[k] = (m[0, 0] > 0).cpu().numpy()
        return masks

    # --------------------------------------------------------------- predict
    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        self.ensure_image(image, spacing)
        axis = prompts.axis if prompts.mode == "2d" else 0
        st = self._state(axis)
        masks = self._add(st, prompts, axis, cancel)
        if prompts.mode == "2d":
            k = prompts.index
            region = tuple(slice(k, k + 1) if a == axis else slice(0, image.shape[a])
                           for a in range(3))
            return np.expand_dims(masks[k], axis), region
        return self._propagate(st, masks, image.shape, cancel)

    def _propagate(self, st, masks: dict, shape, cancel) -> tuple[np.ndarray, Region]:
        out = np.zeros(shape, bool)
        for k, m in masks.items():
            out[k] = m
        lo, hi = min(masks), max(masks)
        for reverse in (False, True):
            # forward from the first prompted slice through the others and beyond;
            # backward from it
            n = self.max_slices + (0 if reverse else hi - lo)
            gen = self.model.propagate_in_video(st, start_frame_idx=lo,
                                                max_frame_num_to_track=n, reverse=reverse)
            with torch.inference_mode():
                for k, _, logits in gen:
                    check_cancel(cancel)
                    m = (logits[0, 0] > 0).cpu().numpy()
                    if k not in masks:
                        out[k] = m
                    if not m.any() and (k > hi or k < lo):
                        break  # the object ended
            gen.close()
        zs = np.nonzero(out.any(axis=(1, 2)))[0]
        z0, z1 = (int(zs[0]), int(zs[-1]) + 1) if len(zs) else (lo, lo + 1)
        region = (slice(z0, z1), slice(0, shape[1]), slice(0, shape[2]))
        return out[region], region


class _Frames:
    """The slices along one axis as a lazy sequence of ``(3, S, S)`` tensors."""

    def __init__(self, engine: Sam2Engine, axis: int):
        self.engine, self.axis = engine, axis

    def __len__(self):
        return self.engine._image.shape[self.axis]

    def __getitem__(self, k):
        return self.engine.frame(self.axis, int(k))


def _cached_feature(engine: Sam2Engine):
    """A ``_get_image_feature`` for the predictor that keeps features per slice."""

    def get(model, state, frame_idx, batch_size):
        key = (state["axis"], int(frame_idx))
        if key in engine._features:
            engine._features.move_to_end(key)
            image, backbone_out = engine._features[key]
        else:
            image = state["images"][frame_idx].to(state["device"]).float()[None]
            backbone_out = model.forward_image(image)
            engine._features[key] = (image, backbone_out)
            if len(engine._features) > engine.cache_slices:
                engine._features.popitem(last=False)
        expanded = {"backbone_fpn": [f.expand(batch_size, -1, -1, -1)
                                     for f in backbone_out["backbone_fpn"]],
                    "vision_pos_enc": [p.expand(batch_size, -1, -1, -1)
                                       for p in backbone_out["vision_pos_enc"]]}
        return (image.expand(batch_size, -1, -1, -1),
                *model._prepare_backbone_features(expanded))

    return get
