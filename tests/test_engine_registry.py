"""Interactive engines register with a card and capabilities; the widget asks them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg._napari.layers import volume_to_layer_data
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.interactive import (
    DEFAULT_ENGINE,
    ENGINES,
    Engine,
    EngineCard,
    EngineInfo,
    engine_info,
    make_engine,
    register_engine,
)
from napari_medseg.interactive.registry import ENGINE_REGISTRY


class Recorder(Engine):
    """Marks the slice of each click and remembers the prompts it was given."""

    name = "recorder"
    bounded = False

    def __init__(self):
        super().__init__()
        self.seen = []

    def predict_region(self, image, spacing, prompts, cancel=None):
        self.seen.append(prompts)
        k = int(prompts.index)
        region = (slice(k, k + 1), slice(None), slice(None))
        mask = np.zeros((1, *image.shape[1:]), bool)
        for z, y, x in np.round(prompts.positive).astype(int):
            mask[0, y, x] = True
        return mask, region


@pytest.fixture
def recorder():
    made = []

    def factory(path, **kwargs):
        made.append(Recorder())
        return made[-1]

    info = register_engine(EngineInfo(
        "recorder", factory, EngineCard(trained_on="nothing (a test engine)",
                                        measured_on="nowhere"),
        prompts=("clicks",), modes=("2d",)))
    yield info, made
    del ENGINE_REGISTRY["recorder"]
    del ENGINES["recorder"]


def test_builtin_engines_and_names_are_kept():
    assert list(ENGINES)[:5] == ["classical", "click model", "Segment Anything", "SAM2",
                                 "nnInteractive"]
    assert ENGINES["classical"] is False and ENGINES["nnInteractive"] is True
    assert DEFAULT_ENGINE in ENGINES
    assert engine_info("nnInteractive").path == "folder"
    assert engine_info("click model").path_optional
    assert "scribbles" not in engine_info("Segment Anything").prompts
    assert "synthetic" in engine_info("classical").card.measured_on
    assert type(make_engine("classical")).__name__ == "ClassicalEngine"
    with pytest.raises(MedSegError, match="checkpoint file for SAM2"):
        make_engine("SAM2")
    with pytest.raises(MedSegError, match="unknown engine"):
        make_engine("no such engine")
    with pytest.raises(ValueError):
        register_engine(EngineInfo("bad", Recorder, EngineCard("", ""), prompts=("gaze",)))


def test_engine_capabilities_drive_the_widget(make_napari_viewer, recorder, qtbot):
    from napari_medseg._widgets.interactive import InteractiveWidget

    info, made = recorder
    assert ENGINES["recorder"] is False and make_engine("recorder") is made[-1]
    viewer = make_napari_viewer()
    vol = Volume(np.zeros((6, 20, 20), np.float32), make_affine((2.0, 1.0, 1.0)))
    data, kwargs, _ = volume_to_layer_data(vol, name="img")
    img = viewer.add_image(data, **kwargs)
    widget = InteractiveWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Interactive")
    assert widget.engine_combo.findText("recorder") >= 0
    assert widget.engine_combo.currentText() == DEFAULT_ENGINE
    assert [widget.mode_combo.itemText(i) for i in range(widget.mode_combo.count())] == \
        ["3D object", "2D slice"]
    widget.engine_combo.setCurrentText("recorder")
    # only the modes it runs in; no path to choose; its card in the tooltip
    assert [widget.mode_combo.itemText(i) for i in range(widget.mode_combo.count())] == \
        ["2D slice"]
    assert not widget.path_edit.isEnabled() and not widget.browse_button.isEnabled()
    assert "a test engine" in widget.engine_combo.toolTip()
    widget.image_combo.setCurrentText("img")
    widget.add_prompt_layers()
    viewer.dims.set_point(0, img.data_to_world((3, 0, 0))[0])
    boxes = viewer.layers["boxes"]
    boxes.add_rectangles(np.array([img.data_to_world(p) for p in
                                   [(3, 2, 2), (3, 2, 9), (3, 9, 9), (3, 9, 2)]]))
    pos = viewer.layers["positive"]
    pos.add(pos.world_to_data(img.data_to_world((3, 5, 6))))
    widget.wait()
    prompts = made[-1].seen[-1]
    assert prompts.mode == "2d" and prompts.index == 3
    assert len(prompts.positive) == 1 and len(prompts.boxes) == 0  # boxes: not used
    assert viewer.layers["interactive preview"].data[3, 5, 6]
    widget.engine_combo.setCurrentText("classical")
    assert widget.mode_combo.count() == 2 and not widget.path_edit.isEnabled()
    widget.engine_combo.setCurrentText("nnInteractive")
    assert widget.path_edit.isEnabled() and "model folder" in widget.path_edit.placeholderText()
