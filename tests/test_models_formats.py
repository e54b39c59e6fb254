"""MONAI bundles, ONNX and nnU-Net result folders, built here from real networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_medseg.errors import MedSegError
from napari_medseg.models import load_model

from test_models_loaders import ThresholdNet, box_volume, threshold_card


class UpperHalfLastAxis(torch.nn.Module):
    """Class 1 in the upper half of the *last* array axis (MONAI's z is last)."""

    def forward(self, x):
        n = x.shape[-1]
        idx = torch.arange(n, dtype=x.dtype, device=x.device)
        logit = (idx - (n - 1) / 2.0).reshape(1, 1, 1, 1, n).expand_as(x)
        return torch.cat([torch.zeros_like(x), logit], dim=1)


def _bundle(tmp_path, network_def=None, weights="pt"):
    root = tmp_path / "spleen_bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    meta = {
        "version": "0.3.1", "name": "toy-spleen", "license": "Apache-2.0",
        "task": "toy spleen segmentation",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [16, 16, 8]}},
            "outputs": {"pred": {"num_channels": 2,
                                 "channel_def": {"0": "background", "1": "spleen"}}}},
    }
    cfg = {
        "num_classes": 2,
        "network_def": network_def or {
            "_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
            "out_channels": "@num_classes", "channels": [4, 8], "strides": [2],
            "num_res_units": 1},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.5, 2.5]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
             "b_min": 0.0, "b_max": 1.0, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 8],
                    "sw_batch_size": 2, "overlap": 0.5},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    return root


def test_monai_bundle_state_dict(tmp_path):
    pytest.importorskip("monai")
    from monai.networks.nets import UNet

    root = _bundle(tmp_path)
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
               num_res_units=1)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    model = load_model(root)
    card = model.card
    assert card.name == "toy-spleen" and card.version == "0.3.1"
    assert card.license == "Apache-2.0" and card.format == "monai-bundle"
    assert card.target_spacing == (2.5, 1.5, 1.0)  # MONAI pixdim is (x, y, z)
    assert card.orientation == "RAS" and card.patch_size == (8, 16, 16)
    assert card.normalization == [{"kind": "ct", "window": [-57.0, 164.0]}]
    assert card.label_names == {1: "spleen"} and card.channels[0]["modality"] == "CT"
    for k, v in net.state_dict().items():
        assert torch.equal(model.network.state_dict()[k], v)
    vol, _ = box_volume()
    pred = model.predict(vol, device="cpu")
    assert pred.labels.data.shape == vol.shape3
    assert set(np.unique(pred.labels.data)) <= {0, 1}


def test_monai_bundle_torchscript_axis_order(tmp_path):
    root = _bundle(tmp_path)
    torch.jit.script(UpperHalfLastAxis()).save(str(root / "models" / "model.ts"))
    (root / "card.yaml").write_text("name: toy-spleen\ntarget_spacing: null\n"
                                    "orientation: null\npatch_size: [12, 30, 26]\n")
    model = load_model(root)
    assert model.card.target_spacing is None and model.card.name == "toy-spleen"
    vol, _ = box_volume()  # (12, 30, 26): z is our first axis, MONAI's last
    lab = model.predict(vol, device="cpu", overlap=0.0).labels.data
    assert (lab[6:] == 1).all() and (lab[:6] == 0).all()


def test_monai_bundle_refuses_expressions(tmp_path):
    pytest.importorskip("monai")
    marker = tmp_path / "ran"
    root = _bundle(tmp_path, network_def={
        "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
        "channels": f"$__import__('os').system('touch {marker}') or [4, 8]", "strides": [2]})
    torch.save({}, root / "models" / "model.pt")
    with pytest.raises(MedSegError, match="Python expression"):
        load_model(root)
    root2 = _bundle(tmp_path / "b", network_def={"_target_": "os.system", "command": "true"})
    torch.save({}, root2 / "models" / "model.pt")
    with pytest.raises(MedSegError, match="only monai.networks"):
        load_model(root2)
    assert not marker.exists()


def test_onnx_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "thresh.onnx"
    x = torch.zeros(1, 1, 8, 16, 16)
    try:
        torch.onnx.export(ThresholdNet(), (x,), str(path), input_names=["x"],
                          output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    except Exception as exc:  # pragma: no cover - exporter unavailable
        pytest.skip(f"ONNX export unavailable: {exc}")
    assert ort.InferenceSession(str(path)).get_inputs()[0].name == "x"
    threshold_card(name="onnx-thresh", format="onnx", weights=None).save(
        path.with_suffix(".yaml"))
    model = load_model(path)
    vol, truth = box_volume()
    pred = model.predict(vol, device="cpu")
    np.testing.assert_array_equal(pred.labels.data, truth.astype(np.uint8))
