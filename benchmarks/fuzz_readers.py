"""Fuzz every reader with seeded mutations of valid files; count what happens.

The script writes small valid files of every format napari-medseg reads
(NIfTI ``.nii`` / ``.nii.gz``, NRRD raw / gzip / ``.seg.nrrd``, MetaImage
``.mha`` raw / compressed and ``.mhd`` + ``.raw``, TIFF plain / zlib / OME,
a DICOM series), then mutates copies of them with a seeded generator: header
edits (numbers in text headers and NIfTI header fields replaced by absurd
values: -1, 0, 1e30, NaN, inf, 2**31, 100), bit flips (in the header and in
the data), truncation and overwritten byte runs. Each mutated file is read by
a child process (``read_volume`` then the voxels forced with ``np.asarray``)
with a 20 s limit per file, so crashes (a signal) and hangs are counted rather
than fatal; the child runs under a 4 GB address-space limit, so an allocation a
header check should have refused shows as an error.

Outcomes per file:

``crashes``
    the child died (segfault, abort);
``hangs``
    no answer within the time limit;
``uncaught``
    an exception other than :class:`~napari_medseg.errors.MedSegError`, or a
    MedSegError caused by a MemoryError (a size check missed);
``accepted_garbage``
    the file was accepted with a non-finite or singular affine, a voxel size
    outside 1e-4..1e3 mm, or (``.nii.gz``) a gzip stream whose CRC fails;
``multi_line_messages``
    a MedSegError spread over several lines;
``clean_errors``
    one MedSegError line naming the file;
``accepted``
    read without complaint (bit flips in raw voxels are undetectable).

Run by hand (niced; about 0.05 s a file once the child is up)::

    nice -n 5 python benchmarks/fuzz_readers.py --n 300 --json
    nice -n 5 python benchmarks/fuzz_readers.py --n 10000 --json --keep /tmp/fuzz-bad
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

BAD = ("crashes", "hangs", "uncaught", "accepted_garbage", "multi_line_messages")
OUTCOMES = BAD + ("clean_errors", "accepted")
ABSURD = ["-1", "0", "1e30", "nan", "inf", "-inf", "2147483648", "100", "1000000", "-2",
          "3.5", "1e-30", "65536", "9999999999999999999"]

# ------------------------------------------------------------------ the child
CHILD = textwrap.dedent(r"""
    import gzip, json, resource, sys, warnings, zlib
    import numpy as np
    limit = int(sys.argv[1])
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    import logging
    logging.disable(logging.CRITICAL)
    from napari_medseg.errors import MedSegError
    from napari_medseg.io import read_volume

    def gzip_ok(path):
        try:
            with gzip.open(path, "rb") as fh:
                while fh.read(1 << 20):
                    pass
            return True
        except (OSError, EOFError, zlib.error):
            return False

    def garbage(vol, path):
        aff = np.asarray(vol.affine, float)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            return "non-finite affine"
        norms = np.linalg.norm(aff[:3, :3], axis=0)
        if not np.all((norms >= 1e-4) & (norms <= 1e3)):
            return "implausible spacing"
        if abs(np.linalg.det(aff[:3, :3] / norms)) < 1e-6:
            return "singular affine"
        if str(path).endswith(".nii.gz") and not gzip_ok(path):
            return "gzip CRC failure accepted"
        return None

    print("ready", flush=True)
    for line in sys.stdin:
        path = line.strip()
        out = {}
        try:
            vol = read_volume(path, lazy=True)
            np.asarray(vol.data)
            bad = garbage(vol, path)
            out = {"outcome": "accepted_garbage", "detail": bad} if bad else \
                {"outcome": "accepted"}
        except MedSegError as exc:
            text = str(exc)
            if isinstance(exc.__cause__, MemoryError):
                out = {"outcome": "uncaught", "detail": "MemoryError: " + text[:200]}
            elif "\n" in text.strip():
                out = {"outcome": "multi_line_messages", "detail": text[:300]}
            else:
                out = {"outcome": "clean_errors", "detail": text[:300]}
        except BaseException as exc:
            out = {"outcome": "uncaught", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}
        print(json.dumps(out), flush=True)
""")


class Worker:
    """A child process reading files one at a time; restarted after a crash or hang."""

    def __init__(self, mem_limit: int):
        self.mem_limit = mem_limit
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.mem_limit)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError("the fuzzing child did not start")

    def read(self, path: Path, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(str(path) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"outcome": "hangs", "detail": f"no answer in {timeout:g} s"}
        line = self.proc.stdout.readline()
        if not line:
            return self._died()
        return json.loads(line)

    def _died(self):
        code = self.proc.wait()
        self.proc = None
        return {"outcome": "crashes", "detail": f"child exit status {code}"}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)


# ------------------------------------------------------------------ seed files
def make_seeds(folder: Path) -> dict[str, Path]:
    """Small valid files of every format, with an oblique affine and real spacing."""
    import nibabel as nib
    import SimpleITK as sitk
    import tifffile

    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io import write_labels, write_volume

    rng = np.random.default_rng(0)
    data = rng.integers(-100, 1000, (6, 10, 12)).astype(np.int16)
    labels = (data > 500).astype(np.uint8) + (data > 800)
    aff = make_affine((2.5, 0.8, 0.7), (-10, 20, 30))
    vol = Volume(data, aff, modality="CT")
    lab = vol.like_labels(labels, {1: "a", 2: "b"})
    seeds = {}
    seeds["nii.gz"] = write_volume(folder / "img.nii.gz", vol)
    seeds["nii"] = write_volume(folder / "img.nii", vol)
    seeds["nrrd"] = write_volume(folder / "img.nrrd", vol)
    hdr = {"type": "int16", "dimension": 3, "sizes": [12, 10, 6], "encoding": "raw",
           "space": "left-posterior-superior",
           "space directions": np.diag([0.7, 0.8, 2.5]), "space origin": [1.0, 2.0, 3.0]}
    import nrrd

    nrrd.write(str(folder / "raw.nrrd"), data, hdr, index_order="C")
    seeds["nrrd-raw"] = folder / "raw.nrrd"
    seeds["seg.nrrd"] = write_labels(folder / "lab.seg.nrrd", lab)
    seeds["mha"] = write_volume(folder / "img.mha", vol)
    img = sitk.GetImageFromArray(data)
    img.SetSpacing((0.7, 0.8, 2.5))
    sitk.WriteImage(img, str(folder / "raw.mha"), useCompression=False)
    seeds["mha-raw"] = folder / "raw.mha"
    sitk.WriteImage(img, str(folder / "img.mhd"), useCompression=False)
    seeds["mhd"] = folder / "img.mhd"
    seeds["tif"] = write_volume(folder / "img.tif", vol)
    tifffile.imwrite(folder / "zlib.tif", data.astype(np.uint16), compression="zlib",
                     imagej=True, metadata={"spacing": 2.5, "unit": "mm"})
    seeds["tif-zlib"] = folder / "zlib.tif"
    tifffile.imwrite(folder / "img.ome.tif", data.astype(np.uint16), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.7, "PhysicalSizeZ": 2.5})
    seeds["ome.tif"] = folder / "img.ome.tif"
    seeds["dicom"] = _dicom_series(folder / "dicom", data)
    del nib
    return seeds


def _dicom_series(folder: Path, data) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series, study = generate_uid(), generate_uid()
    for k, plane in enumerate(data):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "anon"
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [0.8, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = (plane.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"s{k:02d}.dcm", enforce_file_format=True)
    return folder


# ------------------------------------------------------------------- mutations
_NUM = re.compile(rb"-?\d+(\.\d+)?(e-?\d+)?")
#: NIfTI-1 header fields as (offset, struct format) worth making absurd.
_NIFTI_FIELDS = [(40 + 2 * i, "<h") for i in range(8)] + [(70, "<h"), (72, "<h")] + \
    [(76 + 4 * i, "<f") for i in range(8)] + [(108, "<f"), (112, "<f"), (116, "<f")] + \
    [(252, "<h"), (254, "<h")] + [(256 + 4 * i, "<f") for i in range(6)] + \
    [(280 + 4 * i, "<f") for i in range(12)]


def _text_header_end(raw: bytes) -> int:
    for marker in (b"ElementDataFile = LOCAL\n", b"\n\n"):
        i = raw.find(marker)
        if i >= 0:
            return i + len(marker)
    return min(len(raw), 1024)


def mutate(raw: bytes, kind: str, fmt: str, rng) -> tuple[bytes, str]:
    """One seeded mutation of ``raw``; returns the bytes and a short description."""
    n = len(raw)
    if kind == "truncate":
        cut = int(rng.integers(0, n))
        return raw[:cut], f"truncate@{cut}"
    if kind == "bitflip":
        b = bytearray(raw)
        head = fmt in ("nii", "nii.gz") and rng.random() < 0.5
        flips = int(rng.integers(1, 9))
        for _ in range(flips):
            pos = int(rng.integers(0, min(n, 352) if head else n))
            b[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(b), f"bitflip x{flips}"
    if kind == "overwrite":
        b = bytearray(raw)
        pos = int(rng.integers(0, n))
        length = int(rng.integers(1, 64))
        b[pos:pos + length] = rng.integers(0, 256, min(length, n - pos), dtype=np.uint8).tobytes()
        return bytes(b), f"overwrite@{pos}+{length}"
    # header edit: a number of the header becomes an absurd value
    value = ABSURD[int(rng.integers(0, len(ABSURD)))]
    if fmt == "nii":
        import struct

        off, fmt_code = _NIFTI_FIELDS[int(rng.integers(0, len(_NIFTI_FIELDS)))]
        b = bytearray(raw)
        try:
            v = float(value)
            packed = struct.pack(fmt_code, int(np.clip(v, -32768, 32767)) if "h" in fmt_code
                                 and np.isfinite(v) else (v if "f" in fmt_code else -1))
        except (OverflowError, struct.error, ValueError):
            packed = struct.pack(fmt_code, -1)
        b[off:off + len(packed)] = packed
        return bytes(b), f"header@{off}={value}"
    if fmt in ("mha", "mha-raw", "mhd", "nrrd", "nrrd-raw", "seg.nrrd"):
        end = _text_header_end(raw)
        nums = list(_NUM.finditer(raw[:end]))
        if nums:
            m = nums[int(rng.integers(0, len(nums)))]
            return raw[:m.start()] + value.encode() + raw[m.end():], \
                f"header {raw[max(0, m.start() - 20):m.start()].decode('latin-1')!r}={value}"
    b = bytearray(raw)  # binary headers (TIFF IFDs, DICOM): overwrite a field-sized run
    pos = int(rng.integers(0, min(n, 512)))
    b[pos:pos + 4] = int(rng.integers(0, 2**32)).to_bytes(4, "little")
    return bytes(b), f"binary@{pos}"


KINDS = ("header", "bitflip", "truncate", "overwrite")


def fuzz(n: int, seed: int, timeout: float, mem_limit: int, keep: Path | None) -> dict:
    rng = np.random.default_rng(seed)
    work = Path(tempfile.mkdtemp(prefix="medseg-fuzz-"))
    counts = Counter()
    per_format = defaultdict(Counter)
    per_kind = defaultdict(Counter)
    examples = defaultdict(list)
    worker = Worker(mem_limit)
    t0 = time.perf_counter()
    try:
        (work / "seeds").mkdir()
        seeds = make_seeds(work / "seeds")
        formats = sorted(seeds)
        for i in range(n):
            fmt = formats[int(rng.integers(0, len(formats)))]
            kind = KINDS[int(rng.integers(0, len(KINDS)))]
            case = work / f"case{i % 50}"
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir()
            src = seeds[fmt]
            if fmt == "dicom":
                target = case / "dicom"
                shutil.copytree(src, target)
                victim = sorted(target.iterdir())[int(rng.integers(0, len(list(target.iterdir()))))]
                raw, what = mutate(victim.read_bytes(), kind, fmt, rng)
                victim.write_bytes(raw)
                what = f"{victim.name}: {what}"
            elif fmt == "mhd":
                shutil.copy(src.with_suffix(".raw"), case / "img.raw")
                target = case / src.name
                pick_data = kind in ("truncate", "bitflip") and rng.random() < 0.5
                if pick_data:
                    shutil.copy(src, target)
                    raw, what = mutate((case / "img.raw").read_bytes(), kind, "raw", rng)
                    (case / "img.raw").write_bytes(raw)
                    what = "data file: " + what
                else:
                    raw, what = mutate(src.read_bytes(), kind, fmt, rng)
                    target.write_bytes(raw)
            else:
                target = case / src.name
                raw, what = mutate(src.read_bytes(), kind, fmt, rng)
                target.write_bytes(raw)
            res = worker.read(target, timeout)
            out = res["outcome"]
            counts[out] += 1
            per_format[fmt][out] += 1
            per_kind[kind][out] += 1
            if out in BAD:
                if len(examples[out]) < 10:
                    examples[out].append({"format": fmt, "mutation": what,
                                          "detail": res.get("detail", "")})
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    dest = keep / f"{i:05d}-{out}-{target.name}"
                    if target.is_dir():
                        shutil.copytree(target, dest)
                    else:
                        shutil.copy(target, dest)
                        if fmt == "mhd":
                            shutil.copy(case / "img.raw", keep / "img.raw")
    finally:
        worker.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "n": n, "seed": seed, "timeout_s": timeout, "seconds": round(time.perf_counter() - t0, 1),
        **{k: counts.get(k, 0) for k in OUTCOMES},
        "per_format": {f: {k: c.get(k, 0) for k in OUTCOMES if c.get(k, 0)}
                       for f, c in sorted(per_format.items())},
        "per_mutation": {f: {k: c.get(k, 0) for k in OUTCOMES if c.get(k, 0)}
                         for f, c in sorted(per_kind.items())},
        "examples": dict(examples),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="number of mutated files")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per file")
    p.add_argument("--mem-limit-gb", type=float, default=4.0,
                   help="address-space limit of the child (0: none)")
    p.add_argument("--keep", type=Path, help="copy files with a bad outcome here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    res = fuzz(args.n, args.seed, args.timeout, int(args.mem_limit_gb * 2**30), args.keep)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k in OUTCOMES:
            print(f"{k:22s} {res[k]}")
        for f, c in res["per_format"].items():
            print(f"  {f:10s} " + ", ".join(f"{k} {v}" for k, v in c.items()))
    return 1 if any(res[k] for k in BAD) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
