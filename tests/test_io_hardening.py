"""Hostile and corrupt files: every reader checks the header first and fails with one line.

Each case here is a file the fuzzing run of issue 17 found to crash, hang,
exhaust memory, raise a raw exception or be accepted as garbage.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.io import geometry, read_volume, write_labels, write_volume

from _realdata import REAL

AFF = make_affine((2.0, 1.0, 1.0))


def _one_line_error(path, lazy=True):
    """Read ``path`` (voxels included); return the MedSegError text after checking it."""
    with pytest.raises(MedSegError) as info:
        np.asarray(read_volume(path, lazy=lazy).data)
    text = str(info.value)
    assert "\n" not in text and str(path) in text, text
    return text


# --------------------------------------------------------------------- NIfTI
def _nii(path, data, affine=None, **hdr_fields):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    for k, v in hdr_fields.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


def test_nifti_header_claiming_huge_volume_allocates_nothing(tmp_path):
    path = _nii(tmp_path / "big.nii", np.zeros((4, 4, 4), np.float32))
    img = nib.load(str(path))
    raw = bytearray(path.read_bytes())
    hdr = img.header.copy()
    hdr.set_data_shape((2000, 2000, 2000))
    raw[:348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    for lazy in (True, False):
        assert "claims 2000 x 2000 x 2000" in _one_line_error(path, lazy)
    gz = tmp_path / "big.nii.gz"
    gz.write_bytes(gzip.compress(bytes(raw)))
    assert "compressed data" in _one_line_error(gz)


def test_nifti_truncated_uncompressed_data(tmp_path):
    path = _nii(tmp_path / "cut.nii", np.ones((8, 8, 8), np.int16))
    path.write_bytes(path.read_bytes()[:-100])
    for lazy in (True, False):
        assert "truncated" in _one_line_error(path, lazy)


@pytest.mark.parametrize("bad, match", [
    (np.diag([np.nan, 1, 1, 1]), "non-finite"),
    (np.diag([np.inf, 1, 1, 1]), "non-finite"),
    (np.diag([1e30, 1, 1, 1]), "implausible voxel size"),
    (np.diag([1e-9, 1, 1, 1]), "implausible voxel size"),
    (np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]]), "singular"),
])
def test_nifti_bad_affines_are_refused(tmp_path, bad, match):
    path = tmp_path / "bad.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    img.header.set_sform(bad, code=2)
    nib.save(img, str(path))
    assert match in _one_line_error(path)
    with pytest.raises(MedSegError, match=match):
        geometry(path)


def test_nifti_gzip_crc_is_verified(tmp_path):
    rng = np.random.default_rng(0)
    path = _nii(tmp_path / "x.nii.gz", rng.integers(0, 1000, (16, 16, 16)).astype(np.int16))
    raw = path.read_bytes()
    good = np.asarray(read_volume(path).data)
    # a flipped bit in the CRC trailer: voxels unchanged, but the file is corrupt
    bad = bytearray(raw)
    bad[-6] ^= 0x01
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad))
    assert "gzip check failed" in _one_line_error(tmp_path / "crc.nii.gz")
    # single-bit flips in the compressed voxel stream: never silently changed voxels
    changed = 0
    for i, pos in enumerate(np.linspace(len(raw) // 3, len(raw) - 20, 24).astype(int)):
        bad = bytearray(raw)
        bad[pos] ^= 1 << (i % 8)
        f = tmp_path / f"flip{i}.nii.gz"
        f.write_bytes(bytes(bad))
        try:
            back = np.asarray(read_volume(f).data)
        except MedSegError as exc:
            assert "\n" not in str(exc)
            continue
        changed += not np.array_equal(back, good)
    assert changed == 0


def test_nifti_non_finite_scaling_is_refused(tmp_path):
    """A slope of 0 / NaN / inf means "unscaled" in NIfTI (nibabel too); a valid slope
    with a non-finite intercept is an error, not NaN voxels."""
    path = _nii(tmp_path / "s.nii", np.ones((4, 5, 6), np.int16))
    raw = bytearray(path.read_bytes())
    raw[112:120] = struct.pack("<ff", 2.0, np.inf)  # scl_slope, scl_inter
    path.write_bytes(bytes(raw))
    _one_line_error(path)
    raw[112:120] = struct.pack("<ff", np.nan, 0.0)
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(np.asarray(read_volume(path).data), 1)


def _scaled_mask(path, values_int, slope, inter):
    img = nib.Nifti1Image(values_int.astype(np.int32), np.eye(4))
    img.header.set_slope_inter(slope, inter)
    img.set_data_dtype(np.int32)
    # nibabel would rescale on save; write the int32 values and the scaling as given
    img.header["scl_slope"], img.header["scl_inter"] = slope, inter
    hdr = img.header
    hdr.set_data_offset(352)
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4)
        fh.write(np.asfortranarray(values_int.astype("<i4")).tobytes(order="F"))
    return path


def test_scaled_label_file_is_scaled_before_deciding(tmp_path):
    """A 0/1 mask stored as int32 with scl_slope/scl_inter (as the BraTS brainmask)."""
    slope, inter = 2.0 ** -32, 0.5
    raw = np.full((6, 7, 8), -(2 ** 31), np.int64)
    raw[2:4, 2:5, 3:6] = 2 ** 31 - 128  # 0.99999997 once scaled
    path = _scaled_mask(tmp_path / "brainmask.nii", raw, slope, inter)
    vol = read_volume(path)
    assert vol.is_label and vol.data.dtype == np.uint8
    np.testing.assert_array_equal(np.unique(vol.data), [0, 1])
    assert int(vol.data.sum()) == 2 * 3 * 3
    # scaled values that are not whole numbers: an image, with a warning, not zeros
    path = _scaled_mask(tmp_path / "noisy_mask.nii", np.arange(6 * 7 * 8).reshape(6, 7, 8),
                        0.25, 0.0)
    vol = read_volume(path)
    assert not vol.is_label and vol.data.dtype.kind == "f"
    assert float(np.asarray(vol.data).max()) == pytest.approx((6 * 7 * 8 - 1) * 0.25)
    assert "not whole numbers" in vol.meta["warnings"][0]
    # asked for labels: rounded to the nearest id, never truncated
    vol = read_volume(path, is_label=True)
    assert vol.is_label and int(np.asarray(vol.data).max()) == round((6 * 7 * 8 - 1) * 0.25)


@pytest.mark.skipif(not (REAL / "brats").is_dir(), reason="real data not available")
def test_real_brats_brainmask_opens_as_a_mask():
    path = sorted((REAL / "brats").glob("*/brainmask.nii.gz"))[0]
    vol = read_volume(path)
    ref = np.asarray(nib.load(str(path)).dataobj).T > 0.5  # the README's definition
    assert vol.is_label
    np.testing.assert_array_equal(np.asarray(vol.data) == 1, ref)
    assert 0.05 < ref.mean() < 0.5


# ---------------------------------------------------------------- MetaImage
@pytest.mark.parametrize("old, new, match", [
    (b"NDims = 3", b"NDims = -1", "NDims = -1"),
    (b"NDims = 3", b"NDims = 100", "NDims = 100"),
    (b"DimSize = 6 5 4", b"DimSize = 6 5 400000000", "claims"),
    (b"DimSize = 6 5 4", b"DimSize = 6 5", "values for MetaImage"),
    (b"ElementType = MET_SHORT", b"ElementType = MET_NOPE", "ElementType"),
    (b"ElementSpacing = 1 1 2", b"ElementSpacing = 1 nan 2", "non-finite"),
    (b"ElementSpacing = 1 1 2", b"ElementSpacing = 1 1 1e30", "implausible voxel size"),
    (b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 1 0 0 0 0 1",
     "singular"),
    (b"ElementDataFile = LOCAL", b"ElementDataFile = ../../etc/passwd", "outside"),
    (b"NDims = 3", b"ndims = 3", "spells"),
])
def test_metaimage_header_checked_before_simpleitk(tmp_path, old, new, match):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6))
    img.SetSpacing((1, 1, 2))
    sitk.WriteImage(img, str(tmp_path / "ok.mha"))
    raw = (tmp_path / "ok.mha").read_bytes()
    assert old in raw
    bad = tmp_path / "bad.mha"
    bad.write_bytes(raw.replace(old, new))
    assert match in _one_line_error(bad)


# --------------------------------------------------------------------- NRRD
def test_nrrd_bad_headers(tmp_path):
    ok = write_volume(tmp_path / "ok.nrrd", Volume(np.ones((4, 5, 6), np.int16), AFF))
    raw = ok.read_bytes()
    cases = {
        b"type: int16": (b"type: nonsense", "type"),
        b"sizes: 6 5 4": (b"sizes: 6 5 4000000", "claims"),
        b"space origin: (0,0,0)": (b"space origin: (inf,0,0)", "non-finite"),
    }
    for old, (new, match) in cases.items():
        assert old in raw, old
        bad = tmp_path / "bad.nrrd"
        bad.write_bytes(raw.replace(old, new, 1))
        assert match in _one_line_error(bad)
    (tmp_path / "nomagic.nrrd").write_bytes(b"\0" * 1000)
    assert "magic" in _one_line_error(tmp_path / "nomagic.nrrd")


# --------------------------------------------------------------------- TIFF
def test_ome_tiff_claiming_a_million_planes_fails_fast(tmp_path):
    good = tmp_path / "good.ome.tif"
    tifffile.imwrite(good, np.zeros((10, 16, 16), np.uint8), ome=True,
                     metadata={"axes": "ZYX"})
    with tifffile.TiffFile(good) as tif:
        xml = tif.ome_metadata
    assert 'SizeZ="10"' in xml
    path = tmp_path / "claims.ome.tif"
    tifffile.imwrite(path, np.zeros((10, 16, 16), np.uint8), metadata=None,
                     description=xml.replace('SizeZ="10"', 'SizeZ="1000000"'))
    t0 = time.perf_counter()
    assert "1000000 image planes" in _one_line_error(path)
    assert time.perf_counter() - t0 < 5


def test_tiff_bad_compression_tag_is_one_line(tmp_path):
    path = tmp_path / "comp.tif"
    tifffile.imwrite(path, np.arange(5 * 8 * 8, dtype=np.uint16).reshape(5, 8, 8),
                     compression="zlib")
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offsets = [p.tags["Compression"].offset for p in tif.pages]
    for off in offsets:  # tag entry: code (2), type (2), count (4), value (2)
        raw[off + 8:off + 10] = struct.pack("<H", 12345)
    path.write_bytes(bytes(raw))
    assert "compression 12345" in _one_line_error(path)


def test_many_page_tiff_is_read_in_one_pass(tmp_path):
    data = np.random.default_rng(0).integers(0, 100, (1000, 32, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "many.tif", data, compression="zlib")
    np.asarray(read_volume(tmp_path / "many.tif").data)  # warm: imports, page cache
    t0 = time.perf_counter()
    back = np.asarray(read_volume(tmp_path / "many.tif").data)
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    tifffile.imread(tmp_path / "many.tif")
    ref = time.perf_counter() - t0
    np.testing.assert_array_equal(back, data)
    assert took < 10 * ref + 0.5, (took, ref)  # was 19 s vs 0.09 s: one open per page


def test_tiff_truncated_pages(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.ones((4, 64, 64), np.uint16))
    raw = path.read_bytes()
    # keep the IFDs (tifffile writes them first) but drop the last pages' pixels
    path.write_bytes(raw[: len(raw) - 64 * 64 * 3])
    _one_line_error(path)


# --------------------------------------------------------------------- DICOM
def _write_ct(folder: Path, n=5, slope=1.0):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "anon"
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.FrameOfReferenceUID = frame
        ds.Rows = ds.Columns = 8
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = np.full((8, 8), 1000 + k, np.uint16).tobytes()
        f = folder / f"slice{k:03d}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return files


def test_dicom_non_finite_rescale_is_an_error(tmp_path):
    _write_ct(tmp_path / "s", slope=float("nan"))
    assert "rescale" in _one_line_error(tmp_path / "s")


def test_dicom_unreadable_end_slice_is_a_visible_warning(tmp_path):
    files = _write_ct(tmp_path / "s")
    files[0].write_bytes(files[0].read_bytes()[:200])  # the first slice is corrupt
    with pytest.warns(UserWarning, match="could not be read"):
        vol = read_volume(tmp_path / "s")
    assert vol.shape3 == (4, 8, 8)
    assert any("slice000.dcm" in w for w in vol.meta["warnings"])


# ------------------------------------------------------------------- writers
def test_round_trip_still_exact_after_the_checks(tmp_path):
    labels = Volume(np.random.default_rng(1).integers(0, 4, (5, 6, 7)).astype(np.uint8),
                    make_affine((0.5, 0.25, 3.0), (1, 2, 3)), is_label=True)
    for ext in (".nii.gz", ".nii", ".seg.nrrd", ".mha", ".tif"):
        back = read_volume(write_labels(tmp_path / f"l{ext}", labels), is_label=True)
        np.testing.assert_array_equal(np.asarray(back.data), labels.data)
        np.testing.assert_allclose(back.affine, labels.affine, atol=1e-4)
    shutil.rmtree(tmp_path)


def test_highly_compressible_valid_files_are_not_taken_for_lies(tmp_path):
    """All-zero masks compress far beyond deflate's 1032:1 with zstd or bzip2: the size
    check bounds each codec by what it can really reach."""
    import nrrd

    zeros = np.zeros((8, 1024, 1024), np.uint16)
    tifffile.imwrite(tmp_path / "zstd_mask.tif", zeros, compression="zstd",
                     photometric="minisblack")
    nrrd.write(str(tmp_path / "bz2_mask.nrrd"), zeros, {"encoding": "bzip2"},
               index_order="C")
    for name in ("zstd_mask.tif", "bz2_mask.nrrd"):
        back = np.asarray(read_volume(tmp_path / name).data)
        assert back.shape == zeros.shape and not back.any()


def test_dicom_slice_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    import pydicom

    files = _write_ct(tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 60000  # 7.2 GB of 16-bit pixels in files of a few KB
        ds.save_as(f)
    assert "60000" in _one_line_error(tmp_path / "s")
