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
    merge_prediction,
    prediction_layer_data,
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


def test_prediction_layers_take_names_and_colours_from_the_model_card():
    from types import SimpleNamespace

    from napari_medseg._napari.boundary import MODEL_KEY, PREDICTION_KEY
    from napari_medseg._widgets.segment_run import card_html
    from napari_medseg.models.card import ModelCard

    card = ModelCard(name="m", version="1.2", classes={
        1: {"name": "liver", "color": [0.8, 0.3, 0.2]}, 2: {"name": "spleen"}})
    assert card.label_names == {1: "liver", 2: "spleen"}
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[1, 1:3, 1:4] = 2
    vol = Volume(lab, make_affine((2.0, 1.0, 1.0)), is_label=True)
    [(data, kwargs, kind)] = prediction_layer_data(SimpleNamespace(labels=vol), "ct", "m",
                                                   card)
    assert kind == "labels" and kwargs["name"] == "ct m"
    assert list(kwargs["features"]["name"]) == ["background", "liver", "spleen"]
    np.testing.assert_allclose(kwargs["colormap"].color_dict[1], (0.8, 0.3, 0.2, 1.0))
    np.testing.assert_array_equal(kwargs["metadata"][PREDICTION_KEY], lab)
    assert kwargs["metadata"][MODEL_KEY]["name"] == "m"
    html = card_html(card)
    assert "<b>m</b> 1.2" in html and "liver" in html and "#cc4c33" in html


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


# ------------------------------------------------ end to end, built-in model
def _open_sample(viewer):
    from napari.layers import Image, Labels

    viewer.open_sample("napari-medseg", "abdomen-ct")
    image = next(lyr for lyr in viewer.layers if isinstance(lyr, Image))
    truth = next(lyr for lyr in viewer.layers if isinstance(lyr, Labels))
    return image, truth


def _dice(a, b):
    s = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / s if s else 1.0


@pytest.fixture
def segmented(make_napari_viewer, qtbot):
    """The sample CT segmented by the built-in model through the docked widget."""
    viewer = make_napari_viewer()
    image, truth = _open_sample(viewer)
    widget = _dock(viewer)
    widget.model_box.setCurrentText(MODEL)
    assert widget.model_box.currentText() == MODEL
    assert [lyr.name for lyr in widget.selected_layers()] == [image.name]
    widget.device_box.setCurrentText("cpu")
    widget.run()
    _wait(qtbot, widget)
    assert widget.last_error is None
    return viewer, widget, image, truth, viewer.layers[f"{image.name} {MODEL}"]


def test_segment_sample_ct_on_the_image_grid(segmented):
    from napari.layers import Labels

    from napari_medseg._napari.boundary import affine_from_layer

    viewer, widget, image, truth, result = segmented
    assert isinstance(result, Labels)
    assert sum(isinstance(lyr, Labels) for lyr in viewer.layers) == 2  # truth + ONE result
    assert result.data.shape == image.data.shape
    np.testing.assert_allclose(result.scale, image.scale)
    np.testing.assert_allclose(result.translate, image.translate)
    np.testing.assert_allclose(result.affine.affine_matrix, image.affine.affine_matrix)
    np.testing.assert_allclose(affine_from_layer(result, viewer),
                               affine_from_layer(image, viewer), atol=1e-9)
    for label, organ in ORGANS.items():
        d = _dice(np.asarray(result.data) == label, np.asarray(truth.data) == label)
        # model 2.0.0 (trained for adult-sized abdomens too) scores 0.88-0.95 on
        # this child-sized phantom; a one-voxel shift costs the spleen far more
        assert d >= 0.85, f"{organ}: Dice {d:.3f}"
    # metadata for the correction ledger, colours and names from the card
    np.testing.assert_array_equal(result.metadata["medseg_prediction"], result.data)
    card = result.metadata["medseg_model"]
    assert card["name"] == MODEL
    color = card["classes"][1]["color"]
    np.testing.assert_allclose(result.colormap.map(1)[:3], color[:3], atol=1e-2)
    # the status bar names the class under the cursor
    z, y, x = np.argwhere(np.asarray(result.data) == 1)[0]
    world = result.data_to_world((z, y, x))
    viewer.dims.set_point(0, world[0])  # show that slice
    status = result.get_status(world, world=True)
    assert "liver" in str(status)


def test_precision_choice_steers_the_run_and_the_status(segmented, qtbot):
    from napari_medseg.core.policy import bf16_supported

    viewer, widget, image, truth, result = segmented
    assert not widget.precision_row.isHidden()  # a PyTorch model: the choice is shown
    assert widget.precision_box.currentText() == "auto"
    auto = np.asarray(result.data).copy()
    auto_name = "bf16" if bf16_supported("cpu") else "fp32"
    assert widget.status.text().split("<br>")[0].endswith(f"in {auto_name}")

    widget.precision_box.setCurrentText("fp32")
    widget.run()
    _wait(qtbot, widget)
    assert widget.last_error is None
    assert widget.status.text().split("<br>")[0].endswith("in fp32")
    model = widget._loaded[MODEL]
    assert model.amp == "fp32"
    got = np.asarray(viewer.layers[result.name].data)
    assert (got == auto).mean() > 0.995  # the same segmentation, up to bf16 rounding

    # back to auto: the kept model must not stay in fp32
    widget.precision_box.setCurrentText("auto")
    widget.run()
    _wait(qtbot, widget)
    assert model.amp == "auto"
    assert widget.status.text().split("<br>")[0].endswith(f"in {auto_name}")


def test_class_panel_counts_click_and_number_keys(segmented):
    viewer, widget, image, truth, result = segmented
    panel = widget.class_panel
    assert panel.layer is result
    assert [n for n, _ in panel.classes.values()] == [
        "liver", "spleen", "kidney_left", "kidney_right", "lesion"]
    counts = np.bincount(np.asarray(result.data).ravel(), minlength=6)
    voxel_ml = float(np.prod(image.scale)) / 1000.0
    for label, (n, ml) in panel.counts().items():
        assert n == counts[label]
        assert ml == pytest.approx(counts[label] * voxel_ml, abs=0.06)
    panel.table.cellClicked.emit(1, 1)  # the spleen row
    assert result.selected_label == 2 and result.mode == "paint"
    viewer.layers.selection.active = result
    handler = viewer.window._qt_viewer._key_map_handler
    handler.press_key("3")
    assert result.selected_label == 3
    handler.press_key("1")
    assert result.selected_label == 1


def test_paint_undo_and_save_through_the_writer(segmented, tmp_path, qtbot):
    from napari_medseg.io import read_volume

    viewer, widget, image, truth, result = segmented
    before = np.array(result.data, copy=True)
    z = int(np.argwhere(before == 1)[0][0])
    result.brush_size = 5
    result.selected_label = 2
    result.paint((z, 64, 64), 2)
    assert np.any(result.data != before)
    panel = widget.class_panel
    qtbot.waitUntil(lambda: panel.counts()[2][0] == int((result.data == 2).sum()),
                    timeout=3000)
    result.undo()
    np.testing.assert_array_equal(result.data, before)
    result.paint((z, 64, 64), 2)
    out = tmp_path / "seg.nii.gz"
    saved = result.save(str(out), plugin="napari-medseg")
    assert saved
    vol = read_volume(out, lazy=False)
    np.testing.assert_array_equal(np.asarray(vol.data), np.asarray(result.data))
    from napari_medseg._napari.boundary import affine_from_layer

    np.testing.assert_allclose(vol.affine, affine_from_layer(image, viewer), atol=1e-4)


def test_rerun_on_corrected_layer_asks_and_keeps_edits(segmented, qtbot):
    viewer, widget, image, truth, result = segmented
    asked = []
    widget.on_corrected = lambda layer: asked.append(layer.name) or "cancel"
    widget.run()
    assert widget.job is not None and not asked  # not corrected yet: no question
    _wait(qtbot, widget)
    z = int(np.argwhere(np.asarray(result.data) == 1)[0][0])
    result.brush_size = 7
    result.paint((z, 64, 64), 5)
    edited = np.array(result.data, copy=True)
    touched = edited != result.metadata["medseg_prediction"]
    assert touched.any()
    job = widget.job
    assert widget.run() is None and asked == [result.name]  # asked, user said cancel
    assert widget.job is job
    widget.on_corrected = lambda layer: "untouched"
    widget.run()
    _wait(qtbot, widget)
    assert len([lyr for lyr in viewer.layers if lyr.name == result.name]) == 1
    np.testing.assert_array_equal(np.asarray(result.data)[touched], edited[touched])
    pred = result.metadata["medseg_prediction"]
    np.testing.assert_array_equal(np.asarray(result.data)[~touched], pred[~touched])
    widget.on_corrected = lambda layer: "replace"
    widget.run()
    _wait(qtbot, widget)
    np.testing.assert_array_equal(result.data, result.metadata["medseg_prediction"])
    assert np.any(np.asarray(result.data) != edited)
    result.undo()  # the re-run is one undo step
    np.testing.assert_array_equal(result.data, edited)


def _large_ct_layer(viewer):
    from napari_medseg.core.phantom import make_abdomen_ct

    img, _ = make_abdomen_ct(seed=1, shape=(96, 224, 224), spacing=(2.5, 1.5, 1.5))
    data, kwargs, _ = volume_to_layer_data(img, name="big ct")
    return viewer.add_image(data, **kwargs)


def test_cancel_stops_within_a_second_and_leaves_the_viewer(make_napari_viewer, qtbot,
                                                            notes):
    viewer = make_napari_viewer()
    _large_ct_layer(viewer)
    widget = _dock(viewer)
    widget.model_box.setCurrentText(MODEL)
    assert widget.model_box.currentText() == MODEL
    widget.device_box.setCurrentText("cpu")
    names = [lyr.name for lyr in viewer.layers]
    widget.run()
    reported = []
    widget.job._relay.progressed.connect(lambda d, t: reported.append((d, t)))
    qtbot.waitUntil(lambda: len(reported) > 0, timeout=60_000)
    assert reported[-1][0] < reported[-1][1]  # still running
    t0 = time.perf_counter()
    widget.job_bar.cancel_button.click()
    _wait(qtbot, widget, timeout=5000)
    assert time.perf_counter() - t0 < 1.0
    assert [lyr.name for lyr in viewer.layers] == names
    assert any("cancelled" in str(n.message) for n in notes)
    assert widget.run_button.isEnabled()


def test_viewer_stays_responsive_during_a_run(make_napari_viewer, qtbot):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    image, _ = _open_sample(viewer)
    widget = _dock(viewer)
    widget.model_box.setCurrentText(MODEL)
    assert widget.model_box.currentText() == MODEL
    widget.device_box.setCurrentText("cpu")
    # the card asks for test-time augmentation: ticked as the model is chosen
    assert widget.tta.isChecked() is widget.card.default_tta
    assert widget.tta.isEnabled() is bool(widget.card.mirror_axes)
    card = widget.card
    assert widget.overlap.value() == pytest.approx(card.overlap())  # the card's
    saved = card.default_overlap
    try:
        card.default_overlap = 0.3  # a card that names its overlap sets the box
        widget._on_model_changed(MODEL)
        assert widget.overlap.value() == pytest.approx(0.3)
        assert "0.3" in widget.overlap.toolTip()
    finally:
        card.default_overlap = saved
        widget._on_model_changed(MODEL)
    assert widget.overlap.value() == pytest.approx(0.5)
    widget.tta.setChecked(True)
    widget.uncertainty.setChecked(True)
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.wait(200)
    widget.run()
    _wait(qtbot, widget)
    qtbot.waitUntil(lambda: f"{image.name} {MODEL} uncertainty" in viewer.layers)
    qtbot.wait(100)
    timer.stop()
    assert f"{image.name} {MODEL}" in viewer.layers
    assert not viewer.layers[f"{image.name} {MODEL} uncertainty"].visible
    # the run: from Run until the prediction reaches the GUI thread (adding the
    # layers afterwards is napari's own work, about 0.2 s per layer)
    t_start, t_end = widget.last_run["started"], widget.last_run["returned"]
    during = [t for t in ticks if t_start <= t <= t_end]
    assert len(during) >= 10, "the run was too short to measure"
    gaps = np.diff([t_start, *during, t_end])
    assert gaps.max() < 0.020 + 0.100, f"GUI thread blocked for {gaps.max() * 1000:.0f} ms"


def test_box_region_from_shapes_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    img = _ct_layer(viewer, shape=(24, 40, 40))
    corners = [img.data_to_world(p) for p in
               [(12, 5, 8), (12, 5, 30), (12, 25, 30), (12, 25, 8)]]
    viewer.add_shapes([np.array(corners)], shape_type="rectangle", name="box")
    widget = _dock(viewer)
    widget.add_model(_tiny_model(network=_constant_net()))
    widget.device_box.setCurrentText("cpu")
    widget.region_box.setCurrentText("box from Shapes layer")
    assert widget.shapes_box.currentText() == "box"
    widget.margin.setValue(3)
    widget.run()
    _wait(qtbot, widget)
    assert widget.last_error is None
    out = np.asarray(viewer.layers["ct tiny-ct"].data)
    inside = np.zeros(out.shape, bool)
    inside[9:16, 5:26, 8:31] = True
    assert np.all(out[inside] == 1) and np.all(out[~inside] == 0)
    assert "(region)" in widget.status.text()


def _constant_net():
    """A real torch network that calls every voxel class 1 (logits 0 vs 1)."""
    import torch

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 1)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.bias.copy_(torch.tensor([0.0, 1.0]))

        def forward(self, x):
            return self.conv(x)

    return Constant()
