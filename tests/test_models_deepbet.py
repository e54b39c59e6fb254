"""deepbet-brain: the real pretrained TorchScript models from the deepbet wheel."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("deepbet")

from napari_medseg.core.phantom import make_head_mr  # noqa: E402
from napari_medseg.core.volume import Volume  # noqa: E402
from napari_medseg.models import list_models, load_model  # noqa: E402
from napari_medseg.models.deepbet import deepbet_model_dir  # noqa: E402


def _flip_x_swap_yz(vol: Volume) -> Volume:
    """The same image stored with another voxel order: reversed x, swapped y/z."""
    data = np.ascontiguousarray(np.asarray(vol.data)[:, :, ::-1].transpose(1, 0, 2))
    aff = vol.affine.copy()
    n_x = vol.shape3[2]
    aff[:3, 3] += (n_x - 1) * vol.affine[:3, 0]
    aff[:, 0] = -aff[:, 0]
    aff[:, [1, 2]] = aff[:, [2, 1]]
    aff[3] = [0, 0, 0, 1]
    return Volume(data, aff, modality=vol.modality)


@pytest.mark.slow
def test_deepbet_brain_mask_on_input_voxels():
    assert deepbet_model_dir() is not None
    info = {i.name: i for i in list_models()}["deepbet-brain"]
    assert info.source == "extra" and info.card.license == "MIT"
    model = load_model("deepbet-brain")
    img, lab = make_head_mr(seed=0)
    pred = model.predict(img, device="cpu")
    mask = pred.labels.data.astype(bool)
    assert pred.labels.data.shape == img.shape3
    assert np.allclose(pred.labels.affine, img.affine)
    assert pred.labels.label_names == {1: "brain"}
    brain = np.asarray(lab.data) > 0  # csf, gray, white matter, lesion
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.85, dice
    # another storage order of the same image gives the same mask in patient space
    other = _flip_x_swap_yz(img)
    assert other.orientation_code() != img.orientation_code()
    mask2 = model.predict(other, device="cpu").labels.data.astype(bool)
    back = mask2.transpose(1, 0, 2)[:, :, ::-1]
    assert (back == mask).mean() > 0.999
