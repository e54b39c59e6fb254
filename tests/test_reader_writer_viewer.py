"""The npe2 reader and writer driven through the real napari viewer."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_medseg.core.volume import affine_from_itk, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.io import read_volume

PLUGIN = "napari-medseg"

# voxel (i, j, k) -> RAS mm
AFFINES = {
    "ras_aniso": make_affine((3.0, 0.8, 0.6), (-40.0, 12.5, 7.0)),
    "las": make_affine((2.0, 1.0, 1.5), (30.0, -20.0, 5.0), np.diag([-1.0, 1.0, 1.0])),
    "oblique": make_affine(
        (2.5, 1.2, 0.9), (5.0, -7.0, 11.0),
        np.array([[0.9553, -0.2955, 0.0], [0.2955, 0.9553, 0.0], [0.0, 0.0, 1.0]])
        @ np.array([[1.0, 0.0, 0.0], [0.0, 0.9801, -0.1987], [0.0, 0.1987, 0.9801]])),
}


def _image(shape=(6, 9, 11), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(40, 30, size=shape)).astype(np.int16)


def _write_nifti(path, data_zyx, affine):
    img = nib.Nifti1Image(np.asarray(data_zyx).T, affine)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def _paint(layer, value=3):
    """Paint a small block through napari's own Labels API (undo history and all)."""
    idx = tuple(np.meshgrid(np.arange(1, 3), np.arange(2, 5), np.arange(4, 8), indexing="ij"))
    layer.data_setitem(tuple(i.ravel() for i in idx), value)
    expected = np.zeros(layer.data.shape, dtype=np.int64)
    expected[1:3, 2:5, 4:8] = value
    return expected


@pytest.mark.parametrize("geom", sorted(AFFINES))
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_open_paint_save_roundtrip(make_napari_viewer, tmp_path, geom, ext):
    affine = AFFINES[geom]
    data = _image()
    src = tmp_path / f"ct{ext}"
    if ext == ".nii.gz":
        _write_nifti(src, data, affine)
    else:
        from napari_medseg.core.volume import Volume
        from napari_medseg.io import write_volume

        write_volume(src, Volume(data, affine))
    viewer = make_napari_viewer()
    [image] = viewer.open(str(src), plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(image.data), data)
    labels = viewer.add_labels(np.zeros(data.shape, dtype=np.uint8), name="seg",
                               scale=image.scale, translate=image.translate,
                               affine=image.affine)
    expected = _paint(labels)
    out = tmp_path / f"seg{ext}"
    viewer.layers.selection.active = labels
    written = viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    assert [str(out)] == [str(w) for w in written]
    img = sitk.ReadImage(str(out))
    back = sitk.GetArrayFromImage(img)
    np.testing.assert_array_equal(back, expected)
    got = affine_from_itk(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    np.testing.assert_allclose(got, affine, atol=1e-4)
    if ext == ".nii.gz":
        hdr = nib.load(str(out)).header
        np.testing.assert_allclose(hdr.get_best_affine(), affine, atol=1e-5)
        np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-4)
        assert hdr.get_data_dtype() == np.uint8
        assert int(hdr["qform_code"]) > 0 and int(hdr["sform_code"]) > 0


def test_new_labels_layer_from_image_inherits_geometry(make_napari_viewer, tmp_path):
    """A Labels layer napari makes from the image (no metadata) saves on the image grid."""
    affine = AFFINES["oblique"]
    src = tmp_path / "mr.nii.gz"
    _write_nifti(src, _image(), affine)
    viewer = make_napari_viewer()
    viewer.open(str(src), plugin=PLUGIN)
    viewer._new_labels()
    labels = viewer.layers[-1]
    assert labels.__class__.__name__ == "Labels"
    expected = _paint(labels, value=2)
    out = tmp_path / "mr_seg.nii.gz"
    labels.save(str(out), plugin=PLUGIN)
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, expected)


def test_seg_nrrd_names_and_colours_survive(make_napari_viewer, tmp_path):
    from napari_medseg.core.volume import Volume
    from napari_medseg.io import write_labels

    affine = AFFINES["las"]
    lab = np.zeros((6, 9, 11), np.uint8)
    lab[2:4, 3:6, 3:8] = 1
    lab[4, 1:3, 1:3] = 2
    src = tmp_path / "organs.seg.nrrd"
    write_labels(src, Volume(lab, affine, is_label=True, label_names={1: "liver", 2: "spleen"},
                             label_colors={1: (0.8, 0.2, 0.1), 2: (0.1, 0.4, 0.9)}))
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(src), plugin=PLUGIN)
    assert layer.__class__.__name__ == "Labels"
    assert list(layer.features["name"]) == ["background", "liver", "spleen"]
    _paint(layer, value=2)
    out = tmp_path / "organs_edit.seg.nrrd"
    layer.save(str(out), plugin=PLUGIN)
    back = read_volume(out)
    assert back.label_names == {1: "liver", 2: "spleen"}
    np.testing.assert_allclose(back.label_colors[1], (0.8, 0.2, 0.1), atol=1e-4)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert int((np.asarray(back.data) == 2).sum()) == int((layer.data == 2).sum())


def test_tiff_labels_keep_spacing(make_napari_viewer, tmp_path):
    import tifffile

    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, _image().astype(np.uint16), imagej=True, resolution=(1 / 0.4, 1 / 0.4),
                     metadata={"spacing": 2.0, "unit": "mm", "axes": "ZYX"})
    viewer = make_napari_viewer()
    [image] = viewer.open(str(src), plugin=PLUGIN)
    np.testing.assert_allclose(image.scale, (2.0, 0.4, 0.4))
    viewer._new_labels()
    expected = _paint(viewer.layers[-1], value=5)
    out = tmp_path / "stack_seg.tif"
    viewer.layers[-1].save(str(out), plugin=PLUGIN)
    with tifffile.TiffFile(out) as tif:
        np.testing.assert_array_equal(tif.asarray(), expected)
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.0)
        num, den = tif.pages[0].tags["XResolution"].value
        assert den / num == pytest.approx(0.4, rel=1e-5)


def test_label_file_opens_as_labels_on_image_grid(make_napari_viewer, tmp_path):
    affine = AFFINES["ras_aniso"]
    _write_nifti(tmp_path / "case.nii.gz", _image(), affine)
    lab = np.zeros((6, 9, 11), np.uint8)
    lab[1:4, 2:6, 3:9] = 1
    _write_nifti(tmp_path / "case_seg.nii.gz", lab, affine)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "case.nii.gz"), plugin=PLUGIN)
    [labels] = viewer.open(str(tmp_path / "case_seg.nii.gz"), plugin=PLUGIN)
    assert labels.__class__.__name__ == "Labels"
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    np.testing.assert_allclose(labels.affine.affine_matrix, image.affine.affine_matrix)
    labels.data_setitem((np.array([0]), np.array([0]), np.array([0])), 4)  # writable


def test_dicom_folder_opens(make_napari_viewer):
    from pydicom.data import get_testdata_file

    folder = __import__("pathlib").Path(get_testdata_file("dicomdirtests/98892001/CT5N/2062")
                                        ).parent
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(folder), plugin=PLUGIN)
    assert layer.data.shape == (5, 16, 16)
    np.testing.assert_allclose(layer.scale, (2.5, 0.488281, 0.488281), rtol=1e-5)


def test_bad_file_reports_error_and_viewer_keeps_running(make_napari_viewer, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    good = tmp_path / "fine.nii.gz"
    _write_nifti(good, _image(), AFFINES["las"])
    bad.write_bytes(good.read_bytes()[: 200])
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as info:
        viewer.open(str(bad), plugin=PLUGIN)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, MedSegError) for e in chain), chain
    assert "broken.nii.gz" in str(info.value)
    assert len(viewer.layers) == 0
    [layer] = viewer.open(str(good), plugin=PLUGIN)
    assert layer.data.shape == (6, 9, 11)


def test_labels_on_another_grid_are_refused(make_napari_viewer, tmp_path):
    _write_nifti(tmp_path / "ct.nii.gz", _image(), AFFINES["ras_aniso"])
    _write_nifti(tmp_path / "other_seg.nii.gz", np.ones((5, 9, 11), np.uint8),
                 AFFINES["ras_aniso"])
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "ct.nii.gz"), plugin=PLUGIN)
    with pytest.raises(Exception, match="does not match image layer"):
        viewer.open(str(tmp_path / "other_seg.nii.gz"), plugin=PLUGIN)
    assert len(viewer.layers) == 1


def test_reader_declines_foreign_files(tmp_path):
    from napari_medseg._napari._reader import get_reader

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.csv").write_text("1,2")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "sub")) is None
    assert get_reader(str(tmp_path / "missing.nii.gz")) is None
    assert get_reader([str(tmp_path / "notes.txt"), str(tmp_path / "sub" / "a.csv")]) is None


def test_npe2_validate():
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", PLUGIN],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
