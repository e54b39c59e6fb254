"""Linked axial / sagittal / coronal views (napari-orthogonal-views), radiologically upright."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari_orthogonal_views")

from napari_medseg._napari.layers import volume_to_layer_data  # noqa: E402
from napari_medseg.core.phantom import make_abdomen_ct  # noqa: E402


def test_three_linked_planes_upright_and_editable(make_napari_viewer, qtbot):
    img, lab = make_abdomen_ct(seed=0, shape=(24, 48, 48), spacing=(3.0, 2.0, 2.0))
    viewer = make_napari_viewer(show=True)
    d, kw, _ = volume_to_layer_data(img, name="ct")
    viewer.add_image(d, **kw)
    d, kw, _ = volume_to_layer_data(lab, name="seg")
    seg = viewer.add_labels(np.asarray(d), **kw)
    _, display = viewer.window.add_plugin_dock_widget("napari-medseg", "Display")
    display.linked_button.setChecked(True)
    qtbot.wait(100)
    from napari_orthogonal_views.ortho_view_manager import _get_manager

    m = _get_manager(viewer)
    sag = m.right_widget.vm_container.viewer_model
    cor = m.bottom_widget.vm_container.viewer_model
    assert tuple(viewer.dims.order) == (0, 1, 2)  # axial: (P, L) shown
    assert tuple(sag.dims.order)[-2:] == (0, 1)    # sagittal: S vertical, P horizontal
    assert tuple(cor.dims.order)[-2:] == (0, 2)    # coronal: S vertical, L horizontal
    for vm in (sag, cor):
        assert tuple(str(o) for o in vm.camera.orientation2d) == ("up", "right")
    # painting in the coronal view edits the one segmentation, undoable there
    copy = cor.layers["seg"]
    assert copy.data is seg.data
    before = np.array(seg.data, copy=True)
    copy.brush_size = 5
    with copy.block_history():
        copy.paint((12, 24, 24), 4)
    assert (seg.data != before).any()
    display.linked_button.setChecked(False)
