"""Case-id reservations and staging folders of an nnU-Net dataset export.

An export claims a case id by creating ``.medseg/cases/{case}/`` (an atomic
``mkdir``) and writes ``owner.json`` into it: the writer's process id, host
name and process start time. The case's files are staged in
``.medseg/staging/{case}/`` and renamed into place. When the export ends
(published, failed or cancelled) the owner record goes: a finished case keeps
its empty reservation folder, so its id is never handed out again; a failed
one gives its id back.

A process killed mid-export leaves its owner record, its staging folder and
perhaps some published image files behind. :func:`clean_stale` (run by the
next export, under the dataset's folder lock) removes them once the writer is
known to be dead:

* same host: the recorded process no longer exists, or that process id now
  belongs to a process started at another time;
* another host (a shared drive): the process cannot be checked there, so the
  record counts as dead only when older than :data:`OTHER_HOST_MAX_AGE_S`.

A case whose label file had been published (the label is renamed last, so the
case is whole) is kept and added to the datalist when it is missing there;
otherwise everything of the case goes and its id is released for reuse.
Staging folders with no reservation at all (a kill between the two clean-up
steps of a failed export) are removed after reserving their id, so a live
writer's staging folder is never touched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["claim_case_id", "finish_case", "release_case_id", "clean_stale",
           "writer_alive", "OWNER_FILE", "OTHER_HOST_MAX_AGE_S"]

OWNER_FILE = "owner.json"
#: An owner record written on another host counts as dead after this many seconds.
OTHER_HOST_MAX_AGE_S = 24 * 3600.0


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks after boot; Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after it
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _owner_record(**extra) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _process_start(pid),
            "time": time.time(), **extra}


def writer_alive(record: dict, now: float | None = None) -> bool:
    """Whether the process described by an owner record may still be running.

    Errs on the side of "alive": only a process known to be gone counts as dead.
    """
    now = time.time() if now is None else now
    if record.get("host") != socket.gethostname():
        return now - float(record.get("time", now)) < OTHER_HOST_MAX_AGE_S
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    except OSError:
        return True
    start = record.get("start")
    current = _process_start(pid)
    return start is None or current is None or current == start


def claim_case_id(dataset_dir: Path, prefix: str, file_ending: str, **info) -> str:
    """Atomically reserve the lowest free case id ``{prefix}_{n:03d}``.

    An id is free when no file of ``imagesTr`` / ``labelsTr`` uses it and no
    reservation folder exists. The reservation gets an owner record (this
    process; ``info`` is stored with it, e.g. the datalist to repair).
    """
    claims = dataset_dir / ".medseg" / "cases"
    claims.mkdir(parents=True, exist_ok=True)
    taken = set()
    pat = re.compile(rf"^{re.escape(prefix)}_(\d+)(?:_\d{{4}})?{re.escape(file_ending)}$")
    for sub in ("imagesTr", "labelsTr"):
        folder = dataset_dir / sub
        if folder.is_dir():
            for p in folder.iterdir():
                m = pat.match(p.name)
                if m:
                    taken.add(int(m.group(1)))
    n = 0
    while True:
        if n not in taken:
            case = f"{prefix}_{n:03d}"
            try:
                (claims / case).mkdir()
            except FileExistsError:
                n += 1
                continue
            try:
                (claims / case / OWNER_FILE).write_text(json.dumps(_owner_record(**info)),
                                                        encoding="utf-8")
            except OSError:
                release_case_id(dataset_dir, case)
                raise
            return case
        n += 1


def finish_case(dataset_dir: Path, case: str) -> None:
    """Mark a published case as finished: drop its owner record, keep the id."""
    with contextlib.suppress(OSError):
        (dataset_dir / ".medseg" / "cases" / case / OWNER_FILE).unlink()


def release_case_id(dataset_dir: Path, case: str) -> None:
    """Give up the reservation of an unpublished case (its staging must be gone)."""
    res = dataset_dir / ".medseg" / "cases" / case
    with contextlib.suppress(OSError):
        (res / OWNER_FILE).unlink()
    with contextlib.suppress(OSError):
        res.rmdir()


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: judged by the file's age below
    return record if isinstance(record, dict) else {}


def clean_stale(dataset_dir, file_ending: str, now: float | None = None,
                grace_s: float = 600.0) -> list[str]:
    """Remove what exports killed mid-case left in ``dataset_dir``.

    Takes the dataset's folder lock (so two exports never clean up at once).
    ``grace_s``: an owner record that cannot be read (a writer killed while
    writing it, or one just writing it) counts as dead only when older than this.

    Returns
    -------
    list of str
        The case ids cleaned up.
    """
    from ._util import folder_lock

    dataset_dir = Path(dataset_dir)
    with folder_lock(dataset_dir):
        cleaned, repairs = _clean_locked(dataset_dir, file_ending, now, grace_s)
    for case, datalist, images, label in repairs:  # the datalist takes the lock itself
        from .monai import append_datalist

        try:
            append_datalist(dataset_dir / datalist, images, label, extra={"case": case})
        except Exception as exc:  # noqa: BLE001 - the case itself is whole
            log.warning("could not add %s to %s: %s", case, datalist, exc)
        finish_case(dataset_dir, case)
    if cleaned:
        log.info("removed what killed exports left behind in %s: %s", dataset_dir,
                 ", ".join(cleaned))
    return cleaned


def _clean_locked(dataset_dir: Path, file_ending: str, now, grace_s):
    now = time.time() if now is None else now
    repairs = []
    medseg = dataset_dir / ".medseg"
    claims, staging = medseg / "cases", medseg / "staging"
    cleaned = []
    for res in sorted(claims.iterdir()) if claims.is_dir() else []:
        owner = res / OWNER_FILE
        record = _read_record(owner)
        if record is None:  # a finished case, or a claim without a record yet
            continue
        if not record:
            with contextlib.suppress(OSError):
                if now - owner.stat().st_mtime < grace_s:
                    continue
        elif writer_alive(record, now):
            continue
        repair = _discard(dataset_dir, res.name, record, file_ending)
        if repair:
            repairs.append(repair)
        cleaned.append(res.name)
    for stage in sorted(staging.iterdir()) if staging.is_dir() else []:
        res = claims / stage.name
        try:
            res.mkdir(parents=True)  # reserve it: nobody else may be using it
        except FileExistsError:
            continue
        except OSError:
            continue
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            res.rmdir()
        cleaned.append(stage.name)
    return cleaned, repairs


def _discard(dataset_dir: Path, case: str, record: dict, file_ending: str):
    """Remove a dead writer's staging; keep its case if the label was published.

    Returns ``(case, datalist, images, label)`` when a kept case is to be added
    to its datalist (after the folder lock is released), else None.
    """
    stage = dataset_dir / ".medseg" / "staging" / case
    label = dataset_dir / "labelsTr" / f"{case}{file_ending}"
    images = sorted((dataset_dir / "imagesTr").glob(f"{glob.escape(case)}_[0-9][0-9][0-9]"
                                                    f"[0-9]{file_ending}"))
    if label.exists():  # published (the label goes last but for the ledger): keep it
        ledger, dst = stage / "ledger", dataset_dir / "ledger" / case
        if ledger.is_dir() and not dst.exists():
            with contextlib.suppress(OSError):
                dst.parent.mkdir(exist_ok=True)
                os.replace(ledger, dst)
        shutil.rmtree(stage, ignore_errors=True)
        datalist = record.get("datalist")
        if datalist and images:
            return case, datalist, images, label
        finish_case(dataset_dir, case)
        return None
    shutil.rmtree(stage, ignore_errors=True)
    for p in images:
        with contextlib.suppress(OSError):
            p.unlink()
    shutil.rmtree(dataset_dir / "ledger" / case, ignore_errors=True)
    release_case_id(dataset_dir, case)
    return None
