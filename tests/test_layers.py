"""Volume <-> napari layer geometry: the file affine survives napari's transform."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from napari_medseg._napari.boundary import affine_from_layer, exact_affine, volume_from_layer
from napari_medseg._napari.layers import (
    DISPLAY_FROM_RAS,
    affine_from_layer_attributes,
    volume_to_layer_data,
)
from napari_medseg.core.volume import Volume, affine_from_itk, make_affine

DIRECTIONS = {
    "RAS": np.eye(3),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "oblique": Rotation.from_euler("xyz", [12, -20, 33], degrees=True).as_matrix(),
    "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


def _vol(direction, shape=(5, 7, 9), label=False):
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    aff = make_affine((3.0, 0.7, 0.9), (-12.5, 40.0, 7.25), direction)
    return Volume(data=data % 4 if label else data, affine=aff, is_label=label)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_layer_attributes_round_trip(name):
    vol = _vol(DIRECTIONS[name])
    _, kwargs, kind = volume_to_layer_data(vol, name="x")
    assert kind == "image"
    np.testing.assert_allclose(exact_affine(kwargs), vol.affine, atol=1e-9)
    if name != "sagittal":  # no axis swap: napari's transform alone is exact
        np.testing.assert_allclose(affine_from_layer_attributes(kwargs), vol.affine,
                                   atol=1e-9)


def test_axis_swapping_orientation_keeps_napari_transform_invertible():
    vol = _vol(DIRECTIONS["sagittal"])
    _, kwargs, _ = volume_to_layer_data(vol)
    lin = np.asarray(kwargs["affine"])[:3, :3]
    assert np.array_equal(np.argmax(np.abs(lin), axis=0), [0, 1, 2])
    # without stored geometry, the derived affine is wrong: metadata is needed
    assert not np.allclose(affine_from_layer_attributes(kwargs), vol.affine)


def test_itk_default_orientation_has_identity_napari_affine():
    aff = affine_from_itk((0.8, 0.8, 2.5), (10.0, 20.0, 30.0), np.eye(3).ravel())
    vol = Volume(np.zeros((4, 5, 6), np.int16), aff)
    _, kwargs, _ = volume_to_layer_data(vol)
    np.testing.assert_allclose(kwargs["affine"], np.eye(4))
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.8, 0.8))
    # translate is the origin in napari's (S, P, L) world frame
    np.testing.assert_allclose(kwargs["translate"], (30.0, 20.0, 10.0))


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_viewer_world_coordinates_are_patient_space(make_napari_viewer, name):
    vol = _vol(DIRECTIONS[name])
    viewer = make_napari_viewer()
    data, kwargs, _ = volume_to_layer_data(vol, name="img")
    layer = viewer.add_image(data, **kwargs)
    for idx in [(0, 0, 0), (4, 6, 8), (2, 3, 1)]:
        ijk1 = np.array([idx[2], idx[1], idx[0], 1.0])
        ras = (vol.affine @ ijk1)[:3]
        world = np.asarray(layer.data_to_world(np.array(idx, dtype=float)))
        if name != "sagittal":
            np.testing.assert_allclose(world, DISPLAY_FROM_RAS @ ras, atol=1e-6)
    np.testing.assert_allclose(affine_from_layer(layer), vol.affine, atol=1e-9)


@pytest.mark.parametrize("name", ["LAS", "oblique", "sagittal"])
def test_new_labels_from_image_inherits_exact_geometry(make_napari_viewer, name):
    vol = _vol(DIRECTIONS[name])
    viewer = make_napari_viewer()
    data, kwargs, _ = volume_to_layer_data(vol, name="img")
    img = viewer.add_image(data, **kwargs)
    viewer.layers.selection.active = img
    viewer._new_labels()
    labels = viewer.layers[-1]
    assert labels.data.shape == vol.shape3
    back = volume_from_layer(labels, viewer=viewer)
    assert back.is_label
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-9)


def test_labels_layer_carries_names_and_colours(make_napari_viewer):
    vol = _vol(np.eye(3), label=True)
    vol.label_names = {1: "liver", 2: "spleen", 3: "kidney"}
    vol.label_colors = {1: (0.8, 0.3, 0.2), 2: (0.2, 0.5, 0.9), 3: (0.9, 0.9, 0.2)}
    viewer = make_napari_viewer()
    data, kwargs, kind = volume_to_layer_data(vol, name="seg")
    assert kind == "labels"
    layer = viewer.add_labels(data, **kwargs)
    np.testing.assert_allclose(layer.get_color(2)[:3], (0.2, 0.5, 0.9), atol=1e-6)
    names = dict(zip(layer.features["index"], layer.features["name"]))
    assert names[1] == "liver" and names[3] == "kidney"
    back = volume_from_layer(layer)
    assert back.label_names == {1: "liver", 2: "spleen", 3: "kidney"}
    np.testing.assert_array_equal(back.data, vol.data)
