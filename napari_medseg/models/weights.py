"""Reading weights, writing state_dict packages and checking package paths.

Pickled weights are only ever read with ``weights_only=True``; TorchScript
archives are loaded with ``torch.jit.load``; files a package names must resolve
inside the package. :mod:`.loaders` and :mod:`.bundle` both use these (so
neither imports the other for them); fine-tuning and weight averaging write their
packages with :func:`write_state_package`.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import MedSegError, check_cancel

__all__ = ["load_weights", "is_torchscript", "load_torchscript", "inside_package",
           "write_state_package"]


def load_weights(data, source: str) -> dict:
    """Read a state_dict safely (``weights_only=True``).

    Parameters
    ----------
    data : bytes or path-like
        The ``.pt``/``.pth`` file or its bytes.
    source : str
        Name for messages.

    Raises
    ------
    MedSegError
        When the file holds anything but tensors and plain containers (for
        example pickled code); nothing in it is executed.
    """
    fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MedSegError(
            "refused to load: the weights file contains pickled Python objects or code, "
            "not just tensors, and could run code on this computer. Use a plain "
            "state_dict (torch.save(model.state_dict())) or TorchScript", source) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise MedSegError(f"cannot read the weights ({str(exc).splitlines()[0]}); "
                          "is it a PyTorch file?", source) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "network_weights", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MedSegError("the weights file is not a state_dict (a mapping of tensors)", source)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def is_torchscript(data) -> bool:
    """True when ``data`` (bytes or a path) is a TorchScript archive."""
    try:
        fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with zipfile.ZipFile(fh) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def load_torchscript(data, source: str) -> torch.jit.ScriptModule:
    """Load a TorchScript module on the CPU (no Python pickle involved)."""
    fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)
    try:
        return torch.jit.load(fh, map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as exc:
        raise MedSegError(f"cannot load TorchScript model ({str(exc).splitlines()[0]})",
                          source) from exc



def inside_package(root, path) -> Path:
    """``path`` when it resolves inside the package folder ``root``, else :class:`MedSegError`.

    Symlinks are resolved first, so a link pointing outside the package (to
    another user's files, ``/etc``, a network mount) is refused.
    """
    root, path = Path(root), Path(path)
    try:
        real_root, real = root.resolve(strict=True), path.resolve()
    except (OSError, RuntimeError) as exc:  # a missing root, a symlink loop
        raise MedSegError(f"cannot resolve {path.name} ({exc})", str(root)) from exc
    if not real.is_relative_to(real_root):
        raise MedSegError(f"{path.relative_to(root) if path.is_relative_to(root) else path} "
                          "points outside the model package (a symlink?); refused; copy the "
                          "file into the package", str(root))
    return path


def write_state_package(card, state: dict, final, overwrite: bool = False,
                        cancel=None) -> Path:
    """Write ``state`` (tensors) and ``card`` as the package folder ``final``, atomically.

    Both files go to a hidden folder beside ``final`` that is renamed into place
    once whole; on any error or a cancel it is removed and ``final`` is untouched.
    An existing ``final`` is a :class:`MedSegError` unless ``overwrite``; then it is
    replaced only after the new package is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    try:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()},
                   tmp / (card.weights or "model.pt"))
        card.save(tmp / "card.yaml")
        check_cancel(cancel)
        if final.exists():
            if not overwrite:
                raise MedSegError(f"a model package named {final.name} already exists; "
                                  "choose another name", str(final))
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
