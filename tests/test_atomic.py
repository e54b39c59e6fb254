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
