"""Interactive engines: Dice after 1, 3 and 5 simulated clicks and latency per update.

Each next click goes to the centre of the largest error (positive on a miss,
negative on a spill-over). Without ``--image`` or ``--real`` the objects are
the labelled organs and lesions of the synthetic phantoms; the latencies are
measured on a 512 x 512 slice (2D) and on a 128^3 volume (3D), both phantoms.

Protocols: ``clicks`` (a first click, then corrective clicks: 5 interactions),
``box+clicks`` (a 2D box around the reference on its largest axial slice,
then 5 corrective clicks: 6 interactions) and ``scribble+clicks`` (a stroke
painted along the reference's medial axis on that slice, then 5 corrective
clicks: 6 interactions; JSON keys ``real_scribble_*``).

``--real DIR`` runs the objects of the real-scan folder (``../shared/realdata``:
abdominal CT organs, bones and muscles, sarcomas in CT, MR and PET, BraTS
tumours, aseg brain structures; see :data:`REAL_CASES`) with both protocols;
there each next click goes to the deepest voxel of the largest connected error
region (the CVPR 2025 interactive 3D challenge's rule). For an engine that
offers several region sizes for a first click (the click model; the widget's W
key), ``real_dice_at_1_by_size`` is the Dice after the first click in each,
and ``real_dice_at_1_best_size`` the mean over objects of the best of them (a
user who steps through the sizes until the answer looks right). Prints JSON::

    python benchmarks/bench_interactive.py --json
    python benchmarks/bench_interactive.py --protocol box+clicks --engine classical
    python benchmarks/bench_interactive.py --real ../shared/realdata --engine classical
    python benchmarks/bench_interactive.py --real ../shared/realdata --protocol scribble+clicks
    python benchmarks/bench_interactive.py --real ../shared/realdata --groups ct_organ \
        --max-per-group 3
    python benchmarks/bench_interactive.py --image ct.nii.gz --labels seg.nii.gz --label-id 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

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


def _percentiles(seconds) -> dict:
    """Median and 95th percentile of update times (ms)."""
    if not len(seconds):
        return {"p50": None, "p95": None}
    ms = 1000 * np.asarray(seconds)
    return {"p50": round(float(np.median(ms)), 1), "p95": round(float(np.percentile(ms, 95)), 1)}


def latencies(engine, latency, n_clicks: int) -> dict:
    """Update latencies (ms, p50 and p95) of clicks 2.. on phantom organs inside
    a 128^3 volume (3D) and on a 512 x 512 slice (2D)."""
    from napari_medseg.interactive.simulate import simulate_clicks

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
    p3, p2 = _percentiles(t3), _percentiles(t2)
    return {"latency_2d_ms_p50": p2["p50"], "latency_2d_ms_p95": p2["p95"],
            "latency_3d_ms_p50": p3["p50"], "latency_3d_ms_p95": p3["p95"]}


def bench_engine(name: str, cases, latency, n_clicks: int, path=None,
                 protocol: str = "clicks") -> dict:
    """Dice curve and latencies of one engine on the phantoms (or one image)."""
    from napari_medseg.errors import MedSegError
    from napari_medseg.interactive import make_engine
    from napari_medseg.interactive.simulate import simulate_clicks

    engine = make_engine(name, path)
    first = _first_prompt(protocol)
    curves, per_object, curves_2d = [], {}, []
    try:
        for case, image, spacing, objs in cases:
            for obj, mask in objs.items():
                run = simulate_clicks(engine, image, spacing, mask, n_clicks=n_clicks,
                                      **first)
                curves.append(run.dice)
                per_object[f"{case}/{obj}"] = [round(d, 3) for d in run.dice]
                run2 = simulate_clicks(engine, image, spacing, mask, n_clicks=n_clicks,
                                       mode="2d", **first)
                curves_2d.append(run2.dice)
    except MedSegError as exc:
        if protocol == "clicks":
            raise
        what = protocol.split("+")[0]
        return {"protocol": protocol, f"{what}_supported": False,
                "error": f"{name} cannot take a {what} prompt: {exc}"}
    curves = np.array(curves)
    # interaction k of the box (scribble) protocol is the box plus k - 1 clicks
    out = {"protocol": protocol, "interactions": int(curves.shape[1])}
    off = int(protocol != "clicks")
    out.update({f"dice_at_{k}": round(float(curves[:, k - 1 + off].mean()), 4)
                for k in (1, 3, 5) if k + off <= curves.shape[1]})
    out.update({f"dice_2d_at_{k}": round(float(np.array(curves_2d)[:, k - 1 + off].mean()), 4)
                for k in (1, 5) if k + off <= curves.shape[1]})
    out["objects_dice_ge_0.85_at_5"] = int((curves[:, -1] >= 0.85).sum())
    out["objects"] = int(len(curves))
    out.update(latencies(engine, latency, n_clicks))
    out["per_object"] = per_object
    out["per_object_dice_at_5"] = {k: v[-1] for k, v in per_object.items()}
    out["goals"] = _goals(out, curves)
    return out


#: Issue goals on 2 CPU cores: Dice after 5 clicks, latency per update (ms).
GOALS = {"dice_at_5": 0.85, "latency_2d_ms": 50.0, "latency_3d_ms": 300.0,
         "real_dice_at_5": 0.85, "real_group_dice_at_5": 0.80, "real_box_dice_at_5": 0.88,
         "real_regressions": 0.05}


def _goals(out: dict, curves: np.ndarray) -> dict:
    """Which goals an engine reaches: mean and every object's Dice after 5
    clicks, and the median 2D / 3D update latencies."""
    last = curves[:, -1]
    t2, t3 = out["latency_2d_ms_p50"], out["latency_3d_ms_p50"]
    return {"dice_at_5": bool(last.mean() >= GOALS["dice_at_5"]),
            "every_object_dice_at_5": bool((last >= GOALS["dice_at_5"]).all()),
            "latency_2d": t2 is not None and t2 <= GOALS["latency_2d_ms"],
            "latency_3d": t3 is not None and t3 <= GOALS["latency_3d_ms"]}


# ------------------------------------------------------------------- real scans
#: Label ids of the aseg brain structures measured (FreeSurfer colour table).
ASEG = {4: "left_lateral_ventricle", 43: "right_lateral_ventricle", 10: "left_thalamus",
        49: "right_thalamus", 11: "left_caudate", 50: "right_caudate", 12: "left_putamen",
        51: "right_putamen", 17: "left_hippocampus", 53: "right_hippocampus",
        8: "left_cerebellar_cortex", 47: "right_cerebellar_cortex", 16: "brain_stem"}
CT_ORGANS = (5, 1, 6, 7, 52, 63, 64, 20)  # liver spleen stomach pancreas aorta IVC PV/SV colon
CT_BONE_MUSCLE = (32, 33, 86, 87)  # vertebrae T12, T11, autochthon left / right
MIN_VOXELS = 300


def _ct_names(root) -> dict:
    try:
        return {int(k): v for k, v in json.loads((root / "labels.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def real_cases(root) -> list:
    """The cases of the real-scan folder: ``[(case, image path, labels path,
    [(group, object name, selector)])]``; a selector is a label id or ``">0"``
    (every label). Paths that do not exist are left out."""
    root = Path(root)
    names = _ct_names(root)
    cases = [("ct_abdomen", root / "ct_abdomen_dicom", root / "ct_abdomen_dicom_labels.nii.gz",
              [("ct_organ", names.get(i, str(i)), i) for i in CT_ORGANS]
              + [("ct_bone_muscle", names.get(i, str(i)), i) for i in CT_BONE_MUSCLE]),
             ("spleen_ct", root / "spleen_ct" / "ct.nii.gz",
              root / "spleen_ct" / "labels.nii.gz", [("ct_organ", "spleen", ">0")])]
    for d in sorted((root / "sarcoma").glob("STS_*")):
        for mod, group in (("CT", "ct_tumour"), ("MR_T1", "mr_tumour"), ("PET", "pet_tumour")):
            cases.append((f"{d.name}_{mod}", d / f"{mod}_image.nii.gz", d / f"{mod}_mask.nii.gz",
                          [(group, "sarcoma", ">0")]))
    for d in sorted((root / "brats").glob("brats_*")):
        cases.append((d.name, d / "T1c_subtrMeanDivStd.nii.gz", d / "OTMultiClass.nii.gz",
                      [("mr_tumour", "whole_tumour", ">0"), ("mr_tumour", "enhancing_tumour", 4)]))
    cases.append(("brain_t1_aseg", root / "brain_t1_aseg" / "t1.nii.gz",
                  root / "brain_t1_aseg" / "labels.nii.gz",
                  [("mr_brain_structure", n, i) for i, n in ASEG.items()]))
    return [c for c in cases if c[1].exists() and c[2].exists()]


def _load(image_path, labels_path):
    from napari_medseg.io import read_volume

    img = read_volume(image_path)
    lab = read_volume(labels_path, is_label=True)
    labels = np.rint(np.asarray(lab.data, np.float32)).astype(np.int32)
    image = np.asarray(img.data, np.float32)
    if image.shape != labels.shape:
        raise ValueError(f"{labels_path} is {labels.shape}, its image {image.shape}")
    return image, tuple(float(v) for v in img.spacing), labels


def _curve_stats(curves: list) -> dict:
    """Final Dice, mean Dice over the interactions and regressions of curves."""
    if not curves:
        return {"dice_final": None, "auc": None, "regressions": None}
    arr = np.array(curves)
    drops = np.diff(arr, axis=1) < -0.01
    return {"dice_final": round(float(arr[:, -1].mean()), 4),
            "auc": round(float(arr.mean()), 4),
            "regressions": round(float(drops.mean()), 4) if drops.size else 0.0}


#: The real-scan protocols and the prefix of their JSON keys; the first
#: prompt of the last two (a 2D box, a painted stroke) counts as an interaction.
PROTOCOLS = {"clicks": "", "box+clicks": "box_", "scribble+clicks": "scribble_"}


def _first_prompt(protocol: str) -> dict:
    """:func:`simulate_clicks` keywords for the protocol's first prompt."""
    return {"box": protocol == "box+clicks", "scribble": protocol == "scribble+clicks"}


def _refuses(engine, image, spacing, truth, proto: str) -> str:
    """Why ``engine`` refuses the first prompt of ``proto`` alone ("" when it
    takes it, or for the clicks protocol)."""
    from napari_medseg.errors import MedSegError
    from napari_medseg.interactive import Prompts
    from napari_medseg.interactive.simulate import box_around, scribble_along

    if proto == "clicks":
        return ""
    if proto == "box+clicks":
        what, prompts = "a box", Prompts(boxes=box_around(truth)[0][None])
    else:
        what, prompts = "a scribble", Prompts(scribbles=scribble_along(truth, spacing)[0])
    try:
        engine.predict_region(image, spacing, prompts)
    except MedSegError as exc:
        return f"{engine.name} cannot take {what} prompt: {exc}"
    return ""


def _training_image_paths(root) -> set:
    """Resolved paths of the real images whose pixels (never labels) the click
    model may see in training (:data:`~napari_medseg.training.pseudo_objects.TRAINING_IMAGES`)."""
    from napari_medseg.training.pseudo_objects import TRAINING_IMAGES

    return {(Path(root) / rel).resolve() for rel, _ in TRAINING_IMAGES}


def _split(objects: dict, protocols) -> dict:
    """Final Dice on objects of images never seen in training and of the others."""
    out = {}
    for key, seen in (("held_out_images", False), ("images_seen_in_training", True)):
        recs = [r for r in objects.values() if r.get("image_in_training") is seen
                and "skipped" not in r]
        d = {"n": len(recs)}
        for proto, prefix in PROTOCOLS.items():
            vals = [r[proto][-1] for r in recs if proto in protocols and proto in r]
            if vals:
                d[f"{prefix}dice_at_5"] = round(float(np.mean(vals)), 4)
        out[key] = d
    return out


def _first_click_sizes(engine, image, spacing, truth, known: float) -> list | None:
    """Dice after the protocol's first click in each region size the engine
    offers (the widget's W key), or None when it offers none; ``known`` is the
    clicks protocol's own first Dice, at the engine's current size."""
    from napari_medseg.interactive import Prompts
    from napari_medseg.interactive.simulate import dice, next_click

    sizes = getattr(engine, "first_sizes_mm", ())
    if len(sizes) < 2:
        return None
    click = next_click(np.zeros_like(truth), truth, spacing, rule="largest")[0]
    keep = engine.first_size
    out = []
    try:
        for k in range(len(sizes)):
            if k == keep:
                out.append(known)
                continue
            engine.first_size = k
            out.append(round(dice(engine.predict(image, spacing,
                                                 Prompts(positive=[click])), truth), 4))
    finally:
        engine.first_size = keep
    return out


def bench_real(name: str, root, protocols, n_clicks: int = 5, path=None, groups=None,
               max_per_group: int = 0, latency=None, log=None) -> dict:
    """One engine on the objects of the real-scan folder ``root``.

    Every object runs through each protocol in ``protocols`` (``"clicks"``,
    ``"box+clicks"``, ``"scribble+clicks"``); an object that fails records its
    error and scores Dice 0 (a crash is a failure for the user); an engine that
    refuses boxes or scribbles is reported as such (no figures for that
    protocol).
    """
    from napari_medseg.errors import MedSegError
    from napari_medseg.interactive import make_engine
    from napari_medseg.interactive.simulate import simulate_clicks

    engine = make_engine(name, path)
    seen = _training_image_paths(root)
    taken: dict = {}
    objects: dict = {}
    refused: dict = {}
    for case, ipath, lpath, objs in real_cases(root):
        objs = [o for o in objs if (not groups or o[0] in groups)
                and (not max_per_group or taken.get(o[0], 0) < max_per_group)]
        if not objs:
            continue
        try:
            image, spacing, labels = _load(ipath, lpath)
        except Exception as exc:  # a broken file must not stop the run
            for group, obj, _ in objs:
                objects[f"{case}/{obj}"] = {"group": group, "error": f"loading: {exc!r}"}
            continue
        for group, obj, sel in objs:
            if max_per_group and taken.get(group, 0) >= max_per_group:
                continue
            truth = labels > 0 if sel == ">0" else labels == sel
            key = f"{case}/{obj}"
            rec = {"group": group, "voxels": int(truth.sum()),
                   "image_in_training": Path(ipath).resolve() in seen}
            objects[key] = rec
            if rec["voxels"] < MIN_VOXELS:
                rec["skipped"] = f"fewer than {MIN_VOXELS} voxels"
                continue
            taken[group] = taken.get(group, 0) + 1
            for proto in protocols:
                if proto not in refused:
                    refused[proto] = _refuses(engine, image, spacing, truth, proto)
                if refused[proto]:
                    continue
                t0 = time.perf_counter()
                try:
                    run = simulate_clicks(engine, image, spacing, truth, n_clicks=n_clicks,
                                          rule="largest", **_first_prompt(proto))
                    rec[proto] = [round(d, 4) for d in run.dice]
                    rec.setdefault("seconds", {})[proto] = round(time.perf_counter() - t0, 2)
                except MedSegError as exc:
                    rec.setdefault("errors", {})[proto] = str(exc)
                except Exception as exc:  # one object must not kill the run
                    rec.setdefault("errors", {})[proto] = repr(exc)
            if "clicks" in protocols and "clicks" in rec:
                rec["first_click_by_size"] = _first_click_sizes(engine, image, spacing, truth,
                                                                rec["clicks"][0])
            if log:
                log(f"{key}: " + json.dumps({k: v for k, v in rec.items() if k != "group"}))
    return summarise_real(name, objects, protocols, n_clicks, refused, engine, latency)


def summarise_real(name, objects, protocols, n_clicks, refused, engine, latency) -> dict:
    """The JSON keys of a real-scan run (``refused``: why the engine refused a
    protocol's first prompt, by protocol)."""
    out = {"engine": name, "protocols": list(protocols), "click_rule": "largest error region",
           "objects_measured": 0}
    per_group: dict = {}
    for proto, key in PROTOCOLS.items():
        if proto not in protocols:
            continue
        if refused.get(proto):
            out[f"real_{key}dice_at_5"] = None
            out[f"{key}protocol"] = refused[proto]
            continue
        length = n_clicks + int(proto != "clicks")
        curves = []
        for rec in objects.values():
            if "skipped" in rec or "error" in rec and "voxels" not in rec:
                continue
            c = rec.get(proto)
            if c is None and proto in rec.get("errors", {}):
                c = [0.0] * length  # a crash scores 0
            if c is None:
                continue
            curves.append(c)
            per_group.setdefault(rec["group"], {}).setdefault(proto, []).append(c[-1])
        st = _curve_stats(curves)
        out[f"real_{key}dice_at_5"] = st["dice_final"]
        out[f"real_{key}dsc_auc"] = st["auc"]
        out[f"real_{key}regressions"] = st["regressions"]
        out["objects_measured"] = max(out["objects_measured"], len(curves))
    sized = [r["first_click_by_size"] for r in objects.values()
             if r.get("first_click_by_size")]
    if sized:  # one click, then W until the region size looks right
        arr = np.array(sized)
        mm = getattr(engine, "first_sizes_mm", ())
        out["real_dice_at_1_by_size"] = {f"{m:g}mm": round(float(v), 4)
                                         for m, v in zip(mm, arr.mean(0))}
        out["real_dice_at_1_best_size"] = round(float(arr.max(1).mean()), 4)
    out["real_groups"] = {}
    for g, v in sorted(per_group.items()):
        d = {"n": max(len(c) for c in v.values())}
        for proto, key in PROTOCOLS.items():
            if proto in v:
                d[f"{key}dice_at_5"] = round(float(np.mean(v[proto])), 4)
        out["real_groups"][g] = d
    out["real_split"] = _split(objects, protocols)
    out["real_errors"] = {k: r.get("errors", r.get("error")) for k, r in objects.items()
                          if "errors" in r or "error" in r}
    if latency is not None:
        out.update(latencies(engine, latency, n_clicks))
    out["real_objects"] = objects
    g = out["real_groups"]
    out["goals"] = {
        "real_dice_at_5": (out.get("real_dice_at_5") or 0) >= GOALS["real_dice_at_5"],
        "every_group_dice_at_5": bool(g) and all(v.get("dice_at_5", 0) >= GOALS[
            "real_group_dice_at_5"] for v in g.values()),
        "real_box_dice_at_5": (out.get("real_box_dice_at_5") or 0) >= GOALS[
            "real_box_dice_at_5"],
        "real_regressions": out.get("real_regressions") is not None
        and out["real_regressions"] <= GOALS["real_regressions"],
        "latency_3d": (out.get("latency_3d_ms_p50") or np.inf) <= GOALS["latency_3d_ms"],
        "latency_2d": (out.get("latency_2d_ms_p50") or np.inf) <= GOALS["latency_2d_ms"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="JSON only (the default output)")
    p.add_argument("--image", help="an image file; with --labels and --label-id")
    p.add_argument("--labels", help="reference label file on the image's grid")
    p.add_argument("--label-id", type=int, default=1)
    p.add_argument("--real", metavar="DIR",
                   help="the real-scan folder (../shared/realdata): its objects, both "
                        "protocols, the default engine unless --engine is given")
    p.add_argument("--protocol", choices=[*PROTOCOLS, "both", "all"], default=None,
                   help="clicks: 5 clicks; box+clicks: a 2D box then 5 clicks; "
                        "scribble+clicks (with --real): a stroke along the object's "
                        "medial axis on its largest axial slice, then 5 clicks; both: the "
                        "first two; all: the three (default: clicks on phantoms, both "
                        "with --real)")
    p.add_argument("--groups", nargs="+", default=None,
                   help="with --real: only these groups (ct_organ ct_bone_muscle ct_tumour "
                        "mr_tumour pet_tumour mr_brain_structure)")
    p.add_argument("--max-per-group", type=int, default=0,
                   help="with --real: at most this many objects per group (0: all)")
    p.add_argument("--no-latency", action="store_true", help="with --real: skip latencies")
    p.add_argument("--log", default=None, help="with --real: append one line per object here")
    p.add_argument("--engine", nargs="+", default=None,
                   help="engine names (default: classical and click model on phantoms, "
                        "the default engine with --real)")
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
    if a.engine is None:
        from napari_medseg import interactive

        a.engine = ([getattr(interactive, "DEFAULT_ENGINE", "classical")] if a.real
                    else ["classical", "click model"])
    result = {"engines": {}, "clicks": a.clicks, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count()}
    latency = None if a.real and a.no_latency else _latency_volumes()
    both = ["clicks", "box+clicks"]
    protocols = {None: both if a.real else ["clicks"], "both": both,
                 "all": list(PROTOCOLS)}.get(a.protocol, [a.protocol])
    if a.real:
        log = None
        if a.log:
            def log(line, _path=a.log):
                with open(_path, "a") as fh:
                    fh.write(line + "\n")
        result["real"] = os.path.abspath(a.real)
        for name in a.engine:
            result["engines"][name] = bench_real(name, a.real, protocols, a.clicks, a.path,
                                                 a.groups, a.max_per_group, latency, log)
    else:
        cases = _cases(a)
        for name in a.engine:
            for proto in protocols:
                key = name if len(protocols) == 1 else f"{name} ({proto})"
                result["engines"][key] = bench_engine(name, cases, latency, a.clicks, a.path,
                                                      proto)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
