"""Autosave and crash recovery of label maps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.io import read_volume, write_volume
from napari_medseg.io.autosave import (AutoSaver, Snapshot, find_recovery, image_key,
                                       list_recoveries)
from napari_medseg.paths import recovery_dir


def _image(tmp_path):
    aff = make_affine((3.0, 0.8, 0.8), (5.0, -7.0, 12.0), np.diag([-1.0, -1.0, 1.0]))
    vol = Volume(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7), aff, modality="CT")
    return read_volume(write_volume(tmp_path / "ct.nii.gz", vol))


def test_key_identifies_file_shape_and_grid(tmp_path):
    vol = _image(tmp_path)
    again = read_volume(tmp_path / "ct.nii.gz")
    k = image_key(vol.source, vol.shape3, vol.affine)
    assert k == image_key(again.source, again.shape3, again.affine)
    assert k.startswith("ct.nii.gz-")
    moved = vol.affine.copy()
    moved[0, 3] += 1
    assert image_key(vol.source, vol.shape3, moved) != k
    assert image_key(vol.source, (5, 6, 8), vol.affine) != k
    assert image_key(tmp_path / "other.nii.gz", vol.shape3, vol.affine) != k


def test_saves_only_when_changed_and_restores(tmp_path):
    vol = _image(tmp_path)
    key = image_key(vol.source, vol.shape3, vol.affine)
    lab = np.zeros(vol.shape3, np.uint8)
    lab[1:3, 2:4, 2:5] = 2
    saver = AutoSaver(lambda: Snapshot(lab, vol.affine, key, "ct_seg", {2: "spleen"},
                                       vol.source))
    assert len(saver.save_if_changed()) == 1
    assert saver.save_if_changed() == []          # unchanged: nothing written
    lab[0, 0, 0] = 1
    entry = saver.save_if_changed()[0]
    assert entry.folder.parent == recovery_dir()
    found = find_recovery(vol)
    assert found is not None and found.name == "ct_seg"
    back = found.load()
    np.testing.assert_array_equal(back.data, lab)
    np.testing.assert_allclose(back.affine, vol.affine)
    assert back.is_label and back.label_names == {2: "spleen"}
    found.discard()
    assert find_recovery(vol) is None


def test_corrupt_recovery_is_reported(tmp_path):
    key = "x-0123"
    lab = np.ones((2, 3, 4), np.uint8)
    AutoSaver(lambda: (lab, np.eye(4), key)).save_if_changed()
    entry = find_recovery(key)
    entry.npz.write_bytes(b"garbage")
    with pytest.raises(MedSegError, match="discard"):
        entry.load()


def test_background_thread_follows_edits(tmp_path):
    lab = np.zeros((3, 4, 5), np.uint8)
    saver = AutoSaver(lambda: (lab.copy(), np.eye(4), "bg"), interval_s=0.05).start()
    try:
        t0 = time.monotonic()
        while find_recovery("bg") is None and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        lab[1, 1, 1] = 4
        while time.monotonic() - t0 < 10:
            e = find_recovery("bg")
            if e is not None and e.load().data[1, 1, 1] == 4:
                break
            time.sleep(0.02)
    finally:
        saver.stop()
    assert find_recovery("bg").load().data[1, 1, 1] == 4
    assert len(list_recoveries("bg")) == 1


_CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    from napari_medseg.io import read_volume
    from napari_medseg.io.autosave import AutoSaver, Snapshot, image_key
    vol = read_volume(sys.argv[1])
    key = image_key(vol.source, vol.shape3, vol.affine)
    lab = np.zeros(vol.shape3, np.uint8)
    saver = AutoSaver(lambda: Snapshot(lab.copy(), vol.affine, key, "edits"),
                      interval_s=0.05).start()
    n = 0
    while True:          # a user painting, one voxel after another
        lab.flat[n % lab.size] = 1 + n % 3
        n += 1
        time.sleep(0.01)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_recovery_after_a_crash(tmp_path):
    vol = _image(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, vol.source],
                            stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while True:
            e = find_recovery(vol)
            if e is not None and e.load().data.any():
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    reopened = read_volume(tmp_path / "ct.nii.gz")   # "after the crash"
    entry = find_recovery(reopened)
    assert entry is not None and entry.name == "edits"
    back = entry.load()
    flat = back.data.ravel()
    n = int(np.count_nonzero(flat))
    assert n > 0
    # a consistent state of the painting: the first n voxels painted in order
    np.testing.assert_array_equal(flat[:n], 1 + np.arange(n) % 3)
    assert not flat[n:].any()
    np.testing.assert_allclose(back.affine, reopened.affine)
