"""Inference policy: the one place for each choice every model run makes.

The Segment widget, the command line, batch runs, the interactive engines and
the training scripts all decide the same things; each decision is one function
here and nowhere else:

* device: :func:`choose_device` (``"auto"``: CUDA, then Apple MPS, then CPU) and
  :func:`available_devices`;
* precision: :func:`bf16_supported` (native bf16 on this CPU or GPU) and
  :func:`resolve_amp` (the autocast dtype for an ``amp`` setting);
* mirror test-time augmentation: :func:`mirror_combinations` and
  :func:`mirror_tta` (average a network over flips of its input);
* out of memory: :func:`is_out_of_memory` and :func:`out_of_memory_error`
  (one user-facing message with :data:`OOM_HINT`);
* input checks: :func:`check_inputs` (3D, channel count, one voxel grid);
* post-processing: :func:`largest_component` and
  :func:`keep_largest_components`.

numpy / scipy / torch only; no napari, no Qt, nothing above ``core``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Sequence

import numpy as np

from ..errors import MedSegError

log = logging.getLogger(__name__)

__all__ = [
    "OOM_HINT",
    "available_devices",
    "choose_device",
    "bf16_supported",
    "resolve_amp",
    "amp_name",
    "mirror_combinations",
    "mirror_tta",
    "is_out_of_memory",
    "OutOfMemory",
    "out_of_memory_error",
    "check_inputs",
    "largest_component",
    "keep_largest_components",
]

#: What the user can change when a run runs out of memory.
OOM_HINT = ("out of memory; try a smaller region (current view or a box), the fast mode, "
            "or the cpu device")


# ------------------------------------------------------------------ devices
def available_devices() -> dict[str, bool]:
    """``{"auto", "cpu", "cuda", "mps"}`` -> whether torch can use it here."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return {"auto": True, "cpu": True, "cuda": bool(torch.cuda.is_available()),
            "mps": bool(mps is not None and mps.is_available())}


def choose_device(device="auto", allow_mps: bool = True):
    """Resolve ``"auto"`` to CUDA, then Apple MPS, then CPU; check a named device.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (None: auto).
    allow_mps : bool
        Whether ``"auto"`` may pick Apple MPS (engines whose operations MPS
        lacks say False: ``"auto"`` is then CUDA, else CPU).

    Returns
    -------
    torch.device

    Raises
    ------
    MedSegError
        When a named device is not available on this machine.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if allow_mps and mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedSegError(f"device {device!r} asked for but no CUDA GPU is available; use 'cpu'")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise MedSegError("device 'mps' asked for but Apple MPS is not available; use 'cpu'")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise MedSegError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'mps'") from exc


# ---------------------------------------------------------------- precision
def _cpu_has_bf16() -> bool:
    import torch

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except Exception:  # pragma: no cover - platform probing
                pass
    return False


def bf16_supported(device="cpu") -> bool:
    """True when ``device`` runs bfloat16 natively.

    A CPU needs AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than
    fp32); a CUDA GPU needs compute capability 8.0 or newer. Other devices: False.
    """
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cpu":
        return _cpu_has_bf16()
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def resolve_amp(amp, device):
    """The autocast dtype for ``amp`` (``"auto"``, ``"bf16"``, ``"fp16"``, ``"off"``).

    ``"auto"`` is bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), bf16 on
    CUDA GPUs that support it (fp16 on older ones) and off elsewhere.

    Returns
    -------
    torch.dtype or None
    """
    import torch

    name = "off" if amp in (None, False) else ("auto" if amp is True else str(amp).lower())
    if name in ("off", "none", "fp32", "float32"):
        return None
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name in ("fp16", "float16", "half"):
        return torch.float16
    if name != "auto":
        raise MedSegError(f"unknown amp setting {amp!r}; use 'auto', 'bf16', 'fp16' or 'off'")
    if device.type == "cpu":
        return torch.bfloat16 if bf16_supported(device) else None
    if device.type == "cuda":
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    return None


def amp_name(dtype) -> str:
    """``"bf16"``, ``"fp16"`` or ``"off"`` for an autocast dtype (None: off)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")


# --------------------------------------------------------------- mirror TTA
def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the identity ``()`` first): the flips of mirror TTA.

    ``axes`` are tensor dimensions, e.g. ``(2, 3, 4)`` for the spatial axes of a
    ``(B, C, Z, Y, X)`` batch: ``2 ** len(axes)`` combinations.
    """
    axes = tuple(int(a) for a in axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _output_tensor(y):
    """A model's output as one tensor: the first of a list or tuple (deep supervision)."""
    import torch

    if isinstance(y, torch.Tensor):
        return y
    return y[0] if isinstance(y, (list, tuple)) else torch.as_tensor(y)


def mirrored_outputs(fn: Callable, x, combos):
    """``(dims, fn(flip(x, dims)))`` for each mirroring in ``combos``, not flipped back.

    One call a mirroring (batch-1 float32 CPU windows are fast since
    :func:`~.convs.onednn_convolutions`, so mirrors are not stacked into one batch, which
    would hold the activations of every mirror at once). Outputs are tensors (the
    first of a list or tuple).
    """
    import torch

    for dims in (tuple(c) for c in combos):
        yield dims, _output_tensor(fn(torch.flip(x, dims) if dims else x))


def mirror_tta(fn: Callable, x, axes: Sequence[int], combinations=None):
    """Average ``fn`` over the mirror images of ``x``, each flipped back.

    Parameters
    ----------
    fn : callable
        Tensor -> tensor with the same spatial axes (e.g. logits of a network).
    x : torch.Tensor
        The input, e.g. ``(B, C, Z, Y, X)``.
    axes : sequence of int
        Tensor dimensions to mirror (every subset is used, see
        :func:`mirror_combinations`); ``()`` runs ``fn`` once.
    combinations : sequence of tuples of int, optional
        Only these mirrorings (each a tuple of tensor dimensions flipped
        together, ``()`` for as is) instead of every subset of ``axes``: a
        cheaper average where latency matters.

    Returns
    -------
    torch.Tensor
        The mean of ``flip(fn(flip(x, a)), a)`` over all subsets ``a``, in float32
        (``fn(x)`` itself when ``axes`` is empty).
    """
    import torch

    combos = mirror_combinations(axes) if combinations is None else \
        [tuple(c) for c in combinations]
    if len(combos) == 1 and not combos[0]:
        return fn(x)
    out = None
    for dims, y in mirrored_outputs(fn, x, combos):
        y = (torch.flip(y, dims) if dims else y).float()
        out = y if out is None else out + y
    return out / len(combos)


# ------------------------------------------------------------ out of memory
def is_out_of_memory(exc: BaseException) -> bool:
    """True for out-of-memory errors of numpy, torch (CUDA, MPS), TorchScript and the allocator."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        oom_type = getattr(torch, "OutOfMemoryError", None)
        runtime = (RuntimeError, getattr(torch.jit, "Error", RuntimeError))
    except ImportError:  # pragma: no cover - torch is a dependency
        oom_type, runtime = None, (RuntimeError,)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, runtime) and ("out of memory" in text
                                         or "can't allocate memory" in text)


class OutOfMemory(MedSegError):
    """A run ran out of memory; the message says what the user can change."""

    def __init__(self, message: str, source: str | None = None, kind: str = "MemoryError"):
        super().__init__(message, source)
        self.kind = kind


def out_of_memory_error(exc: BaseException, where: str | None = None) -> OutOfMemory:
    """The one user-facing error for an out-of-memory ``exc`` (with :data:`OOM_HINT`).

    ``exc`` may itself be an :class:`OutOfMemory` (to name ``where`` afterwards).
    """
    kind = exc.kind if isinstance(exc, OutOfMemory) else type(exc).__name__
    return OutOfMemory(f"{OOM_HINT} ({kind})", where, kind)


# ------------------------------------------------------------- input checks
def check_inputs(volumes, n_channels: int, model: str, channel_names=(), names=None) -> list:
    """Check a model's inputs: 3D volumes, ``n_channels`` channels in all, one grid.

    Parameters
    ----------
    volumes : Volume, array or list of them
        ``(Z, Y, X)`` or ``(C, Z, Y, X)`` each; arrays are wrapped as Volumes.
    n_channels : int
        Channels the model takes.
    model : str
        The model's name, for messages.
    channel_names : sequence of str
        What each channel is (``"CT (CT)"``), for messages.
    names : sequence of str, optional
        What the user calls each input (layer names); default: their files.

    Returns
    -------
    list of Volume

    Raises
    ------
    MedSegError
        A 2D input, a wrong channel count, or inputs on different voxel grids.
    """
    from .volume import Volume, same_grid

    if isinstance(volumes, (Volume, np.ndarray)):
        volumes = [volumes]
    vols = []
    for v in volumes:
        if isinstance(v, np.ndarray):
            if v.ndim < 3:
                raise MedSegError(f"{model} needs a 3D image (Z, Y, X); got a "
                                  f"{v.ndim}D array of shape {v.shape}")
            v = Volume(v)
        if not isinstance(v, Volume):
            raise MedSegError(f"{model} needs Volume inputs, got {type(v).__name__}")
        vols.append(v)
    if not vols:
        raise MedSegError(f"{model}: no input image given")
    labels = ([f"layer {n!r}" for n in names] if names is not None
              else [v.source or "the image" for v in vols])
    for v, label in zip(vols, labels):
        if min(v.shape3) < 2:
            raise MedSegError(
                f"{model} is a 3D model but {label} is 2D (shape "
                f"{tuple(v.data.shape)}); open the whole series or volume", v.source)
    got = sum(v.n_channels for v in vols)
    if got != int(n_channels):
        want = ", ".join(channel_names)
        given = (f"layer(s) {', '.join(repr(n) for n in names)} give {got}" if names is not None
                 else f"{got} were given")
        raise MedSegError(
            f"channel mismatch: model {model} takes {n_channels} channel(s) [{want}] but "
            f"{given}; choose one single-channel 3D image per model input", vols[0].source)
    for v, label in zip(vols[1:], labels[1:]):
        if not same_grid(v, vols[0]):
            raise MedSegError(f"{label} is not on the grid of {labels[0]}; resample it to "
                              "that image first", v.source)
    return vols


# ---------------------------------------------------------- post-processing
def largest_component(mask: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """The largest connected piece of a bool mask (``connectivity`` 1, 2 or 3 in 3D).

    Returns an empty mask for an empty input; ties go to the piece found first.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros_like(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    comp, n = ndimage.label(mask, structure=structure)
    if n == 1:
        return mask.copy()
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp == int(sizes.argmax())


def keep_largest_components(labels: np.ndarray, class_ids) -> np.ndarray:
    """Keep only the largest 26-connected piece of each listed class (in place if writable).

    Smaller pieces become background (0). Returns the labels.
    """
    ids = list(class_ids or [])
    if not ids:
        return labels
    from scipy import ndimage

    labels = np.array(labels, copy=True) if not labels.flags.writeable else labels
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        boxes = [tuple(slice(None) for _ in labels.shape)] * max(int(c) for c in ids)
    else:
        # each class is labelled inside its own bounding box (one pass finds them all),
        # not over the whole volume: an organ fills a small share of a CT's box
        boxes = ndimage.find_objects(labels, max_label=max(int(c) for c in ids))
    for cid in ids:
        box = boxes[int(cid) - 1] if 0 < int(cid) <= len(boxes) else None
        if box is None:
            continue
        sub = labels[box]
        mask = sub == cid
        if mask.any():
            sub[mask & ~largest_component(mask)] = 0
    return labels
