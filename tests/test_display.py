"""Modality-aware display: CT window presets, percentile windows, the Display widget."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg._napari.layers import volume_to_layer_data
from napari_medseg.core.display import (PRESET_KEYS, WINDOW_PRESETS, default_contrast,
                                        percentile_limits, window_limits)
from napari_medseg.core.volume import Volume


def test_presets_are_the_radiological_windows():
    assert window_limits(*WINDOW_PRESETS["soft tissue"]) == (-160.0, 240.0)
    assert window_limits(*WINDOW_PRESETS["liver"]) == (15.0, 165.0)
    assert window_limits(*WINDOW_PRESETS["lung"]) == (-1350.0, 150.0)
    assert window_limits(*WINDOW_PRESETS["bone"]) == (-500.0, 1300.0)
    assert window_limits(*WINDOW_PRESETS["brain"]) == (0.0, 80.0)
    assert len(set(PRESET_KEYS.values())) == len(PRESET_KEYS)


def test_percentile_window_ignores_zero_background():
    rng = np.random.default_rng(0)
    img = np.zeros((20, 40, 40), np.float32)
    img[5:15, 10:30, 10:30] = rng.normal(500, 50, (10, 20, 20))
    img[10, 20, 20] = 1e6  # one hot voxel must not stretch the window
    lo, hi = percentile_limits(img)
    assert 300 < lo < 450 and 550 < hi < 700


def test_flat_image_gets_a_valid_window():
    lo, hi = percentile_limits(np.full((3, 4, 5), 7.0))
    assert hi > lo


def test_ct_layer_opens_with_soft_tissue_and_mr_with_percentiles():
    data = np.linspace(-1000, 2000, 4 * 5 * 6).reshape(4, 5, 6).astype(np.int16)
    _, kw, _ = volume_to_layer_data(Volume(data, modality="CT"))
    assert kw["contrast_limits"] == (-160.0, 240.0)
    _, kw, _ = volume_to_layer_data(Volume(data, modality="MR"))
    assert kw["contrast_limits"] == pytest.approx(default_contrast(data, "MR"))
    assert kw["contrast_limits"][0] > -1000 and kw["contrast_limits"][1] < 2000


def test_display_widget_sets_modality_and_windows(make_napari_viewer):
    from napari_medseg._napari.layer_roles import layer_modality
    from napari_medseg._napari.boundary import volume_from_layer

    viewer = make_napari_viewer()
    data = np.linspace(-1000, 2000, 8 * 9 * 10).reshape(8, 9, 10).astype(np.float32)
    layer = viewer.add_image(data, name="ct")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Display")
    assert widget.layer() is layer
    widget.modality_combo.setCurrentText("CT")
    assert layer_modality(layer) == "CT"
    assert volume_from_layer(layer).modality == "CT"
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)
    widget.buttons["lung"].click()
    assert tuple(layer.contrast_limits) == (-1350.0, 150.0)
    # the keyboard shortcut reaches the same preset
    from app_model.types import KeyBinding

    viewer.keymap[KeyBinding.from_str(PRESET_KEYS["bone"].replace("-", "+"))](viewer)
    assert tuple(layer.contrast_limits) == (-500.0, 1300.0)
    widget.modality_combo.setCurrentText("MR")
    lo, hi = layer.contrast_limits
    assert (lo, hi) == pytest.approx(percentile_limits(data))


def _ct_nifti(path):
    import nibabel as nib

    rng = np.random.default_rng(1)
    ct = np.full((40, 48, 12), -1000, np.int16)  # file order (i, j, k)
    ct[8:40, 8:40, :] = rng.normal(40, 20, (32, 32, 12)).astype(np.int16)
    ct[20:28, 20:28, :] = 700  # bone
    nib.save(nib.Nifti1Image(ct, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    return path


def test_nifti_ct_opens_as_ct_with_the_soft_tissue_window(make_napari_viewer, tmp_path):
    from napari_medseg._napari.layer_roles import layer_modality

    viewer = make_napari_viewer()
    [layer] = viewer.open(str(_ct_nifti(tmp_path / "ct.nii.gz")), plugin="napari-medseg")
    assert layer_modality(layer) == "CT"
    assert layer.metadata["medseg"]["modality_source"] == "intensities"
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)


def test_modality_travels_into_nnunet_and_monai_exports(make_napari_viewer, tmp_path):
    import json

    from napari_medseg._napari.boundary import volume_from_layer
    from napari_medseg.io.export import export_training_case

    viewer = make_napari_viewer()
    [img] = viewer.open(str(_ct_nifti(tmp_path / "ct.nii.gz")), plugin="napari-medseg")
    lab = np.zeros(img.data.shape, np.uint8)
    lab[3:6, 10:20, 10:20] = 1
    labels = viewer.add_labels(lab, scale=img.scale, translate=img.translate,
                               affine=img.affine.affine_matrix)
    ds = tmp_path / "Dataset501_Test"
    export_training_case([volume_from_layer(img)], volume_from_layer(labels, viewer=viewer),
                         ds, label_names={1: "liver"})
    info = json.loads((ds / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "CT"}  # nnU-Net's CT normalisation
    datalist = json.loads((ds / "datalist.json").read_text())
    assert datalist["modality"] == {"0": "CT"}
    # an MR chosen by the user in the Display widget becomes the channel name
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Display")
    widget.layer_combo.setCurrentText(img.name)
    widget.modality_combo.setCurrentText("MR")
    ds2 = tmp_path / "Dataset502_Test"
    export_training_case([volume_from_layer(img)], volume_from_layer(labels, viewer=viewer),
                         ds2, label_names={1: "liver"})
    assert json.loads((ds2 / "dataset.json").read_text())["channel_names"] == {"0": "MR"}


def test_planes_are_upright_in_radiological_orientation(make_napari_viewer):
    """A marker at the patient's superior-right-anterior corner shows where a radiologist
    expects it in each plane."""
    from napari_medseg.core.volume import make_affine

    viewer = make_napari_viewer()
    data = np.zeros((10, 12, 14), np.float32)  # RAS-stored: k = S, j = A, i = R
    vol = Volume(data, make_affine((2.0, 1.0, 1.0), (0, 0, 0)), modality="CT")
    d, kw, _ = volume_to_layer_data(vol, name="ct")
    layer = viewer.add_image(d, **kw)
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Display")
    corner = np.array([9, 11, 13])  # most superior, anterior and right voxel
    world = np.asarray(layer.data_to_world(corner))
    centre = np.asarray(layer.data_to_world((np.array(data.shape) - 1) / 2))
    def screen(plane):  # which screen side the corner lands on: (vertical, horizontal)
        widget.plane_combo.setCurrentText(plane)
        order = viewer.dims.order
        shown = order[-2:]
        v, h = (world - centre)[list(shown)]
        up = viewer.camera.orientation2d[0] == "up"
        return ("top" if (v > 0) == up else "bottom",
                "right" if (h > 0) == (viewer.camera.orientation2d[1] == "right") else "left")
    assert screen("axial") == ("top", "left")      # anterior up, patient right on the left
    assert screen("coronal") == ("top", "left")    # superior up, patient right on the left
    assert screen("sagittal") == ("top", "left")   # superior up, anterior on the left
    widget.plane_combo.setCurrentText("axial")
    assert tuple(viewer.dims.order) == (0, 1, 2)
