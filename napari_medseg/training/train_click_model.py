"""Train the built-in click model on synthetic phantoms with simulated clicks.

Usage (the shipped weights: 18 minutes, 5,500 steps from scratch on one CPU thread,
then 30 and 24 minutes more, each from the last weights at a lower learning rate on two)::

    nice python -m napari_medseg.training.train_click_model --minutes 18 --threads 1 \
        --out /tmp/click_a.pt --log train_click.log
    nice python -m napari_medseg.training.train_click_model --minutes 30 --threads 2 \
        --lr 1e-3 --init /tmp/click_a.pt --out /tmp/click_b.pt
    nice python -m napari_medseg.training.train_click_model --minutes 24 --threads 2 \
        --lr 7e-4 --seed 1 --init /tmp/click_b.pt --out napari_medseg/interactive/click_model.pt

Training follows the interactive-segmentation recipe of RITM / DeepEdit on
randomised phantoms (abdomen CT and head MR, ``vary=True``; the pool is built
once and cached in an ``.npz`` in the temporary folder). Each step takes one
labelled object (classes drawn evenly) and a region chosen by the same rules
as inference (:mod:`napari_medseg.interactive.click_roi`): the object's box
with a margin, or a 64-256 mm cube around a first click that may cut the
object; three in four regions are 3D, one in four a 2D slab. The region is
resampled onto the inference grid; the first click goes deep inside the
object, then 0-3 clicks are simulated with the network itself (no gradient),
each at the centre of its largest error (:func:`~napari_medseg.interactive.
simulate.next_click`), its last mask becoming the previous-mask input. The
loss is Dice + cross-entropy on the grid. Weights are written atomically as a
plain state dict tagged with the architecture.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from ..core.phantom import make_abdomen_ct, make_head_mr
from ..interactive import click_roi as roi
from ..interactive.click_model import (WEIGHTS, ClickNet, click_channels, keep_clicked,
                                       load_click_net, state_for_saving)
from ..interactive.simulate import next_click
from ..io.atomic import atomic_path

log = logging.getLogger(__name__)

POOL_SEED = 1000


def _phantom(seed: int):
    """``(image, spacing, object ids, class of each id)`` of one randomised phantom."""
    fn = make_head_mr if seed % 2 else make_abdomen_ct
    img, lab = fn(seed=seed, vary=True)
    lab = np.asarray(lab.data)
    objs = np.zeros(lab.shape, np.int16)
    classes = [0]
    for k in np.unique(lab):
        if k == 0:
            continue
        cc, n = ndi.label(lab == k)
        sizes = np.bincount(cc.ravel())
        for i in range(1, n + 1):
            if sizes[i] >= 30:
                classes.append(int(k) + (100 if seed % 2 else 0))
                objs[cc == i] = len(classes) - 1
    return np.asarray(img.data, np.float32), np.asarray(img.spacing, float), objs, \
        np.array(classes)


def build_pool(n: int, cache: Path | None = None) -> list:
    """``n`` phantoms (alternately CT and MR), read from / written to ``cache``."""
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            if int(z["n"]) == n:
                return [(z[f"img{i}"], z[f"sp{i}"], z[f"obj{i}"], z[f"cls{i}"])
                        for i in range(n)]
    pool = [_phantom(POOL_SEED + i) for i in range(n)]
    if cache is not None:
        arrays = {"n": np.array(n)}
        for i, (img, sp, obj, cls) in enumerate(pool):
            arrays.update({f"img{i}": img, f"sp{i}": sp, f"obj{i}": obj, f"cls{i}": cls})
        with atomic_path(cache, overwrite=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    return pool


def _first_click(truth: np.ndarray, spacing, rng) -> np.ndarray:
    """A click deep inside ``truth`` (its deepest voxel half of the time)."""
    box = ndi.find_objects(truth.astype(np.uint8))[0]
    dist = ndi.distance_transform_edt(np.pad(truth[box], 1), sampling=spacing)
    dist = dist[tuple(slice(1, -1) for _ in box)]
    if rng.random() < 0.5:
        p = np.unravel_index(int(np.argmax(dist)), dist.shape)
    else:
        deep = np.argwhere(dist >= 0.6 * dist.max())
        p = deep[rng.integers(len(deep))]
    return np.array([i + s.start for i, s in zip(p, box)], float)


def _region(truth_box, click, spacing, shape, rng, fixed=()):
    """A region as inference would choose it: the object's box or a first-click cube."""
    if rng.random() < 0.55:
        corners = np.array([[s.start for s in truth_box], [s.stop - 1 for s in truth_box]])
        lo, hi = roi.box_around(np.vstack([corners, click]), spacing, shape,
                                margin_mm=rng.uniform(3, 10), rel=rng.uniform(0.05, 0.3))
    else:
        edge = roi.FIRST_ROI_MM * 2 ** rng.choice(3, p=[0.5, 0.3, 0.2]) * rng.uniform(0.8, 1.2)
        lo, hi = roi.box_around(click[None], spacing, shape, min_mm=edge)
        shift = (rng.uniform(-0.3, 0.3, 3) * (hi - lo)).astype(int)
        lo = np.clip(lo + shift, 0, np.asarray(shape) - 1)
        hi = np.clip(hi + shift, lo + 1, shape)
        lo = np.minimum(lo, np.floor(click).astype(int))  # the click stays inside
        hi = np.maximum(hi, np.floor(click).astype(int) + 1)
    return lo, hi


def _example(pool, net, rng) -> tuple[np.ndarray, np.ndarray] | None:
    """One input ``(4, Z, Y, X)`` and target ``(1, Z, Y, X)`` on a region's grid."""
    img, sp, objs, classes = pool[rng.integers(len(pool))]
    kinds = np.unique(classes[1:])
    kind = rng.choice(kinds)
    ids = np.flatnonzero(classes == kind)
    oid = rng.choice(ids)
    boxes = ndi.find_objects((objs == oid).astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    truth, box = objs == oid, boxes[0]
    two_d = rng.random() < 0.25
    if two_d:
        areas = truth[:, box[1], box[2]].sum((1, 2))
        z = int(np.argmax(areas)) if rng.random() < 0.5 else \
            int(rng.choice(np.flatnonzero(areas)))
        click = np.insert(_first_click(truth[z], sp[1:], rng), 0, z)
        lo, hi = _region(box, click, sp, truth.shape, rng)
        z0 = int(np.clip(z - roi.SLAB_2D // 2, 0, max(truth.shape[0] - roi.SLAB_2D, 0)))
        lo[0], hi[0] = z0, z0 + roi.SLAB_2D
        grid = roi.plan_grid(hi - lo, sp, roi.INPLANE_2D, fixed=(0,))
    else:
        click = _first_click(truth, sp, rng)
        lo, hi = _region(box, click, sp, truth.shape, rng)
        grid = roi.plan_grid(hi - lo, sp, roi.BUDGET_3D)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop = roi.resample(img[sl], grid)
    tg = roi.resample(truth[sl].astype(np.float32), grid) > 0.5
    gsp = sp * (hi - lo) / np.asarray(grid)
    p0 = roi.to_grid(click, lo, hi, grid)[0]
    for ax in range(3):  # flips
        if rng.random() < 0.5:
            crop, tg = np.flip(crop, ax), np.flip(tg, ax)
            p0[ax] = grid[ax] - 1 - p0[ax]
    k = int(round(p0[0]))
    if not tg.any() or (two_d and not tg[k].any()):
        return None
    pos, neg, prev = [p0], [], None
    for _ in range(rng.choice(4, p=[0.3, 0.3, 0.25, 0.15])):
        x = click_channels(crop, np.array(pos), np.array(neg).reshape(-1, 3), prev)
        with torch.no_grad():
            pred = net(torch.from_numpy(x)[None])[0, 0].numpy() > 0
        pred = keep_clicked(pred, np.array(pos), np.array(neg).reshape(-1, 3))
        if two_d:
            c = next_click(pred[k], tg[k], gsp[1:])
            c = None if c is None else (np.insert(c[0], 0, k), c[1])
            prev = np.zeros(grid, np.float32)
            prev[k] = pred[k]
        else:
            c = next_click(pred, tg, gsp)
            prev = pred.astype(np.float32)
        if c is None:
            break
        (pos if c[1] else neg).append(c[0])
    x = click_channels(crop, np.array(pos), np.array(neg).reshape(-1, 3), prev)
    return x, tg[None].astype(np.float32)


def _loss(logits, y):
    p = torch.sigmoid(logits)
    inter = (p * y).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + y.sum() + 1)
    return dice + torch.nn.functional.binary_cross_entropy_with_logits(logits, y)


def _save(net: ClickNet, out) -> None:
    with atomic_path(out, overwrite=True) as tmp:
        torch.save(state_for_saving(net), tmp)


def train(out=WEIGHTS, minutes: float = 30.0, width: int = 12, n_phantoms: int = 40,
          threads: int = 1, seed: int = 0, lr: float = 2e-3, init=None,
          cache: Path | None = None) -> dict:
    """Train and save the click network; return a summary dict.

    Parameters
    ----------
    out : path
        Where the weights are written (atomically).
    minutes : float
        Wall-clock budget of the optimisation (pool building excluded).
    width : int
        Network width (:class:`~napari_medseg.interactive.click_model.ClickNet`).
    n_phantoms : int
        Phantoms in the pool (alternately abdomen CT and head MR).
    threads : int
        Torch CPU threads.
    init : path, optional
        Weights to start from (continued training).
    cache : path, optional
        ``.npz`` file caching the phantom pool.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    pool = build_pool(n_phantoms, cache)
    log.info("phantom pool of %d ready in %.1f s", len(pool), time.perf_counter() - t0)
    net = load_click_net(init) if init else ClickNet(width)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    t1 = time.perf_counter()
    deadline = t1 + 60 * minutes
    step, losses = 0, []
    while step == 0 or time.perf_counter() < deadline:
        ex = _example(pool, net, rng)
        if ex is None:
            continue
        try:
            loss = _loss(net(torch.from_numpy(ex[0])[None]), torch.from_numpy(ex[1])[None])
        except (RuntimeError, ValueError) as err:  # keep a long run alive; say so
            log.warning("skipped an example of shape %s: %s", ex[0].shape, err)
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        frac = min((time.perf_counter() - t1) / (60 * minutes), 1.0)
        for g in opt.param_groups:  # short warm-up, then cosine decay over the budget
            g["lr"] = lr * min(1.0, step / 50) * 0.5 * (1 + np.cos(np.pi * frac))
        if step % 50 == 0:
            log.info("step %d loss %.4f (mean of last 50) %.0f s", step,
                     np.mean(losses[-50:]), time.perf_counter() - t0)
        if step % 1000 == 0:  # a checkpoint, in case the run is stopped
            _save(net, out)
    _save(net, out)
    summary = {"steps": step, "final_loss": float(np.mean(losses[-100:])),
               "seconds": time.perf_counter() - t0, "out": str(out)}
    log.info("saved %s", summary)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=12)
    ap.add_argument("--phantoms", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="continue from these weights")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir())
                                           / "napari_medseg_click_pool.npz"))
    ap.add_argument("--log", default=None, help="also log to this file")
    args = ap.parse_args(argv)
    handlers = [logging.StreamHandler()]
    if args.log:
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=handlers)
    train(Path(args.out), args.minutes, args.width, args.phantoms, args.threads,
          seed=args.seed, lr=args.lr, init=args.init, cache=Path(args.cache))


if __name__ == "__main__":
    main()
