"""Dice of an abdominal CT model on the shared real scans (``../shared/realdata``).

Usage::

    python benchmarks/eval_real_builtin.py [MODEL] [--weights W.pt] [--synthetic N]
        [--write-card] [--json]

``MODEL`` is a registry name or a package folder (default: the built-in
``abdomen-ct-small``). ``--weights`` evaluates a training checkpoint (weights
only) with the card :func:`napari_medseg.training.train_builtin_synth.make_card` writes,
in a temporary package. ``--synthetic N`` adds the mean Dice on the first ``N``
held-out synthetic abdomens (``train_builtin_synth.HELD_OUT_SEEDS``). ``--write-card``
writes both into the package's ``card.yaml`` as ``metrics.synthetic`` and
``metrics.real``. The scans and references:

* ``ct_abdomen_dicom/`` (portal-venous upper abdomen, 20 slices of 0.98 x 0.98 x 2 mm)
  against ``ct_abdomen_dicom_labels.nii.gz`` (TotalSegmentator's output, not a manual
  annotation): liver, spleen, stomach, pancreas, aorta, inferior vena cava.
* ``spleen_ct/ct.nii.gz`` against ``spleen_ct/labels.nii.gz`` (manual spleen).

The model runs as ``napari-medseg predict`` and the Segment widget run it (with
``crop_to_body``). Only the classes the model has and the reference labels are scored. Prints
``{case: {class: Dice}}``; the folder missing prints ``{}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"

#: TotalSegmentator ids (``labels.json``) of the classes a built-in model may have.
TOTALSEG_IDS = {"liver": 5, "spleen": 1, "stomach": 6, "pancreas": 7, "aorta": 52,
                "inferior_vena_cava": 63}


def real_cases(root: Path = REALDATA) -> list[dict]:
    """The shared real abdominal CTs: ``[{case, image, labels, ids, reference}]``."""
    out = []
    dicom = root / "ct_abdomen_dicom"
    if dicom.is_dir():
        out.append({"case": "ct_abdomen_dicom", "image": dicom,
                    "labels": root / "ct_abdomen_dicom_labels.nii.gz", "ids": TOTALSEG_IDS,
                    "reference": "TotalSegmentator output (ct_abdomen_dicom_labels.nii.gz)"})
    spleen = root / "spleen_ct"
    if spleen.is_dir():
        out.append({"case": "spleen_ct", "image": spleen / "ct.nii.gz",
                    "labels": spleen / "labels.nii.gz", "ids": {"spleen": 1},
                    "reference": "manual spleen (Medical Segmentation Decathlon)"})
    return out


def real_dice(model, root: Path = REALDATA, cases=None, crop_to_body: bool = True,
              tta=None) -> dict:
    """``{case: {class name: Dice}}`` of ``model`` (a loaded Model) on the real scans.

    ``crop_to_body`` runs the model as ``napari-medseg predict`` and the Segment
    widget do (the air around the body is left out, labels there are 0). ``tta``
    is :meth:`Model.predict`'s (``None``: the card's default).
    """
    from napari_medseg.io import read_volume

    names = {n: c for c, n in model.card.label_names.items()}
    res = {}
    for case in cases or real_cases(root):
        img = read_volume(case["image"], lazy=False)
        ref = np.asarray(read_volume(case["labels"], lazy=False).data)
        ref = np.rint(ref).astype(np.int64)
        pred = np.asarray(model.predict(img, crop_to_body=crop_to_body,
                                        tta=tta).labels.data)
        if pred.shape != ref.shape:
            raise RuntimeError(f"{case['case']}: prediction {pred.shape} vs reference "
                               f"{ref.shape}")
        d = {}
        for name, rid in case["ids"].items():
            if name not in names:
                continue
            a, b = pred == names[name], ref == rid
            s = int(a.sum()) + int(b.sum())
            d[name] = round(2.0 * int((a & b).sum()) / s, 4) if s else float("nan")
        res[case["case"]] = d
    return res


def card_metrics(synthetic: dict | None, real: dict, n_synthetic: int) -> dict:
    """The ``metrics`` mapping of a card (see :mod:`napari_medseg.models.card`):
    ``real`` (one entry per scan, shown first) and ``synthetic``."""
    from napari_medseg.training.train_builtin_synth import HELD_OUT_SEEDS

    refs = {c["case"]: c for c in real_cases()}
    out = {"real": [{"scans": [case], "reference": refs[case]["reference"], "dice": d,
                     "note": NOTES.get(case, "")} for case, d in real.items()]}
    if synthetic is not None:
        out["synthetic"] = {"dice": synthetic, "held_out": {
            "cases": n_synthetic, "seeds": list(HELD_OUT_SEEDS[:n_synthetic]),
            "generator": "synthetic phantom make_abdomen_ct_synth(seed), 96 x 160 x 200 "
                         "voxels of 2.5 x 2 x 2 mm, anatomies never used in training",
            "pipeline": "load_model + Model.predict (resample, sliding window, restore)"}}
    return out


NOTES = {
    "ct_abdomen_dicom": "upper-abdomen portal-venous DICOM CT of ../shared/realdata (20 "
                        "slices, 0.98 x 0.98 x 2 mm); kidneys and lesions are not in the "
                        "reference. Run as napari-medseg predict runs it (the air around the "
                        "body left out). Measured by python benchmarks/eval_real_builtin.py",
    "spleen_ct": "Medical Segmentation Decathlon spleen crop of ../shared/realdata (164 x 166 "
                 "x 26, 0.8 x 0.8 x 5 mm); only the spleen is labelled",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="abdomen-ct-small")
    p.add_argument("--weights", type=Path, default=None,
                   help="weights of a training checkpoint (train_builtin's card)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="also score this many held-out synthetic cases")
    p.add_argument("--write-card", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror test-time augmentation on / off (default: the card's)")
    p.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="sliding-window size on the model grid instead of the card's "
                        "(how much the figures depend on the inference window)")
    a = p.parse_args(argv)
    import tempfile

    import torch

    from napari_medseg.models import load_model
    from napari_medseg.training import train_builtin_synth as train_builtin

    torch.set_num_threads(a.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if a.weights is not None:
            path = train_builtin.write_package(a.weights, Path(tmp) / "pkg")
        model = load_model(path)
        if a.patch:
            if a.write_card:
                raise SystemExit("--write-card measures the card's own window: drop --patch")
            model.card.patch_size = list(a.patch)
        res = real_dice(model, tta=a.tta)
        syn = None
        if a.synthetic:
            syn = train_builtin.evaluate_synthetic(
                model, train_builtin.HELD_OUT_SEEDS[:a.synthetic])
        if a.write_card:
            if a.weights is not None:
                raise SystemExit("--write-card needs a package folder, not --weights")
            from napari_medseg.models.card import ModelCard

            card_path = Path(path) / "card.yaml"
            card = ModelCard.load(card_path)
            metrics = card_metrics(syn, res, a.synthetic)
            if syn is None and (card.metrics or {}).get("synthetic"):
                metrics["synthetic"] = card.metrics["synthetic"]  # keep what training wrote
            card.metrics = metrics
            card.save(card_path)
    if a.json:
        print(json.dumps({"real_dice": res, "synthetic": syn}))
    else:
        for case, d in res.items():
            print(case, d)
        if syn is not None:
            print("synthetic", syn)
        print(f"{time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
