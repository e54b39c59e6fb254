"""A writer killed with SIGKILL mid-export leaves the previous files intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

_CHILD_LABELS = textwrap.dedent("""
    import sys, numpy as np
    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io import write_labels
    target = sys.argv[1]
    rng = np.random.default_rng(1)
    base = rng.integers(0, 6, (48, 160, 160), dtype=np.uint8)
    i = 1
    while True:
        data = base.copy(); data[0, 0, 0] = 100 + i % 100
        write_labels(target, Volume(data, make_affine((2, 1, 1)), is_label=True),
                     overwrite=True, verify=False)
        i += 1
""")


def _kill_when(proc, ready, timeout=60.0):
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() - t0 < timeout, "the writer never got going"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


def test_killed_label_writer_leaves_a_whole_file(tmp_path):
    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io import write_labels

    target = tmp_path / "labels.nii.gz"
    rng = np.random.default_rng(1)
    base = rng.integers(0, 6, (48, 160, 160), dtype=np.uint8)
    old = base.copy()
    old[0, 0, 0] = 7
    write_labels(target, Volume(old, make_affine((2, 1, 1)), is_label=True))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_LABELS, str(target)],
                            stderr=subprocess.PIPE)
    try:
        # kill while a temporary file is being written (in the hidden temporary folder)
        _kill_when(proc, lambda: any((tmp_path / ".napari-medseg-tmp").glob("*labels.nii.gz")))
    finally:
        if proc.poll() is None:
            proc.kill()
    back = np.asarray(nib.load(target).dataobj).T
    stamp = int(back[0, 0, 0])
    assert stamp == 7 or 100 <= stamp < 200  # the old file or one whole new version
    expected = base.copy()
    expected[0, 0, 0] = stamp
    np.testing.assert_array_equal(back, expected)
    # the killed writer's temporary file is removed by the next write to the folder
    write_labels(tmp_path / "other.nii.gz", Volume(old, make_affine((2, 1, 1)), is_label=True))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gz") == \
        ["labels.nii.gz", "other.nii.gz"]
    assert not (tmp_path / ".napari-medseg-tmp").exists()


_CHILD_DATASET = textwrap.dedent("""
    import sys, numpy as np
    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io.export import export_training_case
    folder = sys.argv[1]
    rng = np.random.default_rng(2)
    img = Volume(rng.normal(0, 100, (40, 128, 128)).astype(np.float32),
                 make_affine((2, 1, 1)), modality="CT")
    lab = img.like_labels((rng.random(img.shape3) > 0.7).astype(np.uint8), {1: "lesion"})
    while True:
        export_training_case(img, lab, folder)
""")


def test_killed_dataset_export_leaves_a_valid_dataset(tmp_path, capfd, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import \
        verify_dataset_integrity

    folder = tmp_path / "Dataset601_Kill"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_DATASET, str(folder)],
                            stderr=subprocess.PIPE)

    def busy_after_first_case():
        staging = folder / ".medseg" / "staging"
        done = list((folder / "labelsTr").glob("*.nii.gz")) if folder.exists() else []
        return bool(done) and staging.is_dir() and any(staging.rglob("*.nii.gz"))

    try:
        _kill_when(proc, busy_after_first_case, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    labels = sorted(p.name for p in (folder / "labelsTr").iterdir())
    images = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert labels and all(not n.startswith(".") for n in labels + images)
    info = json.loads((folder / "dataset.json").read_text())
    datalist = json.loads((folder / "datalist.json").read_text())
    # the killed case may have been published without its dataset.json update
    assert info["numTraining"] in (len(labels), len(labels) - 1)
    assert len(datalist["training"]) in (len(labels), len(labels) - 1)
    for name in labels:
        case = name[: -len(".nii.gz")]
        assert f"{case}_0000.nii.gz" in images
        assert nib.load(folder / "labelsTr" / name).get_fdata().max() == 1
    # a later export repairs the count, and nnU-Net accepts the dataset
    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io.export import export_training_case

    rng = np.random.default_rng(3)
    img = Volume(rng.normal(0, 1, (4, 6, 6)).astype(np.float32), make_affine((2, 1, 1)))
    lab = img.like_labels(np.ones((4, 6, 6), np.uint8), {1: "lesion"})
    for p in (folder / "imagesTr").iterdir():  # drop the big cases to keep the check fast
        p.unlink()
    for p in (folder / "labelsTr").iterdir():
        p.unlink()
    export_training_case(img, lab, folder)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    capfd.readouterr()
    verify_dataset_integrity(str(folder), num_processes=1)
    out = capfd.readouterr().out
    assert "Error" not in out, out


# ----------------------------------------------- what killed exports leave behind
_CHILD_PAUSED = textwrap.dedent("""
    import sys, time, numpy as np
    from napari_medseg.core.volume import Volume, make_affine
    from napari_medseg.io.export import nnunet
    folder, where = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(4)
    img = Volume(rng.normal(0, 1, (4, 6, 6)).astype(np.float32), make_affine((2, 1, 1)),
                 modality="CT")
    lab = img.like_labels(np.ones((4, 6, 6), np.uint8), {1: "lesion"})

    def pause(*args, **kwargs):
        print("paused", flush=True)
        time.sleep(600)

    progress = None
    if where == "staged":      # after the image was written to the staging folder
        progress = lambda done, total: pause() if done == 1 else None
    else:                      # after the label was published, before the datalist
        nnunet.append_datalist = pause
    nnunet.export_training_case(img, lab, folder, progress=progress)
""")


def _small_case(seed=5):
    from napari_medseg.core.volume import Volume, make_affine

    rng = np.random.default_rng(seed)
    img = Volume(rng.normal(0, 1, (4, 6, 6)).astype(np.float32), make_affine((2, 1, 1)),
                 modality="CT")
    return img, img.like_labels(np.ones((4, 6, 6), np.uint8), {1: "lesion"})


def _paused_writer(folder, where):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_PAUSED, str(folder), where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().decode().strip()
    assert line == "paused", proc.stderr.read().decode()
    return proc


def _leftovers(folder):
    medseg = folder / ".medseg"
    staging = sorted(p.name for p in (medseg / "staging").iterdir()) \
        if (medseg / "staging").is_dir() else []
    owners = sorted(p.parent.name for p in (medseg / "cases").glob("*/owner.json"))
    return staging, owners


def test_next_export_cleans_up_after_a_killed_one_never_a_live_one(tmp_path):
    from napari_medseg.io.export import export_training_case

    folder = tmp_path / "Dataset602_Stale"
    img, lab = _small_case()
    assert export_training_case(img, lab, folder) == "case_000"
    proc = _paused_writer(folder, "staged")
    try:
        assert _leftovers(folder) == (["case_001"], ["case_001"])
        # the writer is alive: its staging folder and id are left alone
        assert export_training_case(img, lab, folder) == "case_002"
        assert _leftovers(folder) == (["case_001"], ["case_001"])
        assert any((folder / ".medseg" / "staging" / "case_001").iterdir())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the writer is dead: the next export removes its staging and reuses its id
    assert export_training_case(img, lab, folder) == "case_001"
    assert _leftovers(folder) == ([], [])
    assert not (folder / ".medseg" / "cases" / "case_001" / "owner.json").exists()
    labels = sorted(p.name for p in (folder / "labelsTr").iterdir())
    images = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert labels == [f"case_00{i}.nii.gz" for i in range(3)]
    assert images == [f"case_00{i}_0000.nii.gz" for i in range(3)]
    info = json.loads((folder / "dataset.json").read_text())
    assert info["numTraining"] == 3
    assert export_training_case(img, lab, folder) == "case_003"


def test_case_published_by_a_killed_export_is_kept_and_listed(tmp_path):
    from napari_medseg.io.export import export_training_case

    folder = tmp_path / "Dataset603_Half"
    img, lab = _small_case()
    proc = _paused_writer(folder, "published")
    try:
        assert (folder / "labelsTr" / "case_000.nii.gz").exists()
        assert _leftovers(folder)[1] == ["case_000"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (folder / "datalist.json").exists()
    # the whole case stays (its id too) and gets its missing datalist entry
    assert export_training_case(img, lab, folder) == "case_001"
    assert _leftovers(folder) == ([], [])
    datalist = json.loads((folder / "datalist.json").read_text())
    assert sorted(d["case"] for d in datalist["training"]) == ["case_000", "case_001"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    assert (folder / "ledger").is_dir()


def test_killed_dataset_export_staging_is_cleaned_by_the_next_export(tmp_path):
    folder = tmp_path / "Dataset604_Kill"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_DATASET, str(folder)],
                            stderr=subprocess.PIPE)

    def staging_case():
        staging = folder / ".medseg" / "staging"
        return staging.is_dir() and any(staging.rglob("*.nii.gz"))

    try:
        _kill_when(proc, staging_case, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    staged, owners = _leftovers(folder)
    assert staged and owners == staged
    published = {p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").iterdir()}
    killed = staged[0]
    from napari_medseg.io.export import export_training_case

    img, lab = _small_case()
    new = export_training_case(img, lab, folder)
    assert _leftovers(folder) == ([], [])
    if killed in published:   # killed after its label was published: kept
        assert new != killed
    else:                     # killed before: its id is free again and reused
        assert new == killed
    labels = {p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").iterdir()}
    images = {p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTr").iterdir()}
    assert images == labels   # no image left without its label
