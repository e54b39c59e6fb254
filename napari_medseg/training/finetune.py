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
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import MedSegError, check_cancel
from ..models.card import ModelCard
from .data import PatchSampler, list_dataset, load_cases
from .losses import soft_dice_loss
from .metrics import dice_per_class

__all__ = ["finetune", "trainable_model", "dice_per_class", "fine_tuned_name",
           "add_cli_parser", "cmd_finetune"]

log = logging.getLogger(__name__)


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


def _train(net, runner, sampler, iterations, lr, batch, progress, cancel, step, total):
    """The optimisation loop; returns the loss of each iteration."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr,
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))
    bf16 = _use_bf16()
    rng = sampler.rng
    losses = []
    net.train()
    for _ in range(iterations):
        check_cancel(cancel)
        xb, yb = sampler.sample(batch)
        x = torch.from_numpy(xb) * float(rng.uniform(0.9, 1.1)) + float(rng.normal(0, 0.05))
        y = torch.from_numpy(yb)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = runner(x)
        loss = F.cross_entropy(logits.float(), y) + soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        step += 1
        if progress:
            progress(step, total)
    net.eval()
    return losses, bf16


def _write_package(card: ModelCard, net, folder: Path, cancel=None) -> Path:
    """Write ``model.pt`` + ``card.yaml`` to a hidden temp folder, then rename it."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{card.name}.", suffix=".part", dir=folder))
    final = folder / card.name
    try:
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        torch.save(state, tmp / (card.weights or "model.pt"))
        card.save(tmp / "card.yaml")
        check_cancel(cancel)
        if final.exists():
            raise MedSegError(f"a model package named {card.name} already exists; choose "
                              "another name", str(final))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# -------------------------------------------------------------------- main
def finetune(model, dataset_dir, out_dir=None, name=None, iterations: int = 200,
             lr: float = 3e-4, patch_size=None, val_fraction: float = 0.25, seed: int = 0,
             batch_size: int = 2, progress=None, cancel=None) -> Path:
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
        Training window ``(z, y, x)`` on the model grid (default: the card's).
        Must suit the network (e.g. divisible by 8 for the built-in U-Net).
    val_fraction : float
        Share of cases held out to measure Dice before and after (at least one
        when there are two or more cases; 0 for none).
    seed : int
        Seed of the split, the windows and the augmentation.
    batch_size : int
    progress, cancel : callable, optional
        ``progress(done, total)``; ``cancel() -> bool`` stops and leaves nothing.

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

    t0 = time.perf_counter()
    base = trainable_model(model)
    card = base.card
    dataset_dir = Path(dataset_dir).expanduser()
    items = list_dataset(dataset_dir, card)
    if iterations < 1:
        raise MedSegError("iterations must be at least 1")
    patch = tuple(int(p) for p in (patch_size or card.patch_size))
    if len(patch) != 3 or min(patch) < 1:
        raise MedSegError(f"patch size {patch_size} must be three positive integers (z, y, x)")
    folder = Path(out_dir).expanduser() if out_dir else user_models_dir()
    name = _check_name(name, folder) if name else fine_tuned_name(card.name, folder)
    train_idx, val_idx = _split(items, val_fraction, seed)
    total = len(items) + 2 * len(val_idx) + iterations + 1
    cases, originals = load_cases(items, card, patch, progress, cancel, total=total)
    step = len(items)
    val_pairs = [originals[i] for i in val_idx]
    del originals
    names = card.label_names
    before, step = _evaluate(base, val_pairs, names, progress, cancel, step, total)

    sampler = PatchSampler([cases[i] for i in train_idx], patch, card.mirror_axes, seed=seed)
    del cases[:]  # held-out cases are no longer needed on the model grid
    split = _split_classes(sampler.cases, card.postprocessing.get("largest_component") or [])
    net = copy.deepcopy(base.network).cpu()
    tuned = TorchModel(_without_lcc(card, split), net, base.source,
                       getattr(base, "axis_order", "zyx"))
    torch.manual_seed(seed)
    losses, bf16 = _train(net, tuned.make_predictor(torch.device("cpu")), sampler, iterations,
                          lr, batch_size, progress, cancel, step, total)
    step += iterations
    after, step = _evaluate(tuned, val_pairs, names, progress, cancel, step, total)

    new_card = _new_card(tuned.card, name, dataset_dir, items, sampler.cases, split,
                         train_idx, val_idx, iterations, lr, batch_size, patch, seed, losses,
                         before, after, bf16, time.perf_counter() - t0, base.source)
    tuned.card = new_card
    check_cancel(cancel)
    path = _write_package(new_card, net, folder, cancel)
    if progress:
        progress(total, total)
    log.info("fine-tuned %s -> %s in %.0f s (loss %.3f -> %.3f)", card.name, path,
             time.perf_counter() - t0, new_card.metrics["fine_tune"]["loss_first"],
             new_card.metrics["fine_tune"]["loss_last"])
    return path


def _split_classes(cases, classes, min_share: float = 0.05) -> list:
    """Classes with two or more sizeable components in some corrected case.

    A class the user labelled as several separate parts (e.g. both kidneys
    merged into one class) must not keep a "largest component" clean-up.
    """
    from scipy import ndimage

    split = []
    for cid in classes:
        for case in cases:
            mask = case.y == int(cid)
            if not mask.any():
                continue
            lab, n = ndimage.label(mask)
            if n > 1:
                sizes = np.bincount(lab.ravel())[1:]
                if (sizes >= min_share * sizes.sum()).sum() > 1:
                    split.append(int(cid))
                    break
    return split


def _corr_text(cases) -> str:
    n = sum(1 for c in cases if c.corrected is not None)
    return f"; a quarter on voxels corrected in {n} case(s) with a ledger" if n else ""


def _without_lcc(card: ModelCard, split) -> ModelCard:
    """``card`` without the largest-component clean-up for the classes in ``split``."""
    if not split:
        return card
    d = card.to_dict()
    post = dict(d.get("postprocessing") or {})
    post["largest_component"] = [c for c in post.get("largest_component", []) if c not in split]
    d["postprocessing"] = post
    log.info("classes %s have several parts in the corrected labels: no largest "
             "component clean-up for them", split)
    return ModelCard.from_dict(d, card.name)


def _new_card(card, name, dataset_dir, items, cases, split, train_idx, val_idx, iterations, lr,
              batch, patch, seed, losses, before, after, bf16, seconds, source) -> ModelCard:
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
        f"cosine-decayed, cross-entropy + soft Dice, {'bf16 autocast, ' if bf16 else ''}"
        f"CPU, seed {seed}, {seconds / 60:.1f} min, {datetime.date.today():%Y-%m-%d}. "
        f"Base model training: {card.training or 'not described'}")
    metrics = {"fine_tune": {
        "base_model": card.name, "base_version": card.version, "dataset": str(dataset_dir),
        "train_cases": train_ids, "held_out_cases": val_ids, "iterations": int(iterations),
        "lr": float(lr), "patch_size": list(patch), "seed": int(seed),
        "corrected_voxels": int(n_corr),
        "loss_first": round(float(np.mean(losses[:k])), 4),
        "loss_last": round(float(np.mean(losses[-k:])), 4)}}
    if val_ids:
        metrics["dice"] = after
        metrics["dice_before"] = before
        metrics["held_out"] = {"cases": val_ids, "reference": "corrected labels",
                               "pipeline": "Model.predict, overlap 0.25, CPU"}
    else:
        metrics["base_metrics"] = card.metrics
    if split:
        metrics["fine_tune"]["largest_component_dropped"] = list(split)
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
                        batch_size=args.batch_size, progress=bar)
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
    print(msg + ")", file=sys.stderr)
    return 0

