"""A worklist: the cases of a folder, their status, and the review-and-retrain loop.

::

    from napari_medseg.worklist import Worklist
    wl = Worklist("/data/liver_cases", annotator="ana")
    wl.set_training_dir("/data/nnUNet_raw/Dataset501_Liver")   # once per worklist
    case = wl.next_case()                                      # a CaseRecord
    wl.predict_case(case.case_id, "abdomen-ct-small")          # labels + uncertainty
    ... the user corrects ...
    wl.add_work(case.case_id, seconds=95, edits=4)
    wl.approve(case.case_id, images, labels, ledger=ledger, review=True)

Files the worklist writes live in its *work folder*: ``<folder>/.medseg-worklist/``
(database ``worklist.sqlite``, ``predictions/``, ``drafts/``, ``ledgers/``), or,
when the folder is read-only, ``<user data folder>/worklists/<name>-<hash>/``
(:func:`napari_medseg.paths.user_dir`). The database is :class:`.store.Store`.

Statuses: ``new`` (never predicted), ``predicted`` (a prediction is cached),
``in progress`` (an annotator opened and works on it), ``needs review`` (the
annotator approved it and sent it to a reviewer; the corrected labels wait in
``drafts/``), ``approved`` (exported as a training case into the training
dataset folder: nnU-Net raw + MONAI datalist, with the correction ledger).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedSegError, check_cancel
from .scan import scan_folder
from .store import STATUSES, Store

log = logging.getLogger(__name__)

__all__ = ["Worklist", "CaseRecord", "STATUSES", "work_dir_for"]

WORK_DIR_NAME = ".medseg-worklist"
DB_NAME = "worklist.sqlite"


@dataclass
class CaseRecord:
    """One row of the worklist.

    Attributes
    ----------
    case_id : str
    position : int
        Order of the case in the folder listing.
    paths : list of str
        Image channel paths.
    reference : str or None
        A reference label file the folder holds (nnU-Net ``labelsTr``).
    status : str
        One of :data:`STATUSES`.
    annotator, reviewer : str or None
    seconds : float
        Time spent on the case, all sessions together (s).
    edits : int
        Edits recorded (brush strokes, fills, corrections).
    uncertainty : float or None
        Mean uncertainty of the cached prediction (0..1).
    model : str or None
        Model that made the cached prediction.
    training_case : str or None
        Case id in the training dataset once exported.
    """

    case_id: str
    position: int
    paths: list
    reference: str | None
    status: str
    annotator: str | None
    reviewer: str | None
    seconds: float
    edits: int
    uncertainty: float | None
    model: str | None
    training_case: str | None
    note: str | None
    updated: float | None

    @classmethod
    def from_row(cls, row) -> "CaseRecord":
        d = dict(row)
        d["paths"] = json.loads(d["paths"])
        return cls(**d)


def _writable(folder: Path) -> bool:
    """Can we create files in ``folder``? (tried, not guessed: ``os.access`` lies for root)."""
    probe = folder / f".medseg-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def work_dir_for(folder) -> tuple:
    """``(work folder, "folder" | "user")`` for a worklist folder.

    The work folder is ``<folder>/.medseg-worklist`` when it exists and is
    writable or can be created; otherwise a folder under the user data folder
    named after the worklist folder's name and a hash of its absolute path.
    """
    from ..paths import user_dir

    root = Path(folder).expanduser().resolve()
    local = root / WORK_DIR_NAME
    if local.is_dir() and _writable(local):
        return local, "folder"
    if not local.exists() and _writable(root):
        try:
            local.mkdir()
            return local, "folder"
        except OSError:
            pass
    key = hashlib.sha1(str(root).encode("utf-8")).hexdigest()[:12]
    user = user_dir() / "worklists" / f"{root.name or 'root'}-{key}"
    try:
        user.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSegError(f"the folder is read-only and the user data folder {user} cannot "
                          f"be created ({exc.strerror}); set NAPARI_MEDSEG_HOME to a writable "
                          "folder", str(root)) from exc
    log.info("%s is read-only: the worklist state lives in %s", root, user)
    return user, "user"


class Worklist:
    """The cases of a folder with their review state (see the module docstring).

    Parameters
    ----------
    folder : str or Path
        A folder of images / DICOM series, or an nnU-Net raw dataset folder.
    annotator : str, optional
        Who works in this session (default: the login name).
    journal : {"auto", "wal", "delete"}
        SQLite journal mode (see :class:`.store.Store`).
    scan : bool
        Add cases found in the folder to the database (default True).

    Raises
    ------
    MedSegError
        The folder is missing or holds nothing readable.
    """

    def __init__(self, folder, annotator: str | None = None, journal: str = "auto",
                 scan: bool = True):
        self.root = Path(folder).expanduser().resolve()
        if not self.root.is_dir():
            raise MedSegError("the worklist folder does not exist", str(self.root))
        self.annotator = annotator or _login()
        self.work_dir, self.location = work_dir_for(self.root)
        self.store = Store(self.work_dir / DB_NAME, journal=journal)
        self.store.set_meta("root", str(self.root), only_if_unset=True)
        if scan:
            self.sync()

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def db_path(self) -> Path:
        return self.store.path

    @property
    def journal_mode(self) -> str:
        return self.store.journal_mode

    # ----------------------------------------------------------- the cases
    def sync(self) -> int:
        """Add cases found in the folder that the database lacks; return how many."""
        found = scan_folder(self.root)
        with self.store.transaction() as cur:
            have = {r[0] for r in cur.execute("SELECT case_id FROM cases")}
            top = cur.execute("SELECT COALESCE(MAX(position), -1) FROM cases").fetchone()[0]
            n = 0
            for c in found:
                if c.case_id in have:
                    continue
                top += 1
                cur.execute("INSERT INTO cases (case_id, position, paths, reference, status, "
                            "updated) VALUES (?, ?, ?, ?, 'new', ?)",
                            (c.case_id, top, json.dumps(c.paths), c.reference, time.time()))
                n += 1
        return n

    def cases(self, status=None) -> list:
        """All cases (or those with ``status``, a string or a collection), in folder order."""
        rows = self.store.query("SELECT * FROM cases ORDER BY position")
        out = [CaseRecord.from_row(r) for r in rows]
        if status is not None:
            want = {status} if isinstance(status, str) else set(status)
            out = [c for c in out if c.status in want]
        return out

    def case(self, case_id: str) -> CaseRecord:
        rows = self.store.query("SELECT * FROM cases WHERE case_id = ?", (case_id,))
        if not rows:
            raise MedSegError(f"no case {case_id!r} in this worklist", str(self.root))
        return CaseRecord.from_row(rows[0])

    def counts(self) -> dict:
        """``{status: number of cases}`` for every status."""
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self.store.query("SELECT status, COUNT(*) FROM cases GROUP BY status"):
            out[status] = n
        return out

    def events(self, case_id: str | None = None) -> list:
        """The audit trail (dicts), oldest first."""
        if case_id is None:
            rows = self.store.query("SELECT * FROM events ORDER BY id")
        else:
            rows = self.store.query("SELECT * FROM events WHERE case_id = ? ORDER BY id",
                                    (case_id,))
        return [dict(r) for r in rows]

    def next_case(self, after: str | None = None, order: str = "list",
                  statuses=("new", "predicted", "in progress"), step: int = 1):
        """The next (``step=-1``: previous) case to work on, or None.

        Parameters
        ----------
        after : str, optional
            The current case id (default: start from the beginning).
        order : {"list", "uncertainty"}
            Folder order, or most uncertain first (cases without a prediction last).
        statuses : collection of str
            Statuses to visit (default: those not yet approved or in review).
        """
        cases = self.ordered(order)
        ids = [c.case_id for c in cases]
        start = ids.index(after) if after in ids else (-1 if step > 0 else len(ids))
        i = start + step
        while 0 <= i < len(cases):
            if cases[i].status in statuses:
                return cases[i]
            i += step
        return None

    def ordered(self, order: str = "list") -> list:
        """All cases in folder order or by decreasing mean uncertainty."""
        cases = self.cases()
        if order == "uncertainty":
            from ..core.review import rank_cases

            ranked = rank_cases({c.case_id: c.uncertainty for c in cases})
            by_id = {c.case_id: c for c in cases}
            return [by_id[i] for i in ranked]
        if order != "list":
            raise MedSegError(f"unknown order {order!r}; use 'list' or 'uncertainty'")
        return cases

    # ------------------------------------------------------------ changes
    def set_status(self, case_id: str, status: str, who: str | None = None,
                   expect=None, note: str | None = None) -> CaseRecord:
        """Change a case's status in one transaction.

        Parameters
        ----------
        expect : str or collection of str, optional
            Only change it when the status is (one of) this now; otherwise
            raise (another viewer changed it first).

        Raises
        ------
        MedSegError
            Unknown status or case, or the status is not what ``expect`` says.
        """
        if status not in STATUSES:
            raise MedSegError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
        who = who or self.annotator
        with self.store.transaction() as cur:
            old = self._status(cur, case_id)
            if expect is not None:
                want = {expect} if isinstance(expect, str) else set(expect)
                if old not in want:
                    raise MedSegError(f"case {case_id} is now '{old}' (changed elsewhere); "
                                      "reload the worklist", str(self.root))
            sets = "status = ?, updated = ?"
            args = [status, time.time()]
            if status == "in progress":
                sets += ", annotator = ?"
                args.append(who)
            if status == "approved" and old == "needs review":
                sets += ", reviewer = ?"
                args.append(who)
            if note is not None:
                sets += ", note = ?"
                args.append(note)
            cur.execute(f"UPDATE cases SET {sets} WHERE case_id = ?", (*args, case_id))
            self.store.log_event(cur, case_id, "status", who, old, status)
        return self.case(case_id)

    def _status(self, cur, case_id: str) -> str:
        row = cur.execute("SELECT status FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise MedSegError(f"no case {case_id!r} in this worklist", str(self.root))
        return row[0]

    def claim(self, case_id: str, who: str | None = None) -> CaseRecord:
        """Open a case for work: ``new`` / ``predicted`` become ``in progress`` (by ``who``).

        A case ``in progress`` by someone else, in review or approved keeps its
        status (the caller may still look at it).
        """
        who = who or self.annotator
        with self.store.transaction() as cur:
            old = self._status(cur, case_id)
            if old in ("new", "predicted"):
                cur.execute("UPDATE cases SET status = 'in progress', annotator = ?, "
                            "updated = ? WHERE case_id = ?", (who, time.time(), case_id))
                self.store.log_event(cur, case_id, "status", who, old, "in progress")
        return self.case(case_id)

    def add_work(self, case_id: str, seconds: float = 0.0, edits: int = 0,
                 who: str | None = None) -> None:
        """Add time spent (s) and edits to a case (added in SQL: never lost)."""
        if seconds < 0 or edits < 0:
            raise MedSegError("time and edits can only be added")
        with self.store.transaction() as cur:
            cur.execute("UPDATE cases SET seconds = seconds + ?, edits = edits + ?, "
                        "updated = ? WHERE case_id = ?",
                        (float(seconds), int(edits), time.time(), case_id))
            if cur.rowcount == 0:
                raise MedSegError(f"no case {case_id!r} in this worklist", str(self.root))
            self.store.log_event(cur, case_id, "work", who or self.annotator, None,
                                 f"{float(seconds):.1f}s {int(edits)} edits")

    # --------------------------------------------------------- predictions
    def prediction_path(self, case_id: str) -> Path:
        return self.work_dir / "predictions" / f"{case_id}.nii.gz"

    def uncertainty_path(self, case_id: str) -> Path:
        return self.work_dir / "predictions" / f"{case_id}_uncertainty.nii.gz"

    def draft_path(self, case_id: str) -> Path:
        return self.work_dir / "drafts" / f"{case_id}.nii.gz"

    def ledger_dir(self, case_id: str) -> Path:
        return self.work_dir / "ledgers" / case_id

    def record_prediction(self, case_id: str, model: str, uncertainty: float | None) -> None:
        """Note a cached prediction: its model and mean uncertainty; ``new`` -> ``predicted``."""
        with self.store.transaction() as cur:
            old = self._status(cur, case_id)
            new = "predicted" if old == "new" else old
            cur.execute("UPDATE cases SET status = ?, model = ?, uncertainty = ?, updated = ? "
                        "WHERE case_id = ?", (new, model, None if uncertainty is None
                                              else float(uncertainty), time.time(), case_id))
            self.store.log_event(cur, case_id, "predicted", None, old, model)

    def predict_case(self, case_id: str, model, uncertainty: str = "entropy",
                     device: str = "auto", overlap: float | None = None,
                     overwrite: bool = False,
                     progress=None, cancel=None) -> tuple:
        """Predict a case (labels + uncertainty map) into the work folder.

        Parameters
        ----------
        model : str, Path or Model
        uncertainty : {"entropy", "tta"}

        Returns
        -------
        (Path, Path or None)
            The labels and uncertainty files (kept when already there, unless
            ``overwrite``).
        """
        from ..io import read_volume, write_labels, write_volume
        from ..io.atomic import all_or_none

        rec = self.case(case_id)
        lab_p, unc_p = self.prediction_path(case_id), self.uncertainty_path(case_id)
        if lab_p.is_file() and unc_p.is_file() and not overwrite:
            return lab_p, unc_p
        if not (hasattr(model, "card") and hasattr(model, "predict")):
            from ..models import load_model

            model = load_model(model)
        from ..models.run import run_model

        vols = [read_volume(p, lazy=False) for p in rec.paths]
        check_cancel(cancel)
        _, pred = run_model(model, vols, name=case_id, device=device, overlap=overlap,
                            uncertainty=uncertainty, progress=progress, cancel=cancel,
                            crop_to_body=True)
        check_cancel(cancel)
        lab_p.parent.mkdir(parents=True, exist_ok=True)
        mean_unc = None
        with all_or_none([lab_p, unc_p]):
            write_labels(lab_p, pred.labels, overwrite=True)
            if pred.uncertainty is not None:
                import numpy as np

                u = np.asarray(pred.uncertainty.data, dtype=np.float32)
                from ..core.review import case_uncertainty

                mean_unc = case_uncertainty(u)
                write_volume(unc_p, pred.uncertainty.with_data(u), overwrite=True)
        self.record_prediction(case_id, model.card.name, mean_unc)
        return lab_p, unc_p if unc_p.is_file() else None

    def predict_all(self, model, workers: int = 1, device: str = "cpu",
                    uncertainty: str = "entropy", progress=True) -> int:
        """Predict every case without a cached prediction with the batch runner.

        Uses :func:`napari_medseg.batch.run_batch` (a process pool of ``workers``)
        into ``<work folder>/batch/``, with uncertainty maps, then
        :meth:`ingest_predictions`. Returns how many cases were recorded.
        """
        import csv

        from ..batch import run_batch

        todo = [c for c in self.cases() if not self.prediction_path(c.case_id).is_file()]
        if not todo:
            return 0
        out = self.work_dir / "batch"
        out.mkdir(parents=True, exist_ok=True)
        listing = out / "cases.csv"
        n_ch = max(len(c.paths) for c in todo)
        with open(listing, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case_id"] + [f"path_{i}" for i in range(n_ch)])
            for c in todo:
                w.writerow([c.case_id] + list(c.paths))
        name = model if isinstance(model, (str, Path)) else model.source
        run_batch([listing], name, out, workers=workers, device=device,
                  uncertainty=uncertainty, progress=progress)
        return self.ingest_predictions(out, Path(str(name)).name if Path(str(name)).exists()
                                       else str(name))

    def ingest_predictions(self, folder, model: str, suffix: str = ".nii.gz") -> int:
        """Take labels (and ``<case>_uncertainty`` maps) a batch run wrote into ``folder``.

        Returns how many cases were recorded.
        """
        import shutil

        import numpy as np

        from ..core.review import case_uncertainty
        from ..io import read_volume

        folder = Path(folder)
        n = 0
        for rec in self.cases():
            src = folder / f"{rec.case_id}{suffix}"
            if not src.is_file():
                continue
            dst = self.prediction_path(rec.case_id)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            unc = folder / f"{rec.case_id}_uncertainty{suffix}"
            mean = None
            if unc.is_file():
                if unc.resolve() != self.uncertainty_path(rec.case_id).resolve():
                    shutil.copyfile(unc, self.uncertainty_path(rec.case_id))
                mean = case_uncertainty(np.asarray(read_volume(unc, lazy=False).data))
            self.record_prediction(rec.case_id, model, mean)
            n += 1
        return n

    def load_case(self, case_id: str) -> dict:
        """Volumes of a case: ``images`` (list), ``prediction``, ``uncertainty``, ``draft``.

        Missing ones are None.
        """
        from ..io import read_volume

        rec = self.case(case_id)
        out = {"record": rec, "images": [read_volume(p) for p in rec.paths]}
        for key, p in (("prediction", self.prediction_path(case_id)),
                       ("uncertainty", self.uncertainty_path(case_id)),
                       ("draft", self.draft_path(case_id))):
            out[key] = read_volume(p, lazy=False) if p.is_file() else None
        ledger = self.ledger_dir(case_id)
        out["ledger"] = None
        if ledger.is_dir():
            from ..core.ledger import CorrectionLedger

            with contextlib.suppress(MedSegError):
                out["ledger"] = CorrectionLedger.load(ledger)
        return out

    # -------------------------------------------------------------- training
    @property
    def training_dir(self) -> Path | None:
        p = self.store.get_meta("training_dir")
        return Path(p) if p else None

    def set_training_dir(self, path, replace: bool = False) -> Path:
        """Choose the training dataset folder (nnU-Net raw ``DatasetXXX_Name``) once.

        Returns the folder in effect: an earlier choice wins unless ``replace``.
        """
        path = str(Path(path).expanduser().resolve())
        value = self.store.set_meta("training_dir", path, only_if_unset=not replace)
        return Path(value)

    def save_draft(self, case_id: str, labels, ledger=None) -> Path:
        """Keep the corrected labels (and ledger) of a case in the work folder."""
        from ..io import write_labels

        p = self.draft_path(case_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_labels(p, labels, overwrite=True)
        if ledger is not None:
            from ..io.ledger import save_ledger

            import numpy as np

            save_ledger(ledger, self.ledger_dir(case_id), current=np.asarray(labels.data))
        return p

    def approve(self, case_id: str, images, labels, ledger=None, review: bool = False,
                who: str | None = None, progress=None, cancel=None) -> CaseRecord:
        """Approve a case.

        With ``review``, the labels are kept as a draft and the case waits for
        a reviewer (``needs review``); otherwise (and when a reviewer approves
        a case in review) the case is exported as a training case
        (:func:`napari_medseg.io.export.export_training_case`: nnU-Net raw +
        MONAI datalist, with the ledger) into :attr:`training_dir` and becomes
        ``approved``.

        Parameters
        ----------
        images : list of Volume or None
            The case's image channels (None: read from the case's files).
        labels : Volume
            The corrected ``(Z, Y, X)`` labels.
        ledger : CorrectionLedger, optional
        """
        who = who or self.annotator
        self.save_draft(case_id, labels, ledger)
        if review:
            self.set_status(case_id, "needs review", who,
                            expect=("new", "predicted", "in progress", "needs review"))
            return self.case(case_id)
        target = self.training_dir
        if target is None:
            raise MedSegError("choose the training dataset folder of this worklist first",
                              str(self.root))
        rec = self.case(case_id)
        if rec.status == "approved":
            raise MedSegError(f"case {case_id} is already approved (training case "
                              f"{rec.training_case})", str(self.root))
        from ..io.export import export_training_case

        if images is None:
            from ..io import read_volume

            images = [read_volume(p, lazy=False) for p in rec.paths]
        tc = export_training_case(images, labels, target, ledger=ledger,
                                  case_prefix=_safe_prefix(case_id), progress=progress,
                                  cancel=cancel)
        with self.store.transaction() as cur:
            old = self._status(cur, case_id)
            cur.execute("UPDATE cases SET status = 'approved', training_case = ?, updated = ?, "
                        "reviewer = CASE WHEN ? = 'needs review' THEN ? ELSE reviewer END "
                        "WHERE case_id = ?", (tc, time.time(), old, who, case_id))
            self.store.log_event(cur, case_id, "status", who, old, "approved")
            self.store.log_event(cur, case_id, "exported", who, None, f"{target}:{tc}")
        return self.case(case_id)

    def table(self) -> list:
        """Rows for a status table (dicts)."""
        return [{"case": c.case_id, "status": c.status, "annotator": c.annotator or "",
                 "minutes": round(c.seconds / 60.0, 1), "edits": c.edits,
                 "uncertainty": None if c.uncertainty is None else round(c.uncertainty, 4),
                 "training_case": c.training_case or ""} for c in self.cases()]


def _safe_prefix(case_id: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", case_id).strip("_") or "case"


def _login() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (containers)
        return "annotator"
