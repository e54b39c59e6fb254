"""Trained nnU-Net v2 result folders (optional extra ``napari-medseg[nnunet]``).

A result folder (``nnUNet_results/DatasetXXX/<Trainer>__<Plans>__<config>``) holds
``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``. nnU-Net's
own loader unpickles checkpoints with ``weights_only=False``; here checkpoints
are read with ``weights_only=True`` (plain containers, tensors and numpy scalars
only), so a tampered checkpoint is refused instead of executed. The networks
are built from the plans by nnU-Net's builder (``dynamic_network_architectures``).

Two backends run them; both give nnU-Net's labels:

- ``"native"`` (default): nnU-Net's preprocessing, then the plugin's own
  sliding-window engine with nnU-Net's window positions and Gaussian, and
  nnU-Net's export (logits resampled to the input grid, then argmax) done slab
  by slab (:mod:`napari_medseg.models.nnunet_native`): bounded memory, bf16 /
  channels-last on capable CPUs, progress and cancel per window.
- ``"nnunetv2"``: ``nnUNetPredictor`` itself (``manual_initialization``), the
  reference path.

Images go in as ``(C, Z, Y, X)`` with their ``(z, y, x)`` spacing, the axis
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


BACKENDS = ("native", "nnunetv2")


def load_nnunet(path, folds=None, checkpoint: str = "checkpoint_final.pth",
                backend: str = "native", card: ModelCard | None = None) -> "NnunetModel":
    """Load an nnU-Net v2 result folder.

    Parameters
    ----------
    path : path-like
        The ``<Trainer>__<Plans>__<configuration>`` folder.
    folds : sequence, optional
        Folds to ensemble; all with a checkpoint by default.
    checkpoint : str
        Checkpoint file name in each fold folder.
    backend : {"native", "nnunetv2"}
        Run in the plugin's engine, or through ``nnUNetPredictor`` (reference).
    card : ModelCard, optional
        A card to use instead of the one read from the folder.
    """
    if backend not in BACKENDS:
        raise MedSegError(f"unknown nnU-Net backend {backend!r}; use 'native' or 'nnunetv2'",
                          str(path))
    try:
        # (not nnunetv2.inference: it imports torch._dynamo, 3-4 s, and only the
        # reference backend needs it)
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: F401
    except ImportError as exc:
        raise MedSegError("nnU-Net result folders need nnunetv2; install "
                          "napari-medseg[nnunet]", str(path)) from exc
    path = Path(path)
    card = card or nnunet_card(path, checkpoint)
    folds = list(folds) if folds is not None else _folds(path, checkpoint)
    ckpts = [load_checkpoint(path / f"fold_{f}" / checkpoint) for f in folds]
    model = NnunetModel(card, path, ckpts)
    model.backend = backend
    return model


class NnunetModel(Model):
    """An nnU-Net v2 ensemble behind the :class:`Model` API.

    ``overlap`` maps to nnU-Net's ``tile_step_size = 1 - overlap``; ``tta`` to its
    mirroring over the axes the checkpoint allows (none for ``NoMirroring``
    trainers). Uncertainty is the normalised entropy of the class probabilities.

    Attributes
    ----------
    backend : {"native", "nnunetv2"}
        Which pipeline :meth:`predict` uses (see module notes).
    amp : str
        Mixed precision of the native backend (``"auto"``: bf16 where the CPU
        or GPU has it; ``"off"``: float32 throughout).
    """

    backend = "native"

    precision_option = True  # the native backend's autocast (nnUNetPredictor keeps its own)

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
        if "NoMirroring" in self.trainer_name:
            self.mirror_axes_nn = None
        self.parameters = [c["network_weights"] for c in checkpoints]
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration)
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.n_outputs = int(self.label_manager.num_segmentation_heads)
        self.has_regions = bool(self.label_manager.has_regions)
        self.network = self._build_network()
        self._native = None

    def _build_network(self):
        """The plans' network with fold 0's weights.

        Most trainers (epoch counts, ``NoMirroring``, augmentation and loss
        variants, TotalSegmentator's) build the plans' own network, so that is
        tried first; nnU-Net's search through every trainer module (slow, and it
        imports optional packages) is used only when the weights do not fit it.
        """
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import \
            determine_num_input_channels

        cm = self.plans_manager.get_configuration(self.configuration)
        n_in = determine_num_input_channels(self.plans_manager, cm, self.dataset_json)
        n_out = self.plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                     allow_init=False, deep_supervision=False)
        from ..core.convs import onednn_convolutions

        try:
            net.load_state_dict(self.parameters[0])
            return onednn_convolutions(net.eval())
        except RuntimeError as exc:
            first_error = exc
        net = self._trainer_network(cm, n_in, n_out)
        if net is None:
            raise MedSegError("the checkpoint does not fit the network in plans.json: "
                              f"{str(first_error).splitlines()[0]}", self.source)
        try:
            net.load_state_dict(self.parameters[0])
        except RuntimeError as exc:
            raise MedSegError("the checkpoint does not fit the network in plans.json: "
                              f"{str(exc).splitlines()[0]}", self.source) from exc
        return onednn_convolutions(net.eval())

    def _trainer_network(self, cm, n_in, n_out):
        """The network the checkpoint's trainer class builds, or None if it is not installed."""
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            trainer = recursive_find_trainer_class_by_name(self.trainer_name)
        except Exception:  # nnunetv2 raises RuntimeError / AssertionError / ImportError
            return None
        if trainer is None:
            return None
        if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
            return trainer.build_network_architecture(self.plans_manager, cm, n_in, n_out,
                                                      enable_deep_supervision=False)
        return trainer.build_network_architecture(  # older nnunetv2
            cm.network_arch_class_name, cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import, n_in, n_out, enable_deep_supervision=False)

    def native_network(self, device):
        """The fold ensemble as one ``(B, C, z, y, x) -> (B, K, z, y, x)`` module on ``device``."""
        import copy

        from .nnunet_native import EnsembleNetwork, LeanUNet, Network2D, _FullResolution

        # the reference backend loads each fold into self.network in turn: reload fold 0
        self.network.load_state_dict(self.parameters[0])
        if self._native is None:
            nets = []
            for params in self.parameters:
                net = self.network if not nets else copy.deepcopy(self.network)
                net.load_state_dict(params)
                nets.append(net.eval())
            # plain U-Nets run with the same modules in an order that frees memory sooner
            nets = [LeanUNet(n) if LeanUNet.fits(n) else n for n in nets]
            net = nets[0] if len(nets) == 1 else EnsembleNetwork(nets)
            if len(self.configuration_manager.patch_size) == 2:
                net = Network2D(net)
            elif len(nets) == 1 and getattr(net, "decoder", None) is not None and \
                    getattr(net.decoder, "deep_supervision", False):
                net = _FullResolution(net)
            self._native = net
        return self._native.to(device)

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

    def _stack(self, vols):
        ref = vols[0]
        channels = []
        for v in vols:
            a = np.asarray(v.data, dtype=np.float32)
            channels.extend([a] if a.ndim == 3 else list(a))
        x = np.stack(channels)
        if not np.isfinite(x).all():
            raise MedSegError("the image contains NaN or infinite values; fill or mask them "
                              "before running a model", ref.source)
        return x

    def run_array(self, x, spacing, device="auto", overlap=0.5, tta=False, uncertainty=None,
                  progress=None, cancel=None, keep_logits=False):
        """Run the native backend on a ``(C, Z, Y, X)`` array with ``(z, y, x)`` spacing (mm).

        Returns
        -------
        napari_medseg.models.nnunet_native.NativeResult
        """
        from .nnunet_native import run_native

        return run_native(self, x, spacing, device=device, overlap=overlap, tta=tta,
                          amp=self.amp, uncertainty=uncertainty, progress=progress,
                          cancel=cancel, keep_logits=keep_logits)

    def _predict_array(self, vols, device, overlap, tta, uncertainty, progress, cancel):
        from ..core.inference import pick_device

        ref = vols[0]
        x = self._stack(vols)
        if self.backend == "native":
            res = self.run_array(x, ref.spacing, device=device, overlap=overlap,
                                 tta=tta or uncertainty == "tta",
                                 uncertainty="entropy" if uncertainty else None,
                                 progress=progress, cancel=cancel)
            return res.labels, res.uncertainty, dict(res.info, backend="native")
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
        return np.asarray(seg), unc, {"device": str(dev), "amp": "nnunet", "windows": None,
                                      "backend": "nnunetv2"}
