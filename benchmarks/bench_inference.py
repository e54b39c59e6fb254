"""Benchmark: our sliding-window engine against MONAI's, same network, weights and volume.

Runs each engine in its own subprocess (so peak memory is measured separately with
``ru_maxrss``) and prints one JSON object::

    python benchmarks/bench_inference.py --json                 # 256^3, 14 classes
    python benchmarks/bench_inference.py --json --quick         # small smoke test
    python benchmarks/bench_inference.py --json --image ct.nii.gz

Figures:

* ``throughput_ratio_vs_monai``: MONAI wall seconds / ours, for a DynUNet (5.6 M
  parameters), 128^3 windows, overlap 0.5, MONAI in fp32 with Gaussian blending, ours with
  its defaults (``cpu_time_ratio_vs_monai`` compares CPU seconds, steadier on a busy machine);
* ``peak_rss_ratio_vs_monai``: our peak resident memory / MONAI's (14-class output);
* ``peak_rss_gib_105_classes``: our peak with a 105-class output;
* ``dice_vs_monai``: mean Dice between the two label maps over classes with at least 100
  voxels in either (``dice_per_class`` lists them all with voxel counts), measured with
  trained weights (the built-in ``abdomen-ct-small`` model on a synthetic abdomen) when
  available.
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

import numpy as np

HERE = os.path.abspath(__file__)


# --------------------------------------------------------------------------- workers
def _dynunet(classes: int):
    import torch
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    net = DynUNet(3, 1, classes, [3] * 4, [1, 2, 2, 2], [2, 2, 2], norm_name="instance",
                  filters=[32, 64, 128, 256])
    return net.eval()


def _input(args):
    """The ``(1, Z, Y, X)`` float32 input: a file or a synthetic abdomen, normalised."""
    from napari_medseg.core.preprocess import preprocess

    if args.image:
        from napari_medseg.io import read_volume

        vol = read_volume(args.image, lazy=False)
        norm = {"kind": "ct", "window": [-200, 300]} if vol.modality == "CT" else {"kind": "mr"}
    else:
        from napari_medseg.core.phantom import make_abdomen_ct

        vol, _ = make_abdomen_ct(seed=3, shape=(args.size,) * 3, spacing=(1.5, 1.2, 1.2))
        norm = {"kind": "ct", "window": [-200, 300]}
    x, _ = preprocess(vol, normalization=norm)
    return x


def _trained_model():
    from napari_medseg.models import load_model

    return load_model("abdomen-ct-small")


def _trained_input(size):
    """A synthetic abdomen on the built-in model's grid, as its card says."""
    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.core.preprocess import preprocess

    card = _trained_model().card
    img, _ = make_abdomen_ct(seed=11, shape=(size // 2, size, size))
    x, _ = preprocess(img, card.target_spacing, card.orientation, card.normalization)
    return x


def worker(args):
    import torch

    x = np.load(args.input)  # prepared by the driver, so both engines see the same array
    if args.worker_net == "trained":
        model = _trained_model()
        net = model.make_predictor(torch.device("cpu"))
        classes = max(int(c) for c in model.card.classes) + 1
        patch = tuple(model.card.patch_size)
    else:
        classes, patch = args.classes, (args.patch,) * 3
        net = _dynunet(classes)
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    if args.worker == "monai":
        from monai.inferers import sliding_window_inference as monai_swi

        with torch.inference_mode():
            out = monai_swi(torch.from_numpy(x)[None], patch, 1, net, overlap=args.overlap,
                            mode="gaussian")
            labels = out[0].argmax(0).to(torch.uint8).numpy()
        amp, batch = "off", 1
    else:
        from napari_medseg.core.inference import sliding_window_inference

        res = sliding_window_inference(x, net, patch, classes, overlap=args.overlap,
                                       device="cpu", amp=args.amp, batch_size=args.batch)
        labels, amp, batch = res.labels, res.amp, res.batch_size
    seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
    if args.save:
        np.save(args.save, labels)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_gib": rss,
                      "amp": amp, "batch_size": batch,
                      "shape": list(x.shape), "classes": classes, "patch": list(patch)}))


# --------------------------------------------------------------------------- driver
def _spawn(args, engine, inp, net="dynunet", classes=None, save=None):
    cmd = [sys.executable, HERE, "--worker", engine, "--worker-net", net, "--input", inp,
           "--size", str(args.size), "--classes", str(classes or args.classes),
           "--patch", str(args.patch), "--overlap", str(args.overlap), "--amp", args.amp]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if save:
        cmd += ["--save", save]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dice_per_class(a, b, min_voxels=100):
    """Per-class Dice and voxel counts; the mean skips classes under ``min_voxels`` in both."""
    rows, scores = {}, []
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c == 0:
            continue
        x, y = a == c, b == c
        d = float(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
        rows[int(c)] = {"dice": round(d, 4), "ours_voxels": int(x.sum()),
                        "monai_voxels": int(y.sum())}
        if max(x.sum(), y.sum()) >= min_voxels:
            scores.append(d)
    return (float(np.mean(scores)) if scores else 1.0), rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--image", help="run on this volume instead of a synthetic abdomen")
    p.add_argument("--size", type=int, default=256, help="synthetic volume edge (voxels)")
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--amp", default="auto")
    p.add_argument("--batch", type=int, default=None,
                   help="windows per batch (default: the engine's, 1 on the CPU)")
    p.add_argument("--quick", action="store_true", help="small volume and windows")
    p.add_argument("--worker", choices=["ours", "monai"], help=argparse.SUPPRESS)
    p.add_argument("--worker-net", default="dynunet", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.worker:
        args.size, args.patch = 64, 32
    if args.worker:
        return worker(args)

    result = {"size": args.size, "patch": args.patch, "overlap": args.overlap,
              "image": args.image, "threads": None}
    import torch

    result["threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        inp, a, b = (os.path.join(tmp, f) for f in ("x.npy", "ours.npy", "monai.npy"))
        np.save(inp, _input(args))
        ours = _spawn(args, "ours", inp)
        theirs = _spawn(args, "monai", inp)
        big = _spawn(args, "ours", inp, classes=105)
        result.update({
            "ours_seconds": round(ours["seconds"], 2),
            "monai_seconds": round(theirs["seconds"], 2),
            "ours_cpu_seconds": round(ours["cpu_seconds"], 2),
            "monai_cpu_seconds": round(theirs["cpu_seconds"], 2),
            "cpu_time_ratio_vs_monai": round(theirs["cpu_seconds"] / ours["cpu_seconds"], 3),
            "ours_amp": ours["amp"],
            "ours_batch_size": ours["batch_size"],
            "throughput_ratio_vs_monai": round(theirs["seconds"] / ours["seconds"], 3),
            "ours_peak_rss_gib": round(ours["peak_rss_gib"], 3),
            "monai_peak_rss_gib": round(theirs["peak_rss_gib"], 3),
            "peak_rss_ratio_vs_monai": round(ours["peak_rss_gib"] / theirs["peak_rss_gib"], 3),
            "peak_rss_gib_105_classes": round(big["peak_rss_gib"], 3),
            "input_shape": ours["shape"],
        })
        try:
            tin = os.path.join(tmp, "trained.npy")
            np.save(tin, _trained_input(args.size))
            _spawn(args, "ours", tin, net="trained", save=a)
            _spawn(args, "monai", tin, net="trained", save=b)
            result["dice_weights"] = "built-in abdomen-ct-small on a synthetic abdomen"
        except Exception as exc:  # the built-in model is optional here
            msg = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else repr(exc)
            result["dice_weights"] = f"random DynUNet weights (built-in model unavailable: {msg})"
            c = int(args.patch * 1.5)  # a smaller crop keeps this fallback short
            np.save(inp, np.load(inp)[:, :c, :c, :c])
            _spawn(args, "ours", inp, save=a)
            _spawn(args, "monai", inp, save=b)
        mean, rows = _dice_per_class(np.load(a), np.load(b))
        result["dice_vs_monai"] = round(mean, 4)
        result["dice_per_class"] = rows
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:28s} {v}")
    return result


if __name__ == "__main__":
    main()
