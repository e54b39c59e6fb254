"""DICOM series: pydicom's real test series and series built here with pydicom."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from napari_medseg.core.volume import affine_from_itk
from napari_medseg.errors import MedSegError
from napari_medseg.io import read_volume, read_volumes

CT5N = Path(get_testdata_file("dicomdirtests/98892001/CT5N/2062")).parent  # 5 slices
CT2_GAP = Path(get_testdata_file("dicomdirtests/77654033/CT2/17106")).parent  # 4, one gap


def _sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_real_ct_series_matches_simpleitk():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a regular series warns about nothing
        vol = read_volume(CT5N)
    ref = _sitk_series(CT5N)
    np.testing.assert_array_equal(vol.data, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(
        vol.affine, affine_from_itk(ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection()),
        atol=1e-5)
    assert vol.modality == "CT" and vol.data.dtype == np.int16
    assert vol.data.min() < -500  # rescaled to HU (intercept applied)
    files = vol.meta["dicom_files"]
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert z == sorted(z) and len(files) == 5
    assert len(vol.meta["dicom_sop_instance_uids"]) == 5
    assert vol.meta["dicom_series_instance_uid"].endswith("16302.0.6")


def test_gap_is_reported_with_figures():
    with pytest.warns(UserWarning, match=r"gap in the slice positions .*202.50 mm"):
        vol = read_volume(CT2_GAP)
    assert vol.shape3 == (4, 16, 16)
    assert "missing" in vol.meta["warnings"][0]


def test_mixed_folder_picks_largest_and_says_so(tmp_path):
    shutil.copytree(CT5N, tmp_path / "a")
    shutil.copytree(CT2_GAP, tmp_path / "b")
    with pytest.warns(UserWarning) as rec:
        vol = read_volume(tmp_path)
    msgs = [str(w.message) for w in rec]
    assert any("holds 2 DICOM series" in m and str(tmp_path) in m and "5 slices" in m
               and "4 slices" in m for m in msgs), msgs
    assert vol.shape3 == (5, 16, 16)
    with pytest.warns(UserWarning):
        vols = read_volumes(tmp_path)
    assert sorted(v.shape3[0] for v in vols) == [4, 5]


def test_single_file_opens_its_series():
    vol = read_volume(CT5N / "2392")
    assert vol.shape3 == (5, 16, 16)


def _write_series(folder: Path, array, positions, iop, spacing=(0.8, 0.6), slope=1.0,
                  intercept=-1024.0, shuffle=True):
    """Write a real CT series with pydicom: one file per ``array`` slice."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(3).permutation(len(array)) if shuffle else range(len(array))
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "PHANTOM"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 3, int(k) + 1, "phantom"
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = array.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(array[k], dtype=np.uint16).tobytes()
        ds.save_as(folder / f"IM{n:04d}", enforce_file_format=True)


def test_built_oblique_series_with_slope(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, size=(6, 10, 12)).astype(np.uint16)
    row = np.array([np.cos(0.3), np.sin(0.3), 0.0])
    col = np.array([-np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), np.sin(0.2)])
    normal = np.cross(row, col)
    origin = np.array([-50.0, 20.0, 100.0])
    positions = [origin + 2.0 * k * normal for k in range(6)]
    _write_series(tmp_path / "s", stored, positions, [*row, *col], slope=0.5, intercept=-1000)
    vol = read_volume(tmp_path / "s")
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data, stored * 0.5 - 1000)
    ref = _sitk_series(tmp_path / "s")
    np.testing.assert_allclose(
        vol.affine, affine_from_itk(ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection()),
        atol=1e-4)
    assert vol.is_oblique()
    assert vol.spacing == pytest.approx((2.0, 0.8, 0.6))


def test_uneven_spacing_warns(tmp_path):
    stored = np.ones((5, 4, 4), np.uint16)
    zs = [0.0, 2.0, 4.0, 6.5, 8.5]
    _write_series(tmp_path / "u", stored, [(0.0, 0.0, z) for z in zs], [1, 0, 0, 0, 1, 0])
    with pytest.warns(UserWarning, match=r"uneven slice spacing from 2 to 2.5 mm"):
        vol = read_volume(tmp_path / "u")
    assert vol.spacing[0] == pytest.approx(2.0)
    assert vol.data.dtype == np.int16


def test_empty_and_non_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedSegError, match="not a format"):
        read_volume(tmp_path / "empty")
    (tmp_path / "sr").mkdir()
    ds = pydicom.dcmread(get_testdata_file("dicomdirtests/DICOMDIR-empty.dcm"))
    ds.save_as(tmp_path / "sr" / "DICOMDIR.dcm")
    with pytest.raises(MedSegError, match="holds no DICOM images"):
        read_volume(tmp_path / "sr")


def test_localizer_only_folder_is_refused():
    folder = Path(get_testdata_file("dicomdirtests/98892003/MR1/15820")).parent
    with pytest.raises(MedSegError, match="single 2D DICOM images"):
        read_volume(folder)
