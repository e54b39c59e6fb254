"""Train a small nnU-Net v2 3d_fullres model on phantom CTs with one of nnU-Net's short trainers.

::

    python benchmarks/train_nnunet_phantom.py --workdir /tmp/nnunet_phantom
    F=/tmp/nnunet_phantom/nnUNet_results/Dataset901_PhantomAbdomen
    python benchmarks/bench_nnunet.py --json --trained-folder \\
        $F/nnUNetTrainer_5epochs__nnUNetPlans__3d_fullres

nnU-Net's own pipeline end to end: a raw dataset of ``--cases`` varied abdomen
phantoms (``make_abdomen_ct(vary=True)``, ``.nii.gz``, ``channel_names`` CT),
``nnUNetv2_plan_and_preprocess`` (fingerprint, plans, preprocessing), then
nnU-Net's trainer (what ``nnUNetv2_train DATASET 3d_fullres 0 -tr TRAINER`` runs;
default ``nnUNetTrainer_5epochs``: 5 epochs of 250 iterations, nnU-Net's
augmentation, its validation at the end). To fit a 2-core CPU, the planned network is
narrowed before training (``--feature-divisor``: features per stage divided,
at least 4) and the patch capped at ``--max-patch`` (kept divisible by the
network's strides); everything else is nnU-Net's plan. Torch compilation is
off (``nnUNet_compile=f``) and augmentation runs in the main process
(``nnUNet_n_proc_DA=0`` for the training; the planner takes its torch threads
from that variable, so it gets 2). Prints one JSON line: the result folder, seconds
per stage, the plan used and nnU-Net's own validation Dice.

Status: on the shared 2-core development machine (load average about 8, two
other training runs) the raw dataset, nnU-Net's planning and preprocessing
(about a minute) and the start of training ran, but the first of the five
epochs had not finished after 16 minutes, so the run was stopped; the
``dice_vs_nnunet`` figure of ``bench_nnunet.py`` therefore still comes from
its plain training loop. Run it where a few free cores or a GPU are
available (``--device cuda`` for a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), os.pardir))

DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_PhantomAbdomen"


def write_raw(raw: Path, n: int, shape, spacing) -> Path:
    """nnU-Net's raw layout (imagesTr / labelsTr / dataset.json) from phantoms."""
    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.io import write_labels, write_volume

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    names = {}
    for i in range(n):
        img, lab = make_abdomen_ct(seed=100 + i, shape=tuple(shape), spacing=tuple(spacing),
                                   vary=True)
        write_volume(folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz",
                     img.with_data(np.asarray(img.data, np.int16)), overwrite=True)
        write_labels(folder / "labelsTr" / f"case_{i:03d}.nii.gz", lab, overwrite=True)
        names = lab.label_names
    ds = {"channel_names": {"0": "CT"},
          "labels": {"background": 0, **{str(v): int(k) for k, v in sorted(names.items())}},
          "numTraining": n, "file_ending": ".nii.gz", "name": "PhantomAbdomen",
          "description": "napari-medseg synthetic abdomen phantoms (make_abdomen_ct, vary)",
          "licence": "BSD-3-Clause"}
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
    return folder


def shrink_plans(plans_path: Path, divisor: int, max_patch) -> dict:
    """Narrow the 3d_fullres network and cap its patch in nnU-Net's plans file (in place)."""
    plans = json.loads(plans_path.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = [max(4, int(f) // divisor) for f in kw["features_per_stage"]]
    total = np.prod(np.asarray(kw["strides"], int), axis=0)  # downsampling per axis
    patch = []
    for p, cap, t in zip(cfg["patch_size"], max_patch, total):
        p = min(int(p), int(cap))
        patch.append(max(int(t), p // int(t) * int(t)))
    cfg["patch_size"] = patch
    plans_path.write_text(json.dumps(plans, indent=2))
    return {"patch_size": patch, "features_per_stage": kw["features_per_stage"],
            "spacing": cfg["spacing"], "n_stages": kw["n_stages"],
            "batch_size": cfg["batch_size"]}


_TRAIN = r"""
import sys, importlib, pkgutil, torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
import nnunetv2.training.nnUNetTrainer.variants.training_length as lengths
dataset, name, device = sys.argv[1], sys.argv[2], sys.argv[3]
cls = None
for m in pkgutil.iter_modules(lengths.__path__):
    mod = importlib.import_module(f"{lengths.__name__}.{m.name}")
    cls = getattr(mod, name, cls)
if cls is None:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as cls
    assert name == "nnUNetTrainer", f"trainer {name} not found"
pre = join(nnUNet_preprocessed, dataset)
plans = dict(load_json(join(pre, "nnUNetPlans.json")), continue_training=False)
trainer = cls(plans=plans, configuration="3d_fullres",
              fold=0, dataset_json=load_json(join(pre, "dataset.json")),
              device=torch.device(device))
trainer.run_training()
trainer.perform_actual_validation(False)
"""


def _run(cmd, env, log):
    t0 = time.perf_counter()
    log(" ".join(cmd))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{cmd[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/nnunet_phantom")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 96, 96))
    ap.add_argument("--spacing", type=float, nargs=3, default=(2.5, 2.0, 2.0))
    ap.add_argument("--trainer", default="nnUNetTrainer_5epochs")
    ap.add_argument("--feature-divisor", type=int, default=4)
    ap.add_argument("--max-patch", type=int, nargs=3, default=(32, 64, 64))
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    env = dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"),
               nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_compile="f",
               nnUNet_n_proc_DA="0")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    bindir = Path(sys.executable).parent
    times = {}
    t0 = time.perf_counter()
    write_raw(work / "nnUNet_raw", a.cases, a.shape, a.spacing)
    times["raw_dataset"] = time.perf_counter() - t0
    times["plan_and_preprocess"], _ = _run(
        [str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c",
         "3d_fullres", "-np", "1", "-npfp", "1"],
        dict(env, nnUNet_n_proc_DA="2"), log)  # its planner sets torch threads from this
    plan = shrink_plans(work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json",
                        a.feature_divisor, a.max_patch)
    log(f"plan: {plan}")
    # what ``nnUNetv2_train DATASET 3d_fullres 0 -tr TRAINER -device DEVICE`` does, with the
    # trainer imported by name: nnU-Net's search through every trainer module imports
    # optional ones (its Primus trainers need timm / torchvision)
    times["train"], _ = _run([sys.executable, "-c", _TRAIN, DATASET, a.trainer, a.device],
                             env, log)
    folder = work / "nnUNet_results" / DATASET / f"{a.trainer}__nnUNetPlans__3d_fullres"
    summary = folder / "fold_0" / "validation" / "summary.json"
    dice = None
    if summary.is_file():
        s = json.loads(summary.read_text())
        dice = {"mean": s.get("foreground_mean", {}).get("Dice"),
                "per_class": {k: v.get("Dice") for k, v in s.get("mean", {}).items()}}
    print(json.dumps({"folder": str(folder), "trainer": a.trainer, "cases": a.cases,
                      "shape": list(a.shape), "spacing": list(a.spacing), "plan": plan,
                      "seconds": {k: round(v, 1) for k, v in times.items()},
                      "nnunet_validation_dice": dice}))


if __name__ == "__main__":
    main()
