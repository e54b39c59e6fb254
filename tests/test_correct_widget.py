"""The Correct dock widget in a real viewer: each effect is one exact undo step."""

import numpy as np
import pytest

from napari_medseg._napari.history import apply_edit, history_nbytes
from napari_medseg.core import corrections as C

SPACING = (2.0, 0.8, 0.8)


def _case():
    lab = np.zeros((12, 48, 48), np.uint8)
    lab[3:9, 10:30, 10:30] = 1
    lab[5, 18:22, 18:22] = 0          # a hole
    lab[4:7, 36:40, 36:40] = 2
    lab[10, 2, 2] = 1                 # an island of 1 voxel
    lab[2, 20:24, 20:24] = 3          # class 3 drawn on slices 2 and 9 only
    lab[9, 18:26, 18:26] = 3
    lab[6, 40, 5] = 1                 # another island
    img = np.where(lab > 0, 100.0, -50.0).astype(np.float32)
    img[:, :, :24] += 300.0
    return lab, img


@pytest.fixture
def widget(make_napari_viewer):
    viewer = make_napari_viewer()
    lab, img = _case()
    viewer.add_image(img, name="ct", scale=SPACING)
    layer = viewer.add_labels(lab.copy(), name="seg", scale=SPACING)
    _dock, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Correct")
    w.layer_combo.setCurrentText("seg")
    return viewer, layer, w


def _select(w, key):
    w.op_combo.setCurrentIndex(w.op_combo.findData(key))


def _check_undo_redo(layer, before, expected):
    after = layer.data.copy()
    np.testing.assert_array_equal(after, expected)
    assert not np.array_equal(after, before)
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    layer.redo()
    np.testing.assert_array_equal(layer.data, after)
    layer.undo()


CASES = [
    ("islands", 1, {"volume": 5.0},
     lambda a: C.remove_islands(a, 1, min_volume_mm3=5.0, spacing=SPACING)),
    ("largest", 1, {}, lambda a: C.keep_largest(a, 1)),
    ("split", 1, {}, lambda a: C.split_components(a, 1)),
    ("holes", 1, {"mode": 0}, lambda a: C.fill_holes(a, 1)),
    ("smooth", 1, {"method": 2, "radius": 1.6},
     lambda a: C.smooth(a, 1, method="closing", radius_mm=1.6, spacing=SPACING)),
    ("margin", 2, {"mm": 1.6}, lambda a: C.margin(a, 2, margin_mm=1.6, spacing=SPACING)),
    ("margin", 1, {"mm": -2.0}, lambda a: C.margin(a, 1, margin_mm=-2.0, spacing=SPACING)),
    ("between", 3, {}, lambda a: C.fill_between_slices(a, 3, spacing=SPACING)),
    ("logical", 1, {"op": 0, "other": 2}, lambda a: C.logical_op(a, "union", 1, 2)),
    ("relabel", 0, {"sources": "2, 3", "target": 4}, lambda a: C.merge(a, [2, 3], 4)),
]


def _set(w, key, params):
    p = w.params[key]
    for name, value in params.items():
        ctl = p[name]
        if hasattr(ctl, "setCurrentIndex") and isinstance(value, int) and name != "other":
            ctl.setCurrentIndex(value)
        elif hasattr(ctl, "setText"):
            ctl.setText(value)
        else:
            ctl.setValue(value)


@pytest.mark.parametrize("key,label,params,expect", CASES,
                         ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_each_operation_through_widget_undo_redo(widget, key, label, params, expect):
    viewer, layer, w = widget
    before = layer.data.copy()
    _select(w, key)
    w.label_spin.setValue(label)
    _set(w, key, params)
    n_undo = len(layer._undo_history)
    w.run(background=False)
    assert len(layer._undo_history) == n_undo + 1          # exactly one undo step
    expected = expect(before).result(before)
    assert w.last_changed == int((expected != before).sum())
    _check_undo_redo(layer, before, expected)


def test_threshold_paint_and_slice_region(widget):
    viewer, layer, w = widget
    before = layer.data.copy()
    _select(w, "threshold")
    w.label_spin.setValue(5)
    p = w.params["threshold"]
    p["image"].setCurrentText("ct")
    p["lo"].setValue(200.0)
    p["hi"].setValue(500.0)
    w.region_combo.setCurrentIndex(2)
    w.from_spin.setValue(4)
    w.to_spin.setValue(6)
    w.run(background=False)
    img = viewer.layers["ct"].data
    expected = before.copy()
    sel = (img >= 200) & (img <= 500)
    sel[:4] = sel[7:] = False
    expected[sel] = 5
    _check_undo_redo(layer, before, expected)


def test_current_slice_region_follows_dims(widget):
    viewer, layer, w = widget
    before = layer.data.copy()
    viewer.dims.set_point(0, 4 * SPACING[0])
    w.region_combo.setCurrentIndex(1)
    _select(w, "margin")
    w.params["margin"]["mm"].setValue(1.6)
    w.run(background=False)
    changed = np.argwhere(layer.data != before)
    assert len(changed) and set(changed[:, 0]) == {4}


def test_background_job_and_shortcut(widget, qtbot):
    from napari.utils.key_bindings import coerce_keybinding

    viewer, layer, w = widget
    before = layer.data.copy()
    _select(w, "margin")
    w.label_spin.setValue(2)
    w.params["margin"]["mm"].setValue(1.6)
    job = w.run(background=True)
    qtbot.waitUntil(lambda: not job.running and job.result is not None, timeout=20000)
    expected = C.margin(before, 2, margin_mm=1.6, spacing=SPACING).result(before)
    _check_undo_redo(layer, before, expected)
    assert coerce_keybinding("Shift-H") not in viewer.keymap  # no viewer-wide keys
    func = layer.keymap[coerce_keybinding("Shift-H")]       # shrink by the margin
    func(layer)
    expected = C.margin(before, 2, margin_mm=-1.6, spacing=SPACING).result(before)
    np.testing.assert_array_equal(layer.data, expected)


def test_shortcuts_leave_other_bindings_and_unbind_on_close(make_napari_viewer):
    from napari.utils.key_bindings import coerce_keybinding

    viewer = make_napari_viewer()
    mine = viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="seg")

    def theirs(layer):
        return "another plugin"
    viewer.bind_key("Shift-K", theirs, overwrite=True)      # another plugin's viewer key
    mine.bind_key("Shift-R", theirs)                         # ... and one on the layer
    dock, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Correct")
    assert viewer.keymap[coerce_keybinding("Shift-K")] is theirs
    assert mine.keymap[coerce_keybinding("Shift-R")] is theirs
    assert coerce_keybinding("Shift-K") in mine.keymap
    later = viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="later")
    assert coerce_keybinding("Shift-G") in later.keymap      # layers added later too
    w.unbind_keys()
    assert coerce_keybinding("Shift-K") not in mine.keymap
    assert coerce_keybinding("Shift-G") not in later.keymap
    assert mine.keymap[coerce_keybinding("Shift-R")] is theirs


def test_shortcuts_go_when_the_widget_is_destroyed(make_napari_viewer, qtbot):
    from napari.utils.key_bindings import coerce_keybinding

    from napari_medseg._widgets.correct import CorrectWidget

    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="seg")
    w = CorrectWidget(viewer)
    assert coerce_keybinding("Shift-K") in layer.keymap
    w.deleteLater()
    del w
    qtbot.waitUntil(lambda: coerce_keybinding("Shift-K") not in layer.keymap, timeout=5000)


def test_correction_form_is_built_from_the_registry(make_napari_viewer):
    """A correction declared once appears in the widget with its form and shortcut."""
    import functools

    from napari.utils.key_bindings import coerce_keybinding

    from napari_medseg.core.corrections import registry as R

    def make(ctx):
        return functools.partial(C.margin, ctx.data, ctx.label,
                                 margin_mm=ctx.values["mm"] * ctx.values["times"],
                                 spacing=ctx.spacing, region=ctx.region)

    demo = R.Correction("demo", "Demo double margin", make,
                        (R.Param("mm", "Margin", "float", 0.8, -10.0, 10.0, 0.1, " mm"),
                         R.Param("times", "Times", "int", 2, 1, 5)),
                        info="Grows twice.", shortcuts=(R.Shortcut("Shift-J"),))
    R.register(demo)
    try:
        viewer = make_napari_viewer()
        lab, _ = _case()
        layer = viewer.add_labels(lab.copy(), name="seg", scale=SPACING)
        _, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Correct")
        idx = w.op_combo.findData("demo")
        assert idx >= 0 and w.op_combo.itemText(idx) == "Demo double margin"
        p = w.params["demo"]
        assert p["mm"].value() == pytest.approx(0.8) and p["mm"].suffix() == " mm"
        assert p["times"].value() == 2
        p["times"].setValue(3)
        w.layer_combo.setCurrentText("seg")
        w.label_spin.setValue(2)
        before = layer.data.copy()
        layer.keymap[coerce_keybinding("Shift-J")](layer)
        expected = C.margin(before, 2, margin_mm=2.4, spacing=SPACING).result(before)
        np.testing.assert_array_equal(layer.data, expected)
    finally:
        del R.CORRECTIONS["demo"]


def test_undo_memory_small_region_of_large_volume():
    from napari.layers import Labels

    data = np.zeros((300, 512, 512), np.uint8)
    data[140:160, 200:260, 200:260] = 1
    layer = Labels(data)
    before_region = layer.data[130:170, 190:270, 190:270].copy()
    edit = C.margin(layer.data, 1, margin_mm=2.0, spacing=(1.0, 0.7, 0.7),
                    region=C.slice_range(130, 170))
    n = apply_edit(layer, edit)
    assert n > 10_000
    size = history_nbytes(layer)
    assert size < 10 * 2 ** 20, size
    assert len(layer._undo_history) == 1
    layer.undo()
    np.testing.assert_array_equal(layer.data[130:170, 190:270, 190:270], before_region)
    assert int(layer.data.sum()) == 20 * 60 * 60


def test_dense_edit_uses_mask_history_and_undoes(rng):
    from napari.layers import Labels

    data = rng.integers(0, 3, (20, 30, 30)).astype(np.uint8)
    layer = Labels(data.copy())
    edit = C.relabel(layer.data, {1: 2, 2: 1})
    apply_edit(layer, edit)
    assert history_nbytes(layer) < data.size * 3            # not 6+ bytes per voxel
    swapped = edit.result(data)
    np.testing.assert_array_equal(layer.data, swapped)
    layer.undo()
    np.testing.assert_array_equal(layer.data, data)
    layer.redo()
    np.testing.assert_array_equal(layer.data, swapped)


@pytest.fixture
def notes():
    """Messages of the napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    seen: list = []

    def grab(event):
        seen.append(str(getattr(event, "value", event)))

    notification_manager.notification_ready.connect(grab)
    yield seen
    notification_manager.notification_ready.disconnect(grab)


def _corner_islands():
    """Small islands near each corner of slice 5, and one on slice 6 top-left."""
    lab = np.zeros((12, 48, 48), np.uint8)
    for y in (3, 43):
        for x in (3, 43):
            lab[5, y:y + 2, x:x + 2] = 1
    lab[6, 3:5, 3:5] = 1
    lab[5, 8:16, 8:16] = 2                 # big: survives
    return lab


def _zoom_on_top_left(viewer, layer, z=5, half_voxels=10):
    """Show slice ``z`` and zoom in so that about ``half_voxels`` voxels either side
    of voxel (8, 8) are visible."""
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, layer.data_to_world((z, 0, 0))[0])
    camera = viewer.scene.camera
    centre = layer.data_to_world((z, 8, 8))
    camera.center = tuple(centre[-2:])
    camera.zoom = max(viewer.canvas.size) / (2 * half_voxels * SPACING[1])


def test_current_view_region_edits_only_visible_voxels(widget, qtbot):
    viewer, layer, w = widget
    layer.data = _corner_islands()
    before = layer.data.copy()
    _zoom_on_top_left(viewer, layer)
    w.region_combo.setCurrentText("Current view")
    assert not w.range_row.isVisibleTo(w)
    region = w.region(layer)
    assert region[0] == slice(5, 6)                        # the slice shown only
    for sl in region[1:]:                                  # the top-left corner
        assert sl.start <= 3 and 5 <= sl.stop < 43
    _select(w, "islands")
    w.all_check.setChecked(True)
    w.params["islands"]["volume"].setValue(20.0)
    n_undo = len(layer._undo_history)
    w.run(background=False)
    assert len(layer._undo_history) == n_undo + 1          # exactly one undo step
    expected = before.copy()
    expected[5, 3:5, 3:5] = 0                              # the visible island only
    np.testing.assert_array_equal(layer.data, expected)
    outside = np.ones(before.shape, bool)
    outside[region] = False
    np.testing.assert_array_equal(layer.data[outside], before[outside])
    assert w.last_changed == 4
    _check_undo_redo(layer, before, expected)


def test_current_view_fill_holes_inside_view_only(widget):
    viewer, layer, w = widget
    lab = np.zeros((12, 48, 48), np.uint8)
    lab[5, 2:14, 2:14] = 1                 # visible ring with a hole
    lab[5, 30:42, 30:42] = 1               # the same out of view
    lab[5, 6:10, 6:10] = 0
    lab[5, 34:38, 34:38] = 0
    layer.data = lab
    before = lab.copy()
    _zoom_on_top_left(viewer, layer)
    w.region_combo.setCurrentText("Current view")
    _select(w, "holes")
    w.label_spin.setValue(1)
    w.params["holes"]["mode"].setCurrentIndex(1)           # per slice
    w.run(background=False)
    expected = before.copy()
    expected[5, 6:10, 6:10] = 1
    _check_undo_redo(layer, before, expected)


def test_current_view_in_3d_asks_for_the_2d_view(widget, notes):
    from napari_medseg.errors import MedSegError

    viewer, layer, w = widget
    before = layer.data.copy()
    viewer.dims.ndisplay = 3
    w.region_combo.setCurrentText("Current view")
    with pytest.raises(MedSegError, match="2D view"):
        w.region(layer)
    _select(w, "islands")
    n_undo = len(layer._undo_history)
    assert w.run(background=False) is None
    np.testing.assert_array_equal(layer.data, before)
    assert len(layer._undo_history) == n_undo
    assert any("2D view" in n and "seg" in n for n in notes), notes
