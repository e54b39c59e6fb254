"""Locked classes: brush, fill, corrections and interactive commits never change them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg._napari.locks import lock_classes, protect_locked


@pytest.fixture
def labels(make_napari_viewer):
    viewer = make_napari_viewer()
    data = np.zeros((6, 40, 40), np.uint8)
    data[:, 5:20, 5:20] = 1   # liver: locked
    data[:, 22:35, 22:35] = 2  # spleen: editable
    layer = viewer.add_labels(data.copy(), name="organs")
    lock_classes(layer, [1])
    return viewer, layer, data


def test_protect_locked_mask():
    old = np.array([0, 1, 2, 1])
    assert protect_locked(old, np.array([1, 0, 3, 1]), {1}).tolist() == [True, True, False,
                                                                        False]
    assert not protect_locked(old, 5, set()).any()


def test_brush_keeps_locked_voxels_and_undo_is_one_step(labels):
    viewer, layer, before = labels
    layer.brush_size = 20
    layer.selected_label = 2
    with layer.block_history():  # one stroke, as napari's mouse binding does
        layer.paint((3, 18, 18), 2, refresh=True)
        layer.paint((3, 22, 22), 2, refresh=True)
    after = np.asarray(layer.data)
    assert np.array_equal(after == 1, before == 1)  # the liver is untouched
    assert (after[3] == 2).sum() > (before[3] == 2).sum()  # the spleen grew
    n = len(layer._undo_history)
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    layer.redo()
    np.testing.assert_array_equal(layer.data, after)
    assert len(layer._undo_history) == n


def test_fill_and_single_paint_outside_a_stroke(labels):
    viewer, layer, before = labels
    layer.contiguous = True
    layer.fill((2, 10, 10), 3)  # fill the locked liver
    np.testing.assert_array_equal(layer.data, before)
    layer.fill((2, 30, 30), 1)  # turn the spleen into the locked class: refused too
    np.testing.assert_array_equal(layer.data, before)
    layer.fill((2, 30, 30), 4)  # unlocked -> unlocked is fine
    assert (np.asarray(layer.data)[2] == 4).sum() == (before[2] == 2).sum()
    layer.brush_size = 30
    layer.paint((1, 20, 20), 0)  # erase over both organs
    d = np.asarray(layer.data)
    assert np.array_equal(d == 1, before == 1) and not (d[1, 22:30, 22:30] == 2).any()


def test_correction_edit_keeps_locked_voxels(labels):
    from napari_medseg._napari.history import apply_edit
    from napari_medseg.core.corrections import Edit

    viewer, layer, before = labels
    values = np.full((6, 40, 40), 2, np.uint8)  # "grow the spleen everywhere"
    apply_edit(layer, Edit(region=(slice(0, 6), slice(0, 40), slice(0, 40)), values=values))
    d = np.asarray(layer.data)
    assert np.array_equal(d == 1, before == 1)
    assert (d[before != 1] == 2).all()
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)


def test_interactive_commit_keeps_locked_voxels(labels):
    from napari_medseg._widgets.interactive import commit_mask

    viewer, layer, before = labels
    mask = np.zeros((6, 40, 40), bool)
    mask[:, 0:30, 0:30] = True  # overlaps the locked liver and the spleen
    region = (slice(0, 6), slice(0, 40), slice(0, 40))
    commit_mask(layer, mask, region, 3, overwrite=True)
    d = np.asarray(layer.data)
    assert np.array_equal(d == 1, before == 1)
    assert (d[mask & (before != 1)] == 3).all()
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)


def test_unlocked_layer_is_edited_as_before(make_napari_viewer):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.ones((2, 8, 8), np.uint8))
    lock_classes(layer, [])
    layer.fill((0, 1, 1), 5)
    assert (np.asarray(layer.data)[0] == 5).all()  # napari fills the current slice


def test_class_panel_lock_box_locks_the_class(make_napari_viewer):
    from napari.utils.colormaps import DirectLabelColormap

    from napari_medseg._napari.layer_roles import locked_classes
    from napari_medseg._widgets.class_panel import ClassPanel

    viewer = make_napari_viewer()
    data = np.zeros((4, 30, 30), np.uint8)
    data[:, 2:12, 2:12] = 1
    data[:, 15:25, 15:25] = 2
    layer = viewer.add_labels(data.copy(), name="organs", features={
        "index": [0, 1, 2], "name": ["background", "liver", "spleen"]},
        colormap=DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 1: (1, 0, 0, 1),
                                                 2: (0, 0, 1, 1)}))
    panel = ClassPanel(viewer)
    viewer.window.add_dock_widget(panel)
    panel.set_layer(layer)
    assert panel.table.columnCount() == 5 and panel.locked() == []
    panel.set_locked(1)
    assert locked_classes(layer) == {1}
    layer.brush_size = 40
    layer.paint((1, 10, 10), 2)
    d = np.asarray(layer.data)
    assert np.array_equal(d == 1, data == 1) and (d[1] == 2).sum() > (data[1] == 2).sum()
    panel.set_locked(1, False)
    assert locked_classes(layer) == set()
    layer.paint((1, 10, 10), 2)
    assert not (np.asarray(layer.data)[1] == 1).any()


def test_correction_reports_only_the_voxels_it_changed(labels):
    from napari_medseg._napari.history import apply_edit
    from napari_medseg.core.corrections import Edit

    viewer, layer, before = labels
    values = np.full((6, 40, 40), 2, np.uint8)
    n = apply_edit(layer, Edit(region=(slice(0, 6), slice(0, 40), slice(0, 40)),
                               values=values))
    assert n == int(((before != 1) & (before != 2)).sum())  # locked liver not counted
    # a few changes in a big box take the sparse (data_setitem) path
    current = np.array(layer.data, copy=True)
    values = current.copy()
    values[0, 0:2, 0:2] = 3   # background -> 3: allowed (already 2 after the edit above)
    values[0, 10, 10] = 3     # liver -> 3: locked
    n = apply_edit(layer, Edit(region=(slice(0, 6), slice(0, 40), slice(0, 40)),
                               values=values))
    assert n == 4
    assert np.array_equal(np.asarray(layer.data) == 1, before == 1)
