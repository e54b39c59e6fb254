"""Segment shape statistics and surfaces in patient millimetres."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.shape import SHAPE_FIELDS, class_mesh, shape_statistics
from napari_medseg.core.volume import make_affine


def _sphere(radius_mm=12.0, spacing=(1.0, 1.0, 1.0), centre_mm=(30.0, 30.0, 30.0),
            shape=(60, 60, 60)):
    z, y, x = np.indices(shape).astype(float)
    d = np.sqrt(((z * spacing[0] - centre_mm[0])) ** 2 + ((y * spacing[1] - centre_mm[1])) ** 2
                + ((x * spacing[2] - centre_mm[2])) ** 2)
    return (d <= radius_mm).astype(np.uint8)


def test_sphere_statistics_match_geometry():
    r = 12.0
    lab = _sphere(r)
    aff = make_affine((1.0, 1.0, 1.0), (100.0, -50.0, 20.0))
    img = np.where(lab > 0, 40.0, -1000.0) + np.arange(lab.size).reshape(lab.shape) % 3
    row = shape_statistics(lab, aff, image=img)[1]
    assert tuple(row) == SHAPE_FIELDS
    assert row["surface_mm2"] == pytest.approx(4 * np.pi * r ** 2, rel=0.05)
    assert row["max_diameter_mm"] == pytest.approx(2 * r, rel=0.06)
    assert row["sphericity"] == pytest.approx(1.0, abs=0.08)
    for a in ("axis_1_mm", "axis_2_mm", "axis_3_mm"):
        assert row[a] == pytest.approx(2 * r, rel=0.05)
    # centroid in RAS mm: the affine's origin plus the centre voxel (30, 30, 30)
    assert (row["centroid_r"], row["centroid_a"], row["centroid_s"]) == pytest.approx(
        (130.0, -20.0, 50.0), abs=0.05)
    assert 40.0 <= row["p05"] <= row["median"] <= row["p95"] <= 42.0


def test_anisotropic_ellipsoid_axes_and_flipped_affine():
    z, y, x = np.indices((30, 60, 60)).astype(float)
    lab = ((((z * 2.0 - 30) / 10) ** 2 + ((y * 0.8 - 24) / 20) ** 2
            + ((x * 0.8 - 24) / 5) ** 2) <= 1).astype(np.uint8)
    aff = make_affine((2.0, 0.8, 0.8), (0, 0, 0), np.diag([-1.0, -1.0, 1.0]))
    row = shape_statistics(lab, aff)[1]
    assert (row["axis_1_mm"], row["axis_2_mm"], row["axis_3_mm"]) == pytest.approx(
        (40.0, 20.0, 10.0), rel=0.08)
    vol = lab.sum() * 2.0 * 0.8 * 0.8
    assert vol == pytest.approx(4 / 3 * np.pi * 20 * 10 * 5, rel=0.05)


@pytest.mark.parametrize("direction", [None, np.diag([-1.0, -1.0, 1.0])])
def test_mesh_is_closed_outward_and_in_patient_space(direction):
    trimesh = pytest.importorskip("trimesh")
    lab = _sphere(8.0, shape=(40, 40, 40), centre_mm=(20.0, 20.0, 20.0))
    aff = make_affine((1.0, 1.0, 1.0), (5.0, 6.0, 7.0), direction)
    verts, faces = class_mesh(lab, aff, 1)
    m = trimesh.Trimesh(verts, faces, process=True)
    assert m.is_watertight
    assert m.volume > 0  # outward normals
    assert m.volume == pytest.approx(lab.sum(), rel=0.06)
    centre = aff[:3, :3] @ np.array([20.0, 20.0, 20.0]) + aff[:3, 3]
    np.testing.assert_allclose(m.centroid, centre, atol=0.1)
    smooth, sfaces = class_mesh(lab, aff, 1, smooth=10)
    ms = trimesh.Trimesh(smooth, sfaces, process=True)
    assert ms.area < m.area and ms.volume == pytest.approx(m.volume, rel=0.05)


@pytest.mark.parametrize("ext", [".stl", ".obj", ".ply"])
def test_surface_files_read_back_in_the_chosen_frame(tmp_path, ext):
    trimesh = pytest.importorskip("trimesh")
    from napari_medseg.core.volume import Volume
    from napari_medseg.io.export.surface import export_surfaces

    lab = _sphere(8.0, shape=(40, 40, 40), centre_mm=(20.0, 20.0, 20.0))
    lab[2:6, 2:6, 2:6] = 2
    aff = make_affine((1.0, 1.0, 1.0), (5.0, 6.0, 7.0), np.diag([-1.0, -1.0, 1.0]))
    vol = Volume(lab, aff, is_label=True, label_names={1: "liver", 2: "spleen tip"})
    ras = export_surfaces(tmp_path / f"case{ext}", vol)
    assert [p.name for p in ras] == [f"case_liver{ext}", f"case_spleen_tip{ext}"]
    lps = export_surfaces(tmp_path / f"lps{ext}", vol, ids=[1], frame="LPS", smooth=5)
    m_ras = trimesh.load(ras[0], force="mesh")
    m_lps = trimesh.load(lps[0], force="mesh")
    centre = aff[:3, :3] @ np.array([20.0, 20.0, 20.0]) + aff[:3, 3]
    np.testing.assert_allclose(m_ras.centroid, centre, atol=0.2)
    np.testing.assert_allclose(m_lps.centroid, centre * [-1, -1, 1], atol=0.2)
    assert m_ras.volume > 0 and m_lps.volume > 0
    with pytest.raises(Exception, match="exists"):
        export_surfaces(tmp_path / f"case{ext}", vol)


def test_export_widget_writes_surfaces_and_shape_csv(make_napari_viewer, qtbot, tmp_path):
    trimesh = pytest.importorskip("trimesh")
    import csv

    from napari_medseg._napari.layers import volume_to_layer_data
    from napari_medseg.core.volume import Volume

    viewer = make_napari_viewer()
    aff = make_affine((1.0, 1.0, 1.0), (5.0, 6.0, 7.0), np.diag([-1.0, -1.0, 1.0]))
    img = Volume(np.zeros((40, 40, 40), np.int16), aff, modality="CT")
    lab = img.like_labels(_sphere(8.0, shape=(40, 40, 40), centre_mm=(20.0, 20.0, 20.0)),
                          names={1: "liver"})
    d, kw, _ = volume_to_layer_data(img, name="ct")
    viewer.add_image(d, **kw)
    d, kw, _ = volume_to_layer_data(lab, name="seg")
    viewer.add_labels(d, **kw)
    _, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Export")
    w.labels_combo.setCurrentText("seg")
    w.path_edit.setText(str(tmp_path / "case.nii.gz"))
    w.frame_combo.setCurrentText("LPS")
    job = w.export_surfaces()
    qtbot.waitUntil(lambda: job.result is not None or job.error is not None, timeout=30000)
    assert job.error is None, job.error
    mesh = trimesh.load(tmp_path / "case_liver.stl", force="mesh")
    centre = aff[:3, :3] @ np.array([20.0, 20.0, 20.0]) + aff[:3, 3]
    np.testing.assert_allclose(mesh.centroid, centre * [-1, -1, 1], atol=0.2)
    qtbot.waitUntil(lambda: not job.running, timeout=5000)
    job = w.export_csv()
    qtbot.waitUntil(lambda: job.result is not None or job.error is not None, timeout=30000)
    assert job.error is None, job.error
    [row] = list(csv.DictReader((tmp_path / "case_stats.csv").open()))
    assert (float(row["centroid_r"]), float(row["centroid_a"]), float(row["centroid_s"])) \
        == pytest.approx(tuple(centre), abs=0.05)
    assert float(row["max_diameter_mm"]) == pytest.approx(16.0, rel=0.08)


def test_qa_table_shows_shape_columns_on_request(make_napari_viewer):
    viewer = make_napari_viewer()
    lab = _sphere(8.0, shape=(40, 40, 40), centre_mm=(20.0, 20.0, 20.0))
    viewer.add_labels(lab, name="seg", features={"index": [0, 1],
                                                 "name": ["background", "tumour"]})
    _, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Label QA")
    w.layer_combo.setCurrentText("seg")
    w.refresh()
    assert w.table.item(0, 7).text() == ""  # off by default: the table stays fast
    w.shape_check.setChecked(True)
    cells = [w.table.item(0, j).text() for j in (7, 8, 9)]
    assert float(cells[0]) == pytest.approx(4 * np.pi * 8 ** 2 / 100, rel=0.06)
    assert float(cells[1]) == pytest.approx(16.0, rel=0.08)
    assert float(cells[2]) == pytest.approx(1.0, abs=0.1)
