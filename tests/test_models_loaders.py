"""Model loaders and Model.predict: formats built here from real torch modules."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.models import list_models, load_model
from napari_medseg.models.card import ModelCard
from napari_medseg.models.networks import UNet3D


class ThresholdNet(torch.nn.Module):
    """Logits (0, 20 (x - 0.5)): class 1 wherever the normalised input exceeds 0.5."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 20.0 * (x - 0.5)], dim=1)


def threshold_card(**kw) -> ModelCard:
    base = dict(name="threshold", channels=[{"name": "CT", "modality": "CT"}],
                target_spacing=None, orientation="LPS",
                normalization=[{"kind": "ct", "window": [0, 100]}], patch_size=(8, 16, 16),
                classes={1: "bright"}, format="torchscript", weights="model.ts",
                mirror_axes=(0, 1, 2))
    base.update(kw)
    return ModelCard(**base)


def box_volume(shape=(12, 30, 26), spacing=(3.0, 1.1, 0.9), oblique=False):
    data = np.full(shape, 20.0, np.float32)
    data[3:9, 5:20, 7:19] = 80.0
    direction = None
    if oblique:
        a = np.deg2rad(20)
        direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = make_affine(spacing, (10, -5, 3), direction)
    return Volume(data, aff, modality="CT", source="box.nii.gz"), data > 50


def save_torchscript_package(folder, card=None):
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(ThresholdNet()).save(str(folder / "model.ts"))
    (card or threshold_card()).save(folder / "card.yaml")
    return folder


def unet_card(**kw):
    base = dict(name="unet-demo", channels=[{"name": "CT", "modality": "CT"}],
                target_spacing=(2.0, 2.0, 2.0), orientation="LPS",
                normalization=[{"kind": "ct", "window": [-100, 100]}], patch_size=(8, 16, 16),
                classes={1: "a", 2: "b"}, format="state_dict", weights="model.pt",
                network={"class": "UNet3D",
                         "kwargs": {"in_channels": 1, "out_channels": 3, "features": [4, 8]}})
    base.update(kw)
    return ModelCard(**base)


# ------------------------------------------------------------------ formats
@pytest.mark.parametrize("oblique", [False, True])
def test_torchscript_package_exact_on_input_grid(tmp_path, oblique):
    model = load_model(save_torchscript_package(tmp_path / "pkg"))
    vol, truth = box_volume(oblique=oblique)
    pred = model.predict(vol, device="cpu")
    lab = pred.labels
    assert lab.is_label and lab.data.dtype == np.uint8
    assert lab.data.shape == vol.shape3 and np.allclose(lab.affine, vol.affine)
    assert lab.label_names == {1: "bright"}
    np.testing.assert_array_equal(lab.data, truth.astype(np.uint8))


def test_resampled_model_grid_lands_on_input_voxels(tmp_path):
    card = threshold_card(target_spacing=(2.0, 2.0, 2.0), orientation="RAS")
    model = load_model(save_torchscript_package(tmp_path / "pkg", card))
    vol, truth = box_volume()
    pred = model.predict(vol, device="cpu", uncertainty="entropy")
    got = pred.labels.data.astype(bool)
    dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    assert dice > 0.85, dice
    assert pred.uncertainty.data.dtype == np.float16
    assert pred.uncertainty.data.shape == vol.shape3


def test_scores_not_labels_are_resampled_onto_a_finer_input(tmp_path):
    """A 2 mm model on a 0.5 mm scan: the boundary falls where the scores cross,
    between the model's voxels, not on its coarser grid."""
    card = threshold_card(target_spacing=(2.0, 2.0, 2.0), orientation="LPS")
    model = load_model(save_torchscript_package(tmp_path / "pkg", card))
    shape, spacing = (16, 24, 64), (0.5, 0.5, 0.5)
    x_mm = (np.arange(shape[2]) + 0.5) * spacing[2]
    ramp = np.broadcast_to(20.0 + 70.0 * x_mm / x_mm[-1], shape).astype(np.float32)
    vol = Volume(ramp.copy(), make_affine(spacing, (0, 0, 0)), modality="CT", source="ramp")
    truth = ramp > 50.0  # the ThresholdNet's class-1 score crosses 0 at 50 HU
    # ramp 20..90 HU, linear in x: the model grid's (linear) resampling keeps it linear
    # away from the two edge voxels of each side, and so do the interpolated scores
    inner = (slice(None), slice(None), slice(8, -8))
    for unc in (None, "entropy"):
        pred = model.predict(vol, device="cpu", uncertainty=unc)
        assert pred.info["restore"] == "linear logits"
        np.testing.assert_array_equal(pred.labels.data[inner], truth[inner])
        if unc:
            ent = pred.uncertainty.data.astype(np.float32)
            edge = int(np.argmax(truth[0, 0]))  # most uncertain at the boundary
            assert ent.shape == shape and abs(int(ent[0, 0].argmax()) - edge) <= 1
    # the labels of the model grid, resampled by nearest neighbour, miss by up to 2 voxels
    tta = model.predict(vol, device="cpu", uncertainty="tta")
    assert tta.info["restore"] == "nearest labels"
    assert (tta.labels.data[inner] != truth[inner]).any()


def test_zip_package_and_bare_torchscript(tmp_path):
    folder = save_torchscript_package(tmp_path / "pkg")
    zpath = tmp_path / "pkg.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"threshold/{f.name}")
    vol, truth = box_volume()
    assert (load_model(zpath).predict(vol).labels.data.astype(bool) == truth).all()

    bare = tmp_path / "bare" / "thresh.ts"
    bare.parent.mkdir()
    (folder / "model.ts").rename(bare)
    with pytest.raises(MedSegError, match="no model card beside"):
        load_model(bare)
    threshold_card(name="bare-thresh").save(bare.with_suffix(".json"))
    model = load_model(bare)
    assert model.card.name == "bare-thresh"
    assert (model.predict(vol).labels.data.astype(bool) == truth).all()


def test_state_dict_package(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    torch.manual_seed(0)
    net = UNet3D(1, 3, (4, 8))
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               folder / "model.pt")
    unet_card().save(folder / "card.yaml")
    model = load_model(folder)
    for k, v in net.state_dict().items():
        assert torch.equal(model.network.state_dict()[k], v)
    vol, _ = box_volume()
    pred = model.predict(vol, device="cpu", region=(slice(2, 8), slice(4, 20), slice(0, 26)))
    outside = np.ones(vol.shape3, bool)
    outside[2:8, 4:20, :] = False
    assert pred.labels.data.shape == vol.shape3
    assert not pred.labels.data[outside].any()
    assert pred.labels.data[~outside].any()

    unet_card(network={"class": "UNet3D", "kwargs": {"in_channels": 1, "out_channels": 3,
                                                     "features": [4, 16]}}).save(
        folder / "card.yaml")
    with pytest.raises(MedSegError, match="do not fit the network"):
        load_model(folder)


# ---------------------------------------------------------------- safety
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    payload = {"conv.weight": torch.zeros(1), "x": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, folder / "model.pt")
    else:
        (folder / "model.pt").write_bytes(pickle.dumps(payload))
    unet_card().save(folder / "card.yaml")
    with pytest.raises(MedSegError, match="refused to load"):
        load_model(folder)
    assert not marker.exists()
    # the payload really is live: plain unpickling would have run it
    pickle.loads(pickle.dumps(_Evil(tmp_path / "control")))
    assert (tmp_path / "control").exists()


# ---------------------------------------------------------------- checks
def test_input_checks(tmp_path):
    model = load_model(save_torchscript_package(tmp_path / "pkg"))
    vol, _ = box_volume()
    with pytest.raises(MedSegError, match="2D"):
        model.predict(Volume(np.zeros((1, 20, 20), np.float32), source="slice.dcm"))
    with pytest.raises(MedSegError, match="2D"):
        model.predict(np.zeros((20, 20), np.float32))
    with pytest.raises(MedSegError, match="takes 1 channel"):
        model.predict([vol, vol])
    bad = vol.with_data(vol.data.copy())
    bad.data[2, 2, 2] = np.nan
    with pytest.raises(MedSegError, match="NaN"):
        model.predict(bad)
    with pytest.raises(MedSegError, match="region"):
        model.predict(vol, region=(slice(5, 5), slice(None), slice(None)))
    with pytest.raises(MedSegError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(MedSegError, match="not a model"):
        load_model(tmp_path)


def test_registry_user_folder(tmp_path, monkeypatch):
    user = tmp_path / "models"
    save_torchscript_package(user / "mine", threshold_card(name="my-threshold"))
    (user / "junk").mkdir()
    monkeypatch.setenv("NAPARI_MEDSEG_MODELS", str(user))
    infos = {i.name: i for i in list_models()}
    assert infos["my-threshold"].source == "user"
    assert load_model("my-threshold").card.name == "my-threshold"


def test_largest_component_postprocessing(tmp_path):
    from napari_medseg.models.predictor import postprocess_labels

    lab = np.zeros((10, 12, 12), np.uint8)
    lab[1:5, 1:5, 1:5] = 1      # big piece of class 1
    lab[7:9, 8:10, 8:10] = 1    # small stray piece of class 1
    lab[7:9, 1:3, 1:3] = 2      # class 2 pieces are left alone
    lab[1:2, 9:11, 9:11] = 2
    out = postprocess_labels(lab.copy(), {"largest_component": [1]})
    assert (out[1:5, 1:5, 1:5] == 1).all() and not out[7:9, 8:10, 8:10].any()
    assert (out == 2).sum() == (lab == 2).sum()
    # through a card: the bright box plus a one-voxel speck, speck removed
    card = threshold_card(postprocessing={"largest_component": [1]})
    model = load_model(save_torchscript_package(tmp_path / "pkg", card))
    vol, truth = box_volume()
    data = np.asarray(vol.data).copy()
    data[10, 25, 2] = 90.0
    got = model.predict(vol.with_data(data)).labels.data
    np.testing.assert_array_equal(got, truth.astype(np.uint8))
