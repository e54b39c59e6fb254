"""Atomic writes: the target appears whole or not at all, with normal permissions."""

import os
import stat

import pytest

from napari_medseg.errors import MedSegError
from napari_medseg.io.atomic import atomic_path


def test_new_file_gets_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.nii.gz") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.nii.gz").stat().st_mode)
    assert mode == 0o644


def test_overwrite_keeps_existing_permissions(tmp_path):
    target = tmp_path / "b.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_failure_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "c.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_refuses_to_overwrite(tmp_path):
    target = tmp_path / "d.txt"
    target.write_text("old")
    with pytest.raises(MedSegError, match="d.txt"):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "old"


# ------------------------------------------------- hidden temporary folder
def test_temporary_file_is_hidden_keeps_the_suffix_and_goes_away(tmp_path):
    from napari_medseg.io.atomic import TMP_DIR_NAME

    with atomic_path(tmp_path / "case.labels.nii.gz") as tmp:
        assert tmp.parent == tmp_path / TMP_DIR_NAME
        assert tmp.name.endswith("~case.labels.nii.gz")
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.labels.nii.gz"]
    with pytest.raises(KeyboardInterrupt):  # any exit path, a cancel included
        with atomic_path(tmp_path / "b.nii.gz") as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.labels.nii.gz"]


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_are_cleaned_never_a_live_writers(tmp_path):
    import subprocess
    import sys

    from napari_medseg.io.atomic import _HOST, STALE_SECONDS, TMP_DIR_NAME, clean_stale

    tmpdir = tmp_path / TMP_DIR_NAME
    tmpdir.mkdir()
    dead = tmpdir / f"{_HOST}~{_dead_pid()}~00aa11bb22cc~x.nii.gz"
    dead.write_bytes(b"partial")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmpdir / f"{_HOST}~{live_proc.pid}~00aa11bb22cd~y.nii.gz"
        live.write_bytes(b"being written")
        other_host = tmpdir / f"elsewhere~{live_proc.pid}~00aa11bb22ce~z.nii.gz"
        other_host.write_bytes(b"another machine's write, pid unknown here")
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("ok")
        # the other host's file is recent: kept; once old enough it goes
        assert sorted(p.name for p in tmpdir.iterdir()) == sorted([live.name, other_host.name])
        assert clean_stale(tmp_path, max_age=-1) == [other_host]
        assert sorted(p.name for p in tmpdir.iterdir()) == [live.name]
        assert STALE_SECONDS >= 600
    finally:
        live_proc.kill()
        live_proc.wait()
    with atomic_path(tmp_path / "new2.txt") as tmp:  # the writer died: its file goes
        tmp.write_text("ok")
    assert not tmpdir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "new2.txt"]


def test_all_or_none_restores_every_target(tmp_path):
    from napari_medseg.io.atomic import all_or_none

    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(MedSegError):
        with all_or_none([tmp_path / "a.txt", tmp_path / "b.txt"]):
            with atomic_path(tmp_path / "b.txt") as tmp:
                tmp.write_text("new b")
            with atomic_path(tmp_path / "a.txt", overwrite=True) as tmp:
                tmp.write_text("new a")
            raise MedSegError("disk full while writing the second output")
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with all_or_none([tmp_path / "a.txt", tmp_path / "b.txt"]):
        with atomic_path(tmp_path / "a.txt", overwrite=True) as tmp:
            tmp.write_text("new a")
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("new b")
    assert (tmp_path / "a.txt").read_text() == "new a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_mhd_pair_is_replaced_as_one_step(tmp_path):
    """The new data file gets a new name; the old header and data stay whole until the
    new header is renamed into place; the old data file is removed after."""
    import numpy as np

    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io import read_volume, write_labels
    from napari_medseg.io.itk import remove_unreferenced_data, write_itk

    target = tmp_path / "seg.mhd"
    old = Volume(np.ones((3, 4, 5), np.uint8), make_affine((2, 1, 1)), is_label=True)
    new = Volume(np.full((3, 4, 5), 2, np.uint8), make_affine((2, 1, 1)), is_label=True)
    write_labels(target, old)
    first = sorted(p.name for p in tmp_path.iterdir())
    assert len(first) == 2 and first[1] == "seg.mhd" and first[0].endswith(".zraw")
    with atomic_path(target, overwrite=True) as tmp:
        write_itk(tmp, new, target, as_label=True)
        # the new data is in place under a new name; the old pair still reads whole
        assert len(list(tmp_path.glob("seg.*.zraw"))) == 2
        np.testing.assert_array_equal(np.asarray(read_volume(target).data), 1)
    remove_unreferenced_data(target)
    np.testing.assert_array_equal(np.asarray(read_volume(target).data), 2)
    second = sorted(p.name for p in tmp_path.iterdir())
    assert len(second) == 2 and second[0] not in first
    write_labels(target, old, overwrite=True)  # the public writer does all of it
    np.testing.assert_array_equal(np.asarray(read_volume(target).data), 1)
    assert len(list(tmp_path.iterdir())) == 2


def test_mhd_data_orphaned_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io import write_labels

    vol = Volume(np.ones((3, 4, 5), np.uint8), make_affine((2, 1, 1)), is_label=True)
    write_labels(tmp_path / "seg.mhd", vol)
    dead = tmp_path / f"seg.{_dead_pid()}-deadbeef.zraw"  # moved in, header never renamed
    dead.write_bytes(b"orphan")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"seg.{live_proc.pid}-0badcafe.zraw"  # a writer still at work
        live.write_bytes(b"in flight")
        write_labels(tmp_path / "other.mhd", vol)
        assert not dead.exists() and live.exists()
    finally:
        live_proc.kill()
        live_proc.wait()
    assert len(list(tmp_path.glob("*.zraw"))) == 3  # seg's, other's and the live one


def test_backup_of_an_old_file_survives_another_writers_cleanup(tmp_path):
    from napari_medseg.io.atomic import all_or_none, clean_stale

    target = tmp_path / "a.txt"
    target.write_text("old")
    os.utime(target, (1e9, 1e9))  # last modified in 2001
    with pytest.raises(MedSegError):
        with all_or_none([target]):
            clean_stale(tmp_path)  # another writer's cleanup while we hold a backup
            with atomic_path(target, overwrite=True) as tmp:
                tmp.write_text("new")
            raise MedSegError("the second output failed")
    assert target.read_text() == "old"
