"""A volume bigger than memory through the built-in model, labels streamed to OME-Zarr.

::

    python benchmarks/bench_bigvolume.py --json                 # 1024^3 uint16 at 0.5 mm (heavy)
    python benchmarks/bench_bigvolume.py --size 384 --json      # reduced

The input is a synthetic abdominal CT phantom made on a coarse grid and
nearest-upsampled chunk by chunk into a ``size^3`` uint16 Zarr store (HU + 1024)
at 0.5 mm; it is made once and reused from ``--workdir`` (default: a folder in
the system temp directory). The run happens in a child process whose peak
resident size (``VmHWM``, torch and the model included) is ``peak_rss_gib``;
the input alone is ``2 * size^3`` bytes.

Correctness: the streamed labels are compared voxel for voxel with
:meth:`Model.predict` on the same volume loaded whole in memory
(``labels_equal_in_memory``; the card's largest-component step is off in both,
since the lazy path skips it) when the volume is small enough for that
(``--check-max`` voxels per axis, default 512). The lazy path reads the store
in pieces (two input slices per model-grid slice, the labels written one slab
of chunks at a time), so this is the comparison with a run on the volume cut
in pieces, made against the strictest reference: the uncut volume.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL_PEAK_GIB = 1.5


def make_volume(path: Path, size: int, spacing: float = 0.5) -> Path:
    """A ``size^3`` uint16 OME-Zarr CT phantom at ``spacing`` mm (HU + 1024), made once."""
    import dask.array as da

    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.core.volume import Volume
    from napari_medseg.io.zarr import write_zarr_image

    if path.exists():
        return path
    fov = size * spacing
    coarse_n = (64, 128, 128)
    img, _ = make_abdomen_ct(seed=7, shape=coarse_n,
                             spacing=tuple(fov / n for n in coarse_n))
    small = (np.asarray(img.data) + 1024).clip(0, 65535).astype(np.uint16)
    idx = [np.minimum((np.arange(size) * n) // size, n - 1) for n in coarse_n]
    chunk = 128

    def block(block_info=None):
        loc = block_info[None]["array-location"]
        return small[np.ix_(*[i[a:b] for i, (a, b) in zip(idx, loc)])]

    lazy = da.map_blocks(block, chunks=((chunk,) * (size // chunk) + ((size % chunk,)
                                                                       if size % chunk else ()),) * 3,
                         dtype=np.uint16)
    vol = Volume(lazy, _rescaled(img.affine, spacing), modality="CT")
    write_zarr_image(path, vol, chunks=(chunk, chunk, chunk))
    return path


def _rescaled(affine, spacing):
    out = np.array(affine, float)
    for n in range(3):
        col = out[:3, n]
        out[:3, n] = col / np.linalg.norm(col) * spacing
    return out


_CHILD = r"""
import json, sys, time
import dask.array as da
import numpy as np
from napari_medseg.bigvolume import predict_to_zarr
from napari_medseg.core.volume import Volume
from napari_medseg.io.zarr import read_zarr
from napari_medseg.models import load_model
import dataclasses
src, out, overlap = sys.argv[1], sys.argv[2], float(sys.argv[3])
slab_rows = int(sys.argv[4]) if sys.argv[4] != "auto" else None
m = load_model("abdomen-ct-small")
m.card = dataclasses.replace(m.card, postprocessing={})
v = read_zarr(src)
hu = Volume(v.data.astype(np.int16) - np.int16(1024), v.affine, modality="CT", source=src)
t = time.perf_counter()
info = predict_to_zarr(m, hu, out, device="cpu", overwrite=True, overlap=overlap,
                       slab_rows=slab_rows)
wall = time.perf_counter() - t
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"seconds": wall, "peak_rss_bytes": hwm, "windows": info["windows"],
                  "model_grid": info["model_grid"], "slabs": info.get("slabs")}))
"""

_CHECK = r"""
import json, sys, dataclasses
import numpy as np
from napari_medseg.core.volume import Volume
from napari_medseg.io.zarr import read_zarr
from napari_medseg.models import load_model
src, out, mode, pieces = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
overlap = float(sys.argv[5])
m = load_model("abdomen-ct-small")
m.card = dataclasses.replace(m.card, postprocessing={})
v = read_zarr(src)
got = np.asarray(read_zarr(out).data)
if mode == "memory":
    data = np.asarray(v.data).astype(np.int16) - np.int16(1024)
    ref = m.predict(Volume(data, v.affine, modality="CT"), device="cpu",
                    overlap=overlap).labels.data
    print(json.dumps({"equal": bool(np.array_equal(ref, got)),
                      "differing": int(np.count_nonzero(ref != got))}))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="voxels per axis")
    p.add_argument("--spacing", type=float, default=0.5, help="mm")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                     "napari_medseg_bench_bigvolume"))
    p.add_argument("--check-max", type=int, default=512,
                   help="compare with an in-memory run up to this size")
    p.add_argument("--overlap", type=float, default=0.5,
                   help="window overlap (0.25: the fast mode's, a third of the windows)")
    p.add_argument("--slab-rows", default="auto",
                   help="model-grid slices per slab (default: about 64 MiB of float32; a "
                   "large number runs the whole grid at once, as before slabs)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"ct_{a.size}_{a.spacing:g}mm.ome.zarr"
    t = time.perf_counter()
    made = not src.exists()
    make_volume(src, a.size, a.spacing)
    make_s = time.perf_counter() - t
    out = work / f"labels_{a.size}.ome.zarr"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), str(a.overlap),
                        str(a.slab_rows)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    run = json.loads(r.stdout.strip().splitlines()[-1])
    res = {
        "size": a.size, "spacing_mm": a.spacing, "input_gib": 2 * a.size ** 3 / 2 ** 30,
        "reduced": a.size != 1024, "volume_made_seconds": round(make_s, 1) if made else 0.0,
        "seconds": round(run["seconds"], 1), "windows": run["windows"],
        "overlap": a.overlap, "model_grid": run["model_grid"], "slabs": run["slabs"],
        "peak_rss_gib": round(run["peak_rss_bytes"] / 2 ** 30, 3),
        "goal_peak_rss_gib": GOAL_PEAK_GIB,
    }
    if a.size <= a.check_max:
        c = subprocess.run([sys.executable, "-c", _CHECK, str(src), str(out), "memory", "1",
                            str(a.overlap)], capture_output=True, text=True)
        if c.returncode == 0:
            chk = json.loads(c.stdout.strip().splitlines()[-1])
            res["labels_equal_in_memory"] = chk["equal"]
            res["labels_differing_voxels"] = chk["differing"]
        else:
            res["labels_equal_in_memory"] = f"error: {c.stderr[-300:]}"
    print(json.dumps(res, indent=2) if a.json else res)


if __name__ == "__main__":
    main()
