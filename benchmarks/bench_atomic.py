"""kill -9 a writer at random moments; count damaged targets and leftover temporary files.

For each writer (``.nii.gz``, ``.seg.nrrd``, ``.mha``, ``.mhd`` + ``.zraw``,
``.tif`` through :func:`napari_medseg.io.write_labels`, and the autosave of
:func:`napari_medseg.io.autosave.save_recovery`) and each trial:

1. a previous version of the target is written (voxel ``[0, 0, 0]`` = 7);
2. a child process overwrites it in a loop (each version stamped 100..199) and
   is killed with SIGKILL after a seeded random delay (0.05 to 1.5 s after its
   first write began);
3. the target is read: it must be whole, the previous version or one complete
   new one (``previous_intact`` counts the trials where it is);
4. ``temp_files_after_kill``: entries in the hidden temporary folder (and, for
   ``.mhd``, data files no header names) right after the kill;
5. another file is written to the same folder by a new process (the "next
   write"); ``temp_files_left`` counts what is still there after it.

Goal: ``previous_intact`` 20/20 and ``temp_files_left`` 0 for every writer.

Run by hand (niced; about 3 minutes with 20 trials)::

    nice -n 5 python benchmarks/bench_atomic.py --json
    nice -n 5 python benchmarks/bench_atomic.py --trials 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

WRITERS = (".nii.gz", ".seg.nrrd", ".mha", ".mhd", ".tif", "autosave")
SHAPE = (40, 128, 128)
KEY = "bench-image"

CHILD = textwrap.dedent("""
    import sys, numpy as np
    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io import write_labels
    from napari_medseg.io.autosave import Snapshot, save_recovery
    target, kind, shape = sys.argv[1], sys.argv[2], tuple(map(int, sys.argv[3:6]))
    base = np.random.default_rng(1).integers(0, 6, shape, dtype=np.uint8)
    aff = make_affine((2, 1, 1))
    print("ready", flush=True)
    i = 0
    while True:
        data = base.copy(); data[0, 0, 0] = 100 + i % 100
        if kind == "autosave":
            save_recovery(Snapshot(data, aff, sys.argv[6], "labels"), root=target)
        else:
            write_labels(target, Volume(data, aff, is_label=True), overwrite=True,
                         verify=False)
        i += 1
""")


def _base():
    return np.random.default_rng(1).integers(0, 6, SHAPE, dtype=np.uint8)


def _write_previous(folder: Path, kind: str):
    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io import write_labels
    from napari_medseg.io.autosave import Snapshot, save_recovery

    data = _base()
    data[0, 0, 0] = 7
    if kind == "autosave":
        save_recovery(Snapshot(data, make_affine((2, 1, 1)), KEY, "labels"), root=folder)
        return folder
    target = folder / f"labels{kind}"
    write_labels(target, Volume(data, make_affine((2, 1, 1)), is_label=True))
    return target


def _read_back(target: Path, kind: str):
    from napari_medseg.io import read_volume
    from napari_medseg.io.autosave import find_recovery

    if kind == "autosave":
        entry = find_recovery(KEY, root=target)
        return None if entry is None else np.asarray(entry.load().data)
    return np.asarray(read_volume(target, is_label=True).data)


def _leftovers(folder: Path, kind: str) -> list[str]:
    """Temporary files (hidden temporary folders anywhere below) and orphan .mhd data."""
    from napari_medseg.io.atomic import TMP_DIR_NAME

    found = [str(p.relative_to(folder)) for d in folder.rglob(TMP_DIR_NAME)
             for p in d.iterdir()]
    found += [str(p.relative_to(folder)) for p in folder.rglob("*")
              if p.is_file() and re.search(r"\.part|~\d+~", p.name)]
    if kind == ".mhd":
        from napari_medseg.io.itk import read_meta_header

        named = {read_meta_header(h).data_path.name for h in folder.glob("*.mhd")}
        found += [p.name for p in folder.glob("*.zraw") if p.name not in named]
    if kind == "autosave":  # labels files the JSON does not point to
        for j in folder.rglob("labels.json"):
            current = json.loads(j.read_text())["file"]
            found += [p.name for p in j.parent.glob("labels.*.npz") if p.name != current]
    return sorted(set(found))


def _next_write(folder: Path, kind: str) -> None:
    """Another write to the same folder, by a new process."""
    code = ("import sys, numpy as np\n"
            "from napari_medseg.core.volume import Volume, make_affine\n"
            "from napari_medseg.io import write_labels\n"
            "from napari_medseg.io.autosave import Snapshot, save_recovery\n"
            "kind, folder = sys.argv[1], sys.argv[2]\n"
            "d = np.ones((4, 5, 6), np.uint8)\n"
            "if kind == 'autosave':\n"
            f"    save_recovery(Snapshot(np.ones((40, 128, 128), np.uint8), make_affine((2, 1, 1)),"
            f" {KEY!r}, 'labels'), root=folder)\n"
            "else:\n"
            "    write_labels(folder + '/other' + kind, Volume(d, make_affine((1, 1, 1)),"
            " is_label=True), overwrite=True)\n")
    subprocess.run([sys.executable, "-c", code, kind, str(folder)], check=True)


def trial(kind: str, folder: Path, delay: float) -> dict:
    target = _write_previous(folder, kind)
    args = [sys.executable, "-c", CHILD, str(target), kind, *map(str, SHAPE), KEY]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = {"killed_after_s": round(delay, 3)}
    try:
        back = _read_back(target, kind)
        stamp = int(back[0, 0, 0])
        expected = _base()
        expected[0, 0, 0] = stamp
        whole = (stamp == 7 or 100 <= stamp < 200) and np.array_equal(back, expected)
        out["result"] = "previous" if stamp == 7 else "new"
    except Exception as exc:  # noqa: BLE001 - a damaged file is what is measured
        whole = False
        out["result"] = f"damaged: {type(exc).__name__}: {str(exc)[:120]}"
    out["intact"] = bool(whole)
    out["temp_after_kill"] = _leftovers(folder, kind)
    _next_write(folder, kind)
    out["temp_left"] = _leftovers(folder, kind)
    return out


def run(trials: int, seed: int, kinds) -> dict:
    rng = np.random.default_rng(seed)
    res = {"trials": trials, "seed": seed, "shape": list(SHAPE), "writers": {}}
    with tempfile.TemporaryDirectory(prefix="medseg-atomic-") as tmp:
        for kind in kinds:
            rows = []
            for t in range(trials):
                folder = Path(tmp) / f"{kind.strip('.')}-{t}"
                folder.mkdir()
                rows.append(trial(kind, folder, float(rng.uniform(0.05, 1.5))))
            res["writers"][kind] = {
                "previous_intact": f"{sum(r['intact'] for r in rows)}/{trials}",
                "killed_while_writing_temp": sum(bool(r["temp_after_kill"]) for r in rows),
                "temp_files_after_kill": sum(len(r["temp_after_kill"]) for r in rows),
                "temp_files_left": sum(len(r["temp_left"]) for r in rows),
                "results": {k: sum(r["result"] == k for r in rows) for k in ("previous", "new")},
                "damaged": [r["result"] for r in rows if r["result"].startswith("damaged")],
            }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--writers", nargs="*", default=list(WRITERS), choices=WRITERS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args.trials, args.seed, args.writers)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, r in res["writers"].items():
            print(f"{k:10s} intact {r['previous_intact']}, temp after kill "
                  f"{r['temp_files_after_kill']}, left after next write {r['temp_files_left']}")
    bad = any(r["temp_files_left"] or not r["previous_intact"].startswith(f"{args.trials}/")
              for r in res["writers"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
