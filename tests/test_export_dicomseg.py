"""DICOM SEG export: read back with highdicom onto the source slices."""

from __future__ import annotations

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
import pydicom  # noqa: E402
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from napari_medseg.core.volume import Volume, make_affine  # noqa: E402
from napari_medseg.errors import MedSegError  # noqa: E402
from napari_medseg.io import read_volume  # noqa: E402
from napari_medseg.io.export import export_dicom_seg  # noqa: E402

ROWS, COLS, NZ = 14, 18, 6


def _write_series(folder, iop, step, seed=0):
    """A small CT series with pydicom; files named in scrambled order."""
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    order = rng.permutation(NZ)
    truth = {}
    for z in range(NZ):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = \
            "Phantom^CT", "P1", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = \
            study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", \
            "1", "A1"
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber = "", "CT", 3
        ds.InstanceNumber = z + 1
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in
                                   np.array([-20.0, 30.0, 100.0]) + normal * step * z]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.7], abs(step)
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        px = rng.integers(0, 1400, (ROWS, COLS)).astype(np.int16)
        ds.PixelData = px.tobytes()
        ds.save_as(folder / f"im{order[z]:02d}.dcm", enforce_file_format=True)
        truth[ds.SOPInstanceUID] = px.astype(np.int32) - 1024
    return truth


def _classes(hu):
    return np.where(hu > 200, 2, np.where(hu > -200, 1, 0)).astype(np.uint8)


@pytest.mark.parametrize("iop,step", [
    ([1, 0, 0, 0, 1, 0], 2.5),             # axial, feet to head
    ([-1, 0, 0, 0, 1, 0], -3.0),           # flipped rows, head to feet
    ([1, 0, 0, 0, 0, -1], 2.0),            # coronal
])
def test_seg_frames_map_onto_source_slices(tmp_path, iop, step):
    src = tmp_path / "ct"
    src.mkdir()
    truth = _write_series(src, iop, step)
    vol = read_volume(src)
    labels = vol.like_labels(_classes(np.asarray(vol.data)), names={1: "liver", 2: "lesion"})
    out = export_dicom_seg(tmp_path / "seg.dcm", labels, source=vol,
                           algorithm_name="abdomen-ct-small", algorithm_version="1.0")
    seg = hd.seg.segread(out)
    assert seg.SeriesInstanceUID != vol.meta["dicom_series_instance_uid"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "lesion"]
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"SEMIAUTOMATIC"}
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(truth)
    uids = list(truth)
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    for n, uid in enumerate(uids):  # voxels match, computed from each file on its own
        np.testing.assert_array_equal(got[n], _classes(truth[uid]))


def test_manual_type_needs_no_algorithm(tmp_path):
    src = tmp_path / "ct"
    src.mkdir()
    _write_series(src, [1, 0, 0, 0, 1, 0], 2.5)
    vol = read_volume(src)
    labels = vol.like_labels(_classes(np.asarray(vol.data)), names={1: "a", 2: "b"})
    out = export_dicom_seg(tmp_path / "seg.dcm", labels, algorithm_type="manual")
    seg = hd.seg.segread(out)  # source files found through the labels' own metadata
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"MANUAL"}


def test_not_dicom_or_off_grid_is_refused(tmp_path):
    lab = Volume(np.ones((3, 4, 5), np.uint8), make_affine((1, 1, 1)), is_label=True)
    with pytest.raises(MedSegError, match="DICOM series"):
        export_dicom_seg(tmp_path / "seg.dcm", lab)
    src = tmp_path / "ct"
    src.mkdir()
    _write_series(src, [1, 0, 0, 0, 1, 0], 2.5)
    vol = read_volume(src)
    shifted = vol.like_labels(np.ones(vol.shape3, np.uint8))
    shifted.affine[:3, 3] += 0.35  # half a voxel off
    with pytest.raises(MedSegError, match="not on the grid"):
        export_dicom_seg(tmp_path / "seg.dcm", shifted, source=vol)
    assert not list(tmp_path.glob("*seg*"))
