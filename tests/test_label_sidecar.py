"""NIfTI label maps keep class names and colours in a JSON sidecar."""

from __future__ import annotations

import json

import numpy as np

from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.io import read_volume, write_labels
from napari_medseg.io.sidecar import read_label_sidecar, sidecar_path

NAMES = {1: "liver", 2: "spleen"}
COLORS = {1: (0.8, 0.2, 0.1, 1.0), 2: (0.1, 0.3, 0.9, 1.0)}


def _labels():
    lab = np.zeros((4, 6, 8), np.uint8)
    lab[1:3, 1:4, 1:4] = 1
    lab[1:3, 4:6, 5:8] = 2
    return Volume(lab, make_affine((2.0, 0.8, 0.8)), is_label=True, label_names=NAMES,
                  label_colors=COLORS)


def test_names_and_colours_survive_a_nifti_round_trip(tmp_path):
    path = write_labels(tmp_path / "case_seg.nii.gz", _labels())
    side = tmp_path / "case_seg.json"
    assert sidecar_path(path) == side and side.is_file()
    back = read_volume(path)
    assert back.is_label and back.label_names == NAMES
    for k, c in COLORS.items():
        np.testing.assert_allclose(back.label_colors[k], c)


def test_foreign_or_broken_sidecars_are_left_alone(tmp_path):
    side = tmp_path / "case_seg.json"
    side.write_text(json.dumps({"RepetitionTime": 2.0}))  # a BIDS sidecar
    path = write_labels(tmp_path / "case_seg.nii.gz", _labels())
    assert json.loads(side.read_text()) == {"RepetitionTime": 2.0}  # not replaced
    assert read_volume(path).label_names == {}
    side.write_text(json.dumps({"napari_medseg": "label-sidecar",
                                "labels": [{"value": "x"}]}))
    assert read_label_sidecar(path) == ({}, {})


def test_reopened_nifti_layer_has_names_and_colours(make_napari_viewer, tmp_path):
    path = write_labels(tmp_path / "case_seg.nii.gz", _labels())
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-medseg")
    assert list(layer.features["name"]) == ["background", "liver", "spleen"]
    np.testing.assert_allclose(layer.colormap.map(np.array([1]))[0], COLORS[1], atol=1e-6)
    np.testing.assert_allclose(layer.colormap.map(np.array([2]))[0], COLORS[2], atol=1e-6)
