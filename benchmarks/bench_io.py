"""Read / write speed of napari_medseg.io against plain nibabel and tifffile.

A ``(300, 512, 512)`` int16 volume (a CT-sized stack) is written and read as
NIfTI ``.nii.gz`` and TIFF, by napari-medseg and by the plain library doing the
same job in the same run; each figure is also given as a ratio (ours / plain).
Also timed: a lazy open of the uncompressed TIFF (memory map) and of a
zlib-compressed TIFF (dask), which do not read the voxels.

Run by hand::

    python benchmarks/bench_io.py --json
    python benchmarks/bench_io.py --json --shape 64 256 256 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile

from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.io import read_volume, write_volume


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _volume(shape):
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (0.4 * shape[1]) ** 2
    data = np.where(body, 40, -1000).astype(np.int16) + (z % 7).astype(np.int16)
    data += rng.integers(-20, 20, size=shape, dtype=np.int16)
    return Volume(data, make_affine((1.0, 0.7, 0.7), (-180.0, -180.0, -300.0),
                                    np.diag([-1.0, -1.0, 1.0])), modality="CT")


def _fresh(path: Path):
    if path.exists():
        path.unlink()


def bench(shape, repeat, folder: Path) -> dict:
    vol = _volume(shape)
    out: dict = {"shape": list(shape), "dtype": "int16", "repeat": repeat,
                 "megabytes": round(vol.data.nbytes / 2**20, 1)}

    # NIfTI .nii.gz
    ours, plain = folder / "ours.nii.gz", folder / "plain.nii.gz"

    def w_ours():
        _fresh(ours)
        write_volume(ours, vol)

    def w_plain():
        _fresh(plain)
        img = nib.Nifti1Image(vol.data.T, vol.affine)
        img.set_qform(vol.affine, code=1)
        nib.save(img, str(plain))

    t_wo, t_wp = _best(w_ours, repeat), _best(w_plain, repeat)
    t_ro = _best(lambda: np.asarray(read_volume(ours, lazy=False).data), repeat)
    t_rp = _best(lambda: np.asanyarray(nib.load(str(plain)).dataobj).T, repeat)
    out["nifti_gz"] = {"write_s": t_wo, "write_nibabel_s": t_wp, "write_ratio": t_wo / t_wp,
                       "read_s": t_ro, "read_nibabel_s": t_rp, "read_ratio": t_ro / t_rp}

    # TIFF (uncompressed)
    ours, plain = folder / "ours.tif", folder / "plain.tif"

    def tw_ours():
        _fresh(ours)
        write_volume(ours, vol)

    def tw_plain():
        _fresh(plain)
        tifffile.imwrite(plain, vol.data, photometric="minisblack")

    t_wo, t_wp = _best(tw_ours, repeat), _best(tw_plain, repeat)
    t_ro = _best(lambda: np.asarray(read_volume(ours, lazy=False).data), repeat)
    t_rp = _best(lambda: tifffile.imread(plain), repeat)
    t_lazy = _best(lambda: read_volume(ours, lazy=True), repeat)
    comp = folder / "zlib.tif"
    tifffile.imwrite(comp, vol.data, photometric="minisblack", compression="zlib",
                     compressionargs={"level": 1})
    t_lazy_c = _best(lambda: read_volume(comp, lazy=True), repeat)
    out["tiff"] = {"write_s": t_wo, "write_tifffile_s": t_wp, "write_ratio": t_wo / t_wp,
                   "read_s": t_ro, "read_tifffile_s": t_rp, "read_ratio": t_ro / t_rp,
                   "lazy_open_s": t_lazy, "lazy_open_zlib_s": t_lazy_c}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512),
                    metavar=("Z", "Y", "X"))
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench_io_"))
    try:
        res = bench(tuple(args.shape), args.repeat, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for fmt in ("nifti_gz", "tiff"):
        res[fmt] = {k: round(v, 4) for k, v in res[fmt].items()}
    if args.json:
        print(json.dumps(res))
    else:
        for fmt in ("nifti_gz", "tiff"):
            print(fmt, res[fmt])


if __name__ == "__main__":
    main()
