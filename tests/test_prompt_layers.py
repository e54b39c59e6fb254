"""Prompt layers of the Interactive widget are never taken for segmentations."""

from __future__ import annotations

import numpy as np

from napari_medseg._napari.layer_roles import is_prompt_layer, is_segmentation_layer
from napari_medseg._napari.layers import volume_to_layer_data
from napari_medseg._widgets.correct import CorrectWidget
from napari_medseg._widgets.export import ExportWidget
from napari_medseg._widgets.interactive import InteractiveWidget
from napari_medseg._widgets.qa import QAWidget
from napari_medseg.core.phantom import make_abdomen_ct


def test_correct_keeps_its_target_after_add_prompt_layers(make_napari_viewer):
    img, lab = make_abdomen_ct(seed=0, shape=(16, 48, 48), spacing=(3.0, 2.0, 2.0))
    viewer = make_napari_viewer()
    data, kwargs, _ = volume_to_layer_data(img, name="ct")
    viewer.add_image(data, **kwargs)
    ldata, lkw, _ = volume_to_layer_data(lab, name="organs")
    organs = viewer.add_labels(np.asarray(ldata), **lkw)
    correct = CorrectWidget(viewer)
    qa = QAWidget(viewer)
    export = ExportWidget(viewer)
    interactive = InteractiveWidget(viewer)
    for w, n in ((correct, "Correct"), (qa, "QA"), (export, "Export"),
                 (interactive, "Interactive")):
        viewer.window.add_dock_widget(w, name=n)
    assert correct.layer() is organs
    interactive.image_combo.setCurrentText("ct")
    interactive.add_prompt_layers()
    prompts = [lyr for lyr in viewer.layers if is_prompt_layer(lyr)]
    assert {lyr.name for lyr in prompts} >= {"scribbles", "interactive preview"}
    assert not any(is_segmentation_layer(lyr) for lyr in prompts)
    # the scribbles layer becoming active does not move Correct's target
    viewer.layers.selection.active = viewer.layers["scribbles"]
    assert correct.layer() is organs
    names = [correct.layer_combo.itemText(i) for i in range(correct.layer_combo.count())]
    assert names == ["organs"]
    qa_names = [qa.layer_combo.itemText(i) for i in range(qa.layer_combo.count())]
    assert "scribbles" not in qa_names and "organs" in qa_names
    ex_names = [export.labels_combo.itemText(i) for i in range(export.labels_combo.count())]
    assert ex_names == ["organs"]
