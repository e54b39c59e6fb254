"""The napari <-> domain boundary: one way out of a layer for every widget and writer.

Class colours reach every export path that can hold them; an axis swap survives
File > Save when the Labels layer has no metadata; the original prediction and
the model card travel through the boundary as a ledger and a ModelCard.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_medseg._napari.boundary import (
    card_of,
    ledger_of,
    store_prediction,
    volume_from_layer,
    volume_to_layer_data,
)
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.io import read_volume, write_volume

PLUGIN = "napari-medseg"
NAMES = {1: "liver", 2: "spleen"}
COLORS = {1: (0.8, 0.2, 0.1), 2: (0.1, 0.4, 0.9)}
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _labels(shape):
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 2:6, 2:7] = 1
    lab[3:5, 6:9, 1:4] = 2
    return lab


def _add_pair(viewer, img: Volume):
    data, kw, _ = volume_to_layer_data(img, name="ct")
    viewer.add_image(data, **kw)
    lab = _labels(img.shape3)
    ldata, lkw, _ = volume_to_layer_data(img.like_labels(lab, NAMES, COLORS), name="ct_seg")
    return viewer.add_labels(ldata, **lkw), lab


def _export(qtbot, w, path, fmt):
    w.path_edit.setText(str(path))
    w.format_combo.setCurrentText(fmt)
    job = w.export_labels()
    _wait(qtbot, job, w)
    return job.result


def _wait(qtbot, job, w):
    assert job is not None, w.status.text()
    qtbot.waitUntil(lambda: job.result is not None or job.error is not None, timeout=30000)
    qtbot.waitUntil(lambda: not job.running, timeout=30000)
    assert job.error is None, job.error


def test_labels_leave_napari_with_names_and_colours(make_napari_viewer):
    viewer = make_napari_viewer()
    img = Volume(np.zeros((6, 10, 12), np.int16),
                 make_affine((2.0, 0.8, 0.7), (4.0, -3.0, 2.0), SAGITTAL), modality="CT")
    layer, lab = _add_pair(viewer, img)
    vol = volume_from_layer(layer, viewer=viewer)
    assert vol.is_label and vol.label_names == NAMES
    for k, c in COLORS.items():
        np.testing.assert_allclose(vol.label_colors[k], c, atol=1e-6)
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(vol.data), lab)


def test_export_widget_keeps_colours_in_seg_nrrd_nifti_and_names_everywhere(
        make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    aff = make_affine((2.5, 0.9, 0.8), (10.0, -20.0, 30.0), np.diag([-1.0, -1.0, 1.0]))
    img = read_volume(write_volume(tmp_path / "ct.nii.gz", Volume(
        np.random.default_rng(0).normal(50, 30, (8, 12, 10)).astype(np.int16), aff,
        modality="CT")))
    _, lab = _add_pair(viewer, img)
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, "Export")
    back = read_volume(_export(qtbot, w, tmp_path / "seg.seg.nrrd",
                               "Slicer segmentation (.seg.nrrd)"))
    assert back.label_names == NAMES
    for k, c in COLORS.items():  # the Export widget used to drop them
        np.testing.assert_allclose(back.label_colors[k], c, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(back.data), lab)
    # NIfTI: names and colours in the JSON sidecar beside the file
    back = read_volume(_export(qtbot, w, tmp_path / "seg.nii.gz", "NIfTI (.nii.gz)"),
                       is_label=True)
    np.testing.assert_array_equal(np.asarray(back.data), lab)
    assert back.label_names == NAMES
    for k, c in COLORS.items():
        np.testing.assert_allclose(back.label_colors[k][:3], c, atol=1e-4)
    # nnU-Net training case: names in dataset.json (an nnU-Net dataset has no place for
    # colours, and labelsTr gets no sidecar that nnU-Net would take for a case)
    w.dataset_edit.setText(str(tmp_path / "Dataset701_B"))
    _wait(qtbot, w.add_training_case(), w)
    info = json.loads((tmp_path / "Dataset701_B" / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    [case] = sorted((tmp_path / "Dataset701_B" / "labelsTr").glob("*.nii.gz"))
    back = read_volume(case, is_label=True)
    np.testing.assert_array_equal(np.asarray(back.data), lab)


def test_export_widget_keeps_colours_in_dicom_seg(make_napari_viewer, qtbot, tmp_path):
    hd = pytest.importorskip("highdicom")
    from test_export_dicomseg import _write_series

    src = tmp_path / "ct"
    src.mkdir()
    _write_series(src, [1, 0, 0, 0, 1, 0], 2.5)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(src), plugin=PLUGIN)
    img = volume_from_layer(image, is_label=False, viewer=viewer)
    ldata, lkw, _ = volume_to_layer_data(
        img.like_labels(_labels(img.shape3), NAMES, COLORS), name="ct_seg")
    viewer.add_labels(ldata, **lkw)
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, "Export")
    w.image_combo.setCurrentText(image.name)
    seg = hd.seg.segread(_export(qtbot, w, tmp_path / "seg.dcm", "DICOM SEG (.dcm)"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen"]
    for s, k in zip(seg.SegmentSequence, (1, 2)):
        lab = hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue)
        rgb = np.asarray(lab.to_rgb(), float) / 255.0
        np.testing.assert_allclose(rgb, COLORS[k], atol=2 / 255)


def test_file_save_keeps_axis_swap_without_metadata(make_napari_viewer, tmp_path):
    """A Labels layer napari made from a sagittal image saves on the image grid.

    napari's transform cannot hold the axis swap; the layer adopts the image's
    stored geometry when it is added, so File > Save is exact even once the image
    is closed.
    """
    aff = make_affine((3.0, 0.7, 0.9), (-12.5, 40.0, 7.25), SAGITTAL)
    data = np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32)
    src = tmp_path / "sag.nii.gz"
    img = nib.Nifti1Image(data.T, aff)
    img.set_qform(aff, code=1)
    nib.save(img, str(src))
    viewer = make_napari_viewer()
    viewer.open(str(src), plugin=PLUGIN)
    viewer._new_labels()
    labels = viewer.layers[-1]
    labels.data_setitem((np.array([1]), np.array([2]), np.array([3])), 1)
    viewer.layers.remove(viewer.layers[0])  # the image is closed
    out = tmp_path / "sag_seg.nii.gz"
    labels.save(str(out), plugin=PLUGIN)
    back = read_volume(out, is_label=True)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert int(np.asarray(back.data)[1, 2, 3]) == 1


def test_prediction_and_card_round_trip(make_napari_viewer):
    from napari_medseg.models.card import ModelCard

    viewer = make_napari_viewer()
    pred = _labels((4, 10, 10))
    layer = viewer.add_labels(pred.copy())
    assert card_of(layer) is None and ledger_of(layer, (1, 1, 1)) is None
    card = ModelCard(name="m", version="2.0", classes={
        1: {"name": "liver", "color": [0.8, 0.2, 0.1]}})
    store_prediction(layer, pred.copy(), card)
    back = card_of(layer)
    assert isinstance(back, ModelCard) and back.label_names == {1: "liver"}
    layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), 1)
    led = ledger_of(layer, (2.0, 1.0, 1.0), back.label_names)
    assert led.totals(layer.data)["changed_voxels"] == 1
    assert led.meta == {"model": "m", "model_version": "2.0"}
