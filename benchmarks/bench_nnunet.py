"""Benchmark: nnU-Net v2 folders through nnUNetPredictor and through the plugin's engine.

Each network runs through ``nnUNetPredictor`` (CPU, fp32 as nnU-Net runs on a CPU)
and through the native backend (:mod:`napari_medseg.models.nnunet_native`, its
defaults: bf16 on CPUs with AVX512-BF16 / AMX), each in its own subprocess so
peak memory (``ru_maxrss``) is measured separately; same input array, step 0.5,
no mirroring. Prints one JSON object::

    python benchmarks/bench_nnunet.py --json                  # the issue's sizes (long on 2 cores)
    python benchmarks/bench_nnunet.py --json --size reduced   # smaller volumes and windows
    python benchmarks/bench_nnunet.py --json --size quick     # smoke test

Networks (folders built in a temporary directory; nothing is downloaded):

* ``trained``: a 4-stage PlainConvUNet (16-128 features) from nnU-Net plans,
  trained here for ``--train-steps`` Adam steps on synthetic abdomen phantoms
  (``make_abdomen_ct(vary=True)``, nnU-Net's CT normalisation), with two of
  nnU-Net's training rules: a third of the patches centred on a voxel of a
  class present in the case (its foreground oversampling, so the small organs
  are seen) and its poly learning-rate decay to zero (so the last steps settle
  the logits). A plain training loop, not nnU-Net's trainer (nnU-Net's 5-epoch
  trainer, ``benchmarks/train_nnunet_phantom.py``, needs its raw / preprocessed
  dataset folders and more than an hour on 2 cores). One step at full size (one
  64 x 128 x 128 patch, fp32, one thread, huge pages) takes about 3 s on a free
  core.
* ``totalseg-part``: TotalSegmentator-shaped 1.5 mm part network (6 stages,
  32-320 features, 25 outputs), random weights.
* ``totalseg-fast``: the 3 mm 117-class shape (6 stages, 32-320 features, 118
  outputs), random weights.

Figures (per network, and the headline ones for ``trained``):

* ``throughput_ratio_vs_nnunet``: nnU-Net wall seconds / ours for the prediction
  call (model loading excluded); goal >= 3;
* ``peak_rss_ratio_vs_nnunet``: our peak resident memory / nnU-Net's (whole
  process, imports included, ``VmHWM``; ``..._above_baseline`` subtracts each process's
  resident size after loading); goal <= 0.5;
* ``dice_vs_nnunet``: mean Dice between the two label maps over the foreground
  classes with at least 100 voxels in the two together (``voxels_per_class``
  gives each engine's counts); meaningful for ``trained`` (goal >= 0.99); for
  the random-weight networks it is labelled ``random_weights_agreement``;
* ``totalseg_fast_seconds``: ours only, a CT NIfTI (512 x 512 x 300 at full
  size) through the ``total-fast`` task of a TotalSegmentator weights folder
  holding the 3 mm 117-class random-weight network, from reading the file to
  writing the labels file (model loading included; goal <= 30 s on 2 cores).

Importing ``napari_medseg`` sets ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU
allocator then backs large blocks with transparent huge pages; see
``napari_medseg._ask_for_huge_pages``), so our worker runs with it. nnU-Net's
worker runs as nnU-Net does by default, without it (``THP_MEM_ALLOC_ENABLE=0``,
although it imports a helper from ``napari_medseg``); ``--nnunet-thp`` gives it
the same setting. Each worker reports its setting as ``thp``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), os.pardir))

SIZES = {  # volume (z, y, x), patches, totalseg-fast CT shape (z, y, x)
    "full": {"volume": (200, 256, 256), "trained_patch": (64, 128, 128),
             "ts_patch": (128, 128, 128), "fast_ct": (300, 512, 512), "train_steps": 160},
    "reduced": {"volume": (100, 128, 128), "trained_patch": (32, 64, 64),
                "ts_patch": (64, 64, 64), "fast_ct": (150, 256, 256), "train_steps": 120},
    "quick": {"volume": (40, 64, 64), "trained_patch": (16, 32, 32),
              "ts_patch": (32, 32, 32), "fast_ct": (60, 96, 96), "train_steps": 10},
}
CT_SPACING = (2.5, 1.2, 1.2)  # (z, y, x) mm of the benchmark volume
FAST_SPACING = (1.5, 0.8, 0.8)  # of the totalseg-fast CT


# --------------------------------------------------------------------------- folders
def _arch(features, patch):
    n = len(features)
    strides = [[1, 1, 1]]
    size = list(patch)
    for _ in range(n - 1):
        s = [2 if v >= 8 else 1 for v in size]
        strides.append(s)
        size = [v // t for v, t in zip(size, s)]
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(features),
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
            "strides": strides, "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _write_folder(root, dataset, names, spacing, patch, features, trainer, fingerprint,
                  weights_fn):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    rs = "resample_data_or_seg_to_shape"
    plans = {
        "dataset_name": dataset, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [128, 128, 128], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": fingerprint},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [128] * 3,
            "spacing": list(spacing), "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": rs, "resampling_fn_seg": rs,
            "resampling_fn_probabilities": rs,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                          "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                         "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": _arch(features, patch), "batch_dice": False}},
    }
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
    ds = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
          "file_ending": ".nii.gz"}
    folder = Path(root) / dataset / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(ds))
    cm = PlansManager(plans).get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, len(labels),
                                 deep_supervision=False)
    steps = weights_fn(net) if weights_fn else 0
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer,
                "inference_allowed_mirroring_axes": None, "current_epoch": steps,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": ds}},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _ct_fingerprint(img, lab):
    fg = np.asarray(img.data)[np.asarray(lab.data) > 0]
    return {"max": float(fg.max()), "min": float(fg.min()), "mean": float(fg.mean()),
            "median": float(np.median(fg)), "std": float(fg.std()),
            "percentile_00_5": float(np.percentile(fg, 0.5)),
            "percentile_99_5": float(np.percentile(fg, 99.5))}


def _trained_folder(root, cfg, log):
    """A small 3d_fullres model trained briefly on phantoms (see module notes)."""
    import torch

    from napari_medseg.core.phantom import make_abdomen_ct

    patch = cfg["trained_patch"]
    spacing = (2.0, 1.5, 1.5)
    shape = tuple(int(round(v * s / t)) for v, s, t in zip(cfg["volume"], CT_SPACING, spacing))
    cases = [make_abdomen_ct(seed=100 + i, shape=shape, spacing=spacing, vary=True)
             for i in range(3)]
    fp = _ct_fingerprint(*cases[0])
    names = [n for _, n in sorted(cases[0][1].label_names.items())]
    k = len(names) + 1

    def train(net):
        rng = np.random.default_rng(0)
        xs = [np.clip(np.asarray(img.data, np.float32), fp["percentile_00_5"],
                      fp["percentile_99_5"]) for img, _ in cases]
        xs = [(x - fp["mean"]) / max(fp["std"], 1e-8) for x in xs]
        ys = [np.asarray(lab.data, np.int64) for _, lab in cases]
        # nnU-Net's class locations: up to 10,000 voxels of each class per case
        locs = []
        for y in ys:
            d = {}
            for c in range(1, k):
                idx = np.argwhere(y == c)
                if len(idx):
                    d[c] = idx[rng.choice(len(idx), min(len(idx), 10000), replace=False)]
            locs.append(d)
        steps = cfg["train_steps"]
        opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
        # nnU-Net's PolyLRScheduler: lr * (1 - step / steps) ** 0.9
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / steps) ** 0.9)
        weights = torch.ones(k)
        weights[0] = 0.3
        net.train()
        t0 = time.perf_counter()
        for step in range(steps):
            i = rng.integers(len(xs))
            shape = xs[i].shape
            if locs[i] and rng.random() < 0.33:
                # nnU-Net's foreground oversampling (oversample_foreground_percent 0.33):
                # a class present in the case, one of its voxels, the patch around it
                c = list(locs[i])[int(rng.integers(len(locs[i])))]
                v = locs[i][c][int(rng.integers(len(locs[i][c])))]
                st = [int(min(max(int(q) - p // 2, 0), max(n - p, 0)))
                      for q, n, p in zip(v, shape, patch)]
            else:
                st = [int(rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(shape, patch)]
            sl = tuple(slice(s, s + p) for s, p in zip(st, patch))
            x = torch.from_numpy(np.ascontiguousarray(xs[i][sl]))[None, None]
            y = torch.from_numpy(np.ascontiguousarray(ys[i][sl]))[None]
            out = net(x)
            loss = torch.nn.functional.cross_entropy(out, y, weight=weights)
            p = out.softmax(1)
            oh = torch.nn.functional.one_hot(y, k).permute(0, 4, 1, 2, 3).float()
            dice = (2 * (p * oh).sum((0, 2, 3, 4)) + 1) / (p.sum((0, 2, 3, 4))
                                                         + oh.sum((0, 2, 3, 4)) + 1)
            loss = loss + (1 - dice[1:]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 20 == 0:
                log(f"  train step {step}: loss {loss.item():.3f} "
                    f"({time.perf_counter() - t0:.0f} s)")
        net.eval()
        return steps

    return _write_folder(root, "Dataset901_PhantomAbdomen", names, spacing, patch,
                         [16, 32, 64, 128], "nnUNetTrainer", fp, train), k


_TS_FP = {"max": 3000.0, "min": -1024.0, "mean": 92.0, "median": 78.0, "std": 185.0,
          "percentile_00_5": -970.0, "percentile_99_5": 1100.0}


def _ts_folder(root, name, n_out, spacing, patch, trainer):
    names = [f"class_{i}" for i in range(1, n_out)]
    return _write_folder(root, name, names, spacing, patch, [32, 64, 128, 256, 320, 320],
                         trainer, _TS_FP, None)


def _ct_volume(shape, spacing, seed=3):
    from napari_medseg.core.phantom import make_abdomen_ct

    img, _ = make_abdomen_ct(seed=seed, shape=shape, spacing=spacing)
    return img


# --------------------------------------------------------------------------- workers
def _rss_gib():
    """Peak resident size of this process (GiB): ``VmHWM``, which starts afresh at exec.

    (``ru_maxrss`` does not: a worker started by a large parent reports the parent's
    size, so after the in-process training both workers showed the parent's 2.67 GiB.)
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _nnunet_predictor(folder):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from napari_medseg.models.nnunet import load_checkpoint

    folder = Path(folder)
    pm = PlansManager(json.loads((folder / "plans.json").read_text()))
    ds = json.loads((folder / "dataset.json").read_text())
    cm = pm.get_configuration("3d_fullres")
    ck = load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1,
                                 pm.get_label_manager(ds).num_segmentation_heads,
                                 allow_init=False, deep_supervision=False)
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                        perform_everything_on_device=False, device=torch.device("cpu"),
                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    # manual_initialization: nnU-Net's folder loader searches every trainer module first
    p.manual_initialization(net, pm, cm, [ck["network_weights"]], ds, ck["trainer_name"], None)
    return p


def worker(args):
    if args.threads:
        import torch

        torch.set_num_threads(int(args.threads))
    if args.worker == "totalseg-fast":
        t0 = time.perf_counter()
        from napari_medseg.io import read_volume, write_labels
        from napari_medseg.models import load_model

        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        vol = read_volume(args.input, lazy=False)
        model = load_model("total-fast")
        pred = model.predict(vol, device="cpu")
        write_labels(args.save, pred.labels, overwrite=True)
        print(json.dumps({"seconds": time.perf_counter() - t0, "import_seconds": t_import,
                          "peak_rss_gib": _rss_gib(), "amp": pred.info.get("amp"),
                          "windows": pred.info.get("windows"), "shape": list(vol.shape3)}))
        return
    x = np.load(args.input)
    spacing = [float(v) for v in args.spacing.split(",")]
    if args.worker == "nnunet":
        p = _nnunet_predictor(args.folder)
        base = _rss_gib()
        t0, c0 = time.perf_counter(), _cpu()
        labels = p.predict_single_npy_array(x, {"spacing": spacing})
        amp = "off"
    else:
        from napari_medseg.models.nnunet import load_nnunet

        model = load_nnunet(args.folder)
        model.native_network("cpu")
        base = _rss_gib()
        t0, c0 = time.perf_counter(), _cpu()
        res = model.run_array(x, spacing, device="cpu", overlap=0.5, tta=False)
        labels, amp = res.labels, res.info["amp"]
    seconds, cpu_seconds = time.perf_counter() - t0, _cpu() - c0
    np.save(args.save, np.asarray(labels, np.uint8))
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_gib": _rss_gib(),
                      "baseline_rss_gib": base, "amp": amp,
                      "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))


# --------------------------------------------------------------------------- driver
THREADS = None
NNUNET_THP = False


def _spawn(kind, **kw):
    cmd = [sys.executable, HERE, "--worker", kind]
    if THREADS:
        cmd += ["--threads", str(THREADS)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ)
    if kind == "nnunet":  # as nnU-Net runs unless asked (see the module notes)
        env["THP_MEM_ALLOC_ENABLE"] = "1" if NNUNET_THP else "0"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dice(a, b, min_voxels=100):
    out = {}
    for c in sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}):
        pa, pb = a == c, b == c
        n = int(pa.sum() + pb.sum())
        if n >= min_voxels:
            out[int(c)] = 2.0 * float((pa & pb).sum()) / n
    return out


def _compare(tmp, name, folder, x, spacing, log):
    inp = os.path.join(tmp, f"{name}_x.npy")
    np.save(inp, x)
    runs = {}
    for engine in ("nnunet", "ours"):
        log(f"{name}: {engine} ...")
        runs[engine] = _spawn(engine, folder=folder, input=inp, spacing=",".join(map(str, spacing)),
                              save=os.path.join(tmp, f"{name}_{engine}.npy"))
        log(f"  {runs[engine]}")
    a = np.load(os.path.join(tmp, f"{name}_ours.npy"))
    b = np.load(os.path.join(tmp, f"{name}_nnunet.npy"))
    d = _dice(a, b)
    n, o = runs["nnunet"], runs["ours"]
    return {
        "nnunet": n, "ours": o,
        "throughput_ratio_vs_nnunet": n["seconds"] / o["seconds"],
        "cpu_time_ratio_vs_nnunet": n["cpu_seconds"] / o["cpu_seconds"],
        "peak_rss_ratio_vs_nnunet": o["peak_rss_gib"] / n["peak_rss_gib"],
        "peak_rss_ratio_vs_nnunet_above_baseline":
            (o["peak_rss_gib"] - o["baseline_rss_gib"])
            / max(n["peak_rss_gib"] - n["baseline_rss_gib"], 1e-6),
        "mean_dice": float(np.mean(list(d.values()))) if d else None,
        "dice_per_class": d, "voxels_equal": float((a == b).mean()),
        # voxels per label value (0 = background), to see which classes the mean leaves out
        "voxels_per_class": {"nnunet": np.bincount(b.ravel()).tolist(),
                             "ours": np.bincount(a.ravel()).tolist()},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--size", choices=list(SIZES), default="full")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--trained-folder", default=None,
                    help="an nnU-Net result folder trained by nnU-Net itself (e.g. by "
                    "benchmarks/train_nnunet_phantom.py) to use as the 'trained' network "
                    "instead of the plain training loop")
    ap.add_argument("--skip", default="", help="comma list of: trained,part,fast,totalseg")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each worker (default: torch's own); on a busy "
                         "machine 1 avoids OpenMP threads spinning against other processes")
    ap.add_argument("--nnunet-thp", action="store_true",
                    help="let nnU-Net's worker use transparent huge pages too "
                         "(THP_MEM_ALLOC_ENABLE=1, as importing napari_medseg sets for ours)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    for k in ("folder", "input", "spacing", "save"):
        ap.add_argument(f"--{k}", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    global THREADS, NNUNET_THP
    THREADS = args.threads
    NNUNET_THP = args.nnunet_thp
    # the phantom model trains in this process: importing napari_medseg before torch's
    # first allocation gives it transparent huge pages (0.75x the step time here)
    import napari_medseg  # noqa: F401

    if THREADS:  # the training of the phantom model runs in this process
        import torch

        torch.set_num_threads(THREADS)
    cfg = dict(SIZES[args.size])
    if args.train_steps is not None:
        cfg["train_steps"] = args.train_steps
    skip = set(filter(None, args.skip.split(",")))

    def log(msg):
        if not args.json:
            print(msg, flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)

    result = {"size": args.size, "threads": args.threads, "volume": list(cfg["volume"]),
              "volume_spacing": CT_SPACING,
              "step": 0.5, "mirroring": False, "cpu_threads": os.cpu_count(),
              "nnunet_thp": NNUNET_THP,
              "note": ("reduced sizes (not the issue's 256 x 256 x 200 / 512 x 512 x 300)"
                       if args.size != "full" else "the issue's sizes"),
              "networks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        x = np.asarray(_ct_volume(cfg["volume"], CT_SPACING).data, np.float32)[None]
        if "trained" not in skip:
            t0 = time.perf_counter()
            if args.trained_folder:
                folder = Path(args.trained_folder)
                log(f"trained network: {folder}")
            else:
                log(f"training the phantom model ({cfg['train_steps']} steps) ...")
                folder, _ = _trained_folder(os.path.join(tmp, "res"), cfg, log)
            r = _compare(tmp, "trained", folder, x, CT_SPACING, log)
            if args.trained_folder:
                r["trained_by"] = f"nnU-Net ({folder.name})"
            else:
                r["train_steps"] = cfg["train_steps"]
                r["train_seconds"] = time.perf_counter() - t0
            result["networks"]["trained"] = r
            result["throughput_ratio_vs_nnunet"] = r["throughput_ratio_vs_nnunet"]
            result["peak_rss_ratio_vs_nnunet"] = r["peak_rss_ratio_vs_nnunet"]
            result["dice_vs_nnunet"] = r["mean_dice"]
        for key, name, dataset, n_out, mm in (
                ("part", "totalseg-part", "Dataset291_TSPartShape", 25, 1.5),
                ("fast", "totalseg-fast", "Dataset297_TSFastShape", 118, 3.0)):
            if key in skip:
                continue
            folder = _ts_folder(os.path.join(tmp, "res"), dataset, n_out, (mm,) * 3,
                                cfg["ts_patch"], "nnUNetTrainerNoMirroring")
            r = _compare(tmp, name, folder, x, CT_SPACING, log)
            r["random_weights_agreement"] = r.pop("mean_dice")
            result["networks"][name] = r
        if "totalseg" not in skip:
            from napari_medseg.io import write_volume

            home = Path(tmp) / "tshome"
            _ts_folder(home / "nnunet" / "results",
                       "Dataset297_TotalSegmentator_total_3mm_1559subj", 118, (3.0, 3.0, 3.0),
                       cfg["ts_patch"], "nnUNetTrainer_4000epochs_NoMirroring")
            ct = _ct_volume(cfg["fast_ct"], FAST_SPACING, seed=5)
            path = os.path.join(tmp, "ct.nii.gz")
            write_volume(path, ct)
            del ct
            log("total-fast file to file ...")
            env = dict(os.environ, TOTALSEG_HOME_DIR=str(home))
            env.pop("TOTALSEG_WEIGHTS_PATH", None)
            cmd = [sys.executable, HERE, "--worker", "totalseg-fast", "--input", path,
                   "--save", os.path.join(tmp, "seg.nii.gz")]
            if THREADS:
                cmd += ["--threads", str(THREADS)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            log(f"  {r}")
            result["totalseg_fast"] = dict(r, ct_shape=list(cfg["fast_ct"]),
                                           ct_spacing=FAST_SPACING, patch=list(cfg["ts_patch"]))
            result["totalseg_fast_seconds"] = r["seconds"]
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
