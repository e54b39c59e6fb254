"""Batch segmentation: many volumes through one model, locally or on a Dask cluster.

::

    napari-medseg batch scans/ extra/*.nii.gz list.csv -m abdomen-ct-small -o out/
    napari-medseg batch scans/ -m abdomen-ct-small -o out/ --scheduler tcp://host:8786

>>> from napari_medseg.batch import run_batch                         # doctest: +SKIP
>>> result = run_batch(["scans/"], "abdomen-ct-small", "out/", workers=2)  # doctest: +SKIP
>>> result.counts                                                     # doctest: +SKIP
{'done': 24}

Inputs are files, folders (each readable file and each DICOM series folder in
them is a case; a folder holding DICOM files itself is one series case), glob
patterns, or CSV files listing paths (a ``path`` / ``image`` column, or the
first column; ``path_1``, ``path_2``... columns give a multi-channel case; an
optional ``case_id`` column names the case).

How it runs:

* **Local** (default): a process pool of ``workers`` processes (``spawn``);
  each loads the model once and keeps it for all its cases, with the CPU
  cores shared out as torch threads (at most ``$OMP_NUM_THREADS`` when set). The free memory
  (see :mod:`napari_medseg.core.planner`) is shared out between the workers.
* **Dask**: ``scheduler="tcp://host:8786"`` or ``client=`` a
  ``dask.distributed.Client``; each case is one task. A worker process loads
  the model on its first case and keeps it. A worker that dies mid-case has
  its case re-run elsewhere by the scheduler.
* **Resumable**: a case whose output exists and re-reads with the input's
  shape is skipped (status ``skipped``); a worker checks again before it runs,
  so a case re-run after its worker died is never written twice.
* **Atomic**: outputs and the summary are written through :mod:`napari_medseg.io.atomic`.
* **Retried**: a failed case is tried once more (``retries=1``); a case that
  still fails is reported (status ``failed`` and one line in ``error``) and
  never stops the others.
* A text progress line per case on stderr, and ``batch_summary.csv`` /
  ``batch_summary.json`` in the output folder: per case the status, seconds,
  peak memory, volume per class (mL), warnings and errors. ``batch_log.jsonl``
  records every start and every write (with the worker's process id).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MedSegError

__all__ = ["Case", "BatchResult", "collect_cases", "run_batch", "run_case", "add_cli_parser"]

log = logging.getLogger(__name__)

SUMMARY_CSV = "batch_summary.csv"
SUMMARY_JSON = "batch_summary.json"
LOG_NAME = "batch_log.jsonl"
_MODELS: dict = {}  # per worker process: model reference -> loaded model


@dataclass
class Case:
    """One volume to segment.

    Attributes
    ----------
    case_id : str
        Unique name; the output is ``<case_id><suffix>`` in the output folder.
    paths : list of str
        One path per model input channel (a file or a DICOM series folder).
    """

    case_id: str
    paths: list


@dataclass
class BatchResult:
    """What :func:`run_batch` returns.

    Attributes
    ----------
    rows : list of dict
        One summary row per case, in input order.
    summary_csv, summary_json : Path
        The written summaries.
    seconds : float
        Wall time of the whole batch.
    """

    rows: list
    summary_csv: Path
    summary_json: Path
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)


# ------------------------------------------------------------------ inputs
def _case_name(path: Path) -> str:
    name = path.name
    low = name.lower()
    for ext in (".nii.gz", ".seg.nrrd", ".ome.tiff", ".ome.tif", ".ome.zarr"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return path.stem if path.is_file() else name


def _expand(item: str) -> list:
    """Paths (one per case) for one command-line input; CSV rows come as lists."""
    from .io import format_of

    p = Path(item)
    if any(ch in item for ch in "*?[") and not p.exists():
        hits = sorted(glob.glob(item, recursive=True))
        if not hits:
            raise MedSegError(f"no file matches the pattern {item!r}; check the path")
        out = []
        for h in hits:
            out.extend(_expand(h))
        return out
    if not p.exists():
        raise MedSegError("file or folder not found; check the path", str(p))
    if p.is_file() and p.suffix.lower() == ".csv":
        return _read_csv(p)
    if p.is_dir() and not p.name.lower().endswith(".zarr") and not _holds_dicom_files(p):
        out = []
        for child in sorted(p.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() and (child.name.lower().endswith(".zarr")
                                   or format_of(child) == "dicom"):
                out.append(child)
            elif child.is_file() and (format_of(child) is not None
                                      and not child.name.lower().endswith(".dcm")):
                out.append(child)
        if not out:
            raise MedSegError("the folder holds no volume napari-medseg reads", str(p))
        return out
    return [p]


def _holds_dicom_files(folder: Path) -> bool:
    """True when DICOM files lie directly in ``folder`` (a series folder, not a study)."""
    from .io.dicom import is_dicom_file

    for child in folder.iterdir():
        if child.is_file() and not child.name.startswith(".") and (
                child.name.lower().endswith(".dcm") or is_dicom_file(child)):
            return True
    return False


def _read_csv(path: Path) -> list:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise MedSegError("the CSV lists no paths", str(path))
    header = [c.strip().lower() for c in rows[0]]
    base = path.parent
    path_cols = [i for i, h in enumerate(header)
                 if h in ("path", "image", "file") or h.startswith(("path_", "image_",
                                                                     "channel"))]
    id_col = header.index("case_id") if "case_id" in header else None
    if path_cols:
        body = rows[1:]
    else:  # no header: the first column
        path_cols, body = [0], rows
    out = []
    for r in body:
        paths = [base / r[i].strip() if not Path(r[i].strip()).is_absolute()
                 else Path(r[i].strip()) for i in path_cols if i < len(r) and r[i].strip()]
        if not paths:
            continue
        cid = r[id_col].strip() if id_col is not None and id_col < len(r) else None
        out.append((cid, paths))
    return out


def collect_cases(inputs) -> list:
    """Turn files, folders, globs and CSV lists into :class:`Case` objects.

    Parameters
    ----------
    inputs : str, Path or list of them

    Returns
    -------
    list of Case
        In input order; duplicate names get ``_2``, ``_3``... suffixes.

    Raises
    ------
    MedSegError
        When an input is missing or a folder / pattern holds nothing readable.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    cases, seen = [], {}
    for item in inputs:
        for entry in _expand(str(item)):
            if isinstance(entry, tuple):
                cid, paths = entry
            else:
                cid, paths = None, [entry]
            cid = cid or _case_name(Path(paths[0]))
            n = seen.get(cid, 0) + 1
            seen[cid] = n
            if n > 1:
                cid = f"{cid}_{n}"
            cases.append(Case(cid, [str(p) for p in paths]))
    if not cases:
        raise MedSegError("no input volumes given")
    return cases


# ------------------------------------------------------------------ one case
def _log_event(outdir: Path, **event) -> None:
    """Append one JSON line to the batch log (``O_APPEND``: lines never interleave)."""
    line = (json.dumps(dict(event, time=round(time.time(), 3), pid=os.getpid())) + "\n").encode()
    fd = os.open(outdir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def _peak_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def output_is_complete(out: Path, case: Case) -> bool:
    """True when ``out`` exists and its header re-reads with the input's shape."""
    from .io import geometry

    if not out.exists():
        return False
    try:
        shape, _ = geometry(out)
        in_shape, _ = geometry(case.paths[0])
    except (MedSegError, OSError, ValueError):
        return False
    return tuple(int(s) for s in shape)[-3:] == tuple(int(s) for s in in_shape)[-3:]


def _model(ref):
    m = _MODELS.get(str(ref))
    if m is None:
        from .models import load_model

        m = _MODELS[str(ref)] = load_model(ref)
    return m


def run_case(model_ref, case: Case, out: str, options: dict) -> dict:
    """Segment one case and write its labels; never raises for a bad case.

    Runs in a worker (process pool or Dask worker). The model is loaded on the
    first case of the process and kept.

    Returns
    -------
    dict
        The case's summary row (``status`` ``done`` / ``skipped`` / ``failed``).
    """
    from .io import read_volume, write_labels
    from .models.run import run_model

    out = Path(out)
    t0 = time.perf_counter()
    row = {"case_id": case.case_id, "input": ";".join(case.paths), "output": str(out),
           "status": "failed", "seconds": 0.0, "peak_memory_gib": None, "warnings": "",
           "error": "", "worker_pid": os.getpid()}
    caught = []

    class _Collect(logging.Handler):
        def emit(self, record):
            caught.append(record.getMessage())

    handler = _Collect(level=logging.WARNING)
    root = logging.getLogger("napari_medseg")
    root.addHandler(handler)
    try:
        if output_is_complete(out, case):  # done before (or by a worker that then died)
            row.update(status="skipped")
            return row
        _log_event(out.parent, event="start", case=case.case_id)
        _reset_peak()
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            model = _model(model_ref)
            if options.get("backend") or options.get("roi_subset") or options.get("precision"):
                from .models.run import set_model_options

                set_model_options(model, backend=options.get("backend"),
                                  roi_subset=options.get("roi_subset"), name=str(model_ref),
                                  precision=options.get("precision"))
            vols = [read_volume(p, lazy=True) for p in case.paths]
            # the shared run path: input checks, the memory plan, out-of-memory as one line
            _, pred = run_model(model, vols, name=case.paths[0],
                                device=options.get("device", "cpu"),
                                overlap=options.get("overlap"),
                                tta=options.get("tta"), fast=options.get("fast", False),
                                memory_limit=options.get("memory_limit"),
                                uncertainty=options.get("uncertainty"),
                                crop_to_body=True)  # as predict: CT models skip the air
            caught.extend((pred.info or {}).get("warnings") or [])
            if pred.uncertainty is not None:  # before the labels, which mark the case done
                import numpy as np

                from .io import write_volume

                u = pred.uncertainty
                write_volume(uncertainty_path(out), u.with_data(np.asarray(u.data, np.float32)),
                             overwrite=True)
            write_labels(out, pred.labels, overwrite=True)
            _log_event(out.parent, event="wrote", case=case.case_id, output=str(out))
        caught.extend(str(w.message) for w in wlist)
        row.update(status="done", **_class_volumes(pred))
        plan = (pred.info or {}).get("memory_plan") or {}
        if plan.get("notes"):
            caught.append("memory plan: " + ", ".join(plan["notes"]))
    except MedSegError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # a bad case must not stop the batch
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.debug("case %s failed", case.case_id, exc_info=True)
    finally:
        root.removeHandler(handler)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row["peak_memory_gib"] = round(_peak_bytes() / 2**30, 3)
        row["warnings"] = "; ".join(dict.fromkeys(c.replace("\n", " ") for c in caught))
    return row


def uncertainty_path(out) -> Path:
    """Where a batch run with ``uncertainty`` writes a map: ``<case>_uncertainty<suffix>``."""
    out = Path(out)
    low = out.name.lower()
    for ext in (".nii.gz", ".seg.nrrd"):
        if low.endswith(ext):
            return out.with_name(out.name[: -len(ext)] + "_uncertainty" + out.name[-len(ext):])
    return out.with_name(out.stem + "_uncertainty" + out.suffix)


def _class_volumes(pred) -> dict:
    import numpy as np

    from .core.labelmap import label_counts

    data = np.asarray(pred.labels.data)
    counts = label_counts(data)
    ml = pred.labels.voxel_volume_ml
    names = pred.labels.label_names or {}
    ids = sorted(set(int(k) for k in names) | set(range(1, len(counts))))
    return {f"ml_{names.get(k, k)}": round(float(counts[k] if k < len(counts) else 0) * ml, 3)
            for k in ids if k}


# ------------------------------------------------------------------ local pool
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def _run_local(model_ref, jobs, options, workers, report):
    """Run ``jobs`` ``[(case, out)]`` in a process pool; ``report(case, row)`` per case."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    with contextlib.suppress(ValueError):  # a thread count the user set wins when smaller
        threads = min(threads, max(1, int(os.environ.get("OMP_NUM_THREADS", threads))))
    pending = list(jobs)
    broken = 0
    while pending:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            futs = {pool.submit(run_case, model_ref, case, str(out), options): (case, out)
                    for case, out in pending}
            done = []
            try:
                for f in as_completed(futs):
                    case, out = futs[f]
                    report(case, f.result())
                    done.append(case.case_id)
            except BrokenProcessPool:
                broken += 1
                if broken > 2:
                    raise MedSegError("the batch worker processes keep dying (out of memory?); "
                                      "use fewer workers or set NAPARI_MEDSEG_MEMORY_LIMIT")
                log.warning("a batch worker died; re-running its unfinished cases")
            pending = [(c, o) for c, o in pending if c.case_id not in done]


# ------------------------------------------------------------------ dask
def _run_dask(client, model_ref, jobs, options, report):
    from distributed import as_completed

    futs = {}
    for case, out in jobs:
        f = client.submit(run_case, model_ref, case, str(out), options, pure=False,
                          key=f"medseg-{case.case_id}-{time.monotonic_ns()}")
        futs[f] = case
    for f in as_completed(list(futs)):
        case = futs[f]
        try:
            row = f.result()
        except Exception as exc:  # KilledWorker after repeated deaths, lost connection
            row = {"case_id": case.case_id, "input": ";".join(case.paths), "status": "failed",
                   "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        report(case, row)


@contextlib.contextmanager
def _client(scheduler, client):
    if client is not None:
        yield client
        return
    try:
        from distributed import Client
    except ImportError as exc:
        raise MedSegError("a Dask scheduler needs the 'distributed' package; "
                          'pip install "napari-medseg[batch]"') from exc
    try:
        c = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise MedSegError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); check the "
                          "address and that the scheduler runs") from exc
    try:
        yield c
    finally:
        c.close()


# ------------------------------------------------------------------ driver
def run_batch(inputs, model, outdir, *, workers=1, scheduler=None, client=None,
              device="cpu", overlap=None, tta=None, fast=False, suffix=".nii.gz",
              retries=1, memory_limit=None, progress=True, backend=None,
              roi_subset=None, uncertainty=None, precision=None) -> BatchResult:
    """Segment every case of ``inputs`` with ``model`` into ``outdir``.

    Parameters
    ----------
    inputs : str, Path or list
        Files, folders, glob patterns or CSV lists (see :func:`collect_cases`).
    model : str or Path
        Model name or path (each worker loads it once).
    outdir : str or Path
        Output folder (created); labels go to ``<case_id><suffix>``.
    workers : int
        Local worker processes (ignored with a scheduler or client).
    scheduler : str, optional
        Address of a Dask scheduler (``tcp://host:8786``).
    client : distributed.Client, optional
        A connected Dask client (wins over ``scheduler``).
    device, overlap, tta, fast :
        As for :meth:`napari_medseg.models.Model.predict` (``tta=None``: the card's
        ``default_tta``; ``overlap=None``: its ``default_overlap``).
    suffix : str
        Output format by extension (``.nii.gz``, ``.nrrd``, ``.mha``...).
    retries : int
        Extra tries for a failed case.
    memory_limit : int or str, optional
        Memory each case may use; default for the local pool: the free memory
        divided by ``workers``.
    progress : bool or callable
        True: one line per finished case on stderr; a callable gets
        ``(done, total, row)``.
    backend, roi_subset : optional
        nnU-Net / TotalSegmentator options (see
        :func:`napari_medseg.models.run.set_model_options`).
    precision : {"auto", "bf16", "fp16", "fp32"}, optional
        The network's precision (same function).
    uncertainty : {None, "entropy", "tta"}
        Also write each case's uncertainty map (float32, :func:`uncertainty_path`),
        before its labels.

    Returns
    -------
    BatchResult
    """
    t0 = time.perf_counter()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cases = collect_cases(inputs)
    if not suffix.startswith("."):
        suffix = "." + suffix
    jobs = [(c, outdir / f"{c.case_id}{suffix}") for c in cases]
    options = {"device": device, "overlap": None if overlap is None else float(overlap),
               "tta": None if tta is None else bool(tta), "fast": bool(fast),
               "memory_limit": memory_limit, "backend": backend,
               "roi_subset": list(roi_subset) if roi_subset else None,
               "precision": precision,
               "uncertainty": uncertainty}
    local = client is None and scheduler is None
    workers = max(1, int(workers or 1))
    if local and memory_limit is None and workers > 1:
        from .core.planner import free_memory

        options["memory_limit"] = free_memory().bytes // workers
    rows, attempts = {}, {}
    total = len(jobs)

    def report(case, row):
        attempts[case.case_id] = attempts.get(case.case_id, 0) + 1
        row = dict(row, attempts=attempts[case.case_id])
        rows[case.case_id] = row
        n_final = sum(1 for r in rows.values() if r["status"] != "failed"
                      or attempts[r["case_id"]] > retries)
        if callable(progress):
            progress(n_final, total, row)
        elif progress:
            extra = f" ({row['error']})" if row.get("error") else ""
            again = " - will retry" if row["status"] == "failed" and \
                attempts[case.case_id] <= retries else ""
            print(f"batch [{n_final}/{total}] {case.case_id}: {row['status']} "
                  f"{row.get('seconds', 0):.1f} s{extra}{again}", file=sys.stderr, flush=True)

    todo = []
    for case, out in jobs:
        if output_is_complete(out, case):
            report(case, {"case_id": case.case_id, "input": ";".join(case.paths),
                          "output": str(out), "status": "skipped", "seconds": 0.0})
        else:
            todo.append((case, out))
    with _client(scheduler, client) if not local else contextlib.nullcontext() as c:
        for attempt in range(int(retries) + 1):
            if not todo:
                break
            if local:
                _run_local(model, todo, options, workers, report)
            else:
                _run_dask(c, model, todo, options, report)
            todo = [(case, out) for case, out in todo
                    if rows[case.case_id]["status"] == "failed"]
    ordered = [rows[c.case_id] for c, _ in jobs]
    seconds = time.perf_counter() - t0
    csv_path, json_path = _write_summary(outdir, ordered, model, seconds)
    counts = {}
    for r in ordered:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return BatchResult(ordered, csv_path, json_path, seconds, counts)


def _write_summary(outdir: Path, rows, model, seconds):
    from .io.atomic import atomic_path

    keys = ["case_id", "status", "seconds", "peak_memory_gib", "attempts", "input", "output",
            "error", "warnings", "worker_pid"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    csv_path, json_path = outdir / SUMMARY_CSV, outdir / SUMMARY_JSON
    with atomic_path(csv_path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, restval="")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    doc = {"model": str(model), "seconds": round(seconds, 3), "cases": rows}
    with atomic_path(json_path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2, default=str))
    return csv_path, json_path


# ------------------------------------------------------------------ CLI
def add_cli_parser(sub) -> None:
    """Add the ``batch`` subcommand to the ``napari-medseg`` argument parser."""
    import argparse

    b = sub.add_parser("batch", help="segment many volumes (local processes or a Dask cluster)")
    b.add_argument("inputs", nargs="+", help="files, folders, glob patterns or CSV lists")
    b.add_argument("-m", "--model", required=True, help="model name or path")
    b.add_argument("-o", "--outdir", required=True, help="output folder")
    b.add_argument("--workers", type=int, default=1, help="local worker processes")
    b.add_argument("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786")
    b.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    b.add_argument("--overlap", type=float, default=None,
                   help="window overlap in [0, 1) (default: the card's default_overlap or 0.5)")
    b.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror test-time augmentation on / off (default: the model card's)")
    b.add_argument("--fast", action="store_true", help="quick mode (less overlap, no TTA)")
    b.add_argument("--suffix", default=".nii.gz", help="output format by extension")
    b.add_argument("--retries", type=int, default=1, help="extra tries for a failed case")
    b.add_argument("--memory-limit", help="memory per case, e.g. 4G (default: what is free)")
    from .models.run import add_model_option_args

    add_model_option_args(b)
    b.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    """Run :func:`run_batch` from parsed arguments; exit 1 when some case failed."""
    res = run_batch(args.inputs, args.model, args.outdir, workers=args.workers,
                    scheduler=args.scheduler, device=args.device, overlap=args.overlap,
                    tta=args.tta, fast=args.fast, suffix=args.suffix, retries=args.retries,
                    memory_limit=args.memory_limit, backend=args.backend,
                    roi_subset=args.roi_subset, precision=args.precision)
    parts = ", ".join(f"{n} {k}" for k, n in sorted(res.counts.items()))
    print(f"batch: {parts} in {res.seconds:.1f} s; summary {res.summary_csv}",
          file=sys.stderr)
    return 1 if res.counts.get("failed") else 0

