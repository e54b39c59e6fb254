"""Ctrl+Z inside the Interactive tool takes back the newest prompt, several levels deep."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt

from test_interactive_widget import _centre, setup  # noqa: F401 - the fixture


def test_ctrl_z_undoes_prompts_newest_first_before_the_commit(setup, qtbot):  # noqa: F811
    viewer, widget, target, lab = setup
    pos, neg = viewer.layers["positive"], viewer.layers["negative"]
    scribbles = viewer.layers["scribbles"]
    liver = lab.data == 1
    c = _centre(liver)
    pos.add(c)
    neg.add(c + [0, 10, 10])
    scribbles.paint(tuple(int(v) for v in _centre(lab.data == 3)), 1)
    widget.wait()
    assert len(pos.data) == 1 and len(neg.data) == 1 and scribbles.data.any()
    viewer.layers.selection.active = pos
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.KeyboardModifier.ControlModifier)  # the scribble
    assert not scribbles.data.any() and len(neg.data) == 1
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.KeyboardModifier.ControlModifier)  # the negative
    assert len(neg.data) == 0 and len(pos.data) == 1
    widget.wait()
    assert viewer.layers["interactive preview"].data.any()  # preview from the click left
    assert widget.undo_prompt() and len(pos.data) == 0
    assert not widget.undo_prompt()  # nothing left
    # after a commit, the prompts are gone and napari's own undo applies to the labels
    before = np.array(target.data, copy=True)
    pos.add(c)
    widget.wait()
    widget.label_spin.setValue(1)
    assert widget.commit() > 0
    assert not widget.undo_prompt()
    target.undo()
    np.testing.assert_array_equal(target.data, before)
