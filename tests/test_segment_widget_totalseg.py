"""The Segment widget's pipeline and class-subset choices for TotalSegmentator tasks.

TotalSegmentator's weights-folder layout with tiny random-weight networks
(``_tiny_totalseg``), run from the real dock widget on the real viewer.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nnunetv2")

from napari_medseg.core.volume import Volume, make_affine  # noqa: E402
from napari_medseg.io import read_volume, write_volume  # noqa: E402
from napari_medseg.models import load_model  # noqa: E402

from _tiny_totalseg import TOTALSEG_PARTS  # noqa: E402
from test_nnunet_native import _ct  # noqa: E402

ALL_NAMES = [n for _, _, names in TOTALSEG_PARTS.values() for n in names]


@pytest.fixture
def docked(totalseg_env, tmp_path, make_napari_viewer):
    vol = Volume(_ct((14, 24, 20), seed=3), make_affine((2.5, 1.8, 2.0), (-10, 5, 20)),
                 modality="CT")
    path = write_volume(tmp_path / "ct.nii.gz", vol)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-medseg")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    widget.device_box.setCurrentText("cpu")
    return viewer, widget, path


def _run(qtbot, widget):
    job = widget.run()
    if job is not None:
        qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    return job


def test_segment_widget_runs_a_class_subset_of_a_totalsegmentator_task(docked, qtbot):
    viewer, widget, path = docked
    widget.model_box.setCurrentText("abdomen-ct-small")
    assert widget.model_features() == (False, False)
    assert widget.backend_row.isHidden() and widget.subset_row.isHidden()
    assert not widget.precision_row.isHidden()  # a PyTorch model
    widget.model_box.setCurrentText("total")
    assert widget.model_box.currentText() == "total"
    assert widget.model_features() == (True, True)
    assert not widget.backend_row.isHidden() and not widget.subset_row.isHidden()
    assert widget.precision_row.isHidden()  # TotalSegmentator tasks keep their own
    assert widget.backend_box.currentText() == "native"

    # an unknown class name stops before the run, naming it
    widget.subset_edit.setText("liver, livr")
    assert _run(qtbot, widget) is None
    assert "livr" in widget.last_error and "liver" not in widget.last_error.split("'livr'")[0]

    widget.subset_edit.setText("liver, aorta")
    _run(qtbot, widget)
    assert widget.last_error is None
    result = next(lyr for lyr in viewer.layers if lyr.name.endswith("total"))
    got = np.asarray(result.data)
    ids = {ALL_NAMES.index("liver") + 1, ALL_NAMES.index("aorta") + 1}
    assert set(np.unique(got).tolist()) <= ids | {0}
    ref, info = load_model("total").run(read_volume(path), device="cpu",
                                        roi_subset=["liver", "aorta"])
    assert info["parts_run"] == 2
    np.testing.assert_array_equal(got, ref)

    # the next run without a subset runs every part: the kept model forgets the subset
    widget.subset_edit.setText("")
    _run(qtbot, widget)
    assert widget.last_error is None
    assert widget._loaded["total"].roi_subset is None
    full = np.asarray(result.data)
    assert not set(np.unique(full).tolist()) <= ids | {0}

    # nnU-Net's own predictor, as the command line's --backend nnunetv2
    widget.backend_box.setCurrentText("nnunetv2")
    widget.subset_edit.setText("liver aorta")
    _run(qtbot, widget)
    assert widget.last_error is None
    assert widget._loaded["total"].backend == "nnunetv2"
    assert set(np.unique(np.asarray(result.data)).tolist()) <= ids | {0}
