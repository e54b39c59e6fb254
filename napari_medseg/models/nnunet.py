"""Trained nnU-Net v2 result folders, run through ``nnunetv2`` (optional extra).

A result folder (``nnUNet_results/DatasetXXX/<Trainer>__<Plans>__<config>``) holds
``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``. nnU-Net's
own loader unpickles checkpoints with ``weights_only=False``; here checkpoints
are read with ``weights_only=True`` (plain containers, tensors and numpy scalars
only) and handed to ``nnUNetPredictor.manual_initialization``, so a tampered
checkpoint is refused instead of executed. nnU-Net then does its own
preprocessing (cropping, resampling to the plans' spacing, normalisation),
sliding-window inference with Gaussian weighting and export back to the input
grid; images go in as ``(C, Z, Y, X)`` with their ``(z, y, x)`` spacing, the axis
order nnU-Net's SimpleITK reader uses.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import numpy as np

from ..errors import MedSegError, check_cancel
from .card import ModelCard
from .predictor import Model

__all__ = ["nnunet_card", "load_nnunet", "NnunetModel", "load_checkpoint"]

log = logging.getLogger(__name__)

_NORMS = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none",
          "RescaleTo01Normalization": "minmax", "RGBTo01Normalization": "minmax"}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedSegError(f"cannot read {path.name} ({exc})", str(path)) from exc


def _configuration_name(path: Path, plans: dict) -> str:
    parts = path.name.split("__")
    if len(parts) == 3 and parts[2] in plans.get("configurations", {}):
        return parts[2]
    for name in ("3d_fullres", "3d_lowres", "2d"):
        if name in plans.get("configurations", {}):
            return name
    raise MedSegError("cannot tell which nnU-Net configuration this folder holds", str(path))


def _folds(path: Path, checkpoint: str) -> list:
    folds = sorted(p.name[5:] for p in path.glob("fold_*") if (p / checkpoint).is_file())
    if not folds:
        raise MedSegError(f"no fold_*/{checkpoint} in the nnU-Net result folder", str(path))
    return folds


def nnunet_card(path, checkpoint: str = "checkpoint_final.pth") -> ModelCard:
    """A card describing an nnU-Net result folder (read from its plans and dataset json)."""
    path = Path(path)
    plans, ds = _json(path / "plans.json"), _json(path / "dataset.json")
    cfg_name = _configuration_name(path, plans)
    cfg = plans["configurations"][cfg_name]
    while "spacing" not in cfg and "inherits_from" in cfg:
        cfg = {**plans["configurations"][cfg["inherits_from"]], **cfg}
    chans = ds.get("channel_names") or ds.get("modality") or {"0": "image"}
    channels = [{"name": str(v), "modality": "CT" if str(v).upper() == "CT" else
                 ("MR" if str(v).upper() in ("MRI", "MR", "T1", "T2", "FLAIR", "ADC") else str(v))}
                for _, v in sorted(chans.items(), key=lambda kv: int(kv[0]))]
    labels = ds.get("labels", {})
    classes = {int(v): {"name": str(k)} for k, v in labels.items()
               if isinstance(v, int) and int(v) > 0}
    norms = [{"kind": _NORMS.get(n, "none"), "nnunet": n}
             for n in cfg.get("normalization_schemes", ["ZScoreNormalization"])]
    for n, props in zip(norms, (plans.get("foreground_intensity_properties_per_channel") or {})
                        .values()):
        if n["kind"] == "ct":
            n["window"] = [float(props["percentile_00_5"]), float(props["percentile_99_5"])]
            n["mean"], n["std"] = float(props["mean"]), float(props["std"])
    spacing = [float(s) for s in cfg.get("spacing", [1, 1, 1])]
    patch = list(cfg.get("patch_size", [64, 64, 64]))
    if len(spacing) == 2:  # 2d configuration: one slice at a time
        spacing, patch = [1.0] + spacing, [1] + patch
    return ModelCard(
        name=f"{plans.get('dataset_name', path.parent.name)}-{cfg_name}",
        version=str(len(_folds(path, checkpoint))) + "-fold",
        task=str(ds.get("description") or ds.get("name") or plans.get("dataset_name", "")),
        license=str(ds.get("licence") or ds.get("license") or "unknown"),
        channels=channels, target_spacing=spacing, orientation=None,
        normalization=norms, patch_size=patch, classes=classes, format="nnunet",
        training=f"nnU-Net v2 {path.name} ({ds.get('numTraining', '?')} training cases)",
        extra={"configuration": cfg_name, "checkpoint": checkpoint},
    )


def load_checkpoint(path: Path) -> dict:
    """Read an nnU-Net checkpoint with ``weights_only=True`` (numpy scalars allowed).

    Raises
    ------
    MedSegError
        When the checkpoint holds anything else (e.g. pickled code).
    """
    import pickle

    import torch

    allowed = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
               type(np.dtype(np.int64))]
    try:
        allowed.append(np._core.multiarray.scalar)
    except AttributeError:  # numpy < 2
        allowed.append(np.core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MedSegError("refused to load: the checkpoint contains pickled Python objects "
                          "or code beyond tensors and plain data", str(path)) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise MedSegError(f"cannot read the checkpoint ({str(exc).splitlines()[0]})",
                          str(path)) from exc
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise MedSegError("not an nnU-Net checkpoint (no network_weights)", str(path))
    return ckpt


def load_nnunet(path, folds=None, checkpoint: str = "checkpoint_final.pth") -> "NnunetModel":
    """Load an nnU-Net v2 result folder.

    Parameters
    ----------
    path : path-like
        The ``<Trainer>__<Plans>__<configuration>`` folder.
    folds : sequence, optional
        Folds to ensemble; all with a checkpoint by default.
    checkpoint : str
        Checkpoint file name in each fold folder.
    """
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: F401
    except ImportError as exc:
        raise MedSegError("nnU-Net result folders need nnunetv2; install "
                          "napari-medseg[nnunet]", str(path)) from exc
    path = Path(path)
    card = nnunet_card(path, checkpoint)
    folds = list(folds) if folds is not None else _folds(path, checkpoint)
    ckpts = [load_checkpoint(path / f"fold_{f}" / checkpoint) for f in folds]
    return NnunetModel(card, path, ckpts)


class NnunetModel(Model):
    """An nnU-Net v2 ensemble behind the :class:`Model` API.

    ``overlap`` maps to nnU-Net's ``tile_step_size = 1 - overlap``; ``tta`` to its
    mirroring over the axes the checkpoint allows. Uncertainty is the normalised
    entropy of nnU-Net's class probabilities.
    """

    def __init__(self, card, folder: Path, checkpoints: list):
        super().__init__(card, str(folder))
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.folder = Path(folder)
        self.dataset_json = _json(self.folder / "dataset.json")
        self.plans_manager = PlansManager(_json(self.folder / "plans.json"))
        first = checkpoints[0]
        self.trainer_name = str(first.get("trainer_name", "nnUNetTrainer"))
        self.configuration = str((first.get("init_args") or {}).get(
            "configuration", card.extra["configuration"]))
        axes = first.get("inference_allowed_mirroring_axes")
        self.mirror_axes_nn = None if axes is None else tuple(int(a) for a in axes)
        self.parameters = [c["network_weights"] for c in checkpoints]
        self.network = self._build_network()

    def _build_network(self):
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from nnunetv2.utilities.label_handling.label_handling import \
            determine_num_input_channels

        cm = self.plans_manager.get_configuration(self.configuration)
        try:
            trainer = recursive_find_trainer_class_by_name(self.trainer_name)
        except Exception as exc:  # nnunetv2 raises RuntimeError / AssertionError
            raise MedSegError(f"nnU-Net trainer {self.trainer_name} is not installed",
                              self.source) from exc
        n_in = determine_num_input_channels(self.plans_manager, cm, self.dataset_json)
        n_out = self.plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads
        if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
            net = trainer.build_network_architecture(self.plans_manager, cm, n_in, n_out,
                                                     enable_deep_supervision=False)
        else:  # older nnunetv2
            net = trainer.build_network_architecture(
                cm.network_arch_class_name, cm.network_arch_init_kwargs,
                cm.network_arch_init_kwargs_req_import, n_in, n_out,
                enable_deep_supervision=False)
        try:
            net.load_state_dict(self.parameters[0])
        except RuntimeError as exc:
            raise MedSegError("the checkpoint does not fit the network in plans.json: "
                              f"{str(exc).splitlines()[0]}", self.source) from exc
        return net

    def _predictor(self, device, overlap, tta):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        p = nnUNetPredictor(tile_step_size=max(0.05, 1.0 - float(overlap)), use_gaussian=True,
                            use_mirroring=bool(tta), perform_everything_on_device=
                            device.type == "cuda", device=torch.device(device),
                            verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        p.manual_initialization(self.network, self.plans_manager,
                                self.plans_manager.get_configuration(self.configuration),
                                self.parameters, self.dataset_json, self.trainer_name,
                                self.mirror_axes_nn)
        return p

    def _predict_array(self, vols, device, overlap, tta, uncertainty, progress, cancel):
        from ..core.inference import pick_device

        ref = vols[0]
        channels = []
        for v in vols:
            a = np.asarray(v.data, dtype=np.float32)
            channels.extend([a] if a.ndim == 3 else list(a))
        x = np.stack(channels)
        if not np.isfinite(x).all():
            raise MedSegError("the image contains NaN or infinite values; fill or mask them "
                              "before running a model", ref.source)
        dev = pick_device(device)
        pred = self._predictor(dev, overlap, tta or uncertainty == "tta")
        if progress:
            progress(0, 1)
        check_cancel(cancel)
        props = {"spacing": [float(s) for s in ref.spacing]}
        if uncertainty:
            seg, prob = pred.predict_single_npy_array(x, props, None, None, True)
            p = np.clip(np.asarray(prob, dtype=np.float32), 1e-7, 1.0)
            ent = -(p * np.log(p)).sum(0) / np.log(max(p.shape[0], 2))
            unc = ent.astype(np.float16)
        else:
            seg = pred.predict_single_npy_array(x, props, None, None, False)
            unc = None
        check_cancel(cancel)
        if progress:
            progress(1, 1)
        return np.asarray(seg), unc, {"device": str(dev), "amp": "nnunet", "windows": None}
