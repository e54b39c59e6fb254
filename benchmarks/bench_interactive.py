"""Interactive engines: Dice after 1, 3 and 5 simulated clicks and latency per update.

Each next click goes to the centre of the largest error region (positive on a
miss, negative on a spill-over). Without ``--image`` the objects are the
labelled organs and lesions of the synthetic phantoms; the latencies are
measured on a 512 x 512 slice (2D) and on a 128^3 volume (3D). Prints JSON::

    python benchmarks/bench_interactive.py --json
    python benchmarks/bench_interactive.py --image ct.nii.gz --labels seg.nii.gz --label-id 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
from scipy import ndimage as ndi


def _objects(lab: np.ndarray, ids) -> dict:
    """The largest connected part of each label id."""
    out = {}
    for i in ids:
        cc, n = ndi.label(lab == i)
        if n:
            out[i] = cc == (np.argmax(np.bincount(cc.ravel())[1:]) + 1)
    return out


def _cases(args):
    """``[(case name, image, spacing, {object name: mask})]`` to measure Dice on."""
    if args.image:
        from napari_medseg.io import read_volume

        img = read_volume(args.image)
        lab = read_volume(args.labels)
        mask = np.asarray(lab.data) == args.label_id
        return [(os.path.basename(args.image), np.asarray(img.data, np.float32),
                 img.spacing, {f"label {args.label_id}": mask})]
    from napari_medseg.core.phantom import (ABDOMEN_LABELS, HEAD_LABELS, make_abdomen_ct,
                                            make_head_mr)

    cases = []
    for seed in range(args.seeds):
        for fn, names in ((make_abdomen_ct, ABDOMEN_LABELS), (make_head_mr, HEAD_LABELS)):
            img, lab = fn(seed=seed)
            objs = _objects(np.asarray(lab.data), names)
            cases.append((f"{fn.__name__}[{seed}]", np.asarray(img.data, np.float32),
                          img.spacing, {names[i]: m for i, m in objs.items()}))
    return cases


def _latency_volumes():
    """A 128^3 abdomen (3D updates) and a 512 x 512-slice abdomen (2D updates)."""
    from napari_medseg.core.phantom import make_abdomen_ct

    img3, lab3 = make_abdomen_ct(seed=7, shape=(128, 128, 128), spacing=(1.25, 1.5, 1.5))
    img2, lab2 = make_abdomen_ct(seed=7, shape=(24, 512, 512), spacing=(5.0, 0.5, 0.5))
    return ((np.asarray(img3.data, np.float32), img3.spacing, np.asarray(lab3.data)),
            (np.asarray(img2.data, np.float32), img2.spacing, np.asarray(lab2.data)))


def bench_engine(name: str, cases, latency, n_clicks: int, path=None) -> dict:
    """Dice curve and latencies of one engine."""
    from napari_medseg.interactive import make_engine
    from napari_medseg.interactive.simulate import simulate_clicks

    engine = make_engine(name, path)
    curves, per_object, curves_2d = [], {}, []
    for case, image, spacing, objs in cases:
        for obj, mask in objs.items():
            run = simulate_clicks(engine, image, spacing, mask, n_clicks=n_clicks)
            curves.append(run.dice)
            per_object[f"{case}/{obj}"] = [round(d, 3) for d in run.dice]
            run2 = simulate_clicks(engine, image, spacing, mask, n_clicks=n_clicks, mode="2d")
            curves_2d.append(run2.dice)
    curves = np.array(curves)
    t3, t2 = [], []
    (im3, sp3, lab3), (im2, sp2, lab2) = latency
    for i in (1, 3, 4):  # liver, kidneys: objects inside the 128^3 volume
        objs = _objects(lab3, [i])
        if i in objs:
            t3 += simulate_clicks(engine, im3, sp3, objs[i], n_clicks=n_clicks).seconds[1:]
        objs = _objects(lab2, [i])
        if i in objs:
            t2 += simulate_clicks(engine, im2, sp2, objs[i], n_clicks=n_clicks,
                                  mode="2d").seconds[1:]
    out = {f"dice_at_{k}": round(float(curves[:, k - 1].mean()), 4)
           for k in (1, 3, 5) if k <= n_clicks}
    out.update({f"dice_2d_at_{k}": round(float(np.array(curves_2d)[:, k - 1].mean()), 4)
                for k in (1, 5) if k <= n_clicks})
    out["objects_dice_ge_0.85_at_5"] = int((curves[:, -1] >= 0.85).sum())
    out["objects"] = int(len(curves))
    out["latency_2d_ms_p50"] = round(1000 * float(np.median(t2)), 1) if t2 else None
    out["latency_3d_ms_p50"] = round(1000 * float(np.median(t3)), 1) if t3 else None
    out["per_object"] = per_object
    out["per_object_dice_at_5"] = {k: v[min(4, len(v) - 1)] for k, v in per_object.items()}
    out["goals"] = _goals(out, curves)
    return out


#: Issue goals on 2 CPU cores: Dice after 5 clicks, latency per update (ms).
GOALS = {"dice_at_5": 0.85, "latency_2d_ms": 50.0, "latency_3d_ms": 500.0}


def _goals(out: dict, curves: np.ndarray) -> dict:
    """Which goals an engine reaches: mean and every object's Dice after 5
    clicks, and the median 2D / 3D update latencies."""
    last = curves[:, min(4, curves.shape[1] - 1)]
    t2, t3 = out["latency_2d_ms_p50"], out["latency_3d_ms_p50"]
    return {"dice_at_5": bool(last.mean() >= GOALS["dice_at_5"]),
            "every_object_dice_at_5": bool((last >= GOALS["dice_at_5"]).all()),
            "latency_2d": t2 is not None and t2 <= GOALS["latency_2d_ms"],
            "latency_3d": t3 is not None and t3 <= GOALS["latency_3d_ms"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="JSON only (the default output)")
    p.add_argument("--image", help="an image file; with --labels and --label-id")
    p.add_argument("--labels", help="reference label file on the image's grid")
    p.add_argument("--label-id", type=int, default=1)
    p.add_argument("--engine", nargs="+", default=["classical", "click model"])
    p.add_argument("--path", default=None, help="checkpoint / model folder for the engine")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1, help="phantoms per kind")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = p.parse_args(argv)
    if a.image and not a.labels:
        p.error("--image needs --labels")
    logging.basicConfig(level=logging.WARNING)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cases = _cases(a)
    latency = _latency_volumes()
    result = {"engines": {}, "clicks": a.clicks, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count()}
    for name in a.engine:
        result["engines"][name] = bench_engine(name, cases, latency, a.clicks, a.path)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
