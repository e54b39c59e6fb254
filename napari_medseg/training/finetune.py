"""Fine-tune a model on corrected cases and save it as a new model package.

Corrected labels exported with :func:`napari_medseg.io.export.export_training_case`
form an nnU-Net v2 raw dataset folder. :func:`finetune` trains a copy of a
model's network on it (CPU is fine: a few hundred iterations of small windows)
and writes a package in the same format as the built-in models (``card.yaml`` +
``model.pt`` state_dict) into the user model folder, where
:func:`napari_medseg.models.list_models` finds it::

    from napari_medseg.training.finetune import finetune
    path = finetune("abdomen-ct-small", "~/nnUNet_raw/Dataset501_Corrected",
                    iterations=200)

Images are normalised and resampled by the same
:func:`~napari_medseg.core.preprocess.preprocess` call as at inference. With two
or more cases, a share is held out and Dice per class is measured on it with
``Model.predict`` before and after fine-tuning; both go into the card, with the
base model, dataset, case ids and schedule as provenance.

Importing this module is light (torch loads when training starts), so the
command line can offer the ``finetune`` subcommand cheaply.

Only networks we can rebuild from a card and a state_dict (``format:
state_dict``) can be trained; TorchScript, ONNX, MONAI bundles and nnU-Net
folders raise :class:`~napari_medseg.errors.MedSegError`.
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import MedSegError, check_cancel
from ..models.card import ModelCard
from .data import Augment, PatchSampler, list_dataset, load_cases
from .guard import largest_drop
from .losses import soft_dice_loss
from .metrics import dice_per_class

__all__ = ["finetune", "trainable_model", "dice_per_class", "fine_tuned_name",
           "add_cli_parser", "cmd_finetune"]

log = logging.getLogger(__name__)

#: Default L2-SP strength (``finetune(anchor=...)``): the pull of the weights
#: back towards the base model's.
ANCHOR = 0.1

#: Default learning-rate factor of the first third of the layers.
EARLY_LR_FACTOR = 0.3

#: Synthetic phantoms replayed by default when classes are added to an abdominal CT
#: model: the guard then comes from data, and the weights are left free
#: (``anchor=0``, ``early_lr_factor=1``), which a new structure needs. On the
#: sarcoma cases of ``benchmarks/bench_loop.py`` (k = 7, 2000 iterations) the
#: weight-space guard (L2-SP 0.1, early layers at 0.3 x lr) with replay gave a
#: tumour Dice of 0.19 (largest old-class drop on phantoms 0.04), the free weights
#: with replay 0.38 (0.03); the free weights without replay forgot every old class.
NEW_CLASS_REPLAY = 4


def _auto_guard(card, new_classes, anchor, early_lr_factor, replay_cases):
    """Resolve ``None`` / ``"auto"`` guard settings: (anchor, early factor, replay)."""
    from .guard import _phantom_names

    replayable = bool(_phantom_names(card))
    free = bool(new_classes) and replayable
    if replay_cases is None or replay_cases == "auto":
        replay_cases = NEW_CLASS_REPLAY if free else 0
    if anchor is None:
        anchor = 0.0 if free and replay_cases else ANCHOR
    if early_lr_factor is None:
        early_lr_factor = 1.0 if free and replay_cases else EARLY_LR_FACTOR
    return float(anchor), float(early_lr_factor), int(replay_cases)


# ------------------------------------------------------------------ checks
def trainable_model(model):
    """Load ``model`` (name, path or loaded model) and check it can be fine-tuned.

    Returns
    -------
    TorchModel
        A model whose card is ``format: state_dict`` with a ``network``.

    Raises
    ------
    MedSegError
        The model is TorchScript, ONNX, a bundle, nnU-Net or anything else
        without trainable weights in our package format.
    """
    import torch

    from ..models.predictor import TorchModel

    if not (hasattr(model, "card") and hasattr(model, "predict")):
        from ..models import load_model

        model = load_model(model)
    card = model.card
    net = getattr(model, "network", None)
    if (card.format != "state_dict" or not card.network or not isinstance(model, TorchModel)
            or isinstance(net, torch.jit.ScriptModule)):
        raise MedSegError(
            f"model {card.name} ({card.format}) cannot be fine-tuned here: only model "
            "packages with a state_dict and a network in their card (like the built-in "
            "models) have trainable weights; TorchScript, ONNX, MONAI bundle and nnU-Net "
            "models do not", model.source)
    return model


def fine_tuned_name(base: str, folder: Path, date: datetime.date | None = None) -> str:
    """``<base>-ft-<YYYYMMDD>`` or ``...-<n>``, not yet used by a folder or listed model."""
    base = re.sub(r"-ft-\d{8}(-\d+)?$", "", base)
    stem = f"{base}-ft-{(date or datetime.date.today()):%Y%m%d}"
    try:
        from ..models import list_models

        taken = {i.name for i in list_models()}
    except Exception:  # noqa: BLE001 - a broken registry must not stop training
        taken = set()
    name, n = stem, 1
    while name in taken or (folder / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def _check_name(name: str, folder: Path) -> str:
    """A usable new model name: a plain folder name, not taken by a package or model."""
    name = str(name).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise MedSegError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    if (folder / name).exists():
        raise MedSegError(f"a model package named {name} already exists; choose another "
                          "name", str(folder / name))
    from ..models import list_models

    if any(i.name == name for i in list_models()):
        raise MedSegError(f"a model named {name} is already available; choose another name")
    return name


def _bump(version: str) -> str:
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?(.*)$", str(version))
    if not m:
        return f"{version}.ft1"
    return f"{m.group(1)}.{int(m.group(2)) + 1}.0"


# ---------------------------------------------------------------- metrics
def _mean_dice(per_case: list) -> dict:
    names = sorted({n for c in per_case for n in c})
    return {n: round(float(np.mean([c[n] for c in per_case if n in c])), 4) for n in names}


def _use_bf16() -> bool:
    """bf16 autocast only where the CPU has native bf16 (:func:`.core.policy.bf16_supported`)."""
    from ..core.policy import bf16_supported

    return bf16_supported("cpu")


# ---------------------------------------------------------------- helpers
def _evaluate(model, pairs, names, progress=None, cancel=None, step=0, total=1):
    """Mean Dice per class of ``model.predict`` against the reference labels."""
    per_case = []
    for imgs, lab in pairs:
        check_cancel(cancel)
        pred = model.predict(imgs, device="cpu", overlap=0.25, cancel=cancel)
        per_case.append(dice_per_class(np.asarray(pred.labels.data), np.asarray(lab.data),
                                       names))
        step += 1
        if progress:
            progress(step, total)
    return _mean_dice(per_case), step


def _split(cases, val_fraction: float, seed: int):
    """Indices ``(train, val)``; val empty for one case or a zero fraction."""
    n = len(cases)
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0
    if n >= 2 and val_fraction > 0:
        n_val = min(n - 1, max(1, int(round(n * float(val_fraction)))))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class _Run:
    """What the optimisation loop needs besides the network (one fine-tuning run)."""

    def __init__(self, iterations, lr, batch, corrected_weight, early_lr_factor, key, ckpt,
                 checkpoint_every, extra, report=None, val_windows=None):
        self.iterations, self.lr, self.batch = int(iterations), float(lr), int(batch)
        self.corrected_weight = corrected_weight
        self.early_lr_factor = float(early_lr_factor)
        self.key, self.ckpt, self.checkpoint_every = key, ckpt, int(checkpoint_every)
        self.extra, self.report, self.val_windows = extra, report, val_windows
        self.resumed_from = 0
        self.head = None  # the output convolution, when classes were added
        self.fp32_retries = 0  # bf16 steps redone in float32 (in this process)
        self.anchor = 0.0  # L2-SP strength towards the base weights


def _val_dice(runner, windows, n_classes) -> float:
    """Mean foreground Dice of the argmax on fixed held-out windows (the live plot)."""
    import torch

    xb, yb = windows
    with torch.inference_mode():
        pred = runner(torch.from_numpy(xb)).float().argmax(1).numpy()
    scores = []
    for c in range(1, n_classes):
        a, b = pred == c, yb == c
        s = int(a.sum()) + int(b.sum())
        if int(b.sum()):
            scores.append(2.0 * int((a & b).sum()) / s)
    return float(np.mean(scores)) if scores else float("nan")


def _mean_finite(values) -> float:
    """Mean of the finite ``values`` (skipped steps are NaN), rounded; NaN if none."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return round(float(v.mean()), 4) if len(v) else float("nan")


def _finite_step(net, loss) -> bool:
    """Whether ``loss`` and every gradient of ``net`` are finite."""
    import torch

    if not bool(torch.isfinite(loss.detach())):
        return False
    return all(bool(torch.isfinite(p.grad).all()) for p in net.parameters()
               if p.grad is not None)


def _train(net, runner, sampler, run: _Run, progress, cancel, step, total, state=None):
    """The optimisation loop; returns the loss of each iteration.

    ``state`` (from a checkpoint) restores the network, optimiser, scheduler,
    RNGs and losses; a checkpoint is written every ``run.checkpoint_every``
    iterations and when cancelled.
    """
    import torch
    import torch.nn.functional as F

    from ..errors import Cancelled
    from .checkpoint import save_checkpoint
    from .guard import anchor_penalty, base_weights, param_groups

    # the base weights, taken before a checkpoint replaces them
    anchors = base_weights(net, run.head) if run.anchor else None
    opt = torch.optim.AdamW(param_groups(net, run.lr, run.early_lr_factor, run.head),
                            lr=run.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(run.iterations, 1))
    bf16 = _use_bf16()
    rng = sampler.rng
    losses, start = [], 0
    if state is not None:
        info, tensors = state
        net.load_state_dict(tensors["net"])
        opt.load_state_dict(tensors["opt"])
        sched.load_state_dict(tensors["sched"])
        torch.set_rng_state(tensors["torch_rng"])
        rng.bit_generator.state = info["rng"]
        losses, start = list(info["losses"]), int(info["step"])
        run.resumed_from = start
        log.info("resuming fine-tuning at iteration %d of %d", start, run.iterations)

    def checkpoint(i):
        if run.ckpt is not None and i > 0:
            save_checkpoint(run.ckpt, run.key, i, net, opt, sched, losses,
                            rng.bit_generator.state, run.extra)

    def step_loss(x, y, w, amp: bool):
        """Forward and backward of one batch: (loss, classes, whether all is finite)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = runner(x)
        if w is None:
            ce = F.cross_entropy(logits.float(), y)
        else:
            ce = (F.cross_entropy(logits.float(), y, reduction="none") * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss = ce + soft_dice_loss(logits, y)
        if anchors is not None:
            loss = loss + run.anchor * anchor_penalty(anchors)
        loss.backward()
        return loss, logits.shape[1], _finite_step(net, loss)

    n_classes = None
    net.train()
    i = start
    try:
        for i in range(start, run.iterations):
            check_cancel(cancel)
            if run.corrected_weight is not None:
                xb, yb, wb = sampler.sample(run.batch, corrected_weight=run.corrected_weight)
                w = torch.from_numpy(wb)
            else:
                xb, yb = sampler.sample(run.batch)
                w = None
            x = torch.from_numpy(xb) * float(rng.uniform(0.9, 1.1)) + float(rng.normal(0, 0.05))
            y = torch.from_numpy(yb)
            loss, n_classes, finite = step_loss(x, y, w, bf16)
            if not finite and bf16:
                # CPU bf16 convolution backward now and then returns NaN (grids of
                # 16 slices): redo the step in float32
                run.fp32_retries += 1
                loss, n_classes, finite = step_loss(x, y, w, False)
            if finite:
                opt.step()
            else:  # a non-finite step never reaches the weights; its loss is NaN
                opt.zero_grad(set_to_none=True)
                log.warning("fine-tuning: skipped iteration %d (non-finite loss or "
                            "gradient, %d so far)", i + 1, 1 + int(np.isnan(losses).sum()))
            sched.step()
            losses.append(float(loss.item()) if finite else float("nan"))
            if run.report is not None:
                run.report({"step": i + 1, "loss": losses[-1]})
                if run.val_windows is not None and ((i + 1) % _val_every(run) == 0
                                                    or i + 1 == run.iterations):
                    net.eval()
                    run.report({"step": i + 1, "val_dice": _val_dice(
                        runner, run.val_windows, n_classes)})
                    net.train()
            if run.checkpoint_every > 0 and (i + 1) % run.checkpoint_every == 0 \
                    and i + 1 < run.iterations:
                checkpoint(i + 1)
            if progress:
                progress(step + i + 1, total)
    except (Cancelled, KeyboardInterrupt):  # Cancel in the dock, Ctrl+C on the command line
        checkpoint(len(losses))
        net.eval()
        raise
    net.eval()
    return losses, bf16


def _val_every(run) -> int:
    return max(5, run.iterations // 20)


def _val_windows(cases, patch, n: int = 4, seed: int = 12345):
    """Fixed windows (centred on a foreground class) from held-out model-grid cases."""
    if not cases:
        return None
    sampler = PatchSampler(cases, patch, mirror_axes=(), fg_fraction=1.0,
                           corrected_fraction=0.0, seed=seed)
    return sampler.sample(n)


def _write_package(card: ModelCard, net, folder: Path, cancel=None) -> Path:
    """Write ``model.pt`` + ``card.yaml`` as ``folder/<card name>``, atomically."""
    from ..models.weights import write_state_package

    return write_state_package(card, net.state_dict(), Path(folder) / card.name,
                               cancel=cancel)


# -------------------------------------------------------------------- main
def finetune(model, dataset_dir, out_dir=None, name=None, iterations: int = 200,
             lr: float = 3e-4, patch_size=None, val_fraction: float = 0.25, seed: int = 0,
             batch_size: int = 2, progress=None, cancel=None, *, resume: bool = False,
             checkpoint_every: int = 50, checkpoint_root=None,
             corrected_weight: float | None = 3.0, guard: bool = True,
             early_lr_factor: float | None = None, new_classes: dict | None = None,
             forgetting_cases="auto", replay_cases="auto", replay_fraction: float = 0.3,
             anchor: float | None = None, augment: bool = True, single_part: bool = True,
             report=None) -> Path:
    """Fine-tune ``model`` on the corrected cases of an nnU-Net raw dataset folder.

    Parameters
    ----------
    model : str, Path or Model
        Registry name (``"abdomen-ct-small"``), package path or a loaded model
        with a state_dict network. It is not modified.
    dataset_dir : str or Path
        ``DatasetXXX_Name`` folder with ``dataset.json``, ``imagesTr/``, ``labelsTr/``.
    out_dir : str or Path, optional
        Folder receiving the new package (default: the user model folder,
        :func:`napari_medseg.paths.user_models_dir`, so the registry lists it).
    name : str, optional
        Name of the new model (default ``<base>-ft-<YYYYMMDD>[-n]``).
    iterations : int
        Optimiser steps (each a batch of ``batch_size`` windows).
    lr : float
        AdamW learning rate (cosine decay to 0).
    patch_size : tuple of 3 int, optional
        Training window ``(z, y, x)`` on the model grid (default: the card's
        ``train_patch_size``, else its ``patch_size``).
        Must suit the network (e.g. divisible by 8 for the built-in U-Net).
    val_fraction : float
        Share of cases held out to measure Dice before and after (at least one
        when there are two or more cases; 0 for none).
    seed : int
        Seed of the split, the windows and the augmentation.
    batch_size : int
    progress, cancel : callable, optional
        ``progress(done, total)``; ``cancel() -> bool`` stops: no package is
        written, and the training state so far is kept as a checkpoint.
    resume : bool
        Continue from the checkpoint of the same run (same model, dataset,
        cases and settings) left by a cancelled or crashed run; without one,
        start afresh.
    checkpoint_every : int
        Iterations between checkpoints (0: none, not even on cancel).
    checkpoint_root : path, optional
        Where checkpoints go (default ``<user data folder>/finetune-checkpoints``).
        A finished run removes its checkpoint.
    corrected_weight : float or None
        Cross-entropy weight of the voxels the user corrected (from the
        ledgers); None or 1 for none.
    guard : bool
        Guard against forgetting: classes a case does not supervise keep the
        base model's own prediction as their target
        (:func:`~napari_medseg.training.guard.fill_unsupervised`; from the
        ledger's prediction, or one base-model run per case without a ledger).
    early_lr_factor : float, optional
        Learning-rate factor of the first third of the parameter tensors
        (default :data:`EARLY_LR_FACTOR`; 1 when classes are added to an
        abdominal CT model, whose old classes replay then keeps).
    new_classes : dict[int, str], optional
        Classes to add (ids right after the model's): the output layer grows
        (:func:`~napari_medseg.training.guard.add_output_classes`).
    replay_cases : int or "auto"
        Synthetic phantoms with their full labels replayed against forgetting
        (:func:`~napari_medseg.training.guard.synthetic_replay`; abdominal CT
        models only), drawn for a ``replay_fraction`` share of the windows. For
        corrections that adapt the model to a new appearance (scanner, contrast);
        not for corrections that redefine a class (the phantoms would teach the
        old definition back). ``"auto"``: :data:`NEW_CLASS_REPLAY` when
        ``new_classes`` are added to an abdominal CT model, else none.
    replay_fraction : float
    anchor : float, optional
        Strength of a pull of every weight back towards the base model's
        (L2-SP: ``anchor * sum((w - w_base) ** 2)`` added to the loss;
        :func:`~napari_medseg.training.guard.anchor_penalty`); the output
        channels of new classes are free. 0 for none. The default,
        :data:`ANCHOR`, cut the largest synthetic drop of the *adapt*
        benchmark from 0.027 to 0.014 for the same spleen Dice. With new classes
        and replay (above) the default is 0: the pull held a new structure back.
    augment : bool
        Draw each window with nnU-Net's zoom, in-plane rotation and intensity
        augmentation (:class:`~napari_medseg.training.data.Augment`), on top
        of the card's mirror flips.
    single_part : bool
        A new class that is one piece in every corrected case that shows it
        gets the largest-component clean-up (:func:`_single_part_classes`), as
        nnU-Net keeps only the largest part where that fits the data. On the
        *new class* benchmark it removed a false-positive blob in muscle of the
        tumour's density (STS_008: Dice 0.32 -> 0.52 with seed 0; with seed 1
        the false positives touched the tumour and stayed).
    forgetting_cases : int or "auto"
        Held-out synthetic phantoms to measure forgetting on (Dice per class
        before / after, :func:`~napari_medseg.training.guard.synthetic_check`);
        ``"auto"``: 2 for abdominal CT models, else 0.
    report : callable, optional
        ``report(dict)`` from the training thread: ``{"step", "loss"}`` each
        iteration and ``{"step", "val_dice"}`` (mean foreground Dice on fixed
        held-out windows) now and then, for a live plot.

    Returns
    -------
    Path
        The new package folder (``card.yaml`` + ``model.pt``).

    Raises
    ------
    MedSegError
        The model has no trainable weights, the dataset is missing or does not
        fit the model, or the package cannot be written.
    Cancelled
        When cancelled (no package is left behind).
    """
    import torch

    from ..models.predictor import TorchModel
    from ..paths import user_models_dir
    from .checkpoint import checkpoint_dir, load_checkpoint, remove_checkpoint, run_key
    from .guard import add_output_classes, fill_unsupervised, supervised_classes

    t0 = time.perf_counter()
    base = trainable_model(model)
    card = base.card
    dataset_dir = Path(dataset_dir).expanduser()
    new_classes = {int(k): str(v) for k, v in (new_classes or {}).items()}
    anchor, early_lr_factor, replay_cases = _auto_guard(card, new_classes, anchor,
                                                        early_lr_factor, replay_cases)
    net = copy.deepcopy(base.network).cpu()
    train_card = add_output_classes(net, card, new_classes) if new_classes else card
    items = list_dataset(dataset_dir, card, new_classes)
    if iterations < 1:
        raise MedSegError("iterations must be at least 1")
    patch = tuple(int(p) for p in (patch_size or card.train_patch_size or card.patch_size))
    if len(patch) != 3 or min(patch) < 1:
        raise MedSegError(f"patch size {patch_size} must be three positive integers (z, y, x)")
    folder = Path(out_dir).expanduser() if out_dir else user_models_dir()
    name = _check_name(name, folder) if name else fine_tuned_name(card.name, folder)
    train_idx, val_idx = _split(items, val_fraction, seed)
    if corrected_weight is not None and float(corrected_weight) == 1.0:
        corrected_weight = None
    key = run_key(model=card.name, version=card.version, source=str(base.source),
                  dataset=str(dataset_dir.resolve()), cases=[i.case for i in items],
                  iterations=iterations, lr=lr, patch=patch, val=val_fraction, seed=seed,
                  batch=batch_size, corrected_weight=corrected_weight, guard=guard,
                  early=early_lr_factor, new=new_classes, replay=replay_cases,
                  replay_fraction=replay_fraction, **({"anchor": anchor} if anchor else {}),
                  **({"augment": True} if augment else {}))
    ckpt = checkpoint_dir(key, checkpoint_root) if checkpoint_every > 0 else None
    state = load_checkpoint(ckpt, key) if (resume and ckpt is not None) else None
    if resume and state is None:
        log.info("no checkpoint of this run to resume; starting afresh")
    all_ids = set(range(1, train_card.n_classes))
    n_filled = []

    def fill(imgs, y0, ledger_pred):
        sup = supervised_classes(y0, ledger_pred)
        if not guard or all_ids <= sup:
            return y0, sorted(all_ids)
        if ledger_pred is not None:
            pred = ledger_pred
        else:
            pred = np.asarray(base.predict(imgs, device="cpu", overlap=0.25,
                                           cancel=cancel).labels.data)
        out = fill_unsupervised(y0, pred, sup | set(new_classes))
        n_filled.append(int((out != y0).sum()))
        return out, sorted(sup | set(new_classes))

    n_check = (2 if forgetting_cases == "auto" else int(forgetting_cases or 0))
    n_replay = int(replay_cases or 0)
    total = len(items) + 2 * len(val_idx) + iterations + 1 + 2 * n_check + n_replay
    train_items = [items[i] for i in train_idx]
    val_items = [items[i] for i in val_idx]
    cases, _ = load_cases(train_items, train_card, patch, progress, cancel, total=total,
                          fill=fill)
    val_cases, val_pairs = load_cases(val_items, train_card, patch, progress, cancel,
                                      offset=len(train_items), total=total)
    step = len(items)
    names = train_card.label_names
    if state is not None and "before" in state[0]:
        before, synth_before = state[0]["before"], state[0].get("synthetic_before")
        step += len(val_idx) + n_check
    else:
        before, step = _evaluate(base, val_pairs, names, progress, cancel, step, total)
        from .guard import synthetic_check

        synth_before = synthetic_check(base, n_check, cancel=cancel) if n_check else None
        step += n_check

    from .guard import synthetic_replay

    with tempfile.TemporaryDirectory(prefix="medseg-replay-") as scratch:
        replay = synthetic_replay(card, train_card, patch, n_replay, scratch, cancel=cancel)
    step += n_replay
    sampler = PatchSampler(cases, patch, card.mirror_axes, seed=seed, replay=replay,
                           replay_fraction=replay_fraction,
                           augment=Augment() if augment else None)
    val_windows = _val_windows(val_cases, patch) if report is not None else None
    del val_cases
    split = _split_classes(sampler.cases, train_card.postprocessing.get("largest_component")
                           or [])
    single = _single_part_classes(sampler.cases, new_classes) if single_part else []
    tuned = TorchModel(_with_lcc(train_card, drop=split, add=single), net, base.source,
                       getattr(base, "axis_order", "zyx"))
    torch.manual_seed(seed)
    run = _Run(iterations, lr, batch_size, corrected_weight, early_lr_factor, key, ckpt,
               checkpoint_every, {"before": before, "synthetic_before": synth_before},
               report, val_windows)
    if new_classes:  # the new output channels learn fast enough in a short run
        from .guard import output_head

        run.head = output_head(net, train_card.n_classes)
    run.anchor = float(anchor)
    losses, bf16 = _train(net, tuned.make_predictor(torch.device("cpu")), sampler, run,
                          progress, cancel, step, total, state)
    step += iterations
    after, step = _evaluate(tuned, val_pairs, names, progress, cancel, step, total)
    synth_after = None
    if synth_before is not None:
        from .guard import synthetic_check

        synth_after = synthetic_check(tuned, n_check, cancel=cancel)
    step += n_check

    opts = {"corrected_weight": corrected_weight, "guard": bool(guard),
            "early_lr_factor": float(early_lr_factor), "new_classes": new_classes,
            "filled_voxels": int(sum(n_filled)), "resumed_from": run.resumed_from,
            "synthetic": (synth_before, synth_after), "n_check": n_check,
            "replay_cases": len(replay), "replay_fraction": float(replay_fraction),
            "anchor": float(anchor), "augment": bool(augment),
            "float32_retries": run.fp32_retries,
            "skipped_steps": int(np.isnan(losses).sum()), "largest_component_added": single}
    new_card = _new_card(tuned.card, name, dataset_dir, items, sampler.cases, split,
                         train_idx, val_idx, iterations, lr, batch_size, patch, seed, losses,
                         before, after, bf16, time.perf_counter() - t0, base.source, opts)
    tuned.card = new_card
    check_cancel(cancel)
    path = _write_package(new_card, net, folder, cancel)
    if ckpt is not None:
        remove_checkpoint(ckpt)
    if progress:
        progress(total, total)
    log.info("fine-tuned %s -> %s in %.0f s (loss %.3f -> %.3f)", card.name, path,
             time.perf_counter() - t0, new_card.metrics["fine_tune"]["loss_first"],
             new_card.metrics["fine_tune"]["loss_last"])
    return path


def _sizeable_parts(mask: np.ndarray, min_share: float = 0.05) -> int:
    """Pieces of ``mask`` (26-connected, as the largest-component clean-up counts
    them) that hold at least ``min_share`` of its voxels; stray strokes do not count."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if n < 2:
        return n
    sizes = np.bincount(lab.ravel())[1:]
    return int((sizes >= min_share * sizes.sum()).sum())


def _split_classes(cases, classes) -> list:
    """Classes with two or more sizeable parts in some corrected case.

    A class the user labelled as several separate parts (e.g. both kidneys
    merged into one class) must not keep a "largest component" clean-up.
    """
    return [int(cid) for cid in classes
            if any(_sizeable_parts(case.y == int(cid)) > 1 for case in cases)]


def _single_part_classes(cases, classes) -> list:
    """Classes of ``classes`` that are one part in every corrected case showing them.

    The complement of :func:`_split_classes` for classes without a clean-up
    yet: a structure the user always drew as one connected part (a tumour, an
    organ) keeps only the largest part of its prediction. A class no case
    shows gets none (no evidence).
    """
    single = []
    for cid in sorted(int(c) for c in (classes or {})):
        parts = [_sizeable_parts(case.y == cid) for case in cases]
        if any(parts) and max(parts) == 1:
            single.append(cid)
    return single


def _corr_text(cases) -> str:
    n = sum(1 for c in cases if c.corrected is not None)
    return f"; a quarter on voxels corrected in {n} case(s) with a ledger" if n else ""


def _opts_text(opts) -> str:
    """The guard, weights and new classes of a run, for the card's training text."""
    if not opts:
        return ""
    parts = []
    if opts.get("corrected_weight"):
        parts.append(f"corrected voxels weighted x{opts['corrected_weight']:g} in the "
                     "cross-entropy")
    if opts.get("guard"):
        parts.append(f"classes a case does not label kept as the base model predicts them "
                     f"({opts.get('filled_voxels', 0)} voxels)")
    if opts.get("replay_cases"):
        parts.append(f"{opts['replay_fraction']:.0%} of the windows from {opts['replay_cases']} "
                     "replayed synthetic phantoms (make_abdomen_ct vary=True, seeds from 700001)")
    if opts.get("augment"):
        parts.append("nnU-Net's zoom, in-plane rotation and intensity augmentation")
    if opts.get("anchor"):
        parts.append(f"weights pulled towards the base model's (L2-SP, {opts['anchor']:g})")
    if opts.get("early_lr_factor", 1.0) != 1.0:
        parts.append(f"first third of the layers at {opts['early_lr_factor']:g} x lr")
    if opts.get("new_classes"):
        parts.append("new classes " + ", ".join(f"{k}={v}" for k, v in
                                                opts["new_classes"].items()))
    if opts.get("largest_component_added"):
        parts.append("largest-component clean-up for new classes "
                     + ", ".join(str(c) for c in opts["largest_component_added"])
                     + " (one part in every corrected case)")
    if opts.get("resumed_from"):
        parts.append(f"resumed from a checkpoint at iteration {opts['resumed_from']}")
    return "; " + "; ".join(parts) if parts else ""


def _with_lcc(card: ModelCard, drop=(), add=()) -> ModelCard:
    """``card`` with the largest-component clean-up dropped for the classes in
    ``drop`` (several parts in the corrected labels) and added for ``add``."""
    if not drop and not add:
        return card
    d = card.to_dict()
    post = dict(d.get("postprocessing") or {})
    keep = [c for c in post.get("largest_component", []) if c not in drop]
    post["largest_component"] = keep + [int(c) for c in add if c not in keep]
    d["postprocessing"] = post
    if drop:
        log.info("classes %s have several parts in the corrected labels: no largest "
                 "component clean-up for them", list(drop))
    if add:
        log.info("new classes %s are one part in every corrected case: largest component "
                 "clean-up for them", list(add))
    return ModelCard.from_dict(d, card.name)


def _new_card(card, name, dataset_dir, items, cases, split, train_idx, val_idx, iterations, lr,
              batch, patch, seed, losses, before, after, bf16, seconds, source,
              opts=None) -> ModelCard:
    """The base card with a new name and version, provenance and before/after Dice."""
    k = max(1, len(losses) // 10)
    train_ids = [items[i].case for i in train_idx]
    val_ids = [items[i].case for i in val_idx]
    d = card.to_dict()
    d.update(name=str(name), version=_bump(card.version), format="state_dict",
             weights="model.pt")
    n_corr = sum(c.n_corrected for c in cases)
    d["training"] = (
        f"Fine-tuned from {card.name} {card.version} ({source}) on {len(train_ids)} "
        f"corrected case(s) of {dataset_dir} ({', '.join(train_ids)}); "
        f"{len(val_ids)} held out ({', '.join(val_ids) or 'none'}). {iterations} AdamW "
        f"steps of batch {batch} random {list(patch)} windows (half centred on a "
        f"foreground class{_corr_text(cases)}, mirror flips along axes "
        f"{list(card.mirror_axes)}), lr {lr} "
        f"cosine-decayed{_opts_text(opts)}, cross-entropy + soft Dice, "
        f"{'bf16 autocast, ' if bf16 else ''}"
        f"CPU, seed {seed}, {seconds / 60:.1f} min, {datetime.date.today():%Y-%m-%d}. "
        f"Base model training: {card.training or 'not described'}")
    metrics = {"fine_tune": {
        "base_model": card.name, "base_version": card.version, "dataset": str(dataset_dir),
        "train_cases": train_ids, "held_out_cases": val_ids, "iterations": int(iterations),
        "lr": float(lr), "patch_size": list(patch), "seed": int(seed),
        "corrected_voxels": int(n_corr),
        "loss_first": _mean_finite(losses[:k]),
        "loss_last": _mean_finite(losses[-k:])}}
    if val_ids:
        metrics["dice"] = after
        metrics["dice_before"] = before
        metrics["held_out"] = {"cases": val_ids, "reference": "corrected labels",
                               "pipeline": "Model.predict, overlap 0.25, CPU"}
    else:
        metrics["base_metrics"] = card.metrics
    if split:
        metrics["fine_tune"]["largest_component_dropped"] = list(split)
    if (opts or {}).get("largest_component_added"):
        metrics["fine_tune"]["largest_component_added"] = list(opts["largest_component_added"])
    opts = opts or {}
    ft = metrics["fine_tune"]
    for k in ("corrected_weight", "guard", "early_lr_factor", "filled_voxels", "resumed_from",
              "replay_cases", "anchor", "augment", "float32_retries", "skipped_steps"):
        if k in opts:
            ft[k] = opts[k]
    if opts.get("new_classes"):
        ft["new_classes"] = {int(k): v for k, v in opts["new_classes"].items()}
    sb, sa = opts.get("synthetic", (None, None))
    if sb is not None and sa is not None:
        new_names = set((opts.get("new_classes") or {}).values())
        metrics["forgetting"] = {
            "reference": "synthetic phantoms (make_abdomen_ct vary=True, seeds from "
                         f"200001, {opts.get('n_check')} held out), Model.predict overlap 0.25",
            "dice_before": sb, "dice_after": sa,
            "largest_drop": largest_drop(sb, sa, exclude=new_names)}
    d["metrics"] = metrics
    extra = dict(d.get("extra") or {})
    extra["fine_tuned_from"] = {"name": card.name, "version": card.version,
                                "source": str(source)}
    d["extra"] = extra
    return ModelCard.from_dict(d, str(name))


# ----------------------------------------------------------------------- CLI
def add_cli_parser(sub, progress_bar=None) -> None:
    """Add the ``finetune`` subcommand to the ``napari-medseg`` argument parser.

    ``progress_bar(label)`` makes a ``progress(done, total)`` callable with a
    ``close()`` method (the command line's own text bar).
    """
    f = sub.add_parser("finetune", help="fine-tune a model on corrected training cases")
    f.add_argument("model", help="model name or package path (state_dict models)")
    f.add_argument("dataset", help="nnU-Net raw dataset folder (DatasetXXX_Name)")
    f.add_argument("--iterations", type=int, default=200, help="optimiser steps")
    f.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    f.add_argument("--name", help="name of the new model (default <model>-ft-<date>)")
    f.add_argument("--out", help="folder for the new package (default: user model folder)")
    f.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"))
    f.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of cases held out for Dice before/after")
    f.add_argument("--batch-size", type=int, default=2)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--resume", action="store_true",
                   help="continue a cancelled or interrupted run of the same settings from "
                   "its checkpoint")
    f.add_argument("--checkpoint-every", type=int, default=50,
                   help="iterations between checkpoints (0: none)")
    f.add_argument("--corrected-weight", type=float, default=3.0,
                   help="loss weight of the voxels the user corrected (from the ledgers)")
    f.add_argument("--no-guard", action="store_true",
                   help="train unlabelled classes as background (no replay of the base "
                   "model's predictions)")
    f.add_argument("--early-lr-factor", type=float, default=None,
                   help=f"learning-rate factor of the first third of the layers (default "
                   f"{EARLY_LR_FACTOR}; 1 when --add-class replays phantoms)")
    f.add_argument("--anchor", type=float, default=None,
                   help=f"pull of the weights back towards the base model's (L2-SP; 0: "
                   f"none; default {ANCHOR}, 0 when --add-class replays phantoms)")
    f.add_argument("--replay", type=int, default=None, metavar="N",
                   help="replay N synthetic phantoms (abdominal CT models) against "
                   "forgetting, for corrections that adapt to a new appearance (default "
                   f"0; {NEW_CLASS_REPLAY} with --add-class)")
    f.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train on the windows as they are (default: nnU-Net's random zoom, "
                   "rotation and intensity changes per window)")
    f.add_argument("--add-class", nargs=2, action="append", metavar=("ID", "NAME"),
                   default=[], help="add a class the model does not have (repeatable)")
    f.add_argument("--no-single-part", dest="single_part", action="store_false",
                   help="no largest-component clean-up for added classes (default: one for "
                   "each added class that is one part in every corrected case)")
    f.set_defaults(func=cmd_finetune, progress_bar=progress_bar)


def cmd_finetune(args) -> int:
    """Run :func:`finetune` from parsed CLI arguments; print where the model went."""
    import sys

    make_bar = getattr(args, "progress_bar", None)
    bar = make_bar("fine-tune") if make_bar else None
    try:
        path = finetune(args.model, args.dataset, out_dir=args.out, name=args.name,
                        iterations=args.iterations, lr=args.lr, patch_size=args.patch_size,
                        val_fraction=args.val_fraction, seed=args.seed,
                        batch_size=args.batch_size, progress=bar,
                        resume=getattr(args, "resume", False),
                        checkpoint_every=getattr(args, "checkpoint_every", 50),
                        corrected_weight=getattr(args, "corrected_weight", 3.0),
                        guard=not getattr(args, "no_guard", False),
                        early_lr_factor=getattr(args, "early_lr_factor", None),
                        replay_cases=getattr(args, "replay", None),
                        anchor=getattr(args, "anchor", None),
                        augment=getattr(args, "augment", True),
                        single_part=getattr(args, "single_part", True),
                        new_classes=_parse_new_classes(getattr(args, "add_class", [])))
    finally:
        if bar is not None:
            bar.close()
    from ..models.loaders import read_package_card

    m = read_package_card(path).metrics
    ft = m["fine_tune"]
    msg = f"wrote {path} (loss {ft['loss_first']:.3f} -> {ft['loss_last']:.3f}"
    if "dice" in m:
        msg += "; held-out Dice " + ", ".join(
            f"{k} {m['dice_before'].get(k, 0):.3f}->{v:.3f}" for k, v in m["dice"].items())
    if "forgetting" in m:
        msg += f"; largest drop on synthetic held-out cases {m['forgetting']['largest_drop']:.3f}"
    if ft.get("resumed_from"):
        msg += f"; resumed at iteration {ft['resumed_from']}"
    print(msg + ")", file=sys.stderr)
    return 0


def _parse_new_classes(pairs) -> dict:
    out = {}
    for cid, name in pairs or []:
        try:
            out[int(cid)] = str(name)
        except ValueError:
            raise MedSegError(f"--add-class takes an integer id and a name, got {cid!r}") \
                from None
    return out

