"""Fine-tuning checkpoints: cancel (or a crash) and resume where training stopped.

A checkpoint is a folder (by default under the user data folder,
``<user dir>/finetune-checkpoints/<run key>/``) holding

* ``state.pt``: tensors only (network, optimiser and scheduler state, torch's
  RNG state), read back with ``torch.load(weights_only=True)``: nothing is
  unpickled;
* ``state.json``: the run key, the iteration reached, the losses so far, the
  sampler's numpy RNG state and the Dice measured before training.

Both are written atomically (``state.json`` last, so a checkpoint whose JSON
is readable is complete). The run key is a hash of what defines the run (base
model, dataset and its cases, schedule, seed): resuming with other settings
starts afresh rather than mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["run_key", "checkpoint_dir", "save_checkpoint", "load_checkpoint",
           "remove_checkpoint"]

STATE_PT, STATE_JSON = "state.pt", "state.json"


def run_key(**settings) -> str:
    """A short hash of the JSON of ``settings`` (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def checkpoint_dir(key: str, root=None) -> Path:
    """The checkpoint folder of a run (``root`` default: the user data folder)."""
    from ..paths import user_dir

    base = Path(root).expanduser() if root else user_dir() / "finetune-checkpoints"
    return base / key


def save_checkpoint(folder: Path, key: str, step: int, net, opt, sched, losses, rng_state,
                    extra: dict) -> None:
    """Write a checkpoint (see the module docstring)."""
    import torch

    from ..io.atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    state = {"net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
             "opt": opt.state_dict(), "sched": sched.state_dict(),
             "torch_rng": torch.get_rng_state()}
    with atomic_path(folder / STATE_PT, overwrite=True) as tmp:
        torch.save(state, tmp)
    info = {"key": key, "step": int(step), "losses": [float(v) for v in losses],
            "rng": rng_state, **extra}
    with atomic_path(folder / STATE_JSON, overwrite=True) as tmp:
        tmp.write_text(json.dumps(info))
    log.info("fine-tune checkpoint at iteration %d: %s", step, folder)


def load_checkpoint(folder: Path, key: str):
    """``(info, state)`` of a complete checkpoint of run ``key``, or None."""
    import torch

    js, pt = folder / STATE_JSON, folder / STATE_PT
    if not (js.is_file() and pt.is_file()):
        return None
    try:
        info = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable checkpoint %s: %s", js, exc)
        return None
    if info.get("key") != key:
        log.info("checkpoint %s belongs to another run; starting afresh", folder)
        return None
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: start afresh
        log.warning("ignoring an unreadable checkpoint %s: %s", pt, exc)
        return None
    return info, state


def remove_checkpoint(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
