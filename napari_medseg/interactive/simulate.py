"""Simulated users: clicks placed where the current mask is most wrong.

The standard protocol of interactive segmentation benchmarks: each next click
goes to the centre of the largest error region (the voxel farthest from the
region's border), positive when the object was missed there, negative when the
mask spilled over. Used by the benchmark, the click-model training and tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .base import Engine, Prompts

__all__ = ["dice", "next_click", "simulate_clicks", "ClickRun"]


def dice(a, b) -> float:
    """Dice overlap of two bool masks (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _deepest(err: np.ndarray, spacing) -> tuple[float, np.ndarray | None]:
    """Largest distance (mm) to the border of ``err`` and where it is."""
    if not err.any():
        return 0.0, None
    box = ndi.find_objects(err.astype(np.uint8))[0]
    sub = np.pad(err[box], 1)
    dist = ndi.distance_transform_edt(sub, sampling=spacing)
    idx = np.unravel_index(int(np.argmax(dist)), dist.shape)
    point = np.array([i - 1 + s.start for i, s in zip(idx, box)], dtype=float)
    return float(dist[idx]), point


def next_click(pred, truth, spacing=None) -> tuple[np.ndarray, bool] | None:
    """Where a careful user clicks next.

    Parameters
    ----------
    pred, truth : bool array, (Z, Y, X) or (Y, X)
        Current mask and reference mask.
    spacing : sequence of float, optional
        Voxel size (mm); distances are measured in mm.

    Returns
    -------
    (point, positive) or None
        Array indices of the click and whether it is a positive click; None
        when the mask is already perfect.
    """
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    spacing = None if spacing is None else tuple(float(s) for s in spacing)
    d_fn, p_fn = _deepest(truth & ~pred, spacing)
    d_fp, p_fp = _deepest(pred & ~truth, spacing)
    if p_fn is None and p_fp is None:
        return None
    if p_fp is None or (p_fn is not None and d_fn >= d_fp):
        return p_fn, True
    return p_fp, False


@dataclass
class ClickRun:
    """Dice after each click and seconds per engine update."""

    dice: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    prompts: Prompts | None = None


def simulate_clicks(engine: Engine, image, spacing, truth, n_clicks: int = 5,
                    mode: str = "3d", axis: int = 0, index: int | None = None) -> ClickRun:
    """Run ``n_clicks`` simulated clicks on one object and record Dice and time.

    Parameters
    ----------
    engine : Engine
        The engine under test.
    image : (Z, Y, X) array
        The image.
    spacing : sequence of 3 float
        Voxel size in mm.
    truth : (Z, Y, X) bool array
        Reference mask of the object.
    mode, axis, index
        ``"2d"`` evaluates on ``truth.take(index, axis)`` only.
    """
    truth = np.asarray(truth, bool)
    if mode == "2d":
        if index is None:
            index = int(np.argmax(truth.sum(axis=tuple(a for a in range(3) if a != axis))))
        ref = np.take(truth, index, axis)
        sp2 = tuple(s for a, s in enumerate(spacing) if a != axis)
    else:
        ref, sp2 = truth, spacing
    pos, neg = [], []
    pred = np.zeros(ref.shape, bool)
    run = ClickRun()
    for _ in range(n_clicks):
        click = next_click(pred, ref, sp2)
        if click is None:
            run.dice.append(run.dice[-1] if run.dice else 1.0)
            continue
        p, positive = click
        if mode == "2d":
            p = np.insert(p, axis, index)
        (pos if positive else neg).append(p)
        prompts = Prompts(positive=np.array(pos).reshape(-1, 3),
                          negative=np.array(neg).reshape(-1, 3),
                          mode=mode, axis=axis, index=index)
        t0 = time.perf_counter()
        mask, region = engine.predict_region(image, spacing, prompts)
        run.seconds.append(time.perf_counter() - t0)
        full = np.zeros(truth.shape, bool)
        full[region] = mask
        pred = np.take(full, index, axis) if mode == "2d" else full
        run.dice.append(dice(pred, ref))
        run.prompts = prompts
    return run
