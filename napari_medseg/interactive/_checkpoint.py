"""Reading the user's Segment Anything-style checkpoints safely."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MedSegError

__all__ = ["read_state_dict"]


def read_state_dict(checkpoint: Path, what: str, suffix: str) -> dict:
    """A ``{name: tensor}`` checkpoint, read with ``weights_only=True``.

    A ``{"model": state_dict}`` wrapper (as SAM, SAM 2 and MedSAM save them) is
    unwrapped; nothing in the file is executed.

    Parameters
    ----------
    checkpoint : Path
        The file.
    what : str
        The model family for messages (``"SAM"``, ``"SAM2"``).
    suffix : str
        The usual file suffix for messages (``".pth"``, ``".pt"``).

    Raises
    ------
    MedSegError
        When the file is missing, unreadable, or holds anything but tensors.
    """
    if not checkpoint.is_file():
        raise MedSegError(f"{what} checkpoint not found; choose a {suffix} file on disk",
                          str(checkpoint))
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise MedSegError(f"cannot read the checkpoint ({str(exc).splitlines()[0]}); it "
                          "must be a plain state dict of tensors", str(checkpoint)) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise MedSegError(f"not a {what} checkpoint (expected a state dict of tensors, or "
                          "{'model': state_dict})", str(checkpoint))
    return state
