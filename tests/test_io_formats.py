"""Readers and writers of napari_medseg.io against independent readers."""

from __future__ import annotations

import os

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from napari_medseg.core.volume import Volume, affine_from_itk, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.io import geometry, read_volume, write_labels, write_volume

OBLIQUE = make_affine((2.5, 0.7, 0.9), (-12.0, 30.5, 4.0),
                      np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]))
LAS = make_affine((3.0, 1.0, 1.5), (20.0, -5.0, 2.0), np.diag([-1.0, 1.0, 1.0]))


@pytest.fixture
def image():
    rng = np.random.default_rng(1)
    return Volume(rng.normal(0, 100, size=(5, 7, 9)).astype(np.float32), OBLIQUE,
                  modality="CT")


@pytest.fixture
def labels(image):
    lab = np.zeros(image.shape3, np.int64)
    lab[1:3, 2:5, 3:7] = 1
    lab[3, 0:2, 0:2] = 7
    return image.like_labels(lab, names={1: "liver", 7: "lesion"},
                             colors={1: (0.9, 0.3, 0.2), 7: (0.2, 0.9, 0.1)})


EXTS = [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".tif"]


@pytest.mark.parametrize("ext", EXTS)
def test_labels_roundtrip_exact(tmp_path, labels, ext):
    out = write_labels(tmp_path / f"case_seg{ext}", labels)
    back = read_volume(out)
    assert back.is_label
    np.testing.assert_array_equal(np.asarray(back.data), labels.data)
    np.testing.assert_allclose(back.affine, labels.affine, atol=1e-5)
    assert np.asarray(back.data).dtype == np.uint8  # smallest that fits
    shape, affine = geometry(out)  # the header-only check used to verify writes
    assert shape == labels.shape3
    np.testing.assert_allclose(affine, labels.affine, atol=1e-5)
    if ext in (".seg.nrrd", ".tif"):
        assert back.label_names == {1: "liver", 7: "lesion"}


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_geometry_matches_simpleitk(tmp_path, labels, ext):
    out = write_labels(tmp_path / f"seg{ext}", labels)
    img = sitk.ReadImage(str(out))
    np.testing.assert_allclose(
        affine_from_itk(img.GetSpacing(), img.GetOrigin(), img.GetDirection()),
        labels.affine, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), labels.data)


def test_nifti_reader_matches_nibabel_and_is_memmapped(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)  # file order (i, j, k)
    nib.save(nib.Nifti1Image(data, LAS), str(tmp_path / "ct.nii"))
    vol = read_volume(tmp_path / "ct.nii")
    assert isinstance(vol.data, np.memmap) or isinstance(vol.data.base, np.memmap)
    assert vol.shape3 == (4, 5, 6)
    assert vol.data[3, 2, 1] == data[1, 2, 3]
    np.testing.assert_allclose(vol.affine, LAS)
    assert vol.orientation_code() == "LAS"
    assert not vol.is_label


def test_nifti_integer_file_next_to_image_is_label(tmp_path):
    img = np.zeros((6, 5, 4), np.float32)
    nib.save(nib.Nifti1Image(img, LAS), str(tmp_path / "case_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.uint8), LAS), str(tmp_path / "case.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.int16), LAS),
             str(tmp_path / "ct_int16.nii.gz"))
    assert read_volume(tmp_path / "case.nii.gz").is_label
    assert not read_volume(tmp_path / "case_0000.nii.gz").is_label
    assert not read_volume(tmp_path / "ct_int16.nii.gz").is_label


def test_nifti_writer_sets_qform_and_sform(tmp_path, labels):
    out = write_labels(tmp_path / "seg.nii.gz", labels)
    hdr = nib.load(str(out)).header
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 2
    np.testing.assert_allclose(hdr.get_qform(), labels.affine, atol=1e-5)
    np.testing.assert_allclose(hdr.get_sform(), labels.affine, atol=1e-6)


def test_seg_nrrd_fields_follow_slicer(tmp_path, labels):
    out = write_labels(tmp_path / "seg.seg.nrrd", labels)
    data, hdr = nrrd.read(str(out), index_order="C")
    assert hdr["space"] == "left-posterior-superior"
    assert hdr["Segment0_Name"] == "liver" and hdr["Segment0_LabelValue"] == "1"
    assert hdr["Segment1_Name"] == "lesion" and hdr["Segment1_LabelValue"] == "7"
    assert hdr["Segment0_Color"].split() == ["0.9", "0.3", "0.2"]
    assert hdr["Segment1_Extent"] == "0 1 0 1 3 3"
    np.testing.assert_array_equal(data, labels.data)


def test_layered_seg_nrrd_is_merged(tmp_path):
    """Slicer stores overlapping segments as layers of a 4D array."""
    layers = np.zeros((2, 4, 5, 6), np.uint8)  # (layer, k, j, i)
    layers[0, 1:3, 1:3, 1:3] = 1
    layers[1, 0, 0, 0:2] = 1
    hdr = {"space": "left-posterior-superior", "kinds": ["list", "domain", "domain", "domain"],
           "space directions": np.vstack([np.full(3, np.nan), np.eye(3)]),
           "space origin": np.zeros(3),
           "Segment0_Name": "a", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
           "Segment1_Name": "b", "Segment1_LabelValue": "1", "Segment1_Layer": "1"}
    nrrd.write(str(tmp_path / "x.seg.nrrd"), np.moveaxis(layers, 0, -1).copy(), hdr,
               index_order="C")
    vol = read_volume(tmp_path / "x.seg.nrrd")
    assert vol.label_names == {1: "a", 2: "b"}
    assert int((vol.data == 1).sum()) == 8 and int((vol.data == 2).sum()) == 2


def test_raw_nrrd_and_mha_are_memory_mapped(tmp_path):
    data = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    nrrd.write(str(tmp_path / "raw.nrrd"), data, {"encoding": "raw", "space": "RAS",
                                                   "space directions": np.eye(3) * 2},
               index_order="C")
    vol = read_volume(tmp_path / "raw.nrrd")
    assert isinstance(vol.data, np.memmap)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    img = sitk.GetImageFromArray(data)
    img.SetSpacing((0.5, 0.6, 2.0))
    sitk.WriteImage(img, str(tmp_path / "raw.mha"))
    vol = read_volume(tmp_path / "raw.mha")
    assert isinstance(vol.data, np.memmap)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.spacing == pytest.approx((2.0, 0.6, 0.5))


def test_tiff_imagej_and_ome_spacing(tmp_path, monkeypatch):
    import tifffile

    from napari_medseg.io import tiff

    data = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"spacing": 4.0, "unit": "micron", "axes": "ZYX"})
    vol = read_volume(tmp_path / "ij.tif")
    assert vol.spacing == pytest.approx((4e-3, 0.5e-3, 0.25e-3))
    tifffile.imwrite(tmp_path / "x.ome.tif", data, ome=True, compression="zlib",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.7, "PhysicalSizeXUnit": "mm",
                               "PhysicalSizeY": 0.7, "PhysicalSizeYUnit": "mm",
                               "PhysicalSizeZ": 3.0, "PhysicalSizeZUnit": "mm"})
    vol = read_volume(tmp_path / "x.ome.tif")
    assert vol.spacing == pytest.approx((3.0, 0.7, 0.7))
    assert not isinstance(vol.data, np.ndarray)  # compressed: dask, read on demand
    assert vol.data.numblocks[0] == 1  # small pages: one block, one pass over the file
    np.testing.assert_array_equal(np.asarray(vol.data), data)
    monkeypatch.setattr(tiff, "_CHUNK_BYTES", 2 * 4 * 5 * 2)  # two pages per chunk
    vol = read_volume(tmp_path / "x.ome.tif")
    assert vol.data.numblocks[0] == 2
    np.testing.assert_array_equal(np.asarray(vol.data), data)


def test_multichannel_image_roundtrip(tmp_path):
    vol = Volume(np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32), LAS)
    for ext in (".nii.gz", ".nrrd", ".mha", ".tif"):
        back = read_volume(write_volume(tmp_path / f"mc{ext}", vol))
        assert back.data.shape == (2, 3, 4, 5), ext
        np.testing.assert_allclose(np.asarray(back.data), vol.data, err_msg=ext)
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5, err_msg=ext)


def test_smallest_dtype_and_large_ids(tmp_path, image):
    lab = np.zeros(image.shape3, np.int64)
    lab[0, 0, 0] = 300
    out = write_labels(tmp_path / "big_seg.nii.gz", image.like_labels(lab))
    assert nib.load(str(out)).header.get_data_dtype() == np.uint16


def test_refuses_overwrite_and_leaves_file(tmp_path, labels):
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"precious")
    with pytest.raises(MedSegError, match="seg.nii.gz"):
        write_labels(target, labels)
    assert target.read_bytes() == b"precious"
    write_labels(target, labels, overwrite=True)
    assert read_volume(target).shape3 == labels.shape3
    # the labels and their class-name sidecar; no temporary left behind
    assert sorted(os.listdir(tmp_path)) == ["seg.json", "seg.nii.gz"]


def test_detached_nhdr_is_read_not_written(tmp_path, labels):
    data = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    nrrd.write(str(tmp_path / "x.nhdr"), data, {"space": "left-posterior-superior",
                                                 "space directions": np.diag([0.5, 0.6, 2.0]),
                                                 "space origin": [1.0, 2.0, 3.0]},
               index_order="C")
    vol = read_volume(tmp_path / "x.nhdr")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine[:3, 3], [-1.0, -2.0, 3.0])
    with pytest.raises(MedSegError, match="cannot be written"):
        write_labels(tmp_path / "y.nhdr", labels)
