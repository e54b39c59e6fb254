"""The Segment dock widget and the prediction -> layer glue, on the real viewer.

The end-to-end tests open the sample CT, dock the widget through napari's
plugin machinery and run the built-in model (a real torch network).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_medseg._napari.layers import volume_to_layer_data
from napari_medseg._napari.prediction import (
    card_classes,
    merge_prediction,
    region_shape,
    shapes_region,
    view_region,
)
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError

MODEL = "abdomen-ct-small"
ORGANS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}


# ------------------------------------------------------------------ pure parts
def test_merge_prediction_replace_untouched_and_region():
    original = np.zeros((4, 5, 6), np.uint8)
    original[1:3, 1:4, 1:5] = 1
    current = original.copy()
    current[0, 0, 0] = 2          # the user painted here
    current[1, 1, 1] = 0          # ... and erased here
    new = np.full_like(original, 3)
    data, pred = merge_prediction(current, original, new, "untouched")
    assert data[0, 0, 0] == 2 and data[1, 1, 1] == 0
    untouched = current == original
    assert np.all(data[untouched] == 3)
    assert np.all(pred == 3)
    data, _ = merge_prediction(current, original, new, "replace")
    assert np.all(data == 3)
    region = (slice(0, 2), slice(None), slice(None))
    data, pred = merge_prediction(current, original, new, "replace", region)
    assert np.all(data[:2] == 3) and np.array_equal(data[2:], current[2:])
    assert np.all(pred[:2] == 3) and np.array_equal(pred[2:], original[2:])
    with pytest.raises(ValueError):
        merge_prediction(current, original, new, "keep")


def test_card_classes_accepts_names_hex_and_rgb():
    card = {"classes": {1: {"name": "liver", "color": [0.8, 0.3, 0.2]},
                        "2": {"name": "spleen", "color": "#00ff00"},
                        3: {"name": "kidney", "color": [255, 0, 0]},
                        4: {"name": "lesion"}}}
    names, colors = card_classes(card)
    assert names == {1: "liver", 2: "spleen", 3: "kidney", 4: "lesion"}
    np.testing.assert_allclose(colors[1], (0.8, 0.3, 0.2, 1.0))
    np.testing.assert_allclose(colors[2], (0.0, 1.0, 0.0, 1.0))
    np.testing.assert_allclose(colors[3], (1.0, 0.0, 0.0, 1.0))
    assert 4 not in colors


def _image_layer(viewer, shape=(20, 30, 40), spacing=(2.5, 1.5, 1.0)):
    aff = make_affine(spacing, (-30.0, 12.0, 5.0), np.diag([-1.0, -1.0, 1.0]))
    vol = Volume(np.zeros(shape, np.float32), aff, modality="CT")
    data, kwargs, _ = volume_to_layer_data(vol, name="img")
    return viewer.add_image(data, **kwargs)


def test_view_region_is_the_visible_slab(make_napari_viewer):
    viewer = make_napari_viewer()
    img = _image_layer(viewer)
    viewer.dims.set_point(0, img.data_to_world((10, 0, 0))[0])
    viewer.reset_view()
    region = view_region(img, viewer, margin_slices=3)
    assert region[0] == slice(7, 14)  # slice 10 +- 3
    assert region_shape(region, img.data.shape)[1:] == (30, 40)  # everything in view
    # zoom in on the centre: only part of the slice is visible
    viewer.scene.camera.zoom *= 6
    region = view_region(img, viewer, margin_slices=0)
    z, y, x = region_shape(region, img.data.shape)
    assert z == 1 and 0 < y < 30 and 0 < x < 40
    viewer.dims.ndisplay = 3
    assert view_region(img, viewer) is None


def test_shapes_region_single_slice_and_3d_extent(make_napari_viewer):
    viewer = make_napari_viewer()
    img = _image_layer(viewer)
    # a rectangle drawn on slice 5, in world coordinates
    corners = [img.data_to_world(p) for p in
               [(5, 4, 6), (5, 4, 20), (5, 12, 20), (5, 12, 6)]]
    shapes = viewer.add_shapes([np.array(corners)], shape_type="rectangle")
    region = shapes_region(img, shapes, margin_slices=2)
    assert region == (slice(3, 8), slice(4, 13), slice(6, 21))
    # a second rectangle on another slice: the 3D extent of both
    more = [img.data_to_world(p) for p in [(9, 1, 2), (9, 1, 3), (9, 2, 3), (9, 2, 2)]]
    shapes.add_rectangles(np.array(more))
    region = shapes_region(img, shapes, margin_slices=2)
    assert region == (slice(5, 10), slice(1, 13), slice(2, 21))
    far = [np.array(c) + 1e4 for c in corners]
    outside = viewer.add_shapes([np.array(far)], shape_type="rectangle")
    with pytest.raises(MedSegError, match="outside the image"):
        shapes_region(img, outside)
    empty = viewer.add_shapes(ndim=3)
    with pytest.raises(MedSegError, match="no shapes"):
        shapes_region(img, empty)


# ------------------------------------------------------------------ the widget
@pytest.fixture
def notes():
    """Messages of the napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    seen: list = []

    def grab(event):
        seen.append(event.value if hasattr(event, "value") else event)

    notification_manager.notification_ready.connect(grab)
    yield seen
    notification_manager.notification_ready.disconnect(grab)


def _dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    return widget


def _wait(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: widget.job is not None and not widget.running,
                    timeout=timeout)


def _tiny_model(network=None, channels=1):
    """A small real torch model (random 3D U-Net) in our model format."""
    import torch

    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.networks import UNet3D
    from napari_medseg.models.predictor import TorchModel

    torch.manual_seed(0)
    chans = [{"name": f"CT{i}" if i else "CT", "modality": "CT"} for i in range(channels)]
    card = ModelCard(name="tiny-ct", channels=chans, patch_size=(16, 32, 32),
                     normalization=[{"kind": "ct", "window": [-200, 300]}],
                     classes={1: {"name": "liver", "color": [0.8, 0.3, 0.2]}})
    net = network if network is not None else UNet3D(in_channels=channels, out_channels=2)
    return TorchModel(card, net)


def _ct_layer(viewer, shape=(24, 40, 40), name="ct"):
    vol = Volume(np.full(shape, -50.0, np.float32),
                 make_affine((2.5, 1.5, 1.5), (0.0, 0.0, 0.0)), modality="CT")
    data, kwargs, _ = volume_to_layer_data(vol, name=name)
    return viewer.add_image(data, **kwargs)


def test_error_no_image_layer(make_napari_viewer, notes):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.add_model(_tiny_model())
    assert widget.run() is None
    assert "no image layer" in widget.last_error
    assert any("no image layer" in str(n.message) for n in notes)
    assert len(viewer.layers) == 0


def test_error_2d_image_for_3d_model(make_napari_viewer, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 50), np.float32), name="slice")
    widget = _dock(viewer)
    widget.add_model(_tiny_model())
    assert widget.run() is None
    assert "'slice' is a 2D image" in widget.last_error
    assert any("2D image" in str(n.message) for n in notes)
    assert [lyr.name for lyr in viewer.layers] == ["slice"]


def test_error_channel_mismatch(make_napari_viewer, notes):
    viewer = make_napari_viewer()
    # a dual-energy CT kept as one (C, Z, Y, X) layer, for a one-channel model
    viewer.add_image(np.zeros((2, 12, 20, 20), np.float32), name="dual energy")
    widget = _dock(viewer)
    widget.add_model(_tiny_model())
    assert widget.run() is None
    assert "channel mismatch" in widget.last_error and "dual energy" in widget.last_error
    assert any("channel mismatch" in str(n.message) for n in notes)
    assert len(viewer.layers) == 1
    # a two-channel model: one image picker per channel, in card order
    widget.add_model(_tiny_model(channels=2))
    assert len(widget._channel_boxes) == 2
    with pytest.raises(MedSegError, match="takes 2 image channel"):
        widget.set_images(["dual energy"])


def test_error_out_of_memory_names_the_fixes(make_napari_viewer, qtbot, notes):
    import torch

    class Greedy(torch.nn.Module):
        """Asks for a petabyte, like a far too large window would."""

        def forward(self, x):
            big = torch.empty((2 ** 20, 2 ** 20, 2 ** 10), dtype=torch.float32)
            return big[: x.shape[0], :2].reshape(x.shape[0], 2, 1, 1, 1).expand(
                -1, -1, *x.shape[2:])

    viewer = make_napari_viewer()
    _ct_layer(viewer)
    widget = _dock(viewer)
    widget.add_model(_tiny_model(network=Greedy()))
    widget.device_box.setCurrentText("cpu")
    assert widget.run() is not None
    _wait(qtbot, widget)
    msg = widget.last_error
    assert "out of memory" in msg and "smaller region" in msg and "fast mode" in msg
    assert "cpu device" in msg and msg.startswith("ct:")
    assert any("out of memory" in str(n.message) for n in notes)
    assert [lyr.name for lyr in viewer.layers] == ["ct"]
