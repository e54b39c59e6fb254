"""Train the built-in interactive model on domain-randomised synthetic objects and phantoms.

Usage (the shipped weights; see docs/models.md for times and figures)::

    python -m napari_medseg.training.train_click_model --steps 7000 --threads 1 \
        --seed 0 --work-dir /tmp/click3/run1 --out /tmp/click3/run1/click_model.pt
    # (stopped after its step-1000 checkpoint; then, from those weights)
    python -m napari_medseg.training.train_click_model --steps 6000 --threads 1 \
        --seed 1 --lr 2e-3 --init /tmp/click3/run1_step1000.pt --work-dir /tmp/click3/run2 \
        --out napari_medseg/interactive/click_model.pt

A run started again with the same ``--work-dir`` resumes from its checkpoint
(weights, optimiser, step and random state, written every 500 steps).
``--workers N`` makes the examples' objects and first prompts in ``N`` other
processes (one keeps the second core of a 2-core machine busy: 1.3 times the
steps per minute there); ``--device cuda`` trains on a GPU, which needs many.

Training follows the interactive-segmentation recipe of RITM and the CVPR 2025
interactive 3D challenge, on data made to cover what real scans do in the
manner of SynthSeg: three examples in five are synthetic objects
(:mod:`napari_medseg.training.synth`: blobs, tubes, shells, multi-part, tiny
and larger-than-the-region objects in random tissue maps, deformed by random
smooth fields, with random per-structure intensities and textures, a third in
CT Hounsfield ranges with neighbours of nearly equal intensity, then thick
slices, blur, bias field, gamma and noise), made directly on grids shaped as
inference plans them; the others are organs of the randomised abdomen CT and
head MR phantoms (``vary=True``; the pool is built once and cached in an
``.npz`` in the temporary folder) in regions chosen by the same rules as
inference (:mod:`napari_medseg.interactive.click_roi`). Three in four
examples are 3D, one in four a 2D slab (only its prompted slice supervised).
The first prompt is a click deep inside the object or (one 3D example in
three) a box: a 2D box around the object on one of its slices, or its 3D
box. Then 0-4 corrective clicks are simulated with the network itself (no
gradient), each at the centre of its largest error (:func:`~napari_medseg.
interactive.simulate.next_click`), its last mask becoming the previous-mask
input. The loss is Dice + cross-entropy on the grid, under bf16 autocast
where the CPU has native bf16 (a step whose bf16 gradient is not finite is
redone in float32). Weights are written atomically as a plain state dict
tagged with the architecture.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from ..core.phantom import make_abdomen_ct, make_head_mr
from ..interactive import click_roi as roi
from ..interactive.click_model import (WEIGHTS, ClickNet, _anchors, click_channels,
                                       keep_clicked, load_click_net, state_for_saving)
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


def _deep_click(truth: np.ndarray, spacing, rng) -> tuple[np.ndarray, float]:
    """A click deep inside ``truth`` (its deepest voxel half of the time) and its
    depth (mm to the object's edge)."""
    box = ndi.find_objects(truth.astype(np.uint8))[0]
    dist = ndi.distance_transform_edt(np.pad(truth[box], 1), sampling=spacing)
    dist = dist[tuple(slice(1, -1) for _ in box)]
    if rng.random() < 0.5:
        p = np.unravel_index(int(np.argmax(dist)), dist.shape)
    else:
        deep = np.argwhere(dist >= 0.6 * dist.max())
        p = deep[rng.integers(len(deep))]
    return np.array([i + s.start for i, s in zip(p, box)], float), float(dist[tuple(p)])


def _first_click(truth: np.ndarray, spacing, rng) -> np.ndarray:
    """A click deep inside ``truth`` (its deepest voxel half of the time)."""
    return _deep_click(truth, spacing, rng)[0]


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


def _inside_cube(click, depth: float, spacing, shape, rng):
    """A first-click cube that lies (mostly) inside the object: an edge of
    1.0-1.8 times the click's ``depth`` (mm to the object's edge, from
    :func:`_deep_click`), as a first click deep in a large organ sees nothing
    but organ."""
    edge = 2.0 * depth * rng.uniform(0.5, 0.9)
    return roi.box_around(click[None], spacing, shape, min_mm=edge)


def _phantom_crop(pool, rng, two_d: bool, inside_share: float = 0.0):
    """A phantom object's region on the inference grid: ``(crop, truth, click)``.

    The region is chosen as inference would (the object's box or a first-click
    cube, :func:`_region`), or, a share ``inside_share`` of the 3D regions, a
    cube inside the object (:func:`_inside_cube`); ``click`` is the first click
    in grid indices.
    """
    img, sp, objs, classes = pool[rng.integers(len(pool))]
    kinds = np.unique(classes[1:])
    kind = rng.choice(kinds)
    ids = np.flatnonzero(classes == kind)
    oid = rng.choice(ids)
    boxes = ndi.find_objects((objs == oid).astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    truth, box = objs == oid, boxes[0]
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
        click, depth = _deep_click(truth, sp, rng)
        if inside_share > 0 and rng.random() < inside_share:
            lo, hi = _inside_cube(click, depth, sp, truth.shape, rng)
        else:
            lo, hi = _region(box, click, sp, truth.shape, rng)
        grid = roi.plan_grid(hi - lo, sp, roi.BUDGET_3D)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop = roi.resample(img[sl], grid)
    tg = roi.resample(truth[sl].astype(np.float32), grid) > 0.5
    return crop, tg, roi.to_grid(click, lo, hi, grid)[0]


def _synth_grid(rng, two_d: bool) -> tuple:
    """A grid shape as inference plans them, for a random region and spacing."""
    sp = np.array([rng.choice([0.7, 1.0, 1.5, 2.5, 3.0, 5.0]), 1.0, 1.0]) * rng.uniform(0.5, 1.5)
    mm = rng.uniform(30, 250, 3)
    if two_d:
        ext = np.maximum(np.round(mm / sp), 8).astype(int)
        ext[0] = roi.SLAB_2D
        return roi.plan_grid(ext, sp, roi.INPLANE_2D, fixed=(0,))
    ext = np.maximum(np.round(mm / sp), 16).astype(int)
    return roi.plan_grid(ext, sp, roi.BUDGET_3D)


def _synth_crop(rng, two_d: bool, centre_share: float = 0.5):
    """A domain-randomised object on a grid: ``(crop, truth, click or None)`` or None.

    A share ``centre_share`` of the objects is whatever lies at the grid's
    centre, clicked there, as a first click at inference is the centre of its
    region.
    """
    from .synth import synth_example

    centre = bool(centre_share > 0 and rng.random() < centre_share)
    return synth_example(_synth_grid(rng, two_d), rng, centre=centre)


def _first_prompt(tg, rng, two_d: bool, click):
    """The first interaction on a grid: ``(positive clicks, boxes, slice k)``.

    A click deep inside the object (given for phantoms, drawn here for
    synthetic objects), or one time in three (3D) a box: a 2D box around the
    object on one of its slices (as the challenge's box protocol), or its 3D
    box. In 2D mode ``k`` is the slab's slice the prompts are on.
    """
    if two_d:
        if click is not None:
            k = int(np.clip(round(click[0]), 0, tg.shape[0] - 1))
        else:
            areas = tg.sum((1, 2))
            k = int(np.argmax(areas)) if rng.random() < 0.5 else \
                int(rng.choice(np.flatnonzero(areas)))
        if not tg[k].any():
            return None
        if click is None or rng.random() < 0.2:
            if rng.random() < 0.25:
                pts = np.argwhere(tg[k])
                box = np.array([[k, *pts.min(0)], [k, *pts.max(0)]], float)
                box[:, 1:] += rng.normal(0, 1.0, (2, 2))
                return np.zeros((0, 3)), box[None], k
            click = np.insert(_first_click(tg[k], (1.0, 1.0), rng), 0, k)
        return click[None], np.zeros((0, 2, 3)), k
    if rng.random() < 1 / 3:
        if rng.random() < 0.7:  # 2D box on a slice across axis 0
            areas = tg.sum((1, 2))
            z = int(np.argmax(areas)) if rng.random() < 0.6 else \
                int(rng.choice(np.flatnonzero(areas)))
            pts = np.argwhere(tg[z])
            box = np.array([[z, *pts.min(0)], [z, *pts.max(0)]], float)
            box[:, 1:] += rng.normal(0, 1.0, (2, 2))
        else:
            pts = np.argwhere(tg)
            box = np.array([pts.min(0), pts.max(0)], float) + rng.normal(0, 1.0, (2, 3))
        return np.zeros((0, 3)), box[None], None
    if click is None:
        click = _first_click(tg, (1.0, 1.0, 1.0), rng)
    return click[None], np.zeros((0, 2, 3)), None


def _predict_grid(net, x: np.ndarray) -> np.ndarray:
    device = next(net.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=_BF16):
        return net(torch.from_numpy(x)[None].to(device))[0, 0].float().cpu().numpy()


def _source(pool, rng, synth_share: float = 0.6, centre_share: float = 0.5,
            real_pool=(), real_share: float = 0.0, inside_share: float = 0.0):
    """The network-free part of an example: an object on a region's grid and its
    first prompt, ``(crop, truth, two_d, positive, boxes, k)``, or None.

    The object is synthetic (:mod:`.synth`, share ``synth_share``), a
    pseudo-object on a real image (:mod:`.pseudo_objects`, share
    ``real_share`` where ``real_pool`` has entries) or a phantom organ; three
    in four regions are 3D, one in four a 2D slab. Only numpy and scipy: data
    workers (``train(workers=...)``) run it in other processes.
    """
    two_d = rng.random() < 0.25
    r = rng.random()
    if r < synth_share or not (pool or real_pool):
        src = _synth_crop(rng, two_d, centre_share)
    elif real_pool and (r < synth_share + real_share or not pool):
        src = _phantom_crop(real_pool, rng, two_d, inside_share)
    else:
        src = _phantom_crop(pool, rng, two_d, inside_share)
    if src is None:
        return None
    crop, tg, click = src
    if click is not None:
        for ax in range(3):  # flips
            if rng.random() < 0.5:
                crop, tg = np.flip(crop, ax), np.flip(tg, ax)
                click[ax] = tg.shape[ax] - 1 - click[ax]
    crop, tg = np.ascontiguousarray(crop), np.ascontiguousarray(tg)
    if not tg.any():
        return None
    first = _first_prompt(tg, rng, two_d, click)
    if first is None:
        return None
    pos, boxes, k = first
    return crop, tg, two_d, pos, boxes, k


def _with_corrections(net, src, rng):
    """One input ``(6, Z, Y, X)`` and target ``(1, Z, Y, X)`` from a :func:`_source`:
    0-4 corrective clicks simulated with the network itself (no gradient), each
    at the centre of its largest error; its last mask becomes the previous-mask
    input."""
    crop, tg, two_d, pos, boxes, k = src
    pos, neg, prev = [p for p in pos], [], None
    for _ in range(rng.choice(5, p=[0.25, 0.25, 0.2, 0.15, 0.15])):
        x = click_channels(crop, np.array(pos).reshape(-1, 3), np.array(neg).reshape(-1, 3),
                           prev, boxes)
        pred = _predict_grid(net, x) > 0
        anchors = _anchors(np.array(pos).reshape(-1, 3), boxes)
        pred = keep_clicked(pred, anchors, np.array(neg).reshape(-1, 3))
        if two_d:
            c = next_click(pred[k], tg[k], (1.0, 1.0))
            c = None if c is None else (np.insert(c[0], 0, k), c[1])
            prev = np.zeros(tg.shape, np.float32)
            prev[k] = pred[k]
        else:
            c = next_click(pred, tg, (1.0, 1.0, 1.0))
            prev = pred.astype(np.float32)
        if c is None:
            break
        (pos if c[1] else neg).append(c[0])
    x = click_channels(crop, np.array(pos).reshape(-1, 3), np.array(neg).reshape(-1, 3),
                       prev, boxes)
    y = tg[None].astype(np.float32)
    if two_d:  # only the prompted slice is supervised in a 2D slab
        w = np.zeros_like(y)
        w[0, k] = 1.0
    else:
        w = np.ones_like(y)
    return x, y, w


def _example(pool, net, rng, synth_share: float = 0.6, centre_share: float = 0.5,
             real_pool=(), real_share: float = 0.0, inside_share: float = 0.0):
    """One input ``(6, Z, Y, X)`` and target ``(1, Z, Y, X)`` on a region's grid
    (:func:`_source`, then :func:`_with_corrections`), or None."""
    src = _source(pool, rng, synth_share, centre_share, real_pool, real_share, inside_share)
    return None if src is None else _with_corrections(net, src, rng)


#: What forked data workers read: the pools and the example settings.
_WORKER: dict = {}


def _worker_source(seed: int):
    w = _WORKER
    return _source(w["pool"], np.random.default_rng(seed), *w["settings"])


class _Feeder:
    """Examples' network-free parts made ahead by ``workers`` forked processes.

    Each task gets a seed drawn from the run's generator when it is submitted,
    so a run is reproducible for a given worker count; the tasks in flight when
    a run stops are drawn again (with new seeds) when it resumes.
    """

    def __init__(self, workers: int, pool, real_pool, settings, rng):
        import multiprocessing as mp

        _WORKER.update(pool=pool, settings=(settings[0], settings[1], real_pool,
                                            settings[2], settings[3]))
        self._pool = mp.get_context("fork").Pool(workers)
        self._rng = rng
        self._pending = []
        for _ in range(3 * workers):
            self._submit()

    def _submit(self):
        seed = int(self._rng.integers(2 ** 63))
        self._pending.append(self._pool.apply_async(_worker_source, (seed,)))

    def next(self):
        src = self._pending.pop(0).get()
        self._submit()
        return src

    def close(self):
        self._pool.terminate()
        self._pool.join()
        _WORKER.clear()


def _loss(logits, y, w):
    logits = logits.float()
    p = torch.sigmoid(logits) * w
    yw = y * w
    inter = (p * yw).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + yw.sum() + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=w,
                                                               reduction="sum")
    return dice + bce / w.sum().clamp_min(1.0)


def _cpu_state(net: ClickNet) -> dict:
    return {k: v.detach().cpu() for k, v in state_for_saving(net).items()}


def _save(net: ClickNet, out) -> None:
    with atomic_path(out, overwrite=True) as tmp:
        torch.save(_cpu_state(net), tmp)


def _save_checkpoint(path: Path, net, opt, step: int, rng, losses,
                     seconds: float = 0.0) -> None:
    """Everything a resumed run needs, as tensors and plain values (weights_only-safe)."""
    state = {"net": _cpu_state(net), "opt": opt.state_dict(), "step": step,
             "rng": json.dumps(rng.bit_generator.state),
             "losses": torch.tensor(losses[-1000:], dtype=torch.float32),
             "seconds": torch.tensor(float(seconds), dtype=torch.float64)}
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(state, tmp)


_BF16 = True


def train(out=WEIGHTS, minutes: float | None = None, width: int = 16, n_phantoms: int = 40,
          threads: int = 1, seed: int = 0, lr: float = 2e-3, init=None,
          cache: Path | None = None, steps: int = 12000, work_dir: Path | None = None,
          synth_share: float = 0.6, bf16: bool | None = None,
          centre_share: float = 0.5, stop_after: int | None = None,
          real_dir: Path | None = None, real_share: float = 0.0,
          inside_share: float = 0.0, accumulate: int = 1, device: str = "cpu",
          workers: int = 0, real_cache: Path | None = None,
          schedule: str = "steps") -> dict:
    """Train and save the click network; return a summary dict.

    Parameters
    ----------
    out : path
        Where the weights are written (atomically).
    minutes : float, optional
        Wall-clock cap of the optimisation (pool building excluded; of this
        start, or with ``schedule="time"`` of the whole run, resumes included).
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
    steps : int
        Optimisation steps (warm-up, then cosine decay to zero).
    schedule : {"steps", "time"}
        What the cosine decay follows: the steps, or (``"time"``, needs
        ``minutes``) the wall clock, so that a run on hardware of unknown speed
        ends its decay when its time is up; ``steps`` then only caps it.
    work_dir : path, optional
        Folder for ``checkpoint.pt`` (every 500 steps) and resuming: a run
        started again with the same folder continues where it stopped.
    synth_share : float
        Share of domain-randomised synthetic objects (the rest are phantom organs).
    centre_share : float
        Share of the synthetic objects that are the structure at the grid's
        centre, clicked there (:func:`~napari_medseg.training.synth.synth_example`).
    bf16 : bool, optional
        bf16 autocast (default: where the CPU has native bf16).
    real_dir, real_share : path, float
        Real-data folder whose :data:`~.pseudo_objects.TRAINING_IMAGES` (images
        only, never labels) give pseudo-objects for a share ``real_share`` of
        the examples.
    inside_share : float
        Share of the 3D phantom and pseudo-object examples whose first-click
        cube lies inside the object (:func:`_inside_cube`).
    accumulate : int
        Examples whose gradients (each clipped) are averaged into one step.
    device : str
        Torch device of the network (``"cpu"``, ``"cuda"``...). bf16 autocast
        runs on it where the CPU has native bf16 (``bf16``); the weights are
        written as CPU tensors.
    workers : int
        Processes that make the examples' objects and first prompts ahead of
        the training loop (:func:`_source`; forked, so on Linux and macOS).
        The synthetic objects take most of an example's time on the CPU
        (about 0.12 s against 0.11 s for the network's step at width 24): one
        worker keeps the other core of a 2-core machine busy, and a GPU needs
        many. 0: made in the loop, as before (the same examples for a seed).
    real_cache : path, optional
        ``.npz`` file caching the pseudo-object pool of ``real_dir`` (for this
        seed; building it takes 4-12 minutes on one thread).
    """
    global _BF16
    from ..core.policy import bf16_supported

    if schedule not in ("steps", "time") or (schedule == "time" and not minutes):
        raise ValueError(f"schedule {schedule!r}: 'steps', or 'time' with minutes")

    _BF16 = bf16_supported(device) if bf16 is None else bool(bf16)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    pool = build_pool(n_phantoms, cache) if n_phantoms else []
    log.info("phantom pool of %d ready in %.1f s", len(pool), time.perf_counter() - t0)
    real_pool = []
    if real_dir is not None and real_share > 0:
        from .pseudo_objects import build_real_pool

        real_pool = build_real_pool(real_dir, np.random.default_rng([seed, 7]),
                                    cache=real_cache)
        log.info("real-image pseudo-object pool of %d maps ready in %.1f s", len(real_pool),
                 time.perf_counter() - t0)
    device = torch.device(device)
    net = (load_click_net(init) if init else ClickNet(width)).to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    step, losses, done_s = 0, [], 0.0
    ckpt = Path(work_dir) / "checkpoint.pt" if work_dir else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        net = _net_from_state(state["net"]).to(device)
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        rng.bit_generator.state = json.loads(state["rng"])
        losses = state["losses"].tolist()
        done_s = float(state["seconds"]) if "seconds" in state else 0.0
        log.info("resumed from %s at step %d", ckpt, step)
    feeder = None
    if workers > 0:
        feeder = _Feeder(workers, pool, real_pool,
                         (synth_share, centre_share, real_share, inside_share), rng)
        log.info("%d data workers started", workers)
    t1 = time.perf_counter()
    deadline = None if minutes is None else \
        t1 + 60 * minutes - (done_s if schedule == "time" else 0.0)
    start_step, skipped, fp32_retries = step, 0, 0
    acc, n_acc, acc_loss, examples = None, 0, 0.0, 0
    last = steps if stop_after is None else min(steps, int(stop_after))
    try:
        while step < last and (deadline is None or step == start_step
                                or time.perf_counter() < deadline):
            if feeder is None:
                ex = _example(pool, net, rng, synth_share, centre_share, real_pool, real_share,
                              inside_share)
            else:
                src = feeder.next()
                ex = None if src is None else _with_corrections(net, src, rng)
            if ex is None:
                continue
            x, y, w = (torch.from_numpy(np.ascontiguousarray(a))[None].to(device) for a in ex)
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_BF16):
                    logits = net(x)
                loss = _loss(logits, y, w)
            except (RuntimeError, ValueError) as err:  # keep a long run alive; say so
                log.warning("skipped an example of shape %s: %s", tuple(x.shape), err)
                continue
            for g in opt.param_groups:  # short warm-up, then cosine decay over the steps
                if schedule == "time":
                    progress = min(1.0, (done_s + time.perf_counter() - t1) / (60 * minutes))
                else:
                    progress = step / steps
                g["lr"] = float(lr * min(1.0, (step + 1) / 200)
                                * 0.5 * (1 + np.cos(np.pi * progress)))
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            if _BF16 and not (torch.isfinite(norm) and torch.isfinite(loss)):
                # CPU bf16 convolution backward now and then returns NaN for grids of
                # 16 slices (not reproducible on the same input): redo the step in float32
                fp32_retries += 1
                opt.zero_grad()
                loss = _loss(net(x), y, w)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            if not (torch.isfinite(norm) and torch.isfinite(loss)):
                skipped += 1  # never let a non-finite step reach the weights
                log.warning("skipped a step with a non-finite loss or gradient (%d so far), "
                            "example %s", skipped, tuple(x.shape))
                continue
            if accumulate > 1:  # average the clipped gradients of ``accumulate`` examples
                grads = [q.grad.detach().clone() if q.grad is not None else None
                         for q in net.parameters()]
                acc = grads if acc is None else [a if g is None else (g if a is None else a + g)
                                                 for a, g in zip(acc, grads)]
                n_acc += 1
                acc_loss += float(loss.detach())
                if n_acc < accumulate:
                    continue
                for q, a in zip(net.parameters(), acc):
                    q.grad = None if a is None else a / n_acc
                loss = torch.tensor(acc_loss / n_acc)
                acc, n_acc, acc_loss = None, 0, 0.0
            examples += max(1, accumulate)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 50 == 0:
                log.info("step %d loss %.4f (mean of last 50) %.0f s, %d float32 retries", step,
                         np.mean(losses[-50:]), time.perf_counter() - t0, fp32_retries)
            if step % 500 == 0:  # a checkpoint, in case the run is stopped
                _save(net, out)
                if ckpt is not None:
                    _save_checkpoint(ckpt, net, opt, step, rng, losses,
                                     done_s + time.perf_counter() - t1)
    finally:
        if feeder is not None:
            feeder.close()
    _save(net, out)
    if ckpt is not None:
        _save_checkpoint(ckpt, net, opt, step, rng, losses,
                                 done_s + time.perf_counter() - t1)
    summary = {"steps": step, "examples": examples, "skipped": skipped,
               "fp32_retries": fp32_retries,
               "final_loss": float(np.mean(losses[-100:])) if losses else None,
               "seconds": time.perf_counter() - t0, "out": str(out)}
    log.info("saved %s", summary)
    return summary


def _net_from_state(state: dict) -> ClickNet:
    state = dict(state)
    state.pop("_arch", None)
    net = ClickNet(int(state.pop("_width").item()))
    net.load_state_dict(state)
    return net


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock cap (the schedule follows --steps)")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--work-dir", default=None,
                    help="folder for checkpoints; rerun with the same folder to resume")
    ap.add_argument("--synth-share", type=float, default=0.6)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop at this step (the schedule still follows --steps)")
    ap.add_argument("--centre-share", type=float, default=0.5,
                    help="share of synthetic objects clicked at the grid's centre")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--phantoms", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="continue from these weights")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir())
                                           / "napari_medseg_click_pool.npz"))
    ap.add_argument("--log", default=None, help="also log to this file")
    ap.add_argument("--real-dir", default=None,
                    help="real-data folder: its training images (never labels) give "
                         "pseudo-objects (training/pseudo_objects.py)")
    ap.add_argument("--real-share", type=float, default=0.0,
                    help="share of examples that are pseudo-objects on real images")
    ap.add_argument("--accumulate", type=int, default=1,
                    help="examples averaged into one optimisation step")
    ap.add_argument("--inside-share", type=float, default=0.0,
                    help="share of 3D phantom / pseudo-object examples whose first-click "
                         "cube lies inside the object")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the network (cpu, cuda, cuda:1...)")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes making the examples' objects ahead of the loop "
                         "(0: in the loop; the same examples for a seed as before)")
    ap.add_argument("--schedule", choices=["steps", "time"], default="steps",
                    help="the cosine decay follows the steps, or the wall clock of "
                         "--minutes (for hardware of unknown speed)")
    ap.add_argument("--real-cache", default=None,
                    help=".npz caching the pseudo-object pool of --real-dir (per seed)")
    args = ap.parse_args(argv)
    handlers = [logging.StreamHandler()]
    if args.log:
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=handlers)
    train(Path(args.out), args.minutes, args.width, args.phantoms, args.threads,
          seed=args.seed, lr=args.lr, init=args.init, cache=Path(args.cache),
          steps=args.steps, work_dir=Path(args.work_dir) if args.work_dir else None,
          synth_share=args.synth_share, centre_share=args.centre_share,
          stop_after=args.stop_after,
          real_dir=Path(args.real_dir) if args.real_dir else None, real_share=args.real_share,
          inside_share=args.inside_share, accumulate=args.accumulate,
          device=args.device, workers=args.workers,
          real_cache=Path(args.real_cache) if args.real_cache else None,
          schedule=args.schedule)


if __name__ == "__main__":
    main()
