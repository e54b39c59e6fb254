"""The real abdominal CT end to end: window, planes, lock the liver, edit the spleen,
export SEG / RTSTRUCT / STL / CSV and read each back (skipped without the shared data)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from _realdata import REAL

pytestmark = pytest.mark.skipif(not (REAL / "ct_abdomen_dicom").is_dir(),
                                reason="real data not present")


def test_open_window_lock_edit_export_reopen(make_napari_viewer, tmp_path):
    hd = pytest.importorskip("highdicom")
    trimesh = pytest.importorskip("trimesh")
    from napari_medseg._napari.boundary import volume_from_layer
    from napari_medseg._napari.layer_roles import layer_modality
    from napari_medseg._widgets.class_panel import ClassPanel
    from napari_medseg.io.export import export_dicom_seg, write_statistics_csv
    from napari_medseg.io.export.rtstruct import export_rtstruct
    from napari_medseg.io.export.surface import export_surfaces

    viewer = make_napari_viewer()
    [ct] = viewer.open(str(REAL / "ct_abdomen_dicom"), plugin="napari-medseg")
    assert layer_modality(ct) == "CT" and tuple(ct.contrast_limits) == (-160.0, 240.0)
    [ref] = viewer.open(str(REAL / "ct_abdomen_dicom_labels.nii.gz"), plugin="napari-medseg")
    names = {int(k): v for k, v in json.loads((REAL / "labels.json").read_text()).items()}
    sub = np.select([ref.data == 5, ref.data == 1], [1, 2], 0).astype(np.uint8)
    seg = viewer.add_labels(sub, name="organs", scale=ct.scale, translate=ct.translate,
                            affine=ct.affine.affine_matrix,
                            features={"index": [0, 1, 2],
                                      "name": ["background", names[5], names[1]]})
    _, display = viewer.window.add_plugin_dock_widget("napari-medseg", "Display")
    display.buttons["liver"].click()
    assert tuple(ct.contrast_limits) == (15.0, 165.0)
    for plane in ("coronal", "sagittal", "axial"):
        display.plane_combo.setCurrentText(plane)
    panel = ClassPanel(viewer)
    viewer.window.add_dock_widget(panel)
    panel.set_layer(seg)
    panel.set_locked(1)  # the liver is finished
    before = np.array(seg.data, copy=True)
    z = int(np.argwhere(before == 2)[0][0])
    seg.brush_size = 60
    with seg.block_history():  # one brush stroke with the spleen across both organs
        for x in range(150, 400, 20):
            seg.paint((z, 256, x), 2)
    after = np.asarray(seg.data)
    assert np.array_equal(after == 1, before == 1)  # liver untouched
    assert (after == 2).sum() > (before == 2).sum()  # spleen edited

    image = volume_from_layer(ct)
    labels = volume_from_layer(seg, viewer=viewer)
    labels.meta.update({k: v for k, v in image.meta.items() if k.startswith("dicom_")})
    assert labels.label_names == {1: "liver", 2: "spleen"}
    rt = export_rtstruct(tmp_path / "rt.dcm", labels, source=image)
    segf = export_dicom_seg(tmp_path / "seg.dcm", labels, source=image)
    stl = export_surfaces(tmp_path / "case.stl", labels, frame="LPS")
    csvf = write_statistics_csv(tmp_path / "case.csv", labels.data, labels.spacing,
                                image=np.asarray(ct.data), names=labels.label_names,
                                affine=labels.affine)
    # reopen: in the viewer, and in the tools that read each file
    [rt_layer] = viewer.open(str(rt), plugin="napari-medseg")
    np.testing.assert_array_equal(rt_layer.data, after)
    [seg_layer] = viewer.open(str(segf), plugin="napari-medseg")
    np.testing.assert_array_equal(seg_layer.data, after)
    ds = hd.seg.segread(str(segf))
    assert [ds.get_segment_description(n).segment_label for n in ds.get_segment_numbers()] \
        == ["liver", "spleen"]
    import pydicom

    assert [r.ROIName for r in pydicom.dcmread(rt).StructureSetROISequence] == \
        ["liver", "spleen"]
    meshes = [trimesh.load(p, force="mesh") for p in stl]
    assert [p.name for p in stl] == ["case_liver.stl", "case_spleen.stl"]
    assert all(m.is_watertight for m in meshes)
    rows = list(csv.DictReader(csvf.open()))
    assert [r["name"] for r in rows] == ["liver", "spleen"]
    liver = rows[0]
    # the liver lies on the patient's right: RAS x > 0, LPS x < 0 in the STL
    assert float(liver["centroid_r"]) > 0 and meshes[0].center_mass[0] < 0
    assert float(liver["centroid_r"]) == pytest.approx(-meshes[0].center_mass[0], abs=2.0)
