"""Training-case export: nnU-Net v2 raw dataset + MONAI datalist + ledger."""

from __future__ import annotations

import json
import os
import threading

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.core.ledger import CorrectionLedger
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.io.export import dataset_folder, export_training_case

NAMES = {1: "liver", 2: "spleen"}


def _case(seed=0, shape=(6, 10, 12)):
    rng = np.random.default_rng(seed)
    aff = make_affine((2.5, 0.8, 0.7), (-30.0, 12.0, 5.5),
                      np.diag([-1.0, -1.0, 1.0]))  # LPS-stored, like DICOM
    img = Volume(rng.normal(40, 20, shape).astype(np.int16), aff, modality="CT")
    lab = np.zeros(shape, np.uint8)
    lab[1:4, 2:6, 3:8] = 1
    lab[2:5, 6:9, 1:4] = 2
    return img, img.like_labels(lab, names=NAMES)


def test_two_cases_pass_nnunet_integrity_check(tmp_path, capfd, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import \
        verify_dataset_integrity

    folder = dataset_folder(tmp_path, "Liver Corrections")
    assert folder.name == "Dataset501_Liver_Corrections"
    ids = []
    for seed in (0, 1):
        img, lab = _case(seed)
        ids.append(export_training_case([img], lab, folder, channel_names=["CT"]))
    assert ids == ["case_000", "case_001"]
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    assert info["channel_names"] == {"0": "CT"} and info["numTraining"] == 2
    assert info["file_ending"] == ".nii.gz"
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    capfd.readouterr()
    verify_dataset_integrity(str(folder), num_processes=1)
    out = capfd.readouterr().out
    assert "Error" not in out and "Warning" not in out, out
    assert "verify_dataset_integrity Done" in out


def test_image_and_labels_share_geometry_and_values(tmp_path):
    img, lab = _case()
    case = export_training_case(img, lab, tmp_path / "Dataset502_X")
    im = nib.load(tmp_path / "Dataset502_X" / "imagesTr" / f"{case}_0000.nii.gz")
    lb = nib.load(tmp_path / "Dataset502_X" / "labelsTr" / f"{case}.nii.gz")
    np.testing.assert_array_equal(im.affine, lb.affine)
    np.testing.assert_allclose(im.affine, img.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(im.dataobj).T, img.data)
    np.testing.assert_array_equal(np.asarray(lb.dataobj).T, lab.data)
    assert lb.get_data_dtype() == np.uint8


def test_new_ids_never_overwrite_existing_cases(tmp_path):
    folder = tmp_path / "Dataset503_Y"
    img, lab = _case()
    export_training_case(img, lab, folder)
    # a case written by someone else, with a gap in the numbering
    (folder / "labelsTr" / "case_001.nii.gz").write_bytes(b"not ours")
    before = (folder / "labelsTr" / "case_001.nii.gz").read_bytes()
    assert export_training_case(img, lab, folder) == "case_002"
    assert (folder / "labelsTr" / "case_001.nii.gz").read_bytes() == before


def test_concurrent_exports_get_distinct_ids(tmp_path):
    folder = tmp_path / "Dataset504_Z"
    results, errors = [], []

    def run(seed):
        try:
            img, lab = _case(seed)
            results.append(export_training_case(img, lab, folder))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [f"case_{i:03d}" for i in range(4)]
    info = json.loads((folder / "dataset.json").read_text())
    assert info["numTraining"] == 4
    datalist = json.loads((folder / "datalist.json").read_text())
    assert sorted(d["case"] for d in datalist["training"]) == sorted(results)


def test_monai_reads_the_datalist(tmp_path):
    from monai.data import load_decathlon_datalist

    folder = tmp_path / "Dataset505_M"
    img, lab = _case()
    export_training_case(img, lab, folder)
    export_training_case(*_case(1), folder)
    items = load_decathlon_datalist(str(folder / "datalist.json"), True, "training")
    assert len(items) == 2
    for it in items:
        assert os.path.isfile(it["image"]) and os.path.isfile(it["label"])
        assert it["label"].endswith(f"{it['case']}.nii.gz")


def test_ledger_is_saved_beside_the_case(tmp_path):
    img, lab = _case()
    pred = lab.data.copy()
    pred[3, 7, 2] = 0
    pred[1, 1, 1] = 1
    ledger = CorrectionLedger(pred, lab.spacing, NAMES)
    folder = tmp_path / "Dataset506_L"
    case = export_training_case(img, lab, folder, ledger=ledger)
    back = CorrectionLedger.load_current(folder / "ledger" / case)
    np.testing.assert_array_equal(back, lab.data)
    saved = json.loads((folder / "ledger" / case / "ledger.json").read_text())
    assert saved["totals"]["changed_voxels"] == 2


def test_multichannel_case(tmp_path):
    img, lab = _case()
    t2 = img.with_data((img.data * 2).astype(np.int16), modality="MR")
    folder = tmp_path / "Dataset507_MC"
    case = export_training_case([img, t2], lab, folder, channel_names=["T1", "T2"])
    assert (folder / "imagesTr" / f"{case}_0001.nii.gz").is_file()
    # a later case must bring the same number of channels
    with pytest.raises(MedSegError, match="channel"):
        export_training_case([img], lab, folder)
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{case}.nii.gz"]


def test_shape_mismatch_leaves_nothing(tmp_path):
    img, lab = _case()
    small = Volume(lab.data[:, :5], lab.affine, is_label=True)
    folder = tmp_path / "Dataset508_S"
    with pytest.raises(MedSegError, match="grid"):
        export_training_case(img, small, folder)
    assert not folder.exists() or not any((folder / "imagesTr").glob("*.nii.gz"))


def test_class_name_clash_is_refused(tmp_path):
    folder = tmp_path / "Dataset509_C"
    img, lab = _case()
    export_training_case(img, lab, folder)
    other = lab.with_data(lab.data, label_names={1: "kidney", 2: "spleen"})
    with pytest.raises(MedSegError, match="kidney"):
        export_training_case(img, other, folder)
    assert len(list((folder / "labelsTr").glob("*.nii.gz"))) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "Dataset510_RO"
    img, lab = _case()
    export_training_case(img, lab, folder)
    (folder / "imagesTr").chmod(0o500)
    try:
        with pytest.raises(MedSegError):
            export_training_case(img, lab, folder)
    finally:
        (folder / "imagesTr").chmod(0o700)
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["case_000.nii.gz"]
    assert not [p for p in (folder / "imagesTr").iterdir() if p.name.startswith(".")]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1


def test_cancel_mid_case_removes_what_was_written(tmp_path):
    from napari_medseg.errors import Cancelled

    folder = tmp_path / "Dataset511_F"
    img, lab = _case()
    export_training_case(img, lab, folder)
    done = []
    with pytest.raises(Cancelled):
        export_training_case(img, lab, folder, progress=lambda d, t: done.append(d),
                             cancel=lambda: bool(done))
    assert done  # the image had been written before the cancel
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["case_000_0000.nii.gz"]
    assert [d["case"] for d in json.loads((folder / "datalist.json").read_text())["training"]] \
        == ["case_000"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1
    # the abandoned id is free again
    assert export_training_case(img, lab, folder) == "case_001"


def test_blocked_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "Dataset512_B"
    folder.mkdir()
    (folder / "labelsTr").write_text("a file where a folder should be")
    img, lab = _case()
    with pytest.raises(MedSegError, match="Dataset512_B"):
        export_training_case(img, lab, folder)
    assert not list((folder / "imagesTr").glob("*")) if (folder / "imagesTr").is_dir() else True


# ------------------------------------------------- leftovers of killed exports
def test_owner_records_judge_only_dead_writers_dead():
    import socket
    import subprocess
    import sys
    import time

    from napari_medseg.io.export._staging import OTHER_HOST_MAX_AGE_S, _owner_record, \
        writer_alive

    me = _owner_record()
    assert writer_alive(me)
    # a process id now used by another process (another start time)
    assert not writer_alive({**me, "start": "1"}) or me["start"] is None
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = {**me, "pid": int(done.stdout), "start": None}
    assert not writer_alive(dead)
    # another host: cannot be checked, so dead only when very old
    other = {**me, "host": socket.gethostname() + "-elsewhere", "pid": 1}
    assert writer_alive(other)
    assert not writer_alive({**other, "time": time.time() - OTHER_HOST_MAX_AGE_S - 1})


def test_staging_without_reservation_is_removed_and_owned_ones_kept(tmp_path):
    import socket
    import time

    folder = tmp_path / "Dataset520_S"
    img, lab = _case()
    export_training_case(img, lab, folder)
    medseg = folder / ".medseg"
    orphan = medseg / "staging" / "case_007"
    orphan.mkdir(parents=True)
    (orphan / "case_007_0000.nii.gz").write_bytes(b"half")
    # a writer on another machine, right now: never touched
    remote = medseg / "staging" / "case_001"
    remote.mkdir()
    (remote / "case_001_0000.nii.gz").write_bytes(b"half")
    (medseg / "cases" / "case_001").mkdir()
    (medseg / "cases" / "case_001" / "owner.json").write_text(json.dumps(
        {"pid": 1, "host": socket.gethostname() + "-elsewhere", "time": time.time()}))
    assert export_training_case(img, lab, folder) == "case_002"
    assert not orphan.exists() and not (medseg / "cases" / "case_007").exists()
    assert (remote / "case_001_0000.nii.gz").read_bytes() == b"half"
    assert (medseg / "cases" / "case_001" / "owner.json").exists()
