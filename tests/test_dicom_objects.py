"""DICOM SEG and RTSTRUCT in and out: round trips on a small series, pydicom's RTSTRUCT."""

from __future__ import annotations

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pytest.importorskip("skimage")

from napari_medseg.core.volume import Volume  # noqa: E402
from napari_medseg.errors import MedSegError  # noqa: E402
from napari_medseg.io import read_volume  # noqa: E402
from napari_medseg.io.dicom_objects import (dicom_object_kind, group_disjoint,  # noqa: E402
                                            read_dicom_seg, read_rtstruct)
from napari_medseg.io.export import export_dicom_seg  # noqa: E402
from napari_medseg.io.export.rtstruct import export_rtstruct  # noqa: E402
from test_export_dicomseg import _write_series  # noqa: E402

from _realdata import REAL  # noqa: E402

AXIAL = (1, 0, 0, 0, 1, 0)
NAMES = {1: "liver", 3: "spleen"}
COLORS = {1: (1.0, 0.0, 0.0), 3: (0.0, 0.0, 1.0)}


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    _write_series(folder, AXIAL, 2.5)
    img = read_volume(folder)
    lab = np.zeros(img.shape3, np.uint8)
    lab[1:5, 2:10, 3:12] = 1
    lab[2:4, 5:7, 6:9] = 0  # a hole inside the liver
    lab[0:3, 9:13, 13:17] = 3
    lab[5, 0, 0] = 3  # a single voxel in a corner
    labels = img.like_labels(lab, names=NAMES, colors=COLORS)
    return folder, img, labels


def test_rtstruct_round_trip_is_voxel_exact(series, tmp_path):
    import pydicom

    folder, img, labels = series
    out = export_rtstruct(tmp_path / "rt.dcm", labels, source=img)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and dicom_object_kind(out) == "RTSTRUCT"
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "spleen"]
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [255, 0, 0]
    [back] = read_rtstruct(out, reference=img)
    np.testing.assert_array_equal(back.data, labels.data)
    assert back.label_names == NAMES
    np.testing.assert_allclose(back.label_colors[3], COLORS[3])
    np.testing.assert_allclose(back.affine, img.affine)


def test_rtstruct_finds_its_series_in_the_folder(series):
    folder, img, labels = series
    out = export_rtstruct(folder / "rt.dcm", labels, source=img)
    [back] = read_rtstruct(out)
    np.testing.assert_array_equal(back.data, labels.data)
    assert read_volume(folder).shape3 == img.shape3  # the series still reads past the RTSTRUCT


def test_seg_round_trip_on_the_series_and_on_its_own_geometry(series, tmp_path):
    folder, img, labels = series
    out = export_dicom_seg(tmp_path / "seg.dcm", labels, source=img)
    assert dicom_object_kind(out) == "SEG"
    [on_series] = read_dicom_seg(out, reference=img)
    # our SEG numbers segments 1..N in class order: liver 1, spleen 2
    expect = np.select([labels.data == 1, labels.data == 3], [1, 2], 0)
    np.testing.assert_array_equal(on_series.data, expect)
    assert on_series.label_names == {1: "liver", 2: "spleen"}
    np.testing.assert_allclose(on_series.label_colors[1], COLORS[1], atol=0.01)  # CIELab
    np.testing.assert_allclose(on_series.label_colors[2], COLORS[3], atol=0.01)
    [own] = read_dicom_seg(out)  # no series beside it: the SEG's own frames
    world = lambda v, idx: (v.affine @ np.r_[np.asarray(idx, float)[::-1], 1.0])[:3]  # noqa: E731
    for k in (1, 2):
        a = np.argwhere(on_series.data == k)
        b = np.argwhere(own.data == k)
        assert len(a) == len(b)
        np.testing.assert_allclose(np.sort([world(on_series, i) for i in a], axis=0),
                                   np.sort([world(own, i) for i in b], axis=0), atol=1e-3)


def test_overlapping_segments_are_never_merged(series, tmp_path):
    folder, img, labels = series
    a = np.zeros(img.shape3, bool)
    a[1:4, 2:8, 2:8] = True
    b = np.zeros(img.shape3, bool)
    b[2:5, 5:11, 5:11] = True  # overlaps a
    seg = hd.seg.Segmentation(
        source_images=[__import__("pydicom").dcmread(f) for f in img.meta["dicom_files"]],
        pixel_array=np.stack([a, b], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=i, segment_label=n,
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"),
            algorithm_type="MANUAL") for i, n in ((1, "tumour"), (2, "margin"))],
        series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")
    seg.save_as(tmp_path / "overlap.dcm")
    vols = read_dicom_seg(tmp_path / "overlap.dcm", reference=img)
    assert len(vols) == 2  # one layer per group of disjoint segments
    got = {n: (v.data == k) for v in vols for k, n in v.label_names.items()}
    np.testing.assert_array_equal(got["tumour"], a)
    np.testing.assert_array_equal(got["margin"], b)


def test_group_disjoint_packs_disjoint_segments_together():
    m = [np.zeros((1, 4, 4), bool) for _ in range(3)]
    m[0][0, 0] = m[1][0, 1] = True
    m[2][0, 0:2, 0] = True  # overlaps both
    groups = group_disjoint([(1, "a", None, m[0]), (2, "b", None, m[1]), (3, "c", None, m[2])],
                            (1, 4, 4))
    assert [sorted(g[1]) for g in groups] == [[1, 2], [3]]


def test_pydicom_rtstruct_test_file_reads_on_a_matching_grid():
    from pydicom.data import get_testdata_file
    import pydicom

    path = get_testdata_file("rtstruct.dcm")
    ds = pydicom.dcmread(path, force=True)  # an old file without the DICM preamble
    pts = np.concatenate([np.asarray(c.ContourData, float).reshape(-1, 3)
                          for rc in ds.ROIContourSequence for c in rc.ContourSequence])
    # no image series ships with it: a 1 mm grid over its contours stands in for one
    zs = np.unique(pts[:, 2])
    step = float(np.min(np.diff(zs))) if len(zs) > 1 else 1.0
    lo = pts.min(0) - 5
    shape = (int(round(np.ptp(zs) / step)) + 1, int(np.ptp(pts[:, 1]) + 11),
             int(np.ptp(pts[:, 0]) + 11))
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, step])  # LPS identity in RAS
    aff[:3, 3] = [-lo[0], -lo[1], zs[0]]
    ref = Volume(np.zeros(shape, np.int16), aff)
    vols = read_rtstruct(path, reference=ref)
    names = {n for v in vols for n in v.label_names.values()}
    assert {r.ROIName for r in ds.StructureSetROISequence} >= names and names
    assert all(np.any(v.data) for v in vols)


def test_rtstruct_without_its_series_is_a_clear_error(series, tmp_path):
    folder, img, labels = series
    (tmp_path / "alone").mkdir()
    out = export_rtstruct(tmp_path / "alone" / "rt.dcm", labels, source=img)
    with pytest.raises(MedSegError, match=r"rt\.dcm.*open the referenced"):
        read_rtstruct(out)


def test_truncated_seg_header_is_refused_before_decoding(series, tmp_path):
    folder, img, labels = series
    out = export_dicom_seg(tmp_path / "seg.dcm", labels, source=img)
    data = out.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 40])
    with pytest.raises(MedSegError, match="cut.dcm"):
        read_dicom_seg(tmp_path / "cut.dcm", reference=img)


def test_seg_and_rtstruct_open_in_napari_on_the_series(series, tmp_path, make_napari_viewer):
    folder, img, labels = series
    export_dicom_seg(tmp_path / "seg.dcm", labels, source=img)
    export_rtstruct(tmp_path / "rt.dcm", labels, source=img)
    viewer = make_napari_viewer()
    [ct] = viewer.open(str(folder), plugin="napari-medseg")  # nothing else in the folder
    [seg] = viewer.open(str(tmp_path / "seg.dcm"), plugin="napari-medseg")
    [rt] = viewer.open(str(tmp_path / "rt.dcm"), plugin="napari-medseg")
    assert seg.data.shape == rt.data.shape == ct.data.shape
    np.testing.assert_array_equal(rt.data, labels.data)
    assert list(rt.features["name"]) == ["background", "liver", "spleen"]
    np.testing.assert_allclose(rt.colormap.map(np.array([3]))[0][:3], COLORS[3], atol=1e-6)
    np.testing.assert_allclose(seg.scale, ct.scale)
    np.testing.assert_allclose(seg.translate, ct.translate)
    with pytest.raises(MedSegError, match="seg.dcm.*SEG"):
        read_volume(tmp_path / "seg.dcm")


def test_series_folder_opens_with_the_objects_beside_it(series, make_napari_viewer):
    folder, img, labels = series
    export_rtstruct(folder / "rt.dcm", labels, source=img)
    viewer = make_napari_viewer()
    layers = viewer.open(str(folder), plugin="napari-medseg")
    assert [lyr.__class__.__name__ for lyr in layers] == ["Image", "Labels"]
    np.testing.assert_array_equal(layers[1].data, labels.data)


def test_export_widget_writes_rtstruct(series, tmp_path, make_napari_viewer, qtbot):
    from napari_medseg._napari.layers import volume_to_layer_data

    folder, img, labels = series
    viewer = make_napari_viewer()
    [ct] = viewer.open(str(folder), plugin="napari-medseg")
    ldata, lkw, _ = volume_to_layer_data(labels, name="organs")
    viewer.add_labels(ldata, **lkw)
    _, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Export")
    w.labels_combo.setCurrentText("organs")
    w.image_combo.setCurrentText(ct.name)
    w.format_combo.setCurrentText("DICOM RTSTRUCT (.dcm)")
    w.path_edit.setText(str(tmp_path / "rt.dcm"))
    job = w.export_labels()
    qtbot.waitUntil(lambda: job.result is not None or job.error is not None, timeout=30000)
    assert job.error is None, job.error
    assert str(job.result) == str(tmp_path / "rt.dcm"), (job.result, w.status.text())
    [back] = read_rtstruct(tmp_path / "rt.dcm", reference=img)
    np.testing.assert_array_equal(back.data, labels.data)
    assert back.label_names == NAMES


@pytest.mark.skipif(not (REAL / "ct_abdomen_dicom").is_dir(), reason="real data not present")
def test_real_ct_seg_and_rtstruct_round_trip(tmp_path):
    """The shared abdominal CT (whose slices leave the SOP UIDs to the file meta)."""
    img = read_volume(REAL / "ct_abdomen_dicom")
    ref = np.asarray(read_volume(REAL / "ct_abdomen_dicom_labels.nii.gz", is_label=True).data)
    lab = np.select([ref == 5, ref == 1, ref == 52], [5, 1, 52], 0).astype(np.uint8)
    labels = img.like_labels(lab, names={5: "liver", 1: "spleen", 52: "aorta"})
    [rt] = read_rtstruct(export_rtstruct(tmp_path / "rt.dcm", labels, source=img),
                         reference=img)
    np.testing.assert_array_equal(rt.data, lab)
    [seg] = read_dicom_seg(export_dicom_seg(tmp_path / "seg.dcm", labels, source=img),
                           reference=img)
    np.testing.assert_array_equal(seg.data, np.select([lab == 1, lab == 5, lab == 52],
                                                      [1, 2, 3], 0))


def test_pydicom_data_segs_read_on_their_own_geometry():
    """SEGs written by other tools, from the pydicom-data package when it is installed."""
    pdd = pytest.importorskip("pydicom_data")
    from pathlib import Path

    root = Path(pdd.__file__).parent
    segs = [p for p in sorted(root.rglob("*")) if p.is_file() and p.stat().st_size < 50e6
            and dicom_object_kind(p) == "SEG"]
    if not segs:
        pytest.skip("pydicom-data holds no SEG")
    for p in segs[:3]:
        try:
            vols = read_dicom_seg(p)
        except MedSegError as exc:  # e.g. a fractional or tiled SEG: one clear line
            assert str(p.name) in str(exc) and "\n" not in str(exc)
            continue
        assert vols and all(np.any(v.data) for v in vols)
        assert all(v.label_names for v in vols)
