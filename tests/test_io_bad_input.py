"""Bad input: one clear MedSegError naming the file and the problem, nothing touched."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.io import read_volume, write_labels, write_volume

AFF = make_affine((2.0, 1.0, 1.0))


def _good_files(folder):
    vol = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 7, AFF)
    paths = []
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".tif"):
        paths.append(write_volume(folder / f"ok{ext}", vol))
    return paths


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".tif"])
def test_truncated_files(tmp_path, ext):
    good = [p for p in _good_files(tmp_path) if p.name == f"ok{ext}"][0]
    bad = tmp_path / f"cut{ext}"
    raw = good.read_bytes()
    bad.write_bytes(raw[: max(60, len(raw) // 2)] if ext != ".nii" else raw[:400])
    with pytest.raises(MedSegError) as info:
        np.asarray(read_volume(bad, lazy=False).data)
    assert str(bad) in str(info.value)


def test_garbage_file(tmp_path):
    bad = tmp_path / "noise.nrrd"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(MedSegError, match="noise.nrrd"):
        read_volume(bad)


def test_two_dimensional_images(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.float32), np.eye(4)), str(tmp_path / "a.nii"))
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 1), np.float32), np.eye(4)), str(tmp_path / "b.nii"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.uint8)), str(tmp_path / "c.mha"))
    tifffile.imwrite(tmp_path / "d.tif", np.zeros((8, 9), np.uint8))
    for name in ("a.nii", "b.nii", "c.mha", "d.tif"):
        with pytest.raises(MedSegError, match=r"is a 2D image") as info:
            read_volume(tmp_path / name)
        assert name in str(info.value)


def test_five_dimensional_and_rgb(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2, 2), np.float32), np.eye(4)),
             str(tmp_path / "five.nii.gz"))
    with pytest.raises(MedSegError, match="has 5 dimensions"):
        read_volume(tmp_path / "five.nii.gz")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(MedSegError, match="RGB"):
        read_volume(tmp_path / "rgb.tif")
    rgb = sitk.Image([6, 7, 8], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(MedSegError, match="RGB"):
        read_volume(tmp_path / "rgb.mha")


def test_non_integer_labels_refused_and_nothing_written(tmp_path):
    vol = Volume(np.full((3, 4, 5), 0.5, np.float32), AFF, is_label=True)
    for ext in (".nii.gz", ".seg.nrrd", ".tif"):
        with pytest.raises(MedSegError, match="non-integer"):
            write_labels(tmp_path / f"x{ext}", vol)
    assert os.listdir(tmp_path) == []


def test_label_grid_mismatch(tmp_path):
    image = Volume(np.zeros((4, 5, 6), np.float32), AFF, source=str(tmp_path / "ct.nii.gz"))
    with pytest.raises(MedSegError, match=r"do not match the image grid .*ct.nii.gz|ct.nii.gz"):
        image.like_labels(np.zeros((4, 5, 7), np.uint8))


def test_unknown_extension_and_missing_folder(tmp_path):
    vol = Volume(np.zeros((3, 4, 5), np.uint8), AFF, is_label=True)
    with pytest.raises(MedSegError, match="seg.png"):
        write_labels(tmp_path / "seg.png", vol)
    with pytest.raises(MedSegError, match="does not exist"):
        write_labels(tmp_path / "nowhere" / "seg.nii.gz", vol)
    with pytest.raises(MedSegError, match="not found"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MedSegError, match="not a format"):
        read_volume(tmp_path / "notes.txt")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "seg.nrrd"
    good = Volume(np.ones((3, 4, 5), np.uint8), AFF, is_label=True)
    write_labels(target, good)
    before = target.read_bytes()
    bad = Volume(np.full((3, 4, 5), 1.5, np.float32), AFF, is_label=True)
    with pytest.raises(MedSegError):
        write_labels(target, bad, overwrite=True)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["seg.nrrd"]
