"""nnInteractive behind the engine interface.

Used when the ``nnInteractive`` package is installed and the user has a
trained nnInteractive model folder on disk (nothing is downloaded). The model
is 3D and promptable with points, boxes and scribbles; it runs on a GPU when
one is there and on the CPU otherwise (slowly).

nnInteractive keeps its own interaction state per image: this adapter replays
the full prompt set on every update (after ``reset_interactions``) so that the
result depends only on the current prompts, as for every other engine. The
image is preprocessed once per image (``set_image``).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MedSegError, check_cancel
from .base import Engine, Prompts, Region

log = logging.getLogger(__name__)

__all__ = ["NNInteractiveEngine", "nninteractive_available"]


def nninteractive_available() -> bool:
    """True when the ``nnInteractive`` package is installed."""
    return importlib.util.find_spec("nnInteractive") is not None


class NNInteractiveEngine(Engine):
    """nnInteractive from a local model folder.

    Parameters
    ----------
    model_folder : path
        A trained nnInteractive folder (with ``plans.json`` and ``fold_*``).
    device : str
        ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
    """

    name = "nnInteractive"

    def __init__(self, model_folder, device: str = "auto"):
        super().__init__()
        self.model_folder = Path(model_folder)
        self.device = device
        self._session = None

    @property
    def session(self):
        if self._session is None:
            if not nninteractive_available():
                raise MedSegError("the nnInteractive engine needs the `nnInteractive` "
                                  "package: pip install nninteractive", "nnInteractive")
            if not (self.model_folder / "plans.json").is_file():
                raise MedSegError("not an nnInteractive model folder (no plans.json); "
                                  "choose the folder you downloaded", str(self.model_folder))
            import torch
            from nnInteractive.inference.inference_session import (
                nnInteractiveInferenceSession,
            )

            dev = self.device
            if dev == "auto":
                dev = "cuda" if torch.cuda.is_available() else "cpu"
            session = nnInteractiveInferenceSession(
                device=torch.device(dev), use_torch_compile=False, verbose=False,
                torch_n_threads=max(torch.get_num_threads(), 1), do_autozoom=True)
            session.initialize_from_trained_model_folder(str(self.model_folder))
            self._session = session
        return self._session

    def set_image(self, image, spacing) -> None:
        super().set_image(image, spacing)
        # nnInteractive wants (C, X, Y, Z); our arrays are (Z, Y, X)
        img = np.asarray(image, np.float32).transpose(2, 1, 0)[None]
        self.session.set_image(img, {"spacing": list(spacing)[::-1]})
        self._target = np.zeros(img.shape[1:], np.uint8)
        self.session.set_target_buffer(self._target)

    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        self.ensure_image(image, spacing)
        s = self.session
        s.reset_interactions()
        self._target[:] = 0

        def xyz(p):
            return tuple(int(round(v)) for v in p[::-1])

        jobs = []  # (method, first argument, include)
        for p in prompts.positive:
            jobs.append((s.add_point_interaction, xyz(p), True))
        for p in prompts.negative:
            jobs.append((s.add_point_interaction, xyz(p), False))
        for lo, hi in prompts.boxes:
            lo_i = np.floor(lo + 0.5).astype(int)[::-1]
            hi_i = np.floor(hi + 0.5).astype(int)[::-1] + 1
            jobs.append((s.add_bbox_interaction,
                         [[int(a), int(b)] for a, b in zip(lo_i, hi_i)], True))
        if prompts.scribbles is not None:
            for value, include in ((1, True), (2, False)):
                sc = np.asarray(prompts.scribbles) == value
                if sc.any():
                    jobs.append((s.add_scribble_interaction,
                                 sc.transpose(2, 1, 0).astype(np.uint8), include))
        for i, (method, arg, include) in enumerate(jobs):
            check_cancel(cancel)
            # predict once, after the last prompt is in place
            method(arg, include_interaction=include, run_prediction=i == len(jobs) - 1)
        check_cancel(cancel)
        mask = self._target.transpose(2, 1, 0) > 0
        if prompts.mode == "2d":
            ax, k = prompts.axis, prompts.index
            region = tuple(slice(k, k + 1) if a == ax else slice(0, image.shape[a])
                           for a in range(3))
            return mask[region].copy(), region
        return mask.copy(), tuple(slice(0, n) for n in image.shape)
