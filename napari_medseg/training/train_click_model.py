"""Train the built-in click model on synthetic phantoms with simulated clicks.

Usage::

    python -m napari_medseg.training.train_click_model --minutes 9 \
        --out napari_medseg/interactive/click_model.pt --log train_click.log

Each step draws crops around one labelled object of a randomised phantom
(abdomen CT or head MR, ``vary=True``), places 1-4 positive clicks (the first
deep inside the object, like a user's first click) and 0-3 negative clicks
near it, and fits the mask with Dice + cross-entropy. Runs on the CPU within
the given time; the weights are written atomically as a plain state dict.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from ..core.phantom import make_abdomen_ct, make_head_mr
from ..interactive.click_model import WEIGHTS, ClickNet, click_channels
from ..io.atomic import atomic_path

log = logging.getLogger(__name__)

CROP = (16, 48, 48)


def _objects(seed: int):
    """A randomised phantom: image array, spacing and per-object masks."""
    fn = make_abdomen_ct if seed % 3 else make_head_mr
    img, lab = fn(seed=seed, vary=True)
    data = np.asarray(img.data, np.float32)
    objs = []
    for k in np.unique(lab.data):
        if k == 0:
            continue
        cc, n = ndi.label(lab.data == k)
        sizes = np.bincount(cc.ravel())
        for i in range(1, n + 1):
            if sizes[i] >= 30:
                objs.append(cc == i)
    return data, objs


def _sample(data, obj, rng) -> tuple[np.ndarray, np.ndarray]:
    """One training example ``(x (3, *CROP), y (1, *CROP))`` around ``obj``."""
    pts = np.argwhere(obj)
    centre = pts[rng.integers(len(pts))]
    lo = [int(np.clip(c - s // 2 + rng.integers(-s // 4, s // 4 + 1), 0, max(n - s, 0)))
          for c, s, n in zip(centre, CROP, data.shape)]
    sl = tuple(slice(a, a + s) for a, s in zip(lo, CROP))
    img = data[sl]
    m = obj[sl]
    pad = [(0, s - n) for s, n in zip(CROP, img.shape)]
    img = np.pad(img, pad, mode="edge")
    m = np.pad(m, pad)
    dist = ndi.distance_transform_edt(m)
    deep = np.argwhere(dist >= 0.6 * dist.max()) if m.any() else np.argwhere(np.ones_like(m))
    pos = [deep[rng.integers(len(deep))]]
    inside = np.argwhere(m)
    for _ in range(rng.integers(0, 4)):
        if len(inside):
            pos.append(inside[rng.integers(len(inside))])
    ring = np.argwhere(ndi.binary_dilation(m, iterations=6) & ~m)
    neg = [ring[rng.integers(len(ring))] for _ in range(rng.integers(0, 4)) if len(ring)]
    jitter = lambda p: np.asarray(p, float) + rng.uniform(-0.5, 0.5, 3)  # noqa: E731
    x = click_channels(img, np.array([jitter(p) for p in pos]),
                       np.array([jitter(p) for p in neg]).reshape(-1, 3))
    for ax in (1, 2, 3):
        if rng.random() < 0.5:
            x = np.flip(x, ax)
            m = np.flip(m, ax - 1)
    return np.ascontiguousarray(x), np.ascontiguousarray(m[None].astype(np.float32))


def _loss(logits, y):
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3, 4))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3, 4)) + y.sum((1, 2, 3, 4)) + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return dice.mean() + bce


def train(out=WEIGHTS, minutes: float = 9.0, batch: int = 4, width: int = 12,
          n_phantoms: int = 24, threads: int = 2, seed: int = 0) -> dict:
    """Train and save the click network; return a summary dict."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    pool = [_objects(1000 + i) for i in range(n_phantoms)]
    log.info("built %d phantoms in %.1f s", len(pool), time.perf_counter() - t0)
    net = ClickNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    deadline = t0 + 60 * minutes
    step, losses = 0, []
    while step == 0 or time.perf_counter() < deadline:
        xs, ys = [], []
        for _ in range(batch):
            data, objs = pool[rng.integers(len(pool))]
            x, y = _sample(data, objs[rng.integers(len(objs))], rng)
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys))
        loss = _loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        frac = (time.perf_counter() - t0) / (60 * minutes)
        for g in opt.param_groups:  # cosine decay over the time budget
            g["lr"] = 3e-3 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
        if step % 25 == 0:
            log.info("step %d loss %.4f (mean of last 25) %.0f s", step,
                     np.mean(losses[-25:]), time.perf_counter() - t0)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["_width"] = torch.tensor(width)
    with atomic_path(out, overwrite=True) as tmp:
        torch.save(state, tmp)
    summary = {"steps": step, "final_loss": float(np.mean(losses[-50:])),
               "seconds": time.perf_counter() - t0, "out": str(out)}
    log.info("saved %s", summary)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--minutes", type=float, default=9.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default=None, help="also log to this file")
    args = ap.parse_args(argv)
    handlers = [logging.StreamHandler()]
    if args.log:
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=handlers)
    train(Path(args.out), args.minutes, args.batch, args.width, threads=args.threads)


if __name__ == "__main__":
    main()
