"""Train the built-in ``abdomen-ct-small`` model on the synthetic abdomen phantom.

One command, deterministic seeds for a given device and thread count::

    python -m napari_medseg.training.train_builtin \\
        --out napari_medseg/models/builtin/abdomen-ct-small [--device cuda --workers 16]

(The shipped weights were trained with ``--device cuda --workers 16`` on a GPU;
the same command on a CPU trains the same recipe, in some 5 h on two cores.)

Training cases come from :func:`napari_medseg.core.phantom.make_abdomen_ct` with
``vary=True`` (random anatomy size and position, contrast, noise and blur), on
the model grid (2.5 x 1.5 x 1.5 mm). The phantom's anatomy scales with its field
of view, so each case draws its own grid (:func:`case_shape`: 64-104 slices of
128-240 voxels, a 190 mm child-sized to a 360 mm adult-sized abdomen, whose
liver then holds 0.2-1.5 L and whose spleen, a crescent against the ribs,
15-260 mL, up to about 430 mL on the largest grid), and
0-60 voxels of air are added on each side in-plane, as in a scan whose field of
view is wider than the patient. One case in four is
generated at half that spacing and averaged down, so the network also sees the
partial-volume edges that resampling a finer scan in preprocessing produces.
Batches of 8 windows of 32 x 64 x 64 voxels are cropped at random from 384 cases,
half of them centred on a randomly chosen foreground class so the small organs are
seen often; a fifth are
cut to a thin slab between zeros (:data:`SLAB_SHARE`), as inference pads a scan
thinner than the window. Intensities are normalised by
:func:`napari_medseg.core.preprocess.preprocess` with the card's settings,
exactly as at inference time.

The held-out evaluation runs the finished package through
:func:`napari_medseg.models.load_model` and ``Model.predict`` on phantoms from
seeds never used in training, at the phantom's default grid (child-sized) and
at :data:`CASE_SHAPE_MAX` (adult-sized), and writes Dice per class into the
card; ``benchmarks/eval_real_builtin.py PACKAGE --write-card`` adds the figures
on the shared real scans.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.volume import Volume, make_affine
from ..models.card import ModelCard
from ..models.networks import UNet3D, count_parameters
from .losses import soft_dice_loss
from .metrics import dice_per_class

log = logging.getLogger(__name__)

NAME = "abdomen-ct-small"
TARGET_SPACING = (2.5, 1.5, 1.5)
CASE_SHAPE = (64, 128, 128)  # the smallest case grid (the phantom's default)
#: Largest case grid: 260 x 360 x 360 mm, an adult abdomen.
CASE_SHAPE_MAX = (104, 240, 240)
PATCH = (32, 64, 64)
FEATURES = (8, 16, 32, 64)
WINDOW = [-200.0, 300.0]
TRAIN_SEEDS = range(0, 10_000)       # case i uses seed 1 + i
HELD_OUT_SEEDS = tuple(range(100_001, 100_009))  # 8 cases never used in training
# Phase 3 (spleen focus): the spleen is thin and close to the liver and muscle in HU,
# so the first two phases leave its outer voxel layer out; weigh it up.
FOCUS_ITERS = 1500
FOCUS_LR = 1e-3
FOCUS_FG = 0.75
FOCUS_WEIGHTS = {2: 3.0, 3: 2.0, 4: 2.0}  # spleen and the kidneys, the classes learned last
#: Share of training windows cut to a thin slab of SLAB_SLICES slices between
#: zeros, as a scan thinner than the window reaches the network (a partial
#: scan of 20 slices of 2 mm is 16 slices on the model grid).
SLAB_SHARE = 0.2
SLAB_SLICES = (8, 24)
#: In-plane window sizes (voxels) of ``--vary-window``: each step draws one, and its
#: batch shrinks so that a step sees about as many voxels as ``batch`` windows of
#: :data:`PATCH`. The network normalises each window by its own statistics, so one
#: trained on a single window size answers differently for other sizes.
VARY_WINDOW_YX = (64, 96, 128)
#: The card's inference window of a ``--vary-window`` run: the middle of the trained
#: sizes, 144 mm in-plane (a 64-voxel window, 96 mm, is shorter than an adult spleen).
VARY_CARD_PATCH = (PATCH[0], VARY_WINDOW_YX[1], VARY_WINDOW_YX[1])
#: ``--crop-pad SHARE``: that share of the windows keeps a random in-plane rectangle of
#: CROP_KEEP of each side and is zero outside, as inference pads a scan cut to a
#: small field of view (a crop) up to the window.
CROP_KEEP = (0.5, 0.95)
#: Draw the contrast phase of each training case, non-contrast to portal-venous
#: (``make_abdomen_ct(phases=True)``). Off: a run with it lost spleen Dice on both
#: real scans and on the phantoms (docs/models.md).
PHASES = False
#: Per-window appearance augmentation (``--texture``), drawn on the training device:
#: each class (background included) gets a smooth random texture of up to
#: TEXTURE_HU in amplitude, and spatially correlated noise (white noise blurred by a
#: Gaussian of NOISE_SIGMA voxels, as reconstruction kernels correlate it) of up to
#: NOISE_HU standard deviation is added where the window does not clip the image.
TEXTURE_HU = 15.0
NOISE_HU = 20.0
NOISE_SIGMA = (0.0, 1.5)
#: Per-window organ intensity shift (``--class-shift HU``): each organ class moves by its
#: own uniform draw in [-HU, HU], as organs differ between contrast phases and
#: patients; lesions move with the liver they lie in (:data:`SHIFT_WITH`).
SHIFT_WITH = {5: 1}
#: Per-window smooth random deformation (``--deform``): displacements of up to
#: DEFORM_VOX voxels (z, y, x), drawn on a 4 x 5 x 5 control grid and interpolated.
DEFORM_VOX = (1.5, 4.0, 4.0)
#: Predicted volumes (mL) outside these ranges are reported as implausible.
PLAUSIBLE_ML = {"liver": [100, 5000], "spleen": [5, 2500], "kidney_left": [10, 600],
                "kidney_right": [10, 600], "lesion": [0, 3000]}
COLORS = {1: [0.86, 0.33, 0.24], 2: [0.55, 0.25, 0.65], 3: [0.95, 0.75, 0.2],
          4: [0.2, 0.7, 0.35], 5: [0.1, 0.6, 0.95]}


def make_card(names: dict, orientation: str | None, mirror_z: bool = False,
              patch=PATCH) -> ModelCard:
    """The card of the built-in model (metrics filled in after evaluation); ``mirror_z``:
    trained with head-feet flips, so mirror test-time augmentation along z is allowed and
    on by default; ``patch``: the inference window."""
    k = max(names) + 1
    return ModelCard(
        name=NAME, version="2.4.0",
        task="abdominal CT: liver, spleen, kidneys and liver lesions",
        license="BSD-3-Clause",
        channels=[{"name": "CT", "modality": "CT"}],
        target_spacing=TARGET_SPACING, orientation=orientation,
        normalization=[{"kind": "ct", "window": WINDOW}],
        patch_size=tuple(patch),
        # fine-tuning keeps the voxels per step of this training (and its time)
        train_patch_size=None if tuple(patch) == PATCH else PATCH,
        classes={i: {"name": n, "color": COLORS.get(i, [0.5, 0.5, 0.5])}
                 for i, n in names.items()},
        format="state_dict", weights="model.pt",
        network={"class": "UNet3D",
                 "kwargs": {"in_channels": 1, "out_channels": k, "features": list(FEATURES)}},
        # left/right classes: never mirrored across x; along z only when trained so
        mirror_axes=(0,) if mirror_z else (),
        default_tta=bool(mirror_z),  # its real-scan figures are measured with the z mirror
        postprocessing={"largest_component": [1, 2, 3, 4]},  # organs come in one piece
        body_region="abdomen",
        plausible_ml=dict(PLAUSIBLE_ML),
    )


# ------------------------------------------------------------------- data
def _normalize(img: Volume, card: ModelCard) -> np.ndarray:
    """Normalise a model-grid image exactly as inference does; ``(Z, Y, X)`` float32."""
    from ..core.preprocess import preprocess

    x, _info = preprocess([img], target_spacing=card.target_spacing,
                          orientation=card.orientation, normalization=card.normalization)
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] != img.shape3:
        raise RuntimeError(f"preprocess changed the model grid {img.shape3} -> {x.shape[1:]}")
    return x[0]


def _downsample(img: Volume, lab: Volume, factor=(2, 2, 2)):
    """Average an image by ``factor``; labels by majority of their one-hot average."""
    t = torch.from_numpy(np.asarray(img.data, dtype=np.float32))[None, None]
    small = F.avg_pool3d(t, factor)[0, 0].numpy()
    lab_t = torch.from_numpy(np.asarray(lab.data).astype(np.int64))
    k = int(lab_t.max()) + 1
    onehot = F.one_hot(lab_t, k).permute(3, 0, 1, 2).float()[None]
    small_lab = F.avg_pool3d(onehot, factor)[0].argmax(0).numpy().astype(np.uint8)
    spacing = tuple(s * f for s, f in zip(img.spacing, factor))
    origin = img.affine[:3, :3] @ ((np.asarray(factor[::-1]) - 1) / 2.0) + img.affine[:3, 3]
    aff = make_affine(spacing, origin, img.direction)
    return Volume(small, aff, modality="CT"), small_lab


def case_shape(i: int) -> tuple:
    """Grid of training case ``i`` (multiples of 8 between :data:`CASE_SHAPE` and
    :data:`CASE_SHAPE_MAX`): the phantom's body and organs scale with it."""
    rng = np.random.default_rng([20261130, int(i)])
    return tuple(8 * int(rng.integers(lo // 8, hi // 8 + 1))
                 for lo, hi in zip(CASE_SHAPE, CASE_SHAPE_MAX))


def make_case(i: int, card: ModelCard, spleen_contrast=None):
    """Training case ``i``: ``(x (Z, Y, X) float32, y (Z, Y, X) uint8)`` on the model grid.

    ``spleen_contrast`` (``(lo, hi)`` HU, spleen minus liver) overrides the phantom's
    :data:`~napari_medseg.core.phantom.abdomen.SPLEEN_CONTRAST`.
    """
    from ..core.phantom import make_abdomen_ct
    from ..core.phantom.abdomen import SPLEEN_CONTRAST

    contrast = tuple(spleen_contrast or SPLEEN_CONTRAST)

    seed = 1 + int(i)
    shape = case_shape(i)
    if i % 4 != 3:
        img, lab = make_abdomen_ct(seed=seed, shape=shape, spacing=TARGET_SPACING,
                                   vary=True, phases=PHASES, spleen_contrast=contrast)
        y = np.asarray(lab.data, dtype=np.uint8)
    else:
        fine = tuple(s / 2 for s in TARGET_SPACING)
        img, lab = make_abdomen_ct(seed=seed, shape=tuple(2 * n for n in shape),
                                   spacing=fine, vary=True, phases=PHASES,
                                   spleen_contrast=contrast)
        img, y = _downsample(img, lab)
    # Air around the body, as in a scan whose field of view is wider than the
    # patient: 0-90 mm on each side in-plane, so windows of air alone are seen.
    rng = np.random.default_rng([20261130, int(i), 1])
    pad = [(0, 0)] + [tuple(int(v) for v in rng.integers(0, 61, 2)) for _ in range(2)]
    img = Volume(np.pad(np.asarray(img.data, np.float32), pad, constant_values=-1000.0),
                 img.affine, modality="CT")
    return _normalize(img, card), np.pad(y, pad)


def _crop_start(y: np.ndarray, rng, fg_fraction: float = 0.5,
                class_weights: dict | None = None, index: dict | None = None,
                patch=PATCH) -> tuple:
    """Corner of a random ``patch`` window, centred on a foreground class ``fg_fraction``
    of the time; the class is drawn uniformly, or in proportion to ``class_weights``
    (``{class id: weight}``, missing ids weigh 1). ``index`` (a dict kept per case)
    caches each class's voxel coordinates."""
    shape = y.shape
    if rng.random() < fg_fraction:
        if index is None:
            index = {}
        if not index:
            index.update({c: np.argwhere(y == c) for c in range(1, int(y.max()) + 1)})
        classes = [c for c, p in index.items() if len(p)]
        if classes:
            if class_weights:
                w = np.array([class_weights.get(c, 1.0) for c in classes], float)
                pick = classes[rng.choice(len(classes), p=w / w.sum())]
            else:  # the draw of the first two phases, kept for reproducibility
                pick = rng.choice(classes)
            pts = index[pick]
            centre = pts[rng.integers(len(pts))]
            return tuple(int(np.clip(c - p // 2, 0, n - p))
                         for c, p, n in zip(centre, patch, shape))
    return tuple(int(rng.integers(0, n - p + 1)) for p, n in zip(patch, shape))


def _case_job(args):
    return make_case(*args)


def _cached_cases(n_cases: int, card: ModelCard, cache: Path | None, workers: int = 1,
                  spleen_contrast=None):
    """Generate the training cases (in ``workers`` processes), or reuse them from
    ``cache`` (an ``.npz``, reused only when it holds ``n_cases`` cases made with the
    same ``spleen_contrast``). Each case depends only on its index, so the cases are
    the same for any number of workers."""
    from ..core.phantom.abdomen import SPLEEN_CONTRAST

    contrast = np.asarray(spleen_contrast or SPLEEN_CONTRAST, dtype=np.float64)
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            made = z["spleen_contrast"] if "spleen_contrast" in z else SPLEEN_CONTRAST
            if not np.array_equal(np.asarray(made, np.float64), contrast):
                log.info("%s holds cases with another spleen contrast; generating anew", cache)
            elif f"x{n_cases - 1}" in z and f"x{n_cases}" not in z:
                log.info("reusing %d cases from %s", n_cases, cache)
                return [(z[f"x{i}"], z[f"y{i}"]) for i in range(n_cases)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            data = pool.map(_case_job, [(i, card, spleen_contrast) for i in range(n_cases)],
                            chunksize=1)
    else:
        data = [make_case(i, card, spleen_contrast) for i in range(n_cases)]
    if cache is not None:
        arrays = {f"x{i}": d[0] for i, d in enumerate(data)}
        arrays.update({f"y{i}": d[1] for i, d in enumerate(data)})
        np.savez(cache, spleen_contrast=contrast, **arrays)
    return data


# ------------------------------------------------------------------- train


def _phase(net, data, n_classes, iters, lr, batch, seed, schedule, fg_fraction, log_every, name,
           class_weights=None, device="cpu", deadline=None, texture=False, deform=False,
           class_shift=0.0, mirror_z=False, vary_window=False, crop_share=0.0):
    """One training phase with its own seeds; ``schedule`` is ``"onecycle"`` or ``"cosine"``.

    ``class_weights`` (``{class id: weight}``) weighs the cross-entropy and the
    choice of the class a window is centred on; None weighs all classes alike.
    ``device`` is where the network trains (the windows are cut on the CPU);
    ``deadline`` (``time.time()`` seconds) ends the phase early, with a warning.
    ``deform`` and ``texture`` add the random deformation (:func:`_deform`) and the
    texture and correlated-noise augmentation (:func:`_appearance`) to each window;
    ``class_shift`` (HU) moves each organ's intensity (:func:`_class_shift`);
    ``mirror_z`` flips half the windows head to feet; ``vary_window`` draws each step's
    in-plane window size from :data:`VARY_WINDOW_YX` (batch scaled to keep the voxels);
    ``crop_share`` of the windows are cut in-plane as a cropped scan (:func:`_crop_pad`).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters,
                                                    pct_start=0.05)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    use_bf16 = _use_bf16(device)
    ce_weight = None
    if class_weights:
        ce_weight = torch.ones(int(n_classes))
        for c, w in class_weights.items():
            ce_weight[int(c)] = float(w)
        ce_weight = ce_weight.to(device)
    net.train()
    index: dict = {}
    t0, run = time.time(), 0.0
    for it in range(iters):
        if deadline is not None and time.time() > deadline:
            log.warning("%s stopped by the time limit after %d of %d steps", name, it, iters)
            break
        xb, yb = [], []
        patch, n_win = PATCH, batch
        if vary_window:
            side = int(VARY_WINDOW_YX[rng.integers(len(VARY_WINDOW_YX))])
            patch = (PATCH[0], side, side)
            n_win = max(1, int(round(batch * PATCH[1] * PATCH[2] / side ** 2)))
        for j in rng.choice(len(data), n_win, replace=False):
            z0, y0, x0 = _crop_start(data[j][1], rng, fg_fraction, class_weights,
                                     index.setdefault(int(j), {}), patch)
            win = (slice(z0, z0 + patch[0]), slice(y0, y0 + patch[1]), slice(x0, x0 + patch[2]))
            xb.append(torch.from_numpy(np.ascontiguousarray(data[j][0][win])))
            yb.append(torch.from_numpy(data[j][1][win].astype(np.int64)))
        x, y = torch.stack(xb)[:, None], torch.stack(yb)
        for b in range(len(x)):
            if rng.random() < SLAB_SHARE:
                _thin_slab(x[b], y[b], int(rng.integers(SLAB_SLICES[0], SLAB_SLICES[1] + 1)))
            if crop_share and rng.random() < crop_share:
                _crop_pad(x[b], y[b], rng)
        if mirror_z:
            _flip_z(x, y, rng)
        gain, offset = float(rng.uniform(0.9, 1.1)), float(rng.normal(0, 0.05))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if deform:
            x, y = _deform(x, y)
        if class_shift:
            x = _class_shift(x, y, int(n_classes), float(class_shift))
        if texture:
            x = _appearance(x, y, int(n_classes))
        x = x * gain + offset
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, weight=ce_weight) + soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run = 0.9 * run + 0.1 * loss.item() if it else loss.item()
        if (it + 1) % log_every == 0:
            log.info("%s iter %d/%d loss %.4f (%.0f s)", name, it + 1, iters, run,
                     time.time() - t0)
    return (time.time() - t0) / 60


def _flip_z(x: torch.Tensor, y: torch.Tensor, rng) -> np.ndarray:
    """Flip each window of ``x`` ``(B, 1, Z, Y, X)`` and ``y`` ``(B, Z, Y, X)`` head to feet
    with probability 1/2 (in place); returns which were flipped."""
    flip = rng.random(len(x)) < 0.5
    idx = torch.from_numpy(np.flatnonzero(flip))
    if len(idx):
        x[idx] = x[idx].flip(2)
        y[idx] = y[idx].flip(1)
    return flip


def _thin_slab(x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    """Keep the middle ``n`` slices of a window and zero the rest (in place), as
    inference pads a scan thinner than the window (``x`` ``(1, Z, Y, X)``
    normalised, 0 where padded; ``y`` ``(Z, Y, X)``, background there)."""
    start = (x.shape[1] - n) // 2
    x[:, :start] = 0.0
    x[:, start + n:] = 0.0
    y[:start] = 0
    y[start + n:] = 0


def _crop_pad(x: torch.Tensor, y: torch.Tensor, rng) -> None:
    """Keep a random in-plane rectangle of a window, :data:`CROP_KEEP` of each side, and
    zero the rest (in place), as inference pads a scan with a small field of view up to
    the window (``x`` ``(1, Z, Y, X)`` normalised, ``y`` ``(Z, Y, X)``, background there)."""
    keep = []
    for n in x.shape[2:]:
        k = max(1, int(round(n * rng.uniform(*CROP_KEEP))))
        a = int(rng.integers(0, n - k + 1))
        keep.append((a, a + k))
    (ya, yb), (xa, xb) = keep
    inside = torch.zeros(x.shape[2:], dtype=torch.bool)
    inside[ya:yb, xa:xb] = True
    x[:, :, ~inside] = 0.0
    y[:, ~inside] = 0


def _gaussian_blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``t`` ``(B, 1, Z, Y, X)`` by a Gaussian of ``sigma`` voxels along each axis."""
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=t.device, dtype=t.dtype) / sigma) ** 2)
    k = k / k.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        t = F.conv3d(F.pad(t, pad, mode="replicate"), k.view(shape))
    return t


def _appearance(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Texture and correlated-noise augmentation of normalised windows (:data:`TEXTURE_HU`).

    ``x`` ``(B, 1, Z, Y, X)`` in [0, 1] (the card's CT window), ``y`` ``(B, Z, Y, X)``
    class ids; returns the augmented ``x``, clipped to [0, 1] again. Draws from
    torch's generator on ``x``'s device.
    """
    per_hu = 1.0 / (WINDOW[1] - WINDOW[0])
    b, dev = x.shape[0], x.device
    amp = torch.rand(b, n_classes, 1, 1, 1, device=dev) * (TEXTURE_HU * per_hu)
    coarse = torch.randn(b, n_classes, 4, 6, 6, device=dev) * amp
    fields = F.interpolate(coarse, size=tuple(x.shape[2:]), mode="trilinear",
                           align_corners=False)
    texture = fields.gather(1, y[:, None])
    noise = torch.randn_like(x)
    sigma = float(torch.empty(()).uniform_(*NOISE_SIGMA))
    if sigma > 0.3:
        noise = _gaussian_blur(noise, sigma)
        noise = noise / noise.std().clamp_min(1e-6)
    std = torch.rand(b, 1, 1, 1, 1, device=dev) * (NOISE_HU * per_hu)
    return _add_unclipped(x, texture + noise * std)


def _class_shift(x: torch.Tensor, y: torch.Tensor, n_classes: int, hu: float) -> torch.Tensor:
    """Move each foreground class of normalised windows ``x`` ``(B, 1, Z, Y, X)`` by its
    own random offset in [-``hu``, ``hu``] HU (background stays; :data:`SHIFT_WITH`
    classes take their host's offset); clipped voxels are left alone."""
    b, dev = x.shape[0], x.device
    shift = (torch.rand(b, n_classes, device=dev) * 2 - 1) * (hu / (WINDOW[1] - WINDOW[0]))
    shift[:, 0] = 0.0
    for c, host in SHIFT_WITH.items():
        if c < n_classes:
            shift[:, c] = shift[:, host]
    per_voxel = shift[torch.arange(b, device=dev).view(b, 1, 1, 1), y][:, None]
    return _add_unclipped(x, per_voxel)


def _add_unclipped(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + delta`` on the voxels the window does not clip (0 < x < 1), kept in [0, 1]."""
    inside = ((x > 0) & (x < 1)).to(x.dtype)
    return (x + delta * inside).clamp_(0.0, 1.0)


def _deform(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Warp windows ``x`` ``(B, 1, Z, Y, X)`` (linear) and ``y`` ``(B, Z, Y, X)`` (nearest)
    by one smooth random displacement field each (:data:`DEFORM_VOX`)."""
    b, dev = x.shape[0], x.device
    size = tuple(x.shape[2:])
    # grid_sample's last axis is (x, y, z) in [-1, 1]: one voxel is 2 / n
    scale = torch.tensor([2.0 * DEFORM_VOX[2 - i] / size[2 - i] for i in range(3)], device=dev)
    coarse = (torch.rand(b, 3, 4, 5, 5, device=dev) * 2 - 1) * scale.view(1, 3, 1, 1, 1)
    disp = F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)
    axes = [torch.linspace(-1, 1, n, device=dev) for n in size]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack((xx, yy, zz), -1)[None] + disp.permute(0, 2, 3, 4, 1)
    xw = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    yw = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="border",
                       align_corners=True)[:, 0].long()
    return xw, yw


def _use_bf16(device="cpu") -> bool:
    """Whether training on ``device`` runs under bf16 autocast: on a GPU where it has
    bf16 (:func:`~napari_medseg.core.policy.bf16_supported`); on a CPU with AVX512 or
    native bf16 (the rule the shipped CPU-trained versions used)."""
    if torch.device(device).type != "cpu":
        from ..core.policy import bf16_supported

        return bf16_supported(device)
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") or \
        "avx512_bf16" in _cpu_flags()


def _save_weights(net, path: Path) -> None:
    from ..io.atomic import atomic_path

    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def train(out: Path, n_cases: int = 384, iters: int = 3000, batch: int = 8, lr: float = 3e-3,
          seed: int = 0, log_every: int = 25, cache: Path | None = None,
          finetune_iters: int = 700, finetune_lr: float = 1e-3, init: Path | None = None,
          focus_iters: int = FOCUS_ITERS, focus_lr: float = FOCUS_LR,
          resume: Path | None = None, device: str = "cpu", workers: int = 1,
          time_limit: float | None = None, texture: bool = False,
          deform: bool = False, class_shift: float = 0.0, spleen_contrast=None,
          mirror_z: bool = False, vary_window: bool = False,
          crop_share: float = 0.0) -> Path:
    """Generate data, train, save ``model.pt`` + ``card.yaml`` in ``out``; return ``out``.

    Three phases: ``iters`` steps with a one-cycle schedule (seed ``seed``), then
    ``finetune_iters`` steps with a cosine schedule from ``finetune_lr`` and more
    windows centred on organs (seed ``seed + 1``), then ``focus_iters`` cosine
    steps from ``focus_lr`` with the cross-entropy and the window centres weighted
    by :data:`FOCUS_WEIGHTS` towards the spleen and kidneys (seed ``seed + 2``). ``init``
    (weights of a finished first phase) skips the first phase; ``resume``
    (weights of a finished second phase) skips the first two. ``device`` trains
    the network there (``"cuda"`` on a GPU machine), ``workers`` generates the cases
    in that many processes, and ``time_limit`` (minutes, from the start of the
    first phase) ends the run early: each phase gets its share in proportion to its
    steps and logs where it stopped. ``texture`` and ``deform`` add the per-window
    texture and correlated-noise augmentation and the random deformation in every
    phase (:func:`_appearance`, :func:`_deform`); ``class_shift`` (HU) moves each organ's
    intensity by its own random offset in every phase (:func:`_class_shift`);
    ``spleen_contrast`` (``(lo, hi)`` HU) is the phantoms' spleen-minus-liver range;
    ``mirror_z`` flips half the windows head to feet in every phase, and the card then
    allows mirror test-time augmentation along z. ``vary_window`` and ``crop_share``
    (every phase) draw the in-plane window size per step and cut that share of the
    windows as cropped scans (:func:`_phase`).
    """
    from ..core.phantom import ABDOMEN_LABELS, make_abdomen_ct
    from ..models.loaders import load_weights

    probe, _ = make_abdomen_ct(seed=0, shape=PATCH, spacing=TARGET_SPACING)
    card = make_card(dict(ABDOMEN_LABELS), probe.orientation_code(), mirror_z,
                     VARY_CARD_PATCH if vary_window else PATCH)
    t0 = time.time()
    data = _cached_cases(n_cases, card, cache, workers, spleen_contrast)
    counts = sum(np.bincount(d[1].ravel(), minlength=card.n_classes) for d in data)
    log.info("generated %d cases in %.0f s; class voxels %s", n_cases, time.time() - t0,
             counts.tolist())
    torch.manual_seed(seed)
    net = UNet3D(1, card.n_classes, FEATURES)
    log.info("UNet3D %s: %d parameters", FEATURES, count_parameters(net))
    net.to(device)
    # A time limit is shared between the phases in proportion to their steps.
    todo = [0 if (resume or init) else iters, 0 if resume else finetune_iters, focus_iters]
    start = time.time()

    def run(k):
        kw = {"device": device, "texture": texture, "deform": deform,
              "class_shift": class_shift, "mirror_z": mirror_z,
              "vary_window": vary_window, "crop_share": crop_share}
        if time_limit is not None:
            share = sum(todo[:k + 1]) / max(sum(todo), 1)
            kw["deadline"] = start + 60 * float(time_limit) * share
        return kw

    minutes = 0.0
    out.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        net.load_state_dict(load_weights(Path(resume).read_bytes(), str(resume)))
        log.info("phase 1 and 2 weights from %s", resume)
    else:
        if init is None:
            minutes += _phase(net, data, card.n_classes, iters, lr, batch, seed, "onecycle",
                              0.5, log_every, "phase 1", **run(0))
            _save_weights(net, out / "phase1.pt")
        else:
            net.load_state_dict(load_weights(Path(init).read_bytes(), str(init)))
            log.info("phase 1 weights from %s", init)
        if finetune_iters:
            minutes += _phase(net, data, card.n_classes, finetune_iters, finetune_lr, batch,
                              seed + 1, "cosine", 0.75, log_every, "phase 2", **run(1))
        _save_weights(net, out / "phase2.pt")
    if focus_iters:
        minutes += _phase(net, data, card.n_classes, focus_iters, focus_lr, batch, seed + 2,
                          "cosine", FOCUS_FG, log_every, "phase 3", FOCUS_WEIGHTS, **run(2))
    _save_weights(net, out / "model.pt")
    focus = ", ".join(f"{card.label_names[c]} {w:g}" for c, w in FOCUS_WEIGHTS.items())
    card.training = (
        f"{n_cases} synthetic abdominal CT phantoms (make_abdomen_ct, vary=True, seeds "
        f"1..{n_cases}; generated on the {TARGET_SPACING} mm model grid with a field of view "
        f"drawn per case from {CASE_SHAPE} to {CASE_SHAPE_MAX} voxels, a child- to an "
        f"adult-sized abdomen, with 0-60 voxels of air added on each side in-plane; every "
        f"fourth at half that spacing and averaged down"
        f"{_contrast_text(spleen_contrast)}). {SLAB_SHARE:.0%} of the windows are "
        f"cut to a slab of {SLAB_SLICES[0]}-{SLAB_SLICES[1]} slices between zeros, as a thin "
        f"scan is padded at inference. "
        f"{_window_text(batch, vary_window, crop_share)}"
        f"{_augment_text(texture, deform, class_shift, mirror_z)}"
        f"cross-entropy + soft Dice, AdamW, "
        f"{'bf16 autocast, ' if _use_bf16(device) else ''}"
        f"{'CPU' if device == 'cpu' else 'a GPU (' + str(device) + ')'}. "
        f"{_start_text(init, resume, iters, lr, seed, finetune_iters, finetune_lr)}phase 3: "
        f"{focus_iters} steps, cosine lr from {focus_lr}, {FOCUS_FG:.0%} of the windows "
        f"centred on a class drawn with weights {focus} (others 1), the same weights in "
        f"the cross-entropy (seed {seed + 2}). "
        f"{minutes:.1f} min of training in this run. Reproduce: python -m "
        "napari_medseg.training.train_builtin --out <folder> [--device cuda --workers 16]"
        f"{' --texture' if texture else ''}{' --deform' if deform else ''}"
        f"{f' --class-shift {class_shift:g}' if class_shift else ''}"
        f"{' --mirror-z' if mirror_z else ''}"
        f"{' --vary-window' if vary_window else ''}"
        f"{f' --crop-pad {crop_share:g}' if crop_share else ''}"
        f"{' --spleen-contrast %g %g' % tuple(spleen_contrast) if spleen_contrast else ''}"
        f"{' --resume <weights> (see above)' if resume else ''}"
        f"{' --init <weights> (see above)' if init and not resume else ''}.")
    card.save(out / "card.yaml")
    log.info("saved %s after %.1f min", out, minutes)
    return out


def _start_text(init, resume, iters, lr, seed, finetune_iters, finetune_lr) -> str:
    """The card's words for phases 1 and 2 of a run, or for the weights it started from."""
    if resume is not None:
        return f"Phases 1 and 2 not run: the run starts from the weights {Path(resume).name}; "
    one = (f"Phase 1 not run: the weights {Path(init).name}; " if init is not None else
           f"Phase 1: {iters} steps, one-cycle lr {lr}, half the windows centred on a "
           f"foreground class (seed {seed}); ")
    return (one + f"phase 2: {finetune_iters} steps, cosine lr from {finetune_lr}, three "
            f"quarters centred on a class (seed {seed + 1}); ")


def _window_text(batch: int, vary_window: bool, crop_share: float) -> str:
    """The card's words for the training windows of a run."""
    if vary_window:
        sides = "/".join(str(s) for s in VARY_WINDOW_YX)
        text = (f"Each step draws its window, {PATCH[0]} slices of {sides} voxels in-plane, "
                f"and takes as many random windows as hold about the voxels of {batch} "
                f"{PATCH} windows (inference: {VARY_CARD_PATCH} windows); ")
    else:
        text = f"Batches of {batch} random {PATCH} windows; "
    if crop_share:
        text += (f"{crop_share:.0%} of the windows keep a random in-plane rectangle of "
                 f"{CROP_KEEP[0]:g}-{CROP_KEEP[1]:g} of each side and are zero outside, "
                 f"as a cropped scan is padded at inference; ")
    return text


def _contrast_text(spleen_contrast) -> str:
    """The card's words for a spleen contrast range other than the phantom's default."""
    if not spleen_contrast:
        return ""
    lo, hi = (float(v) for v in spleen_contrast)
    return f"; the spleen {-lo:g} HU darker to {hi:g} HU brighter than the liver"


def _augment_text(texture: bool, deform: bool, class_shift: float = 0.0,
                  mirror_z: bool = False) -> str:
    """The card's words for the per-window augmentation of a run."""
    parts = []
    if mirror_z:
        parts.append("a head-feet flip half the time")
    if class_shift:
        parts.append(f"a random intensity offset of up to {class_shift:g} HU per organ")
    if deform:
        parts.append(f"a smooth random deformation of up to {DEFORM_VOX} voxels")
    if texture:
        parts.append(f"a smooth random texture of up to {TEXTURE_HU:g} HU per class and "
                     f"noise of up to {NOISE_HU:g} HU standard deviation, correlated over "
                     f"{NOISE_SIGMA[0]:g}-{NOISE_SIGMA[1]:g} voxels")
    return ("each window gets " + " and ".join(parts) + "; ") if parts else ""


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# --------------------------------------------------------------- evaluate
def evaluate(out: Path, seeds=HELD_OUT_SEEDS) -> dict:
    """Run the saved package on held-out phantoms; write mean Dice per class into its card.

    The held-out phantoms are drawn at the phantom's default grid (a
    child-sized abdomen) and at :data:`CASE_SHAPE_MAX` (an adult-sized one);
    the card's ``metrics.synthetic`` keeps both and the sample phantom's.
    Real-scan figures (``metrics.real``) are added by
    ``benchmarks/eval_real_builtin.py --write-card``.
    """
    from ..core.phantom import make_abdomen_ct
    from ..models import load_model

    model = load_model(out)
    names = model.card.label_names

    def mean_dice(shape):
        per_case = []
        for s in seeds:
            kw = {} if shape is None else {"shape": shape}
            img, lab = make_abdomen_ct(seed=s, vary=True, **kw)
            pred = model.predict(img)
            per_case.append(dice_per_class(np.asarray(pred.labels.data),
                                           np.asarray(lab.data), names))
            log.info("seed %d %s: %s", s, shape or "default", per_case[-1])
        return {n: round(float(np.mean([c[n] for c in per_case if n in c])), 4)
                for n in names.values() if any(n in c for c in per_case)}

    mean = mean_dice(None)
    adult = mean_dice(CASE_SHAPE_MAX)
    img, lab = make_abdomen_ct(seed=0)  # the canonical anatomy of the sample data
    sample = dice_per_class(np.asarray(model.predict(img).labels.data), np.asarray(lab.data),
                            names)
    log.info("sample phantom (seed 0, vary=False): %s", sample)
    card = model.card
    metrics = dict(card.metrics or {})
    metrics["synthetic"] = {
        "dice": mean, "dice_adult_size": adult, "dice_sample_phantom": sample,
        "held_out": {
            "cases": len(seeds), "seeds": list(seeds),
            "generator": "make_abdomen_ct(vary=True): dice at the default 64 x 128 x 128 grid "
                         "of 2.5 x 1.5 x 1.5 mm (a child-sized abdomen), dice_adult_size at "
                         f"{CASE_SHAPE_MAX} voxels of the same spacing",
            "pipeline": "load_model + Model.predict (resample, sliding window, restore)"}}
    metrics.pop("dice", None)
    card.metrics = metrics
    card.save(Path(out) / "card.yaml")
    return mean


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parents[1] / "models" / "builtin" / NAME)
    p.add_argument("--cases", type=int, default=384)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--finetune-iters", type=int, default=700)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--init", type=Path, default=None,
                   help="phase-1 weights (phase1.pt of an earlier run): run phase 2 only")
    p.add_argument("--focus-iters", type=int, default=FOCUS_ITERS)
    p.add_argument("--focus-lr", type=float, default=FOCUS_LR)
    p.add_argument("--resume", type=Path, default=None,
                   help="phase-2 weights (phase2.pt of an earlier run): run phase 3 only")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cache", type=Path, default=None,
                   help="an .npz to keep the generated cases in (reused when present)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate an existing package")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out phantom evaluation")
    p.add_argument("--device", default="cpu", help="where to train: cpu, or cuda on a GPU")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that generate the training cases")
    p.add_argument("--time-limit", type=float, default=None,
                   help="minutes of training after which each phase stops early")
    p.add_argument("--texture", action="store_true",
                   help="per-window random texture per class and correlated noise")
    p.add_argument("--deform", action="store_true",
                   help="per-window smooth random deformation of image and labels")
    p.add_argument("--spleen-contrast", type=float, nargs=2, default=None,
                   metavar=("LO", "HI"), help="spleen minus liver HU range of the phantoms "
                   "(default: the phantom's SPLEEN_CONTRAST)")
    p.add_argument("--class-shift", type=float, default=0.0, metavar="HU",
                   help="per-window random intensity offset of each organ, up to HU")
    p.add_argument("--mirror-z", action="store_true",
                   help="flip half the windows head to feet (the card then allows mirror "
                   "test-time augmentation along z)")
    p.add_argument("--vary-window", action="store_true",
                   help="draw each step's in-plane window size from "
                   f"{'/'.join(map(str, VARY_WINDOW_YX))} voxels")
    p.add_argument("--crop-pad", type=float, default=0.0, metavar="SHARE",
                   help="share of the windows cut in-plane and zero-padded as a cropped scan")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.eval_only:
        train(a.out, a.cases, a.iters, a.batch, a.lr, a.seed, cache=a.cache,
              finetune_iters=a.finetune_iters, finetune_lr=a.finetune_lr, init=a.init,
              focus_iters=a.focus_iters, focus_lr=a.focus_lr, resume=a.resume,
              device=a.device, workers=a.workers, time_limit=a.time_limit,
              texture=a.texture, deform=a.deform, class_shift=a.class_shift,
              spleen_contrast=a.spleen_contrast, mirror_z=a.mirror_z,
              vary_window=a.vary_window, crop_share=a.crop_pad)
    if a.no_eval:
        return 0
    try:
        print(json.dumps({"dice": evaluate(a.out)}, indent=2))
    except ImportError as exc:  # the inference engine is not installed in this checkout
        log.warning("evaluation skipped: %s", exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
