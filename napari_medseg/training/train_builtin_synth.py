"""Train an ``abdomen-ct-small`` candidate on the varied synthetic abdomen (experimental).

This is the training pipeline for a built-in CT model meant to generalise to real
scans from synthetic data only (:mod:`napari_medseg.core.phantom.abdomen_synth`).
Its first runs did not beat the shipped weights (made by
:mod:`napari_medseg.training.train_builtin`) on the real scans; see
``docs/models.md`` for the figures. The shipped model is unchanged.

One command, CPU (or CUDA), resumable::

    python -m napari_medseg.training.train_builtin_synth --work-dir /tmp/builtin_run \\
        --out /tmp/abdomen-ct-candidate --threads 1

Data. A pool of anatomies from
:func:`napari_medseg.core.phantom.abdomen_synth.make_abdomen_tissues` (seed
``1 + i`` for case ``i``; tissue map + class labels on the model grid, 2.5 x 2 x 2
mm) is generated once into ``<work-dir>/pool/`` (compressed ``.npz``, reused by
later runs); the first ``--pool-init`` cases are made before training starts and
the rest while it runs. Every training window is painted anew by
:func:`~napari_medseg.core.phantom.abdomen_synth.paint_ct` (contrast phase,
per-tissue HU and texture, bias, slice thickness, PSF, kernel, noise), then
normalised with the card's CT window exactly as inference does. Some windows
have part of their field of view replaced by the zero padding inference uses
beyond the image edge, as when a scan is a thin slab or a tight crop.

Training. A 4-level :class:`~napari_medseg.models.networks.UNet3D` (optionally
started from other weights with ``--init``), gradient-norm clipping,
cross-entropy + soft Dice, AdamW, warm-up then cosine learning rate over
``--steps``, bf16 autocast on CPUs that support it. A checkpoint
(``<work-dir>/ckpt.pt``: weights, optimiser, step; tensors only) is written every
``--ckpt-minutes`` and the weights alone as ``<work-dir>/weights_<step>.pt``;
``--resume`` continues from ``ckpt.pt``.

Evaluation. ``--out`` receives ``model.pt`` and ``card.yaml`` and the held-out
synthetic Dice is printed; ``benchmarks/eval_real_builtin.py PACKAGE --synthetic 8
--write-card`` scores a package on the real scans of ``../shared/realdata`` and
writes both into its card (``metrics.real``, ``metrics.synthetic``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.card import ModelCard
from ..models.networks import UNet3D, count_parameters
from .losses import soft_dice_loss
from .metrics import dice_per_class
from .train_builtin import _use_bf16  # the same CPU rule as the shipped model

__all__ = ["train", "evaluate_synthetic", "make_card", "sample_window", "HELD_OUT_SEEDS",
           "dice_per_class"]

log = logging.getLogger(__name__)

NAME = "abdomen-ct-small"
VERSION = "2.0.0"
TARGET_SPACING = (2.5, 2.0, 2.0)
CASE_SHAPE = (96, 160, 200)       # 240 x 320 x 400 mm
PATCH = (32, 64, 64)
FEATURES = (8, 16, 32, 64)
WINDOW = [-200.0, 300.0]
HELD_OUT_SEEDS = tuple(range(100_001, 100_009))  # 8 anatomies never used in training
#: Weights of the classes when choosing what a window is centred on (others 1).
CENTRE_WEIGHTS = {5: 2.0, 9: 2.0, 2: 1.5}
FG_FRACTION = 0.6
PAD_FRACTION = 0.2
#: Classes of the older, simpler phantom (:func:`make_abdomen_ct`): ids 1..5 are ours.
LEGACY_CLASSES = 6
CLIP_NORM = 5.0  # gradient norm clip


def make_card(orientation: str | None = "LPS") -> ModelCard:
    """The card of the built-in model (training text and metrics filled in later)."""
    from ..core.phantom.abdomen_synth import SYNTH_COLORS, SYNTH_LABELS

    k = max(SYNTH_LABELS) + 1
    return ModelCard(
        name=NAME, version=VERSION,
        task="abdominal CT: liver, spleen, kidneys, liver lesions, stomach, aorta, "
             "inferior vena cava, pancreas",
        license="BSD-3-Clause",
        channels=[{"name": "CT", "modality": "CT"}],
        target_spacing=TARGET_SPACING, orientation=orientation,
        normalization=[{"kind": "ct", "window": WINDOW}],
        patch_size=PATCH,
        classes={i: {"name": n, "color": list(SYNTH_COLORS[i])}
                 for i, n in SYNTH_LABELS.items()},
        format="state_dict", weights="model.pt",
        network={"class": "UNet3D",
                 "kwargs": {"in_channels": 1, "out_channels": k, "features": list(FEATURES)}},
        mirror_axes=(),  # left/right classes and asymmetric anatomy: no mirror TTA
        postprocessing={"largest_component": [1, 2, 3, 4, 6, 7, 8, 9]},
    )


# ------------------------------------------------------------------- data
def _pool_path(work: Path, i: int) -> Path:
    return Path(work) / "pool" / f"case_{i:05d}.npz"


def pool_case(work: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map and labels of pool case ``i`` (seed ``1 + i``), made once and cached."""
    from ..core.phantom.abdomen_synth import make_abdomen_tissues

    path = _pool_path(work, i)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tis, lab, _ = make_abdomen_tissues(1 + i, CASE_SHAPE, TARGET_SPACING)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, tissue=tis, labels=lab)
        os.replace(tmp, path)
    with np.load(path) as z:
        return np.ascontiguousarray(z["tissue"]), np.ascontiguousarray(z["labels"])


class _Case:
    """A pool case with a subsample of each class's voxels for centred windows."""

    def __init__(self, tissue, labels, rng, limit=4000):
        self.tissue, self.labels = tissue, labels
        self.points = {}
        for c in np.unique(labels):
            if c == 0:
                continue
            pts = np.argwhere(labels == c)
            if len(pts) > limit:
                pts = pts[rng.choice(len(pts), limit, replace=False)]
            self.points[int(c)] = pts.astype(np.int32)


def sample_window(case: _Case, rng, patch=PATCH, fg_fraction=FG_FRACTION,
                  pad_fraction=PAD_FRACTION, margin=4):
    """One training window: ``x (Z, Y, X)`` float32 normalised, ``y (Z, Y, X)`` int64.

    The window is centred on a voxel of a class (drawn with
    :data:`CENTRE_WEIGHTS`) ``fg_fraction`` of the time, else placed at random;
    it is painted by :func:`paint_ct` with a ``margin`` so blurs see real
    neighbours, normalised with the card window, and ``pad_fraction`` of the
    time part of it beyond a random cut is set to inference's zero padding
    (labels there: background).
    """
    from ..core.phantom.abdomen_synth import paint_ct

    shape = case.labels.shape
    if case.points and rng.random() < fg_fraction:
        cls = sorted(case.points)
        w = np.array([CENTRE_WEIGHTS.get(c, 1.0) for c in cls], float)
        c = cls[rng.choice(len(cls), p=w / w.sum())]
        pts = case.points[c]
        centre = pts[rng.integers(len(pts))] + rng.integers(-8, 9, size=3)
        start = [int(np.clip(q - p // 2, 0, n - p)) for q, p, n in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, n - p + 1)) for p, n in zip(patch, shape)]
    lo = [max(s - margin, 0) for s in start]
    hi = [min(s + p + margin, n) for s, p, n in zip(start, patch, shape)]
    tis = case.tissue[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    hu = paint_ct(tis, TARGET_SPACING, rng)
    inner = tuple(slice(s - a, s - a + p) for s, a, p in zip(start, lo, patch))
    hu = hu[inner]
    y = case.labels[start[0]:start[0] + patch[0], start[1]:start[1] + patch[1],
                    start[2]:start[2] + patch[2]].astype(np.int64)
    a, b = WINDOW
    x = (np.clip(hu, a, b) - np.float32(a)) / np.float32(b - a)
    if rng.random() < pad_fraction:
        ax = int(rng.integers(3))
        n = patch[ax]
        cut = int(rng.integers(n // 4, n - n // 8))
        sl = [slice(None)] * 3
        sl[ax] = slice(cut, None) if rng.random() < 0.5 else slice(0, n - cut)
        x[tuple(sl)] = 0.0
        y[tuple(sl)] = 0
    if rng.random() < 0.2:
        x = x ** np.float32(np.exp(rng.uniform(-0.25, 0.25)))
    return np.ascontiguousarray(x, dtype=np.float32), y


def legacy_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Case ``i`` of the older phantom (``make_abdomen_ct(seed=10_001 + i, vary=True)``)
    on the model grid: ``(HU (Z, Y, X) float32, labels (Z, Y, X) uint8)``.

    Its own field of view (192 x 192 mm in-plane, the anatomy scales with it) at
    the model's spacing. It labels only liver, spleen, kidneys and lesions; its
    stomach and vessels are unlabelled, so training on it uses a loss that
    merges our other classes into the background (:func:`_merged_logits`).
    """
    from ..core.phantom import make_abdomen_ct

    img, lab = make_abdomen_ct(seed=10_001 + int(i), shape=(64, 96, 96),
                               spacing=TARGET_SPACING, vary=True)
    return np.asarray(img.data, np.float32), np.asarray(lab.data, np.uint8)


def legacy_window(case: _Case, rng, patch=PATCH):
    """A window of a :func:`legacy_case` (its image in ``case.tissue``), normalised."""
    shape = case.labels.shape
    if case.points and rng.random() < FG_FRACTION:
        cls = sorted(case.points)
        pts = case.points[cls[rng.integers(len(cls))]]
        centre = pts[rng.integers(len(pts))]
        start = [int(np.clip(q - p // 2, 0, n - p)) for q, p, n in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, n - p + 1)) for p, n in zip(patch, shape)]
    win = tuple(slice(s, s + p) for s, p in zip(start, patch))
    a, b = WINDOW
    hu = case.tissue[win] * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.normal(0, 10))
    x = (np.clip(hu, a, b) - np.float32(a)) / np.float32(b - a)
    return np.ascontiguousarray(x, dtype=np.float32), case.labels[win].astype(np.int64)


def _merged_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits of the legacy classes: background = log-sum-exp of background and every
    class above :data:`LEGACY_CLASSES` - 1 (the marginal over what it leaves unlabelled)."""
    bg = torch.logsumexp(torch.cat([logits[:, :1], logits[:, LEGACY_CLASSES:]], 1), 1,
                         keepdim=True)
    return torch.cat([bg, logits[:, 1:LEGACY_CLASSES]], 1)


# ------------------------------------------------------------------- train
def _init_from(net, path: Path) -> None:
    """Copy the tensors of state dict ``path`` that fit ``net`` (head: shared rows)."""
    src = torch.load(path, map_location="cpu", weights_only=True)
    own = net.state_dict()
    n_copied = 0
    for k, v in src.items():
        if k not in own:
            continue
        if own[k].shape == v.shape:
            own[k] = v.clone()
        elif k.startswith("head.") and own[k].shape[1:] == v.shape[1:]:
            own[k][: v.shape[0]] = v
        else:
            continue
        n_copied += 1
    net.load_state_dict(own)
    log.info("initialised %d of %d tensors from %s", n_copied, len(own), path)


def _save(obj, path: Path) -> None:
    from ..io.atomic import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        torch.save(obj, tmp)


def _lr_at(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(work: Path, out: Path | None = None, steps: int = 3000, n_cases: int = 160,
          pool_init: int = 32, gen_every: int = 6, batch: int = 2, lr: float = 1.5e-3,
          seed: int = 0, ckpt_minutes: float = 4.0, resume: bool = False,
          log_every: int = 25, device: str = "cpu", legacy_fraction: float = 0.0,
          legacy_cases: int = 48, init: Path | None = None, warmup: int = 100) -> Path:
    """Train; returns the path of the final weights (``<work>/final.pt``).

    Parameters
    ----------
    work : Path
        Working folder outside the repository: ``pool/``, ``ckpt.pt``,
        ``weights_<step>.pt``, ``final.pt``.
    out : Path, optional
        Package folder that receives ``model.pt`` and ``card.yaml`` at the end.
    steps, batch, lr, seed :
        Optimisation steps, windows per step, peak learning rate, seed.
    n_cases, pool_init, gen_every :
        Pool size, cases made before the first step, steps between two new
        cases while the pool grows.
    ckpt_minutes : float
        Wall time between checkpoints.
    init : Path, optional
        Weights to start from (a state dict of the same network, e.g. the
        previous built-in model): tensors of equal shape are copied, and the
        output head's rows of the classes both have.
    warmup : int
        Steps of linear learning-rate warm-up.
    legacy_fraction, legacy_cases :
        Share of steps whose batch comes from ``legacy_cases`` cases of the older
        phantom (the sample data's generator), with the merged-class loss.
    resume : bool
        Continue from ``<work>/ckpt.pt`` when it exists.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    card = make_card()
    rng_pool = np.random.default_rng([seed, 99])
    t0 = time.time()
    ready = pool_init
    while ready < n_cases and _pool_path(work, ready).is_file():  # made by an earlier run
        ready += 1
    cases = [_Case(*pool_case(work, i), rng_pool) for i in range(min(ready, n_cases))]
    log.info("pool: %d cases ready in %.0f s", len(cases), time.time() - t0)
    legacy = [_Case(*legacy_case(i), rng_pool) for i in range(legacy_cases)] \
        if legacy_fraction > 0 else []
    torch.manual_seed(seed)
    net = UNet3D(1, card.n_classes, FEATURES).to(device)
    log.info("UNet3D %s: %d parameters", FEATURES, count_parameters(net))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    if init is not None and not (resume and (work / "ckpt.pt").is_file()):
        _init_from(net, Path(init))
    start = 0
    ckpt = work / "ckpt.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, start)
    use_bf16 = device == "cpu" and _use_bf16()
    net.train()
    t_ck = time.time()
    t_run = time.time()
    run = None
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])
        if len(cases) < n_cases and step % gen_every == 0:
            cases.append(_Case(*pool_case(work, len(cases)), rng_pool))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        xs, ys = [], []
        old = bool(legacy) and rng.random() < legacy_fraction
        src = legacy if old else cases
        for j in rng.choice(len(src), batch, replace=len(src) < batch):
            x, y = (legacy_window if old else sample_window)(src[int(j)], rng)
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.stack(xs))[:, None].to(device)
        y = torch.from_numpy(np.stack(ys)).to(device)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(x)
        if old:
            logits = _merged_logits(logits.float())
        loss = F.cross_entropy(logits.float(), y) + soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            log.warning("step %d: non-finite loss, step skipped", step + 1)
            continue
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP_NORM)
        if not torch.isfinite(gnorm):
            log.warning("step %d: non-finite gradient, step skipped", step + 1)
            opt.zero_grad(set_to_none=True)
            continue
        opt.step()
        run = loss.item() if run is None else 0.95 * run + 0.05 * loss.item()
        if (step + 1) % log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e grad norm %.3g pool %d (%.2f s/step)",
                     step + 1, steps, run, opt.param_groups[0]["lr"], float(gnorm), len(cases),
                     (time.time() - t_run) / log_every)
            t_run = time.time()
        if time.time() - t_ck > ckpt_minutes * 60 or step + 1 == steps:
            weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            _save({"net": weights, "opt": opt.state_dict(), "step": step + 1}, ckpt)
            _save(weights, work / f"weights_{step + 1:06d}.pt")
            log.info("checkpoint at step %d", step + 1)
            t_ck = time.time()
    weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    final = work / "final.pt"
    _save(weights, final)
    if out is not None:
        write_package(final, out, training=_training_text(
            steps, batch, lr, seed, n_cases, (time.time() - t0) / 60, init, legacy_fraction,
            warmup))
    return final


def _training_text(steps, batch, lr, seed, n_cases, minutes=None, init=None,
                   legacy_fraction=0.0, warmup=100) -> str:
    took = f" {minutes:.0f} min wall time." if minutes else ""
    start = (f"Started from the weights {Path(init).name} (tensors of equal shape, shared "
             "head rows). ") if init else ""
    legacy = (f" {legacy_fraction:.0%} of the steps take their windows from 48 cases of the "
              "older phantom make_abdomen_ct(vary=True) (the sample data's generator), with "
              "the classes it leaves unlabelled merged into the background in the loss."
              if legacy_fraction else "")
    extra = (f" --init {init}" if init else "") + \
        (f" --legacy-fraction {legacy_fraction:g}" if legacy_fraction else "")
    return (
        f"{start}Synthetic data only: {n_cases} random anatomies from make_abdomen_tissues "
        f"(seeds 1..{n_cases}, {CASE_SHAPE} voxels of {TARGET_SPACING} mm), every training "
        "window painted anew by paint_ct (contrast phase, per-tissue HU and texture, bias, "
        "slice thickness 0.5-5 mm, PSF, smooth/sharp kernel, noise) and 20% partly replaced "
        f"by inference's zero padding.{legacy} {steps} steps of {batch} windows of {PATCH} "
        f"voxels, {FG_FRACTION:.0%} centred on a class; cross-entropy + soft Dice, AdamW, lr "
        f"{lr:g} ({warmup} warm-up steps, cosine), gradient norm clipped at {CLIP_NORM:g}, "
        f"seed {seed}, bf16 autocast, one CPU thread.{took} Reproduce: python -m "
        "napari_medseg.training.train_builtin_synth --work-dir /tmp/builtin_run --out <folder> "
        f"--steps {steps} --lr {lr:g} --warmup {warmup} --threads 1{extra} (add --resume "
        "to continue from the last checkpoint).")


#: Card fields this script owns; a package's other fields (``body_region``,
#: ``plausible_ml``, metrics...) are kept when it rewrites the card.
_OWN_FIELDS = ("name", "version", "task", "channels", "target_spacing", "orientation",
               "normalization", "patch_size", "classes", "format", "weights", "network",
               "mirror_axes", "postprocessing")


def write_package(weights: Path, out: Path, training: str | None = None) -> Path:
    """Copy ``weights`` into package ``out`` as ``model.pt`` and write its card.

    Where ``out`` already has a ``card.yaml``, the fields this script does not
    own (:data:`_OWN_FIELDS`) are kept, except metrics (they belonged to the
    old weights) and plausible volumes of classes the model no longer has.
    """
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card = make_card()
    old = out / "card.yaml"
    if old.is_file():
        prev = ModelCard.load(old)
        for f in ("license", "body_region", "extra"):
            setattr(card, f, getattr(prev, f))
        names = set(card.label_names.values())
        card.plausible_ml = {k: v for k, v in (prev.plausible_ml or {}).items() if k in names}
    card.training = training or _training_text(0, 0, 0, 0, 0)
    card.metrics = {}
    shutil.copyfile(weights, out / "model.pt.tmp")
    os.replace(out / "model.pt.tmp", out / "model.pt")
    card.save(out / "card.yaml")
    return out


# --------------------------------------------------------------- evaluate
def evaluate_synthetic(model, seeds=HELD_OUT_SEEDS) -> dict:
    """Mean Dice per class of a loaded Model on held-out synthetic abdomens.

    Each case is :func:`make_abdomen_ct_synth` at its default grid (96 x 160 x
    200 voxels of 2.5 x 2 x 2 mm), run through ``Model.predict``.
    """
    from ..core.phantom.abdomen_synth import make_abdomen_ct_synth

    names = model.card.label_names
    per_case = []
    for s in seeds:
        img, lab = make_abdomen_ct_synth(seed=s)
        pred = model.predict(img)
        per_case.append(dice_per_class(np.asarray(pred.labels.data), np.asarray(lab.data),
                                       names))
        log.info("held-out seed %d: %s", s, per_case[-1])
    return {n: round(float(np.mean([c[n] for c in per_case if n in c])), 4)
            for n in names.values() if any(n in c for c in per_case)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/builtin_run"),
                   help="pool, checkpoints and weights (outside the repository)")
    p.add_argument("--out", type=Path, default=None,
                   help="package folder to write model.pt + card.yaml into at the end")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--cases", type=int, default=160)
    p.add_argument("--pool-init", type=int, default=32)
    p.add_argument("--gen-every", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--resume", action="store_true", help="continue from <work-dir>/ckpt.pt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--init", type=Path, default=None,
                   help="weights to start from (e.g. the previous built-in model.pt)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--legacy-fraction", type=float, default=0.0,
                   help="share of steps on the older phantom (make_abdomen_ct)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    train(a.work_dir, a.out, a.steps, a.cases, a.pool_init, a.gen_every, a.batch, a.lr, a.seed,
          a.ckpt_minutes, a.resume, device=a.device, legacy_fraction=a.legacy_fraction,
          init=a.init, warmup=a.warmup)
    if a.out is not None:
        from ..models import load_model

        print(json.dumps({"synthetic": evaluate_synthetic(load_model(a.out))}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
