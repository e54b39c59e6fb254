"""The Label QA dock widget in a real viewer."""

import numpy as np
import pytest

SPACING = (2.0, 1.0, 1.0)


@pytest.fixture
def qa(make_napari_viewer):
    viewer = make_napari_viewer()
    img = np.full((8, 40, 40), -1000.0, np.float32)
    img[:, 4:36, 4:36] = 40.0
    pred = np.zeros(img.shape, np.uint8)
    pred[2:6, 10:20, 10:20] = 1
    pred[3:5, 25:30, 25:30] = 2
    lab = pred.copy()
    lab[0, 0, 0:2] = 1                       # a stray mark outside the body
    viewer.add_image(img, name="ct", scale=SPACING, metadata={"medseg": {"modality": "CT"}})
    layer = viewer.add_labels(
        lab, name="seg", scale=SPACING, metadata={"medseg_prediction": pred},
        features={"index": [0, 1, 2, 3], "name": ["background", "liver", "spleen", "lesion"]})
    _dock, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Label QA")
    w.layer_combo.setCurrentText("seg")
    w.image_combo.setCurrentText("ct")
    return viewer, layer, w


def _table(w):
    return [[w.table.item(i, j).text() for j in range(w.table.columnCount())]
            for i in range(w.table.rowCount())]


def test_table_shows_volumes_corrections_and_flags(qa):
    viewer, layer, w = qa
    rows = w.refresh()
    t = _table(w)
    assert [r[0] for r in t] == ["1", "2", "3"]
    assert t[0][1] == "liver" and t[0][2] == f"{(400 + 2) * 2 / 1000:.2f}"
    assert t[0][3] == "2" and t[0][4] == "2"
    assert t[0][5] == f"{2 * 400 / (400 + 402):.3f}"
    assert "outside the body" in t[0][6]
    assert t[1][6] == "" and t[1][5] == "1.000"
    assert t[2][6] == "empty"
    assert rows[0]["outside_voxels"] == 2


def test_auto_refresh_after_edit_and_undo(qa, qtbot):
    from napari_medseg._napari.history import apply_edit
    from napari_medseg.core.corrections import remove_islands

    viewer, layer, w = qa
    w.refresh()
    apply_edit(layer, remove_islands(layer.data, 1, min_volume_mm3=10, spacing=SPACING))
    qtbot.waitUntil(lambda: _table(w)[0][4] == "0", timeout=5000)
    assert _table(w)[0][6] == ""
    layer.undo()
    qtbot.waitUntil(lambda: _table(w)[0][4] == "2", timeout=5000)
