"""Simulated users: clicks placed where the current mask is most wrong.

The standard protocol of interactive segmentation benchmarks: each next click
goes to the centre of the largest error (the voxel farthest from the error's
border), positive when the object was missed there, negative when the mask
spilled over. ``rule="deepest"`` takes the deepest error voxel over all errors;
``rule="largest"`` (RITM, the CVPR 2025 interactive 3D challenge) first picks
the largest connected error region, then its deepest voxel. A run can start
with a box around the object on its largest slice (the challenge's box +
clicks protocol) or with a stroke painted along the object's medial axis on
that slice. Used by the benchmark, the click-model training and tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .base import Engine, Prompts

__all__ = ["dice", "next_click", "box_around", "scribble_along", "simulate_clicks", "ClickRun"]


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


def _largest_error(pred, truth) -> tuple[np.ndarray, bool] | None:
    """The largest connected error region and whether it is a miss."""
    best, size, positive = None, 0, True
    for err, pos in ((truth & ~pred, True), (pred & ~truth, False)):
        if not err.any():
            continue
        lab, n = ndi.label(err)
        counts = np.bincount(lab.ravel())[1:]
        i = int(np.argmax(counts))
        if counts[i] > size:
            best, size, positive = lab == i + 1, int(counts[i]), pos
    return None if best is None else (best, positive)


def next_click(pred, truth, spacing=None, rule: str = "deepest"
               ) -> tuple[np.ndarray, bool] | None:
    """Where a careful user clicks next.

    Parameters
    ----------
    pred, truth : bool array, (Z, Y, X) or (Y, X)
        Current mask and reference mask.
    spacing : sequence of float, optional
        Voxel size (mm); distances are measured in mm.
    rule : {"deepest", "largest"}
        ``"deepest"``: the error voxel farthest from the border of the misses
        or of the spill-overs, whichever lies deeper. ``"largest"``: the
        deepest voxel of the largest connected error region (misses and
        spill-overs compared by voxel count).

    Returns
    -------
    (point, positive) or None
        Array indices of the click and whether it is a positive click; None
        when the mask is already perfect.
    """
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    spacing = None if spacing is None else tuple(float(s) for s in spacing)
    if rule == "largest":
        err = _largest_error(pred, truth)
        if err is None:
            return None
        return _deepest(err[0], spacing)[1], err[1]
    if rule != "deepest":
        raise ValueError(f"rule must be 'deepest' or 'largest', not {rule!r}")
    d_fn, p_fn = _deepest(truth & ~pred, spacing)
    d_fp, p_fp = _deepest(pred & ~truth, spacing)
    if p_fn is None and p_fp is None:
        return None
    if p_fp is None or (p_fn is not None and d_fn >= d_fp):
        return p_fn, True
    return p_fp, False


def box_around(truth, axis: int = 0, index: int | None = None) -> tuple[np.ndarray, int]:
    """A 2D box around ``truth`` on one slice: its corners and the slice.

    Parameters
    ----------
    truth : (Z, Y, X) bool array
        Reference mask (not empty).
    axis : int
        The box lies on a slice across this axis (0: axial).
    index : int, optional
        That slice; by default the one where ``truth`` is largest.

    Returns
    -------
    corners : (2, 3) float array
        Opposite corners (inclusive array indices), equal along ``axis``.
    index : int
    """
    truth = np.asarray(truth, bool)
    if index is None:
        index = int(np.argmax(truth.sum(axis=tuple(a for a in range(3) if a != axis))))
    pts = np.argwhere(np.take(truth, index, axis))
    lo, hi = np.insert(pts.min(0), axis, index), np.insert(pts.max(0), axis, index)
    return np.array([lo, hi], float), index


def scribble_along(truth, spacing, axis: int = 0, index: int | None = None
                   ) -> tuple[np.ndarray, int]:
    """A stroke painted inside ``truth`` on one slice: the medial axis of the
    object's core there (its voxels at least two voxels, or half the object's
    greatest depth, from the edge), the longest connected piece.

    Returns
    -------
    scribbles : (Z, Y, X) uint8 array
        1 on the stroke (a scribble layer's object paint), 0 elsewhere.
    index : int
        The slice (by default the one where ``truth`` is largest).
    """
    from skimage.morphology import skeletonize

    truth = np.asarray(truth, bool)
    if index is None:
        index = int(np.argmax(truth.sum(axis=tuple(a for a in range(3) if a != axis))))
    sl = np.take(truth, index, axis)
    sp = tuple(float(s) for a, s in enumerate(spacing) if a != axis)
    depth = ndi.distance_transform_edt(sl, sampling=sp)
    core = depth >= min(2.0 * max(sp), 0.5 * depth.max())
    line = skeletonize(core) if core.sum() > 1 else core
    lab, n = ndi.label(line, np.ones((3, 3), bool))
    if n > 1:
        line = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    out = np.zeros(truth.shape, np.uint8)
    view = [slice(None)] * 3
    view[axis] = index
    out[tuple(view)] = line
    return out, index


@dataclass
class ClickRun:
    """Dice after each interaction and seconds per engine update."""

    dice: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    prompts: Prompts | None = None


def simulate_clicks(engine: Engine, image, spacing, truth, n_clicks: int = 5,
                    mode: str = "3d", axis: int = 0, index: int | None = None,
                    box: bool = False, rule: str = "deepest",
                    scribble: bool = False) -> ClickRun:
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
    box : bool
        Start with a 2D box around ``truth`` on its largest slice across
        ``axis`` (on slice ``index`` in 2D mode), kept with every later click:
        ``n_clicks + 1`` interactions.
    scribble : bool
        Start instead with a stroke painted along the medial axis of ``truth``
        on that slice (:func:`scribble_along`), kept with every later click:
        ``n_clicks + 1`` interactions.
    rule : {"deepest", "largest"}
        Where each next click goes (:func:`next_click`).

    Returns
    -------
    ClickRun
        ``dice`` and ``seconds`` per interaction.
    """
    truth = np.asarray(truth, bool)
    if mode == "2d":
        if index is None:
            index = int(np.argmax(truth.sum(axis=tuple(a for a in range(3) if a != axis))))
        ref = np.take(truth, index, axis)
        sp2 = tuple(s for a, s in enumerate(spacing) if a != axis)
    else:
        ref, sp2 = truth, spacing
    if box and scribble:
        raise ValueError("simulate_clicks starts with a box or a scribble, not both")
    boxes = np.zeros((0, 2, 3))
    if box:
        boxes = box_around(truth, axis, index if mode == "2d" else None)[0][None]
    paint = None
    if scribble:
        paint = scribble_along(truth, spacing, axis, index if mode == "2d" else None)[0]
    first = box or scribble
    pos, neg = [], []
    pred = np.zeros(ref.shape, bool)
    run = ClickRun()
    for step in range(n_clicks + int(first)):
        if first and step == 0:
            click = None
        else:
            click = next_click(pred, ref, sp2, rule)
            if click is None:
                run.dice.append(run.dice[-1] if run.dice else 1.0)
                continue
            p, positive = click
            if mode == "2d":
                p = np.insert(p, axis, index)
            (pos if positive else neg).append(p)
        prompts = Prompts(positive=np.array(pos).reshape(-1, 3),
                          negative=np.array(neg).reshape(-1, 3), boxes=boxes,
                          scribbles=paint, mode=mode, axis=axis, index=index)
        t0 = time.perf_counter()
        mask, region = engine.predict_region(image, spacing, prompts)
        run.seconds.append(time.perf_counter() - t0)
        full = np.zeros(truth.shape, bool)
        full[region] = mask
        pred = np.take(full, index, axis) if mode == "2d" else full
        run.dice.append(dice(pred, ref))
        run.prompts = prompts
    return run
