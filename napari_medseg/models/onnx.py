"""ONNX models through onnxruntime (optional extra ``napari-medseg[onnx]``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import MedSegError
from .predictor import Model

__all__ = ["OnnxModel"]

log = logging.getLogger(__name__)


class OnnxModel(Model):
    """A model run by onnxruntime; windows go through the same tiled engine.

    Parameters
    ----------
    card : ModelCard
    data : bytes
        The ``.onnx`` file contents.
    source : str
    """

    batch_size = 1
    amp = "off"  # onnxruntime runs the graph in its own precision

    def __init__(self, card, data: bytes, source: str = ""):
        super().__init__(card, source)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MedSegError("ONNX models need onnxruntime; install napari-medseg[onnx]",
                              source) from exc
        self._ort = ort
        self._data = data
        self._sessions = {}
        self._session("cpu")  # fail early on a bad file

    def _session(self, kind: str):
        if kind not in self._sessions:
            providers = ["CPUExecutionProvider"]
            if kind == "cuda" and "CUDAExecutionProvider" in self._ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            try:
                self._sessions[kind] = self._ort.InferenceSession(self._data, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise MedSegError(f"cannot load the ONNX model ({str(exc).splitlines()[0]})",
                                  self.source) from exc
        return self._sessions[kind]

    def make_predictor(self, device):
        sess = self._session("cuda" if device.type == "cuda" else "cpu")
        name = sess.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            arr = x.detach().float().cpu().numpy()
            y = sess.run(None, {name: np.ascontiguousarray(arr)})[0]
            return torch.from_numpy(np.asarray(y, dtype=np.float32)).to(x.device)

        return run
