"""CT models run on the box around the body, not on the air around it."""

from __future__ import annotations

import numpy as np

from napari_medseg.core.body_region import body_box
from napari_medseg.core.phantom import make_abdomen_ct
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.models.card import ModelCard


def _tiny(window=(-200.0, 300.0)):
    import torch

    from napari_medseg.models.networks import UNet3D
    from napari_medseg.models.predictor import TorchModel

    torch.manual_seed(0)
    card = ModelCard(name="tiny-ct", channels=[{"name": "CT", "modality": "CT"}],
                     patch_size=(16, 32, 32), target_spacing=(5.0, 3.0, 3.0),
                     normalization=[{"kind": "ct", "window": list(window)}],
                     classes={1: {"name": "liver"}})
    return TorchModel(card, UNet3D(in_channels=1, out_channels=2, features=(4, 8)))


def test_body_box_leaves_out_air_and_the_table():
    img = np.full((20, 80, 80), -1000.0, np.float32)
    img[2:18, 20:50, 10:70] = 40.0  # the body
    img[:, 70:74, 5:75] = 200.0  # a table, a separate piece
    box = body_box(img, step=2)
    assert box is not None
    zs, ys, xs = box
    assert ys.start <= 20 and 50 <= ys.stop < 70 and xs.start <= 10 and xs.stop >= 70
    full = np.full((20, 80, 80), 40.0, np.float32)
    assert body_box(full) is None  # nothing to save


def test_ct_model_runs_on_the_body_and_labels_land_on_the_input_grid():
    img, _ = make_abdomen_ct(seed=0, shape=(32, 96, 96), spacing=(5.0, 2.0, 2.0))
    model = _tiny()
    assert model.predict(img, device="cpu", fast=True).info["body_crop"] is None  # asked only
    pred = model.predict(img, device="cpu", fast=True, crop_to_body=True)
    crop = pred.info["body_crop"]
    assert crop is not None and pred.info["region"] is None
    assert pred.labels.data.shape == img.shape3
    assert np.allclose(pred.labels.affine, img.affine)
    outside = np.ones(img.shape3, bool)
    outside[tuple(slice(a, b) for a, b in crop)] = False
    assert not np.asarray(pred.labels.data)[outside].any()
    # a user region, an MR-like card or a wide CT window runs as before
    box = (slice(0, 32), slice(10, 80), slice(10, 80))
    assert model.predict(img, device="cpu", fast=True, region=box,
                         crop_to_body=True).info["body_crop"] is None
    assert _tiny(window=(-1000.0, 400.0)).predict(img, device="cpu", fast=True,
                                                  crop_to_body=True).info["body_crop"] is None


def test_body_filling_the_image_is_not_cropped():
    vol = Volume(np.full((16, 40, 40), 30.0, np.float32), make_affine((5.0, 3.0, 3.0)))
    assert _tiny().predict(vol, device="cpu", crop_to_body=True).info["body_crop"] is None
