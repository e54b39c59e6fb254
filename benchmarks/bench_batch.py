"""Batch throughput: phantom CTs through the built-in model, one process per case vs batch.

::

    python benchmarks/bench_batch.py --json                         # 24 cases (the goal's setting)
    python benchmarks/bench_batch.py --cases 6 --shape 32 64 64 --json   # reduced

Cases are synthetic abdominal CT phantoms (``make_abdomen_ct(seed=i)``, on the
model's 2.5 x 1.5 x 1.5 mm grid, written as ``.nii.gz``). Runs, each timed from
the outside (process start and model loading included):

* ``separate``: one ``napari-medseg predict`` process per case, one after another;
* ``pool_1`` / ``pool_2``: ``napari-medseg batch`` with the local process pool
  and 1 / 2 workers;
* ``dask_1`` / ``dask_2``: ``run_batch`` on a ``dask.distributed.LocalCluster``
  with 1 / 2 worker processes (cluster start included).

``cases_per_minute`` for each; ``batch_overhead_ratio`` = ``pool_1`` wall time
over the sum of the ``separate`` wall times (goal <= 0.9: the batch saves the
per-case start-up and model loading).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL_OVERHEAD = 0.9


def make_cases(folder: Path, n: int, shape) -> list:
    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.io import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"ct{i:03d}.nii.gz"
        if not p.exists():
            img, _ = make_abdomen_ct(seed=1000 + i, shape=tuple(shape))
            write_volume(p, img.with_data(np.asarray(img.data).astype(np.int16)))
        paths.append(p)
    return paths


def _cli():
    return [sys.executable, "-m", "napari_medseg.cli"]


def run_separate(paths, out: Path, threads: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    for p in paths:
        r = subprocess.run(_cli() + ["predict", str(p), "-m", "abdomen-ct-small", "-o",
                                     str(out / p.name), "--device", "cpu"],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(r.stderr[-2000:])
    return time.perf_counter() - t0


def _env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else dict(os.environ)


def run_pool(folder: Path, out: Path, workers: int, threads=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(_cli() + ["batch", str(folder), "-m", "abdomen-ct-small", "-o",
                                 str(out), "--workers", str(workers), "--device", "cpu"],
                       capture_output=True, text=True, env=_env(threads))
    if r.returncode:
        sys.exit(r.stderr[-2000:])
    return time.perf_counter() - t0


_DASK = r"""
import sys, time
t0 = time.perf_counter()
from distributed import Client, LocalCluster
from napari_medseg.batch import run_batch
n = int(sys.argv[3])
with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                  dashboard_address=None) as lc, Client(lc) as c:
    res = run_batch(sys.argv[1], "abdomen-ct-small", sys.argv[2], client=c, progress=False)
    assert res.counts.get("done") == len(res.rows), res.counts
print(time.perf_counter() - t0)
"""


def run_dask(folder: Path, out: Path, workers: int, threads=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _DASK, str(folder), str(out), str(workers)],
                       capture_output=True, text=True, env=_env(threads))
    if r.returncode:
        sys.exit(r.stderr[-2000:])
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128))
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                     "napari_medseg_bench_batch"))
    p.add_argument("--skip-dask", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process in every run (OMP_NUM_THREADS); default: "
                   "all cores for a separate run, cores / workers for the pool, one per Dask "
                   "worker (Dask's own default). On a busy machine 1 keeps OpenMP threads "
                   "from spinning against other processes")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    folder = work / f"cases_{a.cases}_{'x'.join(map(str, a.shape))}"
    paths = make_cases(folder, a.cases, a.shape)
    threads = a.threads or max(1, os.cpu_count() or 1)
    runs = {}
    outs = work / "out"
    shutil.rmtree(outs, ignore_errors=True)
    runs["separate"] = run_separate(paths, outs / "separate", threads)
    runs["pool_1"] = run_pool(folder, outs / "pool_1", 1, a.threads)
    runs["pool_2"] = run_pool(folder, outs / "pool_2", 2, a.threads)
    if not a.skip_dask:
        runs["dask_1"] = run_dask(folder, outs / "dask_1", 1, a.threads)
        runs["dask_2"] = run_dask(folder, outs / "dask_2", 2, a.threads)
    res = {
        "cases": a.cases, "shape": list(a.shape), "reduced": a.cases != 24,
        "cpu_count": os.cpu_count(), "threads": a.threads,
        "wall_seconds": {k: round(v, 1) for k, v in runs.items()},
        "cases_per_minute": {k: round(60 * a.cases / v, 2) for k, v in runs.items()},
        "batch_overhead_ratio": round(runs["pool_1"] / runs["separate"], 3),
        "goal_batch_overhead_ratio": GOAL_OVERHEAD,
    }
    print(json.dumps(res, indent=2) if a.json else res)


if __name__ == "__main__":
    main()
