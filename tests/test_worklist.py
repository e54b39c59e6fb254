"""The worklist: folder scanning, statuses, concurrency, crashes and read-only folders."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.core.volume import Volume
from napari_medseg.errors import MedSegError
from napari_medseg.worklist import STATUSES, Worklist
from napari_medseg.worklist.store import Store, is_network_fs, journal_mode_for


def _image(seed: int, shape=(6, 16, 16)) -> Volume:
    rng = np.random.default_rng(seed)
    data = rng.normal(40, 10, shape).astype(np.float32)
    return Volume(data, affine=np.diag([-1.5, -1.5, 2.5, 1.0]), modality="CT")


def _folder(path: Path, n: int = 3) -> Path:
    from napari_medseg.io import write_labels, write_volume

    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _image(i)
        write_volume(path / f"case{i}.nii.gz", img)
    lab = np.zeros((6, 16, 16), np.uint8)
    lab[2:4, 4:8, 4:8] = 1
    write_labels(path / "case0_seg.nii.gz", _image(0).like_labels(lab, {1: "liver"}))
    return path


def test_scan_files_labels_and_dicom(tmp_path):
    from pydicom.data import get_testdata_file

    root = _folder(tmp_path / "cases")
    ct5n = Path(get_testdata_file("dicomdirtests/98892001/CT5N/2062")).parent
    shutil.copytree(ct5n, root / "ct_series")
    with Worklist(root, annotator="ana") as wl:
        ids = [c.case_id for c in wl.cases()]
        assert ids == ["case0", "case1", "case2", "ct_series"]  # the label file is no case
        assert wl.case("case0").reference.endswith("case0_seg.nii.gz")
        assert wl.case("case1").reference is None
        assert all(c.status == "new" for c in wl.cases())
        assert wl.location == "folder" and wl.db_path.parent == root / ".medseg-worklist"
        assert wl.journal_mode == journal_mode_for(root)
        # a new file appears: sync adds it at the end, nothing else changes
        wl.set_status("case1", "in progress")
        from napari_medseg.io import write_volume

        write_volume(root / "case9.nii.gz", _image(9))
        assert wl.sync() == 1
        assert [c.case_id for c in wl.cases()][-1] == "case9"
        assert wl.case("case1").status == "in progress"
        assert wl.case("case1").annotator == "ana"


def test_scan_nnunet_raw_dataset(tmp_path):
    from napari_medseg.io.export import export_training_case

    ds = tmp_path / "Dataset501_Test"
    lab = np.zeros((6, 16, 16), np.uint8)
    lab[1:3, 2:6, 2:6] = 1
    for i in range(2):
        img = _image(i)
        export_training_case(img, img.like_labels(lab, {1: "liver"}), ds)
    with Worklist(ds) as wl:
        cases = wl.cases()
        assert [c.case_id for c in cases] == ["case_000", "case_001"]
        assert cases[0].paths[0].endswith("imagesTr/case_000_0000.nii.gz")
        assert cases[0].reference.endswith("labelsTr/case_000.nii.gz")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(MedSegError, match="does not exist"):
        Worklist(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedSegError, match="no volume"):
        Worklist(tmp_path / "empty")


def test_status_flow_counts_and_events(tmp_path):
    root = _folder(tmp_path / "cases")
    with Worklist(root, annotator="ana") as wl:
        assert wl.counts() == {"new": 3, "predicted": 0, "in progress": 0,
                               "needs review": 0, "approved": 0}
        wl.record_prediction("case0", "m", 0.2)
        wl.record_prediction("case1", "m", 0.6)
        assert wl.case("case0").status == "predicted"
        assert wl.claim("case0").status == "in progress"
        assert wl.claim("case0", who="bob").annotator == "ana"  # stays with ana
        wl.add_work("case0", seconds=30, edits=2)
        wl.add_work("case0", seconds=15, edits=1)
        rec = wl.case("case0")
        assert (rec.seconds, rec.edits) == (45.0, 3)
        with pytest.raises(MedSegError, match="changed elsewhere"):
            wl.set_status("case0", "approved", expect="needs review")
        with pytest.raises(MedSegError, match="unknown status"):
            wl.set_status("case0", "done")
        assert [c.case_id for c in wl.ordered("uncertainty")] == ["case1", "case0", "case2"]
        assert wl.next_case().case_id == "case0"
        assert wl.next_case("case0").case_id == "case1"
        assert wl.next_case("case1", step=-1).case_id == "case0"
        assert wl.next_case(order="uncertainty").case_id == "case1"
        actions = [(e["old"], e["new"]) for e in wl.events("case0") if e["action"] == "status"]
        assert actions == [("predicted", "in progress")]
    # the state is in the file: a new session sees it
    with Worklist(root, annotator="bob") as wl:
        assert wl.case("case0").edits == 3
        assert wl.case("case1").uncertainty == pytest.approx(0.6)


def test_approve_exports_training_case_with_ledger_and_review(tmp_path):
    from napari_medseg.core.ledger import CorrectionLedger
    from napari_medseg.io import read_volume

    root = _folder(tmp_path / "cases")
    train = tmp_path / "nnUNet_raw" / "Dataset501_Review"
    with Worklist(root, annotator="ana") as wl:
        img = read_volume(root / "case1.nii.gz", lazy=False)
        pred = np.zeros(img.shape3, np.uint8)
        pred[2:4, 4:8, 4:8] = 1
        cur = pred.copy()
        cur[2:4, 8:10, 4:8] = 1
        ledger = CorrectionLedger(pred, img.spacing, {1: "liver"})
        labels = img.like_labels(cur, {1: "liver"})
        with pytest.raises(MedSegError, match="training dataset folder"):
            wl.approve("case1", [img], labels, ledger=ledger)
        assert wl.set_training_dir(train) == train.resolve()
        assert wl.set_training_dir(tmp_path / "other") == train.resolve()  # chosen once
        rec = wl.approve("case1", [img], labels, ledger=ledger, review=True)
        assert rec.status == "needs review"
        assert not (train / "labelsTr").exists()  # nothing exported before the review
        loaded = wl.load_case("case1")
        assert np.array_equal(np.asarray(loaded["draft"].data), cur)
        assert np.array_equal(np.asarray(loaded["ledger"].prediction), pred)
        rec = wl.approve("case1", [img], labels, ledger=ledger, who="rita")
        assert rec.status == "approved" and rec.reviewer == "rita"
        assert (train / "labelsTr" / f"{rec.training_case}.nii.gz").is_file()
        assert (train / "ledger" / rec.training_case / "prediction.npz").is_file()
        assert "datalist.json" in os.listdir(train)
        with pytest.raises(MedSegError, match="already approved"):
            wl.approve("case1", [img], labels)


# ------------------------------------------------------------- concurrency
def _writer(root: str, who: str, cases: list, n: int, barrier) -> None:
    wl = Worklist(root, annotator=who, scan=False)
    barrier.wait()
    for i in range(n):
        c = cases[i % len(cases)]
        wl.add_work(c, seconds=1.0, edits=1, who=who)
        wl.set_status(c, STATUSES[i % len(STATUSES)], who=who)
    wl.close()


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_two_concurrent_writer_processes_lose_nothing(tmp_path, journal):
    root = _folder(tmp_path / "cases")
    wl = Worklist(root, journal=journal)
    assert wl.journal_mode == journal
    ids = [c.case_id for c in wl.cases()]
    n = 60
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(root), who, ids, n, barrier))
             for who in ("ana", "bob")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert wl.store.integrity_ok()
    cases = wl.cases()
    assert sum(c.edits for c in cases) == 2 * n  # every increment of both processes
    assert sum(c.seconds for c in cases) == pytest.approx(2.0 * n)
    status_events = [e for e in wl.events() if e["action"] == "status"]
    assert len(status_events) == 2 * n
    # the status of each case is the one of its last logged change
    for c in cases:
        last = [e for e in status_events if e["case_id"] == c.case_id][-1]
        assert c.status == last["new"]
    wl.close()


def _hold_transaction(db: str, journal: str, ready) -> None:
    store = Store(db, journal=journal)
    with store.transaction() as cur:
        cur.execute("UPDATE cases SET status = 'approved', edits = edits + 1000")
        cur.execute("INSERT INTO events (case_id, time, action) VALUES ('x', 0, 'half')")
        ready.set()
        time.sleep(120)  # killed here, inside the transaction


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_killed_writer_leaves_database_consistent(tmp_path, journal):
    root = _folder(tmp_path / "cases")
    wl = Worklist(root, journal=journal)
    wl.add_work("case0", seconds=5, edits=2)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_transaction, args=(str(wl.db_path), journal, ready))
    p.start()
    assert ready.wait(60)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    wl.close()
    with Worklist(root, journal=journal) as again:  # a fresh process-like opening
        assert again.store.integrity_ok()
        assert [c.status for c in again.cases()] == ["new"] * 3
        assert again.case("case0").edits == 2
        assert not [e for e in again.events() if e["action"] == "half"]
        again.set_status("case0", "approved")  # the lock is free again
        assert again.case("case0").status == "approved"


# ---------------------------------------------------------- read-only folder
_RO_SCRIPT = """
import sys
from napari_medseg.worklist import Worklist
wl = Worklist(sys.argv[1], annotator="ana")
wl.set_status("case1", "in progress")
print(wl.location, wl.db_path, wl.case("case1").status, len(wl.cases()), sep="|")
"""


def _run_read_only(root: Path, home: Path) -> str:
    env = dict(os.environ, NAPARI_MEDSEG_HOME=str(home))
    cmd = [sys.executable, "-c", _RO_SCRIPT, str(root)]
    if os.geteuid() != 0:
        root.chmod(0o555)
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                                  timeout=120).stdout
        finally:
            root.chmod(0o755)
    # root ignores file modes: a read-only bind mount in a private mount namespace
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only folder")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make a read-only folder")
    script = (f"mount --bind -o ro '{root}' '{root}' && "
              + " ".join(f"'{c}'" for c in cmd))
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_read_only_folder_keeps_state_in_user_folder(tmp_path):
    root = _folder(tmp_path / "cases")
    home = tmp_path / "home"
    out = _run_read_only(root, home)
    location, db, status, n = out.strip().split("|")
    assert location == "user" and status == "in progress" and n == "3"
    assert Path(db).is_relative_to(home / "worklists")
    assert not (root / ".medseg-worklist").exists()
    # the same folder opened again (read-only or not) finds nothing in the folder, so a
    # writable opening starts its own state there; the user-folder state is intact
    con = sqlite3.connect(db)
    assert con.execute("SELECT status FROM cases WHERE case_id='case1'").fetchone()[0] \
        == "in progress"
    con.close()


def test_wal_failure_falls_back_to_rollback_journal(tmp_path, monkeypatch):
    root = _folder(tmp_path / "cases")
    monkeypatch.setenv("NAPARI_MEDSEG_WORKLIST_JOURNAL", "delete")  # as on a network share
    with Worklist(root) as wl:
        assert wl.journal_mode == "delete"
        assert not Path(str(wl.db_path) + "-wal").exists()
    # a database file whose folder cannot hold WAL's shared memory: sqlite refuses WAL on
    # an in-memory database too, and the store must then use the rollback journal
    s = Store(":memory:", journal="wal")
    assert s.journal_mode in ("memory", "delete")
    s.close()
    assert is_network_fs(tmp_path) is False
