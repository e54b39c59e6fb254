"""The Worklist dock widget with the real viewer: predict ahead, uncertain regions,
approve to review, reviewer mode side by side, export as a training case."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.worklist import Worklist

MODEL = "abdomen-ct-small"


@pytest.fixture
def folder(tmp_path):
    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.io import write_volume

    root = tmp_path / "cases"
    root.mkdir()
    for i in range(3):
        img, _ = make_abdomen_ct(seed=i, shape=(20, 56, 56), spacing=(2.5, 1.5, 1.5))
        write_volume(root / f"p{i}.nii.gz", img.with_data(np.asarray(img.data, np.int16)))
    return root


def _widget(viewer):
    _, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Worklist")
    return w


def _names(viewer):
    return [layer.name for layer in viewer.layers]


def test_annotate_review_and_approve(make_napari_viewer, qtbot, folder, tmp_path):
    from app_model.types import KeyBinding

    viewer = make_napari_viewer()
    w = _widget(viewer)
    w.annotator_edit.setText("ana")
    w.model_box.setCurrentText(MODEL)
    assert w.open_folder(folder)
    assert w.table.rowCount() == 3 and w.table.item(0, 1).text() == "new"

    job = w.next_case()  # p0 has no prediction yet: made in the background first
    assert job is not None and w.current == "p0"
    qtbot.waitUntil(lambda: "labels" in w.layers, timeout=120_000)
    assert {"p0 image", "p0 labels", "p0 uncertainty"} <= set(_names(viewer))
    unc = w.layers["uncertainty"]
    assert not unc.visible
    w.show_uncertainty.setChecked(True)
    assert unc.visible
    # the next case is predicted ahead while the user works on this one
    qtbot.waitUntil(lambda: w.worklist.prediction_path("p1").is_file(), timeout=120_000)
    qtbot.waitUntil(lambda: w.ahead is not None and not w.ahead.running, timeout=30_000)
    wl = w.worklist
    assert wl.case("p0").status == "in progress" and wl.case("p0").annotator == "ana"
    assert wl.case("p1").status == "predicted"

    # shortcuts on the case's layers
    labels = w.layers["labels"]
    for key in ("Alt-N", "Alt-P", "Alt-U"):
        assert KeyBinding.from_str(key) in labels.keymap

    # next uncertain region: view and cursor move to its most uncertain voxel
    assert w.regions, "the phantom prediction has uncertain borders"
    region = w.next_region()
    world = np.asarray(unc.data_to_world(np.asarray(region.peak, float)))
    np.testing.assert_allclose(viewer.dims.point[-3:], world, atol=1e-3)
    np.testing.assert_allclose(viewer.cursor.position[-3:], world, atol=1e-3)
    assert w.regions[0].score >= w.regions[-1].score
    second = w.next_region()
    assert second is w.regions[1 % len(w.regions)]

    # an edit, then approve with "send to review"
    before = np.asarray(labels.data).copy()
    labels.paint((10, 28, 28), 2)
    assert w._edits >= 1
    w.review_check.setChecked(True)
    job = w.approve()
    qtbot.waitUntil(lambda: not job.running and job.result is not None, timeout=60_000)
    assert wl.case("p0").status == "needs review"
    assert wl.case("p0").edits >= 1 and wl.case("p0").seconds > 0
    draft = np.asarray(wl.load_case("p0")["draft"].data)
    assert draft[10, 28, 28] == 2 and (draft != before).sum() >= 1
    qtbot.waitUntil(lambda: w.current == "p1" and "labels" in w.layers, timeout=60_000)

    # reviewer mode: original prediction beside the correction; approve exports
    w.annotator_edit.setText("rita")
    w.training_edit.setText(str(tmp_path / "nnUNet_raw" / "Dataset501_Liver"))
    w.reviewer_mode.setChecked(True)
    w.open_case("p0")
    assert {"p0 original prediction", "p0 labels"} <= set(_names(viewer))
    assert viewer.canvas.grid.enabled and viewer.canvas.grid.shape == (1, 2)
    np.testing.assert_array_equal(np.asarray(w.layers["labels"].data), draft)
    np.testing.assert_array_equal(np.asarray(w.layers["original"].data),
                                  np.asarray(wl.load_case("p0")["prediction"].data))
    job = w.approve()
    qtbot.waitUntil(lambda: not job.running and job.result is not None, timeout=60_000)
    rec = Worklist(folder).case("p0")
    assert rec.status == "approved" and rec.reviewer == "rita"
    ds = tmp_path / "nnUNet_raw" / "Dataset501_Liver"
    assert (ds / "labelsTr" / f"{rec.training_case}.nii.gz").is_file()
    assert (ds / "ledger" / rec.training_case / "corrections.npz").is_file()
    assert (ds / "datalist.json").is_file()

    # send back (reviewer) and the Fine-tune dock with the training folder
    w.reviewer_mode.setChecked(False)
    wl.set_status("p2", "needs review")
    w.current = "p2"
    w.send_back()
    assert wl.case("p2").status == "in progress"
    ft = w.open_finetune()
    assert ft.dataset_edit.text() == str(ds.resolve())


def test_bad_folder_is_one_line(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    w = _widget(viewer)
    assert not w.open_folder(tmp_path / "missing")
    assert "does not exist" in w.status.text()
    assert w.next_case() is None and "open a worklist folder" in w.status.text()
