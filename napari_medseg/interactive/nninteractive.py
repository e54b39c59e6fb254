"""nnInteractive behind the engine interface.

Used when the ``nninteractive`` package is installed (``pip install
napari-medseg[nninteractive]``) and the user has an nnInteractive model folder
on disk (nothing is downloaded): ``plans.json``, ``dataset.json``, one
``fold_*/checkpoint_final.pth`` and ``inference_info.json`` (or the older
``inference_session_class.json``). The model is 3D and promptable with points,
boxes (drawn on one slice; boxes spanning slices where the model supports
them) and scribbles; it runs on a GPU when one is there and on the CPU
otherwise (slowly for the published 192^3 model).

nnInteractive's own loader unpickles checkpoints with ``weights_only=False``;
here the checkpoint is read with ``weights_only=True`` (tensors, plain data and
numpy scalars, see :func:`napari_medseg.models.nnunet.load_checkpoint`) and
the network is handed to the session ready-built.

nnInteractive keeps its own interaction state per image: this adapter replays
the full prompt set on every update (after ``reset_interactions``) so that the
result depends only on the current prompts, as for every other engine. The
prompt the prediction is centred on is replayed last (the first positive
click, else a box, else an object scribble). The image is normalised once per
image (``set_image``) and kept by the session.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.policy import choose_device
from ..errors import MedSegError, check_cancel
from .base import Engine, Prompts, Region

log = logging.getLogger(__name__)

__all__ = ["NNInteractiveEngine", "nninteractive_available", "load_session"]


def nninteractive_available() -> bool:
    """True when the ``nninteractive`` package (module ``nnInteractive``) is installed."""
    try:
        return importlib.util.find_spec("nnInteractive.inference.inference_session") is not None
    except ModuleNotFoundError:
        return False


class _LogStream(io.TextIOBase):
    """A text stream that sends each line to ``log.debug`` (nnInteractive prints a lot)."""

    def write(self, s):
        for line in s.splitlines():
            if line.strip():
                log.debug("nnInteractive: %s", line)
        return len(s)


def _quiet():
    return contextlib.redirect_stdout(_LogStream())


def _fold_checkpoint(folder: Path, checkpoint: str) -> Path:
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise MedSegError(f"not an nnInteractive model folder (no {name}); choose the "
                              "folder that holds plans.json and fold_0", str(folder))
    if not ((folder / "inference_info.json").is_file()
            or (folder / "inference_session_class.json").is_file()):
        raise MedSegError("not an nnInteractive model folder (no inference_info.json); an "
                          "nnU-Net result folder goes into the Segment panel instead",
                          str(folder))
    folds = sorted(p for p in folder.glob("fold_*") if (p / checkpoint).is_file())
    if len(folds) != 1:
        raise MedSegError(f"expected one fold_*/{checkpoint} in the model folder, found "
                          f"{len(folds)}", str(folder))
    return folds[0] / checkpoint


def _trainer_class(name: str):
    import nnInteractive.trainer
    import nnunetv2
    from nnInteractive.trainer.nnInteractiveTrainer import nnInteractiveTrainer_stub
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(nnInteractive.trainer.__path__[0], name,
                                        "nnInteractive.trainer")
    if found is None:
        try:
            found = recursive_find_python_class(
                str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"), name,
                "nnunetv2.training.nnUNetTrainer")
        except Exception as exc:  # noqa: BLE001 - a trainer module that fails to import
            log.warning("nnU-Net trainers not searchable (%s); using nnInteractive's "
                        "default network builder", exc)
    # every nnInteractive trainer builds its network the nnU-Net way, as the stub does
    return found or nnInteractiveTrainer_stub


def _artifacts(session, folder: Path, ckpt: dict, device) -> dict:
    """What ``initialize_from_loaded_artifacts`` wants, from a safely read checkpoint.

    Mirrors nnInteractive's ``_load_model_artifacts_from_disk`` without its
    ``torch.load(weights_only=False)``.
    """
    import json

    from nnInteractive.interaction.point import PointInteraction_stub
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cap, radius, thickness, decay, pad = session._load_capability_and_runtime_defaults(
        str(folder))
    point = PointInteraction_stub(radius, True)
    session._apply_capability(cap)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())
    pm = PlansManager(plans)
    trainer = str(ckpt.get("trainer_name", "nnInteractiveTrainer_stub"))
    config = str((ckpt.get("init_args") or {}).get("configuration", ""))
    try:
        cm = pm.get_configuration(config)
    except Exception as exc:  # noqa: BLE001 - nnU-Net raises bare assertions / KeyErrors
        raise MedSegError(f"the checkpoint's configuration {config!r} is not in plans.json",
                          str(folder)) from exc
    n_in = (determine_num_input_channels(pm, cm, dataset_json)
            + session.num_interaction_channels)
    net = _trainer_class(trainer).build_network_architecture(
        pm, cm, n_in, 2, enable_deep_supervision=False)
    try:
        net.load_state_dict(ckpt["network_weights"])
    except RuntimeError as exc:
        raise MedSegError("the checkpoint does not fit the network its plans.json describes: "
                          f"{str(exc).splitlines()[0]}", str(folder)) from exc
    return {"capability_content": cap, "point_interaction": point,
            "preferred_scribble_thickness": thickness, "interaction_decay": decay,
            "pad_mode_data": pad, "network": net.to(device).eval(), "plans_manager": pm,
            "configuration_manager": cm, "dataset_json": dataset_json,
            "trainer_name": trainer, "label_manager": pm.get_label_manager(dataset_json),
            "license": session._load_license(str(folder), plans, ckpt)}


def load_session(model_folder, device: str = "auto", autozoom: bool = True,
                 checkpoint: str = "checkpoint_final.pth"):
    """An ``nnInteractiveInferenceSession`` for a local model folder.

    Parameters
    ----------
    model_folder : path
        nnInteractive model folder (``plans.json``, ``dataset.json``,
        ``inference_info.json``, ``fold_*/checkpoint_final.pth``).
    device : str
        ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
    autozoom : bool
        nnInteractive's zoom-out and refinement for objects larger than one
        patch (slow on the CPU); off: one patch around the centring prompt.

    Raises
    ------
    MedSegError
        When the package is missing or the folder / checkpoint is not usable.
    """
    import inspect

    import torch

    from ..models.nnunet import load_checkpoint

    if not nninteractive_available():
        raise MedSegError("the nnInteractive engine needs the `nninteractive` package: "
                          "pip install napari-medseg[nninteractive]", "nnInteractive")
    folder = Path(model_folder)
    if not folder.is_dir():
        raise MedSegError("nnInteractive model folder not found; choose the folder that "
                          "holds plans.json and fold_0", str(folder))
    ckpt = load_checkpoint(_fold_checkpoint(folder, checkpoint))
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    dev = choose_device(device, allow_mps=False)
    kwargs = {"device": dev, "use_torch_compile": False, "verbose": False,
              "torch_n_threads": max(torch.get_num_threads(), 1),
              "do_autozoom": bool(autozoom),
              "enable_undo": False}
    accepted = inspect.signature(nnInteractiveInferenceSession.__init__).parameters
    with _quiet():
        session = nnInteractiveInferenceSession(
            **{k: v for k, v in kwargs.items() if k in accepted})
        try:
            session.initialize_from_loaded_artifacts(_artifacts(session, folder, ckpt, dev))
        except (AttributeError, TypeError) as exc:
            raise MedSegError("this nnInteractive version is not supported; install "
                              f"nninteractive>=2.6 ({exc})", "nnInteractive") from exc
        except (ValueError, RuntimeError, FileNotFoundError) as exc:
            raise MedSegError(f"cannot use the nnInteractive model: {exc}",
                              str(folder)) from exc
    log.info("nnInteractive model %s loaded on %s (license: %s)", folder, dev,
             session.license)
    return session


class NNInteractiveEngine(Engine):
    """nnInteractive from a local model folder.

    Parameters
    ----------
    model_folder : path
        An nnInteractive model folder (see :func:`load_session`).
    device : str
        ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
    autozoom : bool
        Zoom out and refine when the object leaves the first patch (the
        default, as in nnInteractive); off, one network patch (the model's
        patch size, 192^3 voxels for the published one) around the first
        positive click is predicted, which is much faster on the CPU.
    """

    name = "nnInteractive"

    def __init__(self, model_folder, device: str = "auto", autozoom: bool = True):
        super().__init__()
        self.model_folder = Path(model_folder)
        self.device = device
        self.autozoom = bool(autozoom)
        self._session = None
        self._target = None

    @property
    def session(self):
        """The loaded nnInteractive session (built on first use)."""
        if self._session is None:
            self._session = load_session(self.model_folder, self.device, self.autozoom)
        return self._session

    def set_image(self, image, spacing) -> None:
        """Hand the image (as ``(1, Z, Y, X)``) to the session; it normalises it once."""
        if not np.any(np.asarray(image)):
            raise MedSegError("the image is all zeros; nnInteractive cannot normalise it",
                              "image")
        session = self.session
        self._cache_key = None
        img = np.asarray(image, np.float32)[None]
        with _quiet():
            session.set_image(img, {"spacing": [float(s) for s in spacing]})
            self._target = np.zeros(img.shape[1:], np.uint8)
            session.set_target_buffer(self._target)
        super().set_image(image, spacing)

    def _jobs(self, prompts: Prompts) -> list:
        """``(method name, argument, include, extra kwargs)``, the centring prompt last."""
        s = self.session
        jobs, last = [], []
        if prompts.scribbles is not None:
            for value, include in ((2, False), (1, True)):
                sc = np.asarray(prompts.scribbles) == value
                if sc.any():
                    box = [[int(i.min()), int(i.max()) + 1] for i in np.nonzero(sc)]
                    crop = sc[tuple(slice(a, b) for a, b in box)].astype(np.uint8)
                    jobs.append(("add_scribble_interaction", crop, include,
                                 {"interaction_bbox": box}))
        for lo, hi in prompts.boxes:
            lo_i = np.floor(lo + 0.5).astype(int)
            hi_i = np.floor(hi + 0.5).astype(int) + 1
            if np.all(hi_i - lo_i > 1) and not s.supported_interactions.get("bbox3d"):
                raise MedSegError("this nnInteractive model takes boxes drawn on one slice "
                                  "only; draw the box on a single slice", "boxes")
            jobs.append(("add_bbox_interaction",
                         [[int(a), int(b)] for a, b in zip(lo_i, hi_i)], True, {}))
        for p in prompts.negative:
            jobs.append(("add_point_interaction", tuple(int(round(v)) for v in p), False, {}))
        for i, p in enumerate(prompts.positive):
            job = ("add_point_interaction", tuple(int(round(v)) for v in p), True, {})
            (last if i == 0 else jobs).append(job)
        if not last:  # centre on a box or an object scribble
            for k in range(len(jobs) - 1, -1, -1):
                if jobs[k][2]:
                    last.append(jobs.pop(k))
                    break
        return jobs + last

    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        self.ensure_image(image, spacing)
        s = self.session
        jobs = self._jobs(prompts)
        with _quiet():
            s.reset_interactions()
            for i, (method, arg, include, extra) in enumerate(jobs):
                check_cancel(cancel)
                try:  # predict once, after the last prompt is in place
                    getattr(s, method)(arg, include_interaction=include,
                                       run_prediction=i == len(jobs) - 1, **extra)
                except ValueError as exc:
                    raise MedSegError(f"nnInteractive refused a prompt: {exc}",
                                      "prompts") from exc
        check_cancel(cancel)
        mask = self._target > 0
        if prompts.mode == "2d":
            ax, k = prompts.axis, prompts.index
            region = tuple(slice(k, k + 1) if a == ax else slice(0, image.shape[a])
                           for a in range(3))
            return mask[region].copy(), region
        return mask.copy(), tuple(slice(0, n) for n in image.shape)
