"""Fine-tuning from corrections: time per iteration and held-out Dice before/after.

Exports synthetic abdomen CT cases with a systematic correction (the right
kidney relabelled as ``kidney_left``: one "kidney" class) through the real
nnU-Net exporter (with the phantom's labels standing in for the model's
original prediction in the correction ledger), fine-tunes a model on them on the CPU and prints JSON::

    python benchmarks/bench_finetune.py --model abdomen-ct-small --cases 4 --iterations 100
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(folder: Path, n: int, shape, spacing) -> Path:
    """``n`` corrected phantom cases exported as an nnU-Net raw dataset."""
    from napari_medseg.core.ledger import CorrectionLedger
    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.io.export import export_training_case

    for i in range(n):
        img, lab = make_abdomen_ct(seed=500 + i, shape=shape, spacing=spacing, vary=True)
        y = np.asarray(lab.data).copy()
        y[y == 4] = 3
        ledger = CorrectionLedger(np.asarray(lab.data), lab.spacing, lab.label_names)
        export_training_case([img], lab.with_data(y), folder, ledger=ledger)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="abdomen-ct-small")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128))
    p.add_argument("--spacing", type=float, nargs=3, default=(2.5, 1.5, 1.5))
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from napari_medseg.models.loaders import read_package_card
    from napari_medseg.training.finetune import finetune

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = make_dataset(tmp / "Dataset501_Bench", a.cases, tuple(a.shape), tuple(a.spacing))
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = finetune(a.model, data, out_dir=tmp / "models", iterations=a.iterations,
                        lr=a.lr, val_fraction=0.25, seed=0)
        seconds = time.perf_counter() - t0
        card = read_package_card(path)
    m = card.metrics
    print(json.dumps({
        "model": a.model, "cases": a.cases, "case_shape": list(a.shape),
        "iterations": a.iterations, "lr": a.lr, "torch_threads": torch.get_num_threads(),
        "export_seconds": round(t_export, 1), "finetune_seconds": round(seconds, 1),
        "loss_first": m["fine_tune"]["loss_first"], "loss_last": m["fine_tune"]["loss_last"],
        "held_out": m["fine_tune"]["held_out_cases"],
        "seconds_per_iteration": round(seconds / a.iterations, 2),
        "dice_before": m.get("dice_before"), "dice_after": m.get("dice"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
