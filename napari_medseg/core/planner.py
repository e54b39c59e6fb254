"""Memory planner: estimate a run's peak memory and pick a plan that fits, or refuse.

Every model run (Segment widget, ``napari-medseg predict``, ``napari-medseg batch``,
the lazy big-volume path) asks :func:`plan_run` first. It estimates the peak
resident memory (and GPU memory on a GPU) that the run adds to the process, from

* the input grid ``(Z, Y, X)`` and the model grid it is resampled to (card
  spacing and orientation), the channels and the input's bytes per voxel;
* the engine's cell stitching (:mod:`napari_medseg.core.inference`): the
  cells waiting for windows hold about ``0.9 x channels x patch_z x Y x X``
  accumulators (float16 under mixed precision), plus the labels and the
  optional probability / uncertainty maps on the model grid;
* one batch of windows: the network's activations (about
  ``ACTIVATION_FACTOR x first-layer features x bytes per value`` per window
  voxel) and the window logits;
* the preprocessing copies (float32 input, a reoriented copy when the axes
  are flipped or permuted) and the post-processing on the input grid
  (restored labels, largest-component labelling in ``int32``).

The phases do not overlap (preprocessing, then the windows, then the restore),
so the peak is the largest phase plus a fixed allowance for the runtime's own
buffers, times a safety factor. Calibrated on the built-in model (CPU, bf16):
measured peaks above the warmed-up process were 0.023 GiB (64 x 128 x 128 on
the model grid), 0.116 GiB (128 x 256 x 256 on the model grid) and 0.240 GiB
(160 x 320 x 320 at 1.0 x 0.75 x 0.75 mm, resampled); the estimates for these
runs are 0.13, 0.25 and 0.39 GiB (an upper bound, as it should be). The restore phase was
measured on its own (15.7 bytes per input voxel with largest-component labelling).

Free memory is the smaller of ``MemAvailable`` (``/proc/meminfo``) and what the
cgroup still allows (v2 ``memory.max - memory.current``, v1
``memory.limit_in_bytes - memory.usage_in_bytes``); the ``memory_limit``
argument or the ``NAPARI_MEDSEG_MEMORY_LIMIT`` environment variable (bytes, or
``"512M"``, ``"1.5G"``) caps it further (used by tests and by batch workers
that share a machine). On a GPU the free memory is ``torch.cuda.mem_get_info``.

A plan that does not fit is re-planned, in this order: one window per batch,
the output accumulated on the CPU instead of the GPU (GPU only), the fast mode
(no test-time augmentation), the CPU instead of the GPU; if nothing fits the
run is refused with one :class:`~napari_medseg.errors.MedSegError` line naming
the figures and the ways out (a region, lazy output to OME-Zarr, more memory).

numpy only (torch is imported lazily for GPU queries); no napari, no Qt.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedSegError

__all__ = [
    "ENV_LIMIT",
    "GIB",
    "FreeMemory",
    "MemoryEstimate",
    "Plan",
    "parse_size",
    "free_memory",
    "free_gpu_memory",
    "estimate_memory",
    "plan_run",
    "plan_for_model",
    "lazy_slab_rows",
    "LAZY_SLAB_BYTES",
]

log = logging.getLogger(__name__)

GIB = float(1 << 30)
#: Environment variable that caps the memory a run may use (bytes or "512M", "2G").
ENV_LIMIT = "NAPARI_MEDSEG_MEMORY_LIMIT"
#: Activation bytes per window voxel = this x first-layer features x bytes per value
#: (a 5.6 M-parameter DynUNet with 32 first-layer features used 0.85 GiB per 128^3
#: window in bf16: about 6.8; rounded up).
ACTIVATION_FACTOR = 8.0
#: The lazy big-volume path makes the float32 model grid this many bytes at a time
#: (whole window rows; at least two windows deep).
LAZY_SLAB_BYTES = 64 << 20


def lazy_slab_rows(model_shape, n_channels: int, patch) -> int:
    """Model-grid slices the lazy path holds as float32 at a time (see :data:`LAZY_SLAB_BYTES`).

    Parameters
    ----------
    model_shape : tuple of 3 int
        ``(Z, Y, X)`` of the model grid.
    n_channels : int
    patch : tuple of 3 int
        Window size ``(pz, py, px)``.

    Returns
    -------
    int
        ``max(2 * pz, LAZY_SLAB_BYTES // (4 * C * Y * X))`` capped at ``Z``.
    """
    z, y, x = (max(int(s), int(p)) for s, p in zip(model_shape, patch))
    per_row = 4 * max(int(n_channels), 1) * y * x
    return int(min(z, max(2 * int(patch[0]), LAZY_SLAB_BYTES // per_row)))
#: Fixed allowance for the runtime's own buffers during a run (oneDNN scratch,
#: glibc arenas, the first window's one-off allocations).
RUNTIME_BYTES = 96 << 20
#: Estimates are multiplied by this (heap fragmentation, temporaries not modelled).
SAFETY = 1.2
#: Fraction of the free memory a plan may use (the rest stays for the system).
USABLE_FRACTION = 0.9

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text) -> int:
    """Bytes from ``1073741824``, ``"512M"``, ``"1.5G"``, ``"2 GiB"`` (powers of 1024).

    Raises
    ------
    MedSegError
        When the text is not a size.

    Examples
    --------
    >>> parse_size("1.5G"), parse_size("512m"), parse_size(1024)
    (1610612736, 536870912, 1024)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MedSegError(f"memory size {text!r} is not a size such as 2G, 512M or 1073741824")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# ---------------------------------------------------------------- free memory
@dataclass
class FreeMemory:
    """Memory a run may use, and where the figure comes from.

    Attributes
    ----------
    bytes : int
        The smallest of the sources below.
    source : str
        Which one bounded it: ``"MemAvailable"``, ``"cgroup v2"``, ``"cgroup v1"``,
        ``"NAPARI_MEDSEG_MEMORY_LIMIT"`` or ``"memory_limit"``.
    """

    bytes: int
    source: str


def _read_int(path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_cgroup_paths() -> tuple[str | None, str | None]:
    """This process's cgroup path for v2 (``0::``) and for the v1 memory controller."""
    v2 = v1 = None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                v2 = parts[2]
            elif "memory" in parts[1].split(","):
                v1 = parts[2]
    except OSError:
        pass
    return v2, v1


def _cgroup_room(root="/sys/fs/cgroup") -> tuple[int | None, str]:
    """What the cgroup still allows (limit minus usage), or None without a limit."""
    root = Path(root)
    v2, v1 = _own_cgroup_paths()
    best, name = None, ""
    # cgroup v2: the process's own group, then the mount root (inside a container)
    for base in [root / (v2 or "/").lstrip("/"), root]:
        limit = _read_int(base / "memory.max")
        used = _read_int(base / "memory.current")
        if limit is not None and used is not None:
            room = max(limit - used, 0)
            if best is None or room < best:
                best, name = room, "cgroup v2"
            break
    # cgroup v1: the memory controller's group, then its mount root
    mem = root / "memory"
    for base in [mem / (v1 or "/").lstrip("/"), mem]:
        limit = _read_int(base / "memory.limit_in_bytes")
        used = _read_int(base / "memory.usage_in_bytes")
        if limit is not None and used is not None and limit < (1 << 60):
            room = max(limit - used, 0)
            if best is None or room < best:
                best, name = room, "cgroup v1"
            break
    return best, name


def free_memory(memory_limit=None) -> FreeMemory:
    """The memory a run may use now: the smallest of the system's and the limits.

    Parameters
    ----------
    memory_limit : int or str, optional
        A cap (bytes or ``"2G"``); None reads ``NAPARI_MEDSEG_MEMORY_LIMIT``.

    Returns
    -------
    FreeMemory
    """
    cands = []
    avail = _mem_available()
    if avail is not None:
        cands.append((avail, "MemAvailable"))
    room, name = _cgroup_room()
    if room is not None:
        cands.append((room, name))
    if memory_limit is not None:
        cands.append((parse_size(memory_limit), "memory_limit"))
    elif os.environ.get(ENV_LIMIT):
        cands.append((parse_size(os.environ[ENV_LIMIT]), ENV_LIMIT))
    if not cands:  # not Linux: assume what psutil says, else plenty
        try:
            import psutil

            cands.append((int(psutil.virtual_memory().available), "psutil"))
        except ImportError:  # pragma: no cover - exotic platforms
            cands.append((1 << 40, "unknown"))
    b, src = min(cands, key=lambda c: c[0])
    return FreeMemory(int(b), src)


def free_gpu_memory(device) -> FreeMemory | None:
    """Free memory on a CUDA ``device`` (``torch.cuda.mem_get_info``); None elsewhere."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return FreeMemory(int(free), "cuda mem_get_info")


# ---------------------------------------------------------------- estimate
@dataclass
class MemoryEstimate:
    """Estimated peak memory a run adds to the process.

    Attributes
    ----------
    ram : int
        Peak resident bytes (host memory).
    vram : int
        Peak GPU bytes (0 on the CPU).
    parts : dict
        Phase name -> bytes (``"preprocess"``, ``"windows"``, ``"restore"``,
        ``"gpu"``), before the allowance and safety factor.
    """

    ram: int
    vram: int = 0
    parts: dict = field(default_factory=dict)


def estimate_memory(input_shape, model_shape, *, n_channels=1, n_classes=2,
                    patch=(128, 128, 128), batch_size=1, tta=False, value_bytes=2,
                    first_features=32, param_bytes=0, input_itemsize=2, lazy_input=False,
                    reoriented_copy=True, resampled=True, uncertainty=None,
                    postprocess=True, device_type="cpu", output_on_cpu=False,
                    lazy_output=False) -> MemoryEstimate:
    """Estimate the peak memory of one run of the standard pipeline.

    Parameters
    ----------
    input_shape, model_shape : tuple of 3 int
        ``(Z, Y, X)`` of the input grid and of the model grid (after resampling).
    n_channels, n_classes : int
        Input channels and output classes ``K``.
    patch : tuple of 3 int
        Window size in voxels.
    batch_size : int
        Windows per network call.
    tta : bool
        Mirror test-time augmentation (doubles the per-window logit buffers).
    value_bytes : int
        Bytes per activation value (2 under bf16 / fp16 autocast, 4 in fp32).
    first_features : int
        Channels of the network's first layer (activations scale with it).
    param_bytes : int
        Size of the weights (only counted on a GPU; on the CPU they are loaded).
    input_itemsize : int
        Bytes per input voxel as stored.
    lazy_input : bool
        The input is read from disk during the run (dask, memory map): its raw
        copy is counted.
    reoriented_copy : bool
        The model's orientation flips or permutes the axes (one more float32 copy).
    resampled : bool
        The model grid differs from the input grid.
    uncertainty : {None, "entropy", "tta"}
        An uncertainty map is also made.
    postprocess : bool
        Largest-component post-processing runs on the input grid.
    device_type : str
        ``"cpu"`` or ``"cuda"`` / ``"mps"``: where the windows run.
    output_on_cpu : bool
        On a GPU, accumulate the cells in host memory instead of GPU memory.
    lazy_output : bool
        Labels are written to a chunked store on the fly (lazy big-volume path):
        the input-grid arrays are replaced by one output slab, and the float32
        model grid by :func:`lazy_slab_rows` of its slices.

    Returns
    -------
    MemoryEstimate
    """
    n_in = math.prod(int(s) for s in input_shape)
    m_shape = tuple(max(int(s), int(p)) for s, p in zip(model_shape, patch))
    n_m = math.prod(m_shape)
    c, k = int(n_channels), int(n_classes)
    pz = int(patch[0])
    slab = pz * m_shape[1] * m_shape[2]
    p_vox = math.prod(int(p) for p in patch)
    b = max(int(batch_size), 1)
    acc_bytes = 2 if value_bytes == 2 else 4
    # input slab of one resample chunk (16 output slices) when the input streams lazily
    in_slab = n_in // max(int(input_shape[0]), 1) * 16 if lazy_output else n_in
    # the float32 model grid: whole, or a slab of window rows on the lazy path
    n_g = n_m if not lazy_output else \
        lazy_slab_rows(m_shape, c, patch) * m_shape[1] * m_shape[2]
    # preprocessing, one channel at a time: raw read, float32 copy, reoriented copy,
    # resample output, the (C, Z, Y, X) float32 model array
    pre = (input_itemsize * in_slab if lazy_input else 0) + 4 * in_slab \
        + (4 * in_slab if reoriented_copy else 0) + (4 * n_g if resampled else 0) + 4 * c * n_g
    # windows: model array, finite check, labels (+ maps) on the model grid, open cells,
    # one batch of inputs, activations and logits
    cells = int(0.9 * k * slab * acc_bytes) + (4 * slab if uncertainty else 0)
    maps = 2 * n_m * ((uncertainty is not None) + 0)
    act = int(ACTIVATION_FACTOR * first_features * value_bytes * p_vox * b)
    logits = 4 * k * p_vox * b * (2 if tta or uncertainty == "tta" else 1)
    batch_in = 4 * c * p_vox * b
    on_gpu = device_type not in ("cpu", None)
    win = 4 * c * n_g + c * n_g + n_m + maps
    gpu = 0
    if on_gpu:
        gpu = param_bytes + act + logits + batch_in + (0 if output_on_cpu else cells)
        win += batch_in + logits + (cells if output_on_cpu else 0)
    else:
        win += cells + act + logits + batch_in
    # restore: labels cropped, resampled and reoriented to the input grid (nearest-
    # neighbour takes along each axis, a reoriented copy), then the largest-component
    # labelling (bool mask, int32 components and scipy's own buffers, bool temporaries):
    # measured 15.7 bytes per input voxel for both on 160 x 320 x 320
    out_n = in_slab if lazy_output else n_in
    rest = n_m + (16 if postprocess and not lazy_output else 6) * out_n
    if uncertainty is not None:
        rest += 4 * out_n + 2 * out_n + 2 * n_m
    parts = {"preprocess": int(pre), "windows": int(win), "restore": int(rest)}
    if lazy_output:  # the model grid's labels stay in memory through the whole run
        parts["windows"] += n_m
        parts["preprocess"] += n_m
    ram = int(SAFETY * max(parts.values()) + RUNTIME_BYTES)
    vram = int(SAFETY * gpu + (RUNTIME_BYTES if on_gpu else 0))
    if on_gpu:
        parts["gpu"] = int(gpu)
    return MemoryEstimate(ram=ram, vram=vram, parts=parts)


# ---------------------------------------------------------------- plans
@dataclass
class Plan:
    """How a run will use memory.

    Attributes
    ----------
    batch_size : int or None
        Windows per network call (None: the engine's default).
    output_on_cpu : bool
        Accumulate the cells in host memory (GPU runs).
    fast : bool
        Run in the fast mode (no test-time augmentation, overlap <= 0.25).
    device : str or None
        A device to use instead of the one asked for (``"cpu"`` when the GPU is
        too small), else None.
    estimate : MemoryEstimate
        The estimate of the chosen plan.
    free : FreeMemory
        Host memory available.
    free_gpu : FreeMemory or None
        GPU memory available.
    notes : list of str
        What was changed to fit, one short phrase each.
    """

    batch_size: int | None
    output_on_cpu: bool
    fast: bool
    device: str | None
    estimate: MemoryEstimate
    free: FreeMemory
    free_gpu: FreeMemory | None = None
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        """One line: the estimate, the free memory and the changes made."""
        s = (f"estimated peak {self.estimate.ram / GIB:.2f} GiB of "
             f"{self.free.bytes / GIB:.2f} GiB free ({self.free.source})")
        if self.free_gpu is not None:
            s += (f", GPU {self.estimate.vram / GIB:.2f} of "
                  f"{self.free_gpu.bytes / GIB:.2f} GiB")
        if self.notes:
            s += "; " + ", ".join(self.notes)
        return s

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "output_on_cpu": self.output_on_cpu,
                "fast": self.fast, "device": self.device,
                "estimated_ram_gib": round(self.estimate.ram / GIB, 3),
                "estimated_vram_gib": round(self.estimate.vram / GIB, 3),
                "free_gib": round(self.free.bytes / GIB, 3), "free_source": self.free.source,
                "notes": list(self.notes)}


def _fits(est: MemoryEstimate, free: FreeMemory, free_gpu: FreeMemory | None) -> bool:
    if est.ram > USABLE_FRACTION * free.bytes:
        return False
    return free_gpu is None or est.vram <= USABLE_FRACTION * free_gpu.bytes


def plan_run(*, device_type="cpu", batch_size=None, tta=False, uncertainty=None,
             memory_limit=None, free=None, free_gpu=None, source=None,
             refuse_hint=None, **shape_kwargs) -> Plan:
    """Choose a plan that fits the free memory, or refuse.

    Parameters
    ----------
    device_type : str
        ``"cpu"``, ``"cuda"`` or ``"mps"``.
    batch_size : int or None
        Windows per call asked for (None: 1 on the CPU, 2 on a GPU).
    tta, uncertainty :
        As for :func:`estimate_memory`.
    memory_limit : int or str, optional
        Cap on host memory (see :func:`free_memory`).
    free, free_gpu : FreeMemory, optional
        Known free memory (default: measured now).
    source : str, optional
        File or layer name for the refusal message.
    refuse_hint : str, optional
        The way out to name in a refusal (default: a region or lazy output).
    **shape_kwargs
        The rest of :func:`estimate_memory`'s arguments.

    Returns
    -------
    Plan

    Raises
    ------
    MedSegError
        When no plan fits, naming the estimate, the free memory and what to do.
    """
    free = free or free_memory(memory_limit)
    on_gpu = device_type not in ("cpu", None)
    if on_gpu and free_gpu is None and device_type == "cuda":
        free_gpu = free_gpu_memory("cuda")
    b0 = batch_size or (2 if on_gpu else 1)
    gpu_free = free_gpu if on_gpu else None
    tries = [([], b0, False, False, None)]  # (notes, batch, output on CPU, fast, device)
    notes = []
    if b0 > 1:
        notes = ["1 window per batch"]
        tries.append((list(notes), 1, False, False, None))
    if on_gpu:
        notes = ["1 window per batch", "output kept on the CPU"]
        tries.append((list(notes), 1, True, False, None))
    if tta or uncertainty == "tta":
        tries.append((notes + ["fast mode"], 1, on_gpu, True, None))
    if on_gpu:
        tries.append((["run on the CPU (the GPU is too small)"], 1, False, False, "cpu"))
    est = None
    for notes, b, on_cpu, fast, dev in tries:
        dt = "cpu" if dev == "cpu" else device_type
        est = estimate_memory(batch_size=b, tta=bool(tta) and not fast,
                              uncertainty="entropy" if fast and uncertainty == "tta"
                              else uncertainty, device_type=dt, output_on_cpu=on_cpu,
                              **shape_kwargs)
        if _fits(est, free, gpu_free if dt != "cpu" else None):
            plan = Plan(batch_size=b if (b != b0 or batch_size) else batch_size,
                        output_on_cpu=on_cpu, fast=fast, device=dev, estimate=est,
                        free=free, free_gpu=gpu_free if dt != "cpu" else None,
                        notes=list(dict.fromkeys(notes)))
            log.info("memory plan: %s", plan.describe())
            return plan
    first = estimate_memory(batch_size=b0, tta=tta, uncertainty=uncertainty,
                            device_type=device_type, **shape_kwargs)
    hint = refuse_hint or ("segment a region (current view or a box), write the labels lazily "
                           "to an .ome.zarr output, or free memory")
    msg = (f"this run needs about {first.ram / GIB:.2f} GiB of memory but only "
           f"{free.bytes / GIB:.2f} GiB is free ({free.source})")
    if gpu_free is not None and first.vram > USABLE_FRACTION * gpu_free.bytes:
        msg += f" and {first.vram / GIB:.2f} GiB of GPU memory ({gpu_free.bytes / GIB:.2f} free)"
    raise MedSegError(f"{msg}; {hint}", source)


# ---------------------------------------------------------------- models
def _network_facts(model) -> tuple[int, int]:
    """``(first-layer features, parameter bytes)`` of a model's torch network."""
    net = getattr(model, "network", None)
    feats, nbytes = 32, 0
    if net is not None and hasattr(net, "modules"):
        try:
            import torch

            for m in net.modules():
                if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                    feats = int(m.out_channels)
                    break
            nbytes = sum(p.numel() * p.element_size() for p in net.parameters())
        except Exception:  # pragma: no cover - exotic modules
            pass
    return feats, int(nbytes)


def _is_lazy(data) -> bool:
    return not isinstance(data, np.ndarray) or isinstance(data, np.memmap)


def plan_for_model(model, volumes, *, device="cpu", tta=False, uncertainty=None,
                   memory_limit=None, lazy_output=False, free=None, refuse_hint=None) -> Plan:
    """:func:`plan_run` for ``model.predict(volumes, ...)`` on the standard pipeline.

    Parameters
    ----------
    model : Model
        A loaded model (its ``card``; its ``network`` when it has one).
    volumes : list of Volume
        The inputs as they will be run (after any region crop).
    device : str or torch.device
        The resolved device.
    lazy_output : bool
        Labels stream to a chunked store (see :func:`estimate_memory`).

    Returns
    -------
    Plan
    """
    from .preprocess import _target_shape, orientation_transform

    card = model.card
    ref = volumes[0]
    shape = tuple(int(s) for s in ref.shape3)
    perm, flips = orientation_transform(ref.affine, card.orientation)
    r_shape = tuple(shape[p] for p in perm)
    r_spacing = tuple(ref.spacing[p] for p in perm)
    m_shape, _ = _target_shape(r_shape, r_spacing, card.target_spacing)
    feats, pbytes = _network_facts(model)
    dev_type = getattr(device, "type", str(device).split(":")[0])
    amp = str(getattr(model, "amp", "auto")).lower()
    value_bytes = 4 if amp in ("off", "none", "fp32", "float32", "false") else 2
    n_channels = sum(getattr(v, "n_channels", 1) for v in volumes)
    lazy_in = any(_is_lazy(v.data) for v in volumes)
    itemsize = max(np.dtype(getattr(v.data, "dtype", np.float32)).itemsize for v in volumes)
    return plan_run(
        device_type=dev_type, batch_size=getattr(model, "batch_size", None), tta=tta,
        uncertainty=uncertainty, memory_limit=memory_limit, free=free, source=ref.source,
        refuse_hint=refuse_hint, input_shape=shape, model_shape=m_shape,
        n_channels=n_channels, n_classes=card.n_classes, patch=tuple(card.patch_size),
        value_bytes=value_bytes, first_features=feats, param_bytes=pbytes,
        input_itemsize=itemsize, lazy_input=lazy_in,
        reoriented_copy=tuple(perm) != (0, 1, 2) or any(flips),
        resampled=tuple(m_shape) != tuple(r_shape),
        postprocess=bool((card.postprocessing or {}).get("largest_component")),
        lazy_output=lazy_output)
