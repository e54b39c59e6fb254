"""The Export dock widget in a real (headless) napari viewer."""

from __future__ import annotations

import json

import numpy as np

from napari_medseg._napari.layers import volume_to_layer_data
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.io import read_volume, write_volume
from napari_medseg.io.autosave import find_recovery


def _setup(viewer, tmp_path):
    aff = make_affine((2.5, 0.9, 0.8), (10.0, -20.0, 30.0), np.diag([-1.0, -1.0, 1.0]))
    rng = np.random.default_rng(0)
    img = Volume(rng.normal(50, 30, (8, 24, 20)).astype(np.int16), aff, modality="CT")
    img = read_volume(write_volume(tmp_path / "ct.nii.gz", img))
    data, kw, _ = volume_to_layer_data(img, name="ct")
    viewer.add_image(data, **kw)
    lab = np.zeros(img.shape3, np.uint8)
    lab[2:6, 5:15, 4:12] = 1
    lab[3:5, 16:20, 2:6] = 2
    ldata, lkw, _ = volume_to_layer_data(img.like_labels(lab, {1: "liver", 2: "spleen"}),
                                         name="ct_seg")
    viewer.add_labels(ldata, **lkw)
    _, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Export")
    return img, lab, w


def _wait(qtbot, job):
    assert job is not None
    qtbot.waitUntil(lambda: job.result is not None or job.error is not None, timeout=30000)
    qtbot.waitUntil(lambda: w_idle(job), timeout=30000)


def w_idle(job):
    return not job.running


def test_export_formats_csv_and_training_case(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    img, lab, w = _setup(viewer, tmp_path)
    assert w.labels_combo.currentText() == "ct_seg" and w.image_combo.currentText() == "ct"
    for fmt in ("NIfTI (.nii.gz)", "NRRD (.nrrd)", "Slicer segmentation (.seg.nrrd)"):
        w.path_edit.setText(str(tmp_path / "out" / "seg"))
        (tmp_path / "out").mkdir(exist_ok=True)
        w.format_combo.setCurrentText(fmt)
        _wait(qtbot, w.export_labels())
        assert w.job.error is None, w.job.error
        back = read_volume(w.job.result, is_label=True)
        np.testing.assert_array_equal(np.asarray(back.data), lab)
        np.testing.assert_allclose(back.affine, img.affine, atol=1e-4)
    # CSV beside the labels file
    _wait(qtbot, w.export_csv())
    text = (tmp_path / "out" / "seg_stats.csv").read_text()
    assert text.splitlines()[1].startswith("1,liver,320,")
    # training case
    w.dataset_edit.setText(str(tmp_path / "Dataset700_W"))
    _wait(qtbot, w.add_training_case())
    info = json.loads((tmp_path / "Dataset700_W" / "dataset.json").read_text())
    assert info["numTraining"] == 1 and info["labels"]["spleen"] == 2
    assert info["channel_names"] == {"0": "channel_0"}


def test_failed_export_leaves_file_and_layer_untouched(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _, lab, w = _setup(viewer, tmp_path)
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"old contents")
    w.path_edit.setText(str(target))
    _wait(qtbot, w.export_labels())
    assert w.job.error is not None and "exists" in w.status.text()
    assert target.read_bytes() == b"old contents"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".seg")]
    np.testing.assert_array_equal(viewer.layers["ct_seg"].data, lab)
    # DICOM SEG needs a DICOM source: a clear message, no file
    w.format_combo.setCurrentText("DICOM SEG (.dcm)")
    _wait(qtbot, w.export_labels())
    assert "DICOM series" in w.status.text()
    assert not (tmp_path / "seg.dcm").exists()


def test_autosave_and_restore(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    img, lab, w = _setup(viewer, tmp_path)
    layer = viewer.layers["ct_seg"]
    layer.selected_label = 2
    layer.paint((1, 1, 1), 2, refresh=True)   # an edit, through napari's own painting
    edited = np.array(layer.data)
    worker = w.autosave_now()
    assert worker is not None
    qtbot.waitUntil(lambda: find_recovery(img) is not None, timeout=10000)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10000)
    assert w.autosave_now() is None            # nothing edited since
    # "crash": the labels are gone; the image is opened again
    viewer.layers.clear()
    data, kw, _ = volume_to_layer_data(read_volume(tmp_path / "ct.nii.gz"), name="ct")
    viewer.add_image(data, **kw)
    assert w.restore_button.isVisibleTo(w)
    restored = w.restore()
    np.testing.assert_array_equal(restored.data, edited)
    np.testing.assert_allclose(np.asarray(restored.scale), np.asarray(layer.scale))
    assert find_recovery(img) is None and not w.restore_button.isVisibleTo(w)


def test_screenshot(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _setup(viewer, tmp_path)
    viewer.window._qt_window.resize(1200, 800)
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=False)
    out = tmp_path / "export_widget.png"
    import imageio.v3 as iio

    iio.imwrite(out, shot)
    assert shot.shape[-1] == 4 and shot.shape[0] > 300
    assert iio.imread(out).shape == shot.shape
