"""The review-and-retrain loop, measured: an annotator whose corrections are the references.

Three scenarios (``--scenarios adapt newclass ordering``), each starting from the
built-in CT model (``abdomen-ct-small``: liver 1, spleen 2, kidneys 3 / 4,
lesion 5) and fine-tuning with :func:`napari_medseg.training.finetune.finetune`
(its defaults: corrected voxels weighted x3, classes a case does not label kept
as the base model predicts them, early layers at 0.3 x lr; adapt also replays 4
synthetic phantoms for 30 % of the windows):

* **adapt** -- fine-tuned on the real abdominal DICOM CT of ``../shared/realdata``
  (``ct_abdomen_dicom/``) with its reference (TotalSegmentator output) for liver
  (id 5 there) and spleen (id 1) only: kidneys and lesions are not labelled and
  not penalised. Evaluated on the spleen CT (``spleen_ct/``, manual spleen):
  ``adapt_spleen_dice_before`` / ``_after``; ``adapt_forgetting`` is the largest
  Dice drop of any class but the spleen on held-out synthetic phantoms
  (``make_abdomen_ct(vary=True)``, seeds from 300001, never trained on).
* **newclass** -- a class the model does not have: the soft-tissue sarcoma
  (``sarcoma/STS_00k/CT_mask.nii.gz``, new id 6) learned from the corrected CT
  cases STS_001..STS_00k, starting from the built-in model each time, evaluated
  on STS_008..STS_010: ``newclass_dice_after_1`` / ``_3`` / ``_7``, and
  ``newclass_minutes_7`` (wall time of the k = 7 fine-tune, this machine). Each
  case is the base model's prediction corrected into the reference (the ledger
  holds the prediction, as a worklist approval records it: the organs it labels
  in a thigh are erased); ``--no-newclass-ledger`` exports the masks alone.
  finetune's defaults for added classes apply (4 replayed phantoms, free
  weights); ``newclass_forgetting_k`` is the largest Dice drop of an old class
  on the held-out phantoms of *adapt*.
* **ordering** -- 12 abdomen phantoms in a shifted domain (non-contrast: organs
  40 HU darker; twice the default 14 HU noise, by adding 24 HU Gaussian noise),
  put in a :class:`napari_medseg.worklist.Worklist`, predicted with an entropy
  uncertainty map, and corrected (approved with the phantom's labels, the
  prediction in the ledger) one at a time, in uncertainty order and in random
  order (``--ordering-seeds`` seeds, mean). After k = 1..5 corrected cases a
  model is fine-tuned from the built-in one on them and scored (mean Dice over
  the five classes) on 4 other shifted phantoms: ``ordering_uncertainty`` and
  ``ordering_random`` (lists over k).

Everything written goes to a temporary folder (the shared data is read-only).
Run it on an otherwise idle machine for figures; the defaults are the issue's
settings, the flags make smaller runs::

    python benchmarks/bench_loop.py --json
    python benchmarks/bench_loop.py --json --scenarios ordering --ordering-cases 4 \\
        --ordering-k 2 --ordering-seeds 1 --ordering-iterations 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
MODEL = "abdomen-ct-small"
CLASSES = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "lesion"}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _predict(model, img):
    """Labels of ``model`` on ``img``, run as the Segment widget runs a whole image
    (CT models on the box around the body)."""
    return np.asarray(model.predict(img, device="cpu", overlap=0.25,
                                    crop_to_body=True).labels.data)


def _synthetic_dice(model, seeds, shape) -> dict:
    from napari_medseg.core.phantom import make_abdomen_ct

    per = {n: [] for n in CLASSES.values()}
    for s in seeds:
        img, lab = make_abdomen_ct(seed=s, shape=shape, vary=True)
        pred, ref = _predict(model, img), np.asarray(lab.data)
        for cid, name in CLASSES.items():
            if (ref == cid).any():
                per[name].append(_dice(pred == cid, ref == cid))
    return {k: round(float(np.mean(v)), 4) for k, v in per.items() if v}


def _finetune(base, ds, out, name, a, iterations, **kw):
    from napari_medseg.training.finetune import finetune

    t0 = time.perf_counter()
    kw.setdefault("lr", a.lr)
    if a.anchor is not None:
        kw.setdefault("anchor", a.anchor)
    kw.setdefault("augment", a.augment)
    path = finetune(base, ds, out_dir=out, name=name, iterations=iterations,
                    val_fraction=0, seed=a.seed, forgetting_cases=0, checkpoint_every=0,
                    batch_size=a.batch_size, **kw)
    from napari_medseg.models import load_model

    return load_model(path), time.perf_counter() - t0


# ------------------------------------------------------------------- adapt
def scenario_adapt(a, tmp: Path) -> dict:
    from napari_medseg.io import read_volume
    from napari_medseg.io.export import export_training_case
    from napari_medseg.models import load_model

    dicom, ref_path = REAL / "ct_abdomen_dicom", REAL / "ct_abdomen_dicom_labels.nii.gz"
    spleen_img, spleen_lab = REAL / "spleen_ct" / "ct.nii.gz", REAL / "spleen_ct" / "labels.nii.gz"
    if not (dicom.is_dir() and ref_path.is_file() and spleen_img.is_file()):
        return {"adapt_skipped": f"{REAL} lacks the abdominal DICOM CT or the spleen CT"}
    base = load_model(MODEL)
    img = read_volume(dicom, lazy=False)
    ref = np.asarray(read_volume(ref_path, lazy=False).data)
    y = np.zeros(ref.shape, np.uint8)
    y[ref == 5] = 1  # liver
    y[ref == 1] = 2  # spleen
    ds = tmp / "adapt" / "Dataset601_Adapt"
    export_training_case([img], img.like_labels(y, {1: "liver", 2: "spleen"}), ds)
    s_img = read_volume(spleen_img, lazy=False)
    s_ref = np.asarray(read_volume(spleen_lab, lazy=False).data) > 0
    seeds = list(range(300001, 300001 + a.synthetic_cases))
    shape = tuple(a.synthetic_shape)
    before_spleen = _dice(_predict(base, s_img) == 2, s_ref)
    synth_before = _synthetic_dice(base, seeds, shape)
    tuned, secs = _finetune(base, ds, tmp / "adapt" / "models", "adapt", a, a.adapt_iterations,
                            replay_cases=a.adapt_replay, patch_size=tuple(a.adapt_patch))
    after_pred = _predict(tuned, img)
    after_spleen = _dice(_predict(tuned, s_img) == 2, s_ref)
    synth_after = _synthetic_dice(tuned, seeds, shape)
    drops = {k: round(synth_before[k] - synth_after.get(k, 0.0), 4) for k in synth_before
             if k != "spleen"}
    ft = tuned.card.metrics["fine_tune"]
    return {
        "adapt_spleen_dice_before": round(before_spleen, 4),
        "adapt_spleen_dice_after": round(after_spleen, 4),
        "adapt_forgetting": round(max([0.0] + list(drops.values())), 4),
        "adapt_forgetting_per_class": drops,
        "adapt_synthetic_dice_before": synth_before,
        "adapt_synthetic_dice_after": synth_after,
        "adapt_train_case_dice_after": {
            "liver": round(_dice(after_pred == 1, y == 1), 4),
            "spleen": round(_dice(after_pred == 2, y == 2), 4)},
        "adapt_filled_voxels": ft.get("filled_voxels"),
        "adapt_iterations": a.adapt_iterations,
        "adapt_minutes": round(secs / 60, 2),
        "adapt_setup": (f"train: {dicom.name} (liver+spleen of the TotalSegmentator "
                        f"reference); eval: spleen_ct (manual); forgetting: "
                        f"{len(seeds)} phantoms {shape}, seeds {seeds[0]}..{seeds[-1]}"),
    }


# ---------------------------------------------------------------- newclass
def scenario_newclass(a, tmp: Path) -> dict:
    from napari_medseg.core.ledger import CorrectionLedger
    from napari_medseg.io import read_volume
    from napari_medseg.io.export import export_training_case
    from napari_medseg.models import load_model

    root = REAL / "sarcoma"
    cases = [f"STS_{i:03d}" for i in range(1, 11)]
    if not all((root / c / "CT_image.nii.gz").is_file() for c in cases):
        return {"newclass_skipped": f"{root} lacks STS_001..STS_010"}
    base = load_model(MODEL)
    new_id = base.card.n_classes
    names = {**base.card.label_names, new_id: "sarcoma"}

    def load(c):
        img = read_volume(root / c / "CT_image.nii.gz", lazy=False)
        m = np.asarray(read_volume(root / c / "CT_mask.nii.gz", lazy=False).data) > 0
        return img, m

    test = [load(c) for c in cases[7:10]]
    seeds = list(range(300001, 300001 + a.synthetic_cases))
    shape = tuple(a.synthetic_shape)
    synth_before = _synthetic_dice(base, seeds, shape)
    # the simulated annotator corrects the base model's prediction into the reference:
    # the organs it labels in a thigh are erased, the tumour painted (the ledger keeps
    # the prediction, as the worklist's approval does)
    train = {}  # case: (image, mask, base prediction), read and predicted once for every k
    out = {}
    for k in a.newclass_k:
        ds = tmp / f"newclass{k}" / "Dataset602_Sarcoma"
        for c in cases[:k]:
            if c not in train:
                img, m = load(c)
                train[c] = (img, m, _predict(base, img))
            img, m, pred = train[c]
            ledger = (CorrectionLedger(pred, img.spacing, base.card.label_names)
                      if a.newclass_ledger else None)
            export_training_case([img], img.like_labels(m.astype(np.uint8) * new_id, names),
                                 ds, ledger=ledger)
        tuned, secs = _finetune(base, ds, tmp / f"newclass{k}" / "models", f"sarcoma{k}", a,
                                a.newclass_iterations, new_classes={new_id: "sarcoma"},
                                lr=a.newclass_lr, patch_size=a.newclass_patch,
                                **_newclass_options(a))
        scores = [_dice(_predict(tuned, img) == new_id, m) for img, m in test]
        out[f"newclass_dice_after_{k}"] = round(float(np.mean(scores)), 4)
        out[f"newclass_dice_per_case_{k}"] = [round(s, 4) for s in scores]
        out[f"newclass_minutes_{k}"] = round(secs / 60, 2)
        after = _synthetic_dice(tuned, seeds, shape)
        drops = {n: round(synth_before[n] - after.get(n, 0.0), 4) for n in synth_before}
        out[f"newclass_forgetting_{k}"] = round(max([0.0] + list(drops.values())), 4)
        out[f"newclass_forgetting_per_class_{k}"] = drops
    out["newclass_synthetic_dice_before"] = synth_before
    out["newclass_iterations"] = a.newclass_iterations
    out["newclass_options"] = {"lr": a.newclass_lr, "ledger": bool(a.newclass_ledger),
                               "patch_size": a.newclass_patch,
                               **_newclass_options(a)}
    out["newclass_setup"] = ("train STS_001..STS_00k (CT + GTV mask, "
                             + ("the base prediction corrected into it" if a.newclass_ledger
                                else "no ledger: other classes from the base model")
                             + f"); eval STS_008..STS_010; forgetting: largest Dice drop of "
                             f"an old class on {len(seeds)} phantoms {shape}")
    return out


def _newclass_options(a) -> dict:
    """finetune() settings the flags override (the rest are its defaults)."""
    opts = {}
    for key in ("anchor", "early_lr_factor", "replay_cases", "replay_fraction"):
        value = getattr(a, f"newclass_{key}")
        if value is not None:
            opts[key] = value
    return opts


# ---------------------------------------------------------------- ordering
def _shifted(seed: int, shape):
    """A non-contrast-like phantom: organs 40 HU darker, twice the default noise."""
    from napari_medseg.core.phantom import make_abdomen_ct

    img, lab = make_abdomen_ct(seed=seed, shape=shape, vary=True)
    x = np.asarray(img.data, np.float32).copy()
    organs = np.asarray(lab.data) > 0
    x[organs] -= 40.0
    rng = np.random.default_rng([seed, 7])
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(24.0)
    return img.with_data(x), lab


def _mean_fg_dice(model, pairs) -> float:
    scores = []
    for img, lab in pairs:
        pred, ref = _predict(model, img), np.asarray(lab.data)
        scores.append(np.mean([_dice(pred == c, ref == c) for c in CLASSES if (ref == c).any()]))
    return round(float(np.mean(scores)), 4)


def scenario_ordering(a, tmp: Path) -> dict:
    from napari_medseg.io import write_labels, write_volume
    from napari_medseg.models import load_model
    from napari_medseg.worklist import Worklist

    base = load_model(MODEL)
    shape = tuple(a.ordering_shape)
    folder = tmp / "ordering" / "cases"
    refs = folder.parent / "references"
    folder.mkdir(parents=True)
    refs.mkdir()
    n = a.ordering_cases
    for i in range(n):
        img, lab = _shifted(400001 + i, shape)
        write_volume(folder / f"shifted{i:02d}.nii.gz", img)
        write_labels(refs / f"shifted{i:02d}.nii.gz", lab)
    evals = [_shifted(500001 + j, shape) for j in range(a.ordering_eval)]
    t0 = time.perf_counter()
    wl = Worklist(folder, annotator="simulated")
    for c in wl.cases():
        wl.predict_case(c.case_id, base, uncertainty="entropy", device="cpu", overlap=0.25)
    unc_order = [c.case_id for c in wl.ordered("uncertainty")]
    predict_seconds = time.perf_counter() - t0
    base_score = _mean_fg_dice(base, evals)
    ids = [c.case_id for c in wl.cases()]
    orders = {"uncertainty": unc_order}
    for s in range(a.ordering_seeds):
        orders[f"random{s}"] = [ids[i] for i in np.random.default_rng(s).permutation(n)]
    curves = {}
    for key, order in orders.items():
        curve = []
        # one worklist per order: the same cases and cached predictions, its own training set
        work = tmp / "ordering" / key
        shutil.copytree(folder, work / "cases", ignore=shutil.ignore_patterns(".*"))
        owl = Worklist(work / "cases", annotator="simulated")
        owl.ingest_predictions(wl.work_dir / "predictions", base.card.name)
        ds = owl.set_training_dir(work / "Dataset603_Shifted")
        for k in range(1, a.ordering_k + 1):
            case = order[k - 1]
            _approve(owl, case, refs)
            tuned, _ = _finetune(base, ds, tmp / "ordering" / key / "models", f"{key}-{k}", a,
                                 a.ordering_iterations)
            curve.append(_mean_fg_dice(tuned, evals))
            logging.getLogger("bench_loop").info("ordering %s k=%d: %.4f", key, k, curve[-1])
        curves[key] = curve
        owl.close()
    rand = [k for k in curves if k.startswith("random")]
    mean_random = [round(float(np.mean([curves[r][i] for r in rand])), 4)
                   for i in range(a.ordering_k)] if rand else []
    out = {"ordering_uncertainty": curves["uncertainty"], "ordering_random": mean_random,
           "ordering_random_per_seed": {r: curves[r] for r in rand},
           "ordering_base_dice": base_score,
           "ordering_uncertainty_order": unc_order,
           "ordering_case_uncertainty": {c.case_id: round(c.uncertainty, 5)
                                         for c in wl.cases()},
           "ordering_predict_seconds": round(predict_seconds, 1),
           "ordering_iterations": a.ordering_iterations,
           "ordering_setup": (f"{n} shifted phantoms {shape} (seeds 400001..), eval on "
                              f"{a.ordering_eval} (seeds 500001..), k=1..{a.ordering_k}, "
                              f"{a.ordering_seeds} random seed(s); mean Dice over classes")}
    if a.ordering_k >= 2 and mean_random:
        out["ordering_uncertainty_ahead_at_2"] = curves["uncertainty"][1] > mean_random[1]
    wl.close()
    return out


def _approve(wl, case_id, refs: Path) -> None:
    """The simulated annotator: the reference becomes the correction of the prediction."""
    from napari_medseg.core.ledger import CorrectionLedger
    from napari_medseg.io import read_volume

    data = wl.load_case(case_id)
    ref = read_volume(refs / f"{case_id}.nii.gz", lazy=False)
    pred = np.asarray(data["prediction"].data)
    ledger = CorrectionLedger(pred, ref.spacing, ref.label_names)
    labels = data["images"][0].like_labels(np.asarray(ref.data), ref.label_names,
                                           ref.label_colors)
    wl.claim(case_id)
    wl.add_work(case_id, seconds=0, edits=int((pred != np.asarray(ref.data)).sum() > 0))
    wl.approve(case_id, None, labels, ledger=ledger)


# -------------------------------------------------------------------- main
def main(argv=None) -> int:
    from napari_medseg.training.finetune import ANCHOR

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--scenarios", nargs="+", default=["adapt", "newclass", "ordering"],
                   choices=["adapt", "newclass", "ordering"])
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning lr (adapt, ordering)")
    p.add_argument("--newclass-lr", type=float, default=1e-3)
    p.add_argument("--anchor", type=float, default=None,
                   help=f"L2-SP pull towards the base weights in adapt and ordering "
                   f"(default: finetune's, {ANCHOR})")
    p.add_argument("--adapt-replay", type=int, default=4,
                   help="synthetic phantoms replayed against forgetting in adapt")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="fine-tune without finetune()'s default zoom, rotation and intensity "
                   "augmentation")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    p.add_argument("--adapt-iterations", type=int, default=150)
    p.add_argument("--adapt-patch", type=int, nargs=3, default=(16, 64, 64),
                   help="training window: the DICOM CT is 16 slices on the model grid, so "
                   "the card's 32 would be half padding")
    p.add_argument("--synthetic-cases", type=int, default=4)
    p.add_argument("--synthetic-shape", type=int, nargs=3, default=(64, 128, 128))
    p.add_argument("--newclass-k", type=int, nargs="+", default=[1, 3, 7])
    p.add_argument("--newclass-iterations", type=int, default=2000)
    p.add_argument("--newclass-patch", type=int, nargs=3, default=None,
                   help="training window in newclass (default: the card's)")
    p.add_argument("--newclass-anchor", type=float, default=None,
                   help="L2-SP strength in newclass (default: finetune's for new classes)")
    p.add_argument("--newclass-early-lr-factor", type=float, default=None)
    p.add_argument("--newclass-replay-cases", type=int, default=None)
    p.add_argument("--newclass-replay-fraction", type=float, default=None)
    p.add_argument("--no-newclass-ledger", dest="newclass_ledger", action="store_false",
                   help="export the sarcoma cases without the base prediction in a ledger "
                   "(labels drawn from scratch: other classes kept as the base predicts)")
    p.add_argument("--ordering-cases", type=int, default=12)
    p.add_argument("--ordering-eval", type=int, default=4)
    p.add_argument("--ordering-k", type=int, default=5)
    p.add_argument("--ordering-seeds", type=int, default=3)
    p.add_argument("--ordering-iterations", type=int, default=60)
    p.add_argument("--ordering-shape", type=int, nargs=3, default=(48, 96, 96))
    p.add_argument("--out", help="also write the JSON here after each scenario (a run cut "
                   "short keeps the scenarios it finished)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    result = {"machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        os.environ.setdefault("NAPARI_MEDSEG_HOME", str(Path(tmp) / "home"))
        for name in a.scenarios:
            t = time.perf_counter()
            result.update({"adapt": scenario_adapt, "newclass": scenario_newclass,
                           "ordering": scenario_ordering}[name](a, Path(tmp)))
            result[f"{name}_wall_seconds"] = round(time.perf_counter() - t, 1)
            if a.out:
                Path(a.out).write_text(json.dumps(result, indent=2))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_average_end"] = os.getloadavg()
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
