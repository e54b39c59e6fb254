"""MONAI bundles, ONNX and nnU-Net result folders, built here from real networks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from napari_medseg.errors import MedSegError
from napari_medseg.models import load_model

from _tiny_nnunet import TINY_PLAIN_UNET
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
    # a bundle runs as a PyTorch model: its precision can be chosen, as the Segment
    # dock knows from the registry entry before the model is loaded
    from napari_medseg.models.info import ModelInfo
    from napari_medseg.models.run import precision_choosable

    assert model.precision_option and precision_choosable(model)
    assert precision_choosable(ModelInfo(model.card.name, model.card, "user", str(root)))


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
    with pytest.raises(MedSegError, match="may only build MONAI network classes"):
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


# ------------------------------------------------------------------ nnU-Net
def _nnunet_folder(tmp_path, train_steps=60):
    """A small trained nnU-Net v2 result folder: plans, dataset json, one fold checkpoint."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    arch = copy.deepcopy(TINY_PLAIN_UNET)
    resample = "resample_data_or_seg_to_shape"
    plans = {
        "dataset_name": "Dataset999_Box", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 1.1, 0.9],
        "original_median_shape_after_transp": [12, 30, 26],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 80.0, "mean": 60.0, "median": 80.0, "min": 20.0, "percentile_00_5": 20.0,
            "percentile_99_5": 80.0, "std": 25.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [8, 16, 16], "median_image_size_in_voxels": [12, 30, 26],
            "spacing": [3.0, 1.1, 0.9], "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": resample,
            "resampling_fn_seg": resample, "resampling_fn_probabilities": resample,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                          "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                         "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": arch, "batch_dice": False}},
    }
    ds = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "bright": 1},
          "numTraining": 1, "file_ending": ".nii.gz", "licence": "CC-BY-4.0"}
    folder = tmp_path / "Dataset999_Box" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(ds))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=False)
    vol, truth = box_volume()
    x = torch.from_numpy((np.asarray(vol.data) - 60.0) / 25.0)[None, None].float()
    y = torch.from_numpy(truth.astype(np.int64))[None]
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    loss = torch.zeros(())
    for _ in range(train_steps):  # fit the one case: a real, if tiny, training run
        sl = (slice(None), slice(None), slice(0, 12), slice(0, 28), slice(0, 24))
        loss = torch.nn.functional.cross_entropy(net(x[sl]), y[sl[:1] + sl[2:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = {"network_weights": net.state_dict(), "optimizer_state": None,
            "grad_scaler_state": None, "current_epoch": train_steps,
            "logging": {"train_losses": [np.float64(loss.item())]},
            "_best_ema": np.float64(0.5),
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                          "dataset_json": ds},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    return folder, vol, truth


def test_nnunet_result_folder_matches_nnunet_predictor(tmp_path):
    folder, vol, truth = _nnunet_folder(tmp_path)
    model = load_model(folder)
    card = model.card
    assert card.format == "nnunet" and card.name == "Dataset999_Box-3d_fullres"
    assert card.label_names == {1: "bright"} and card.target_spacing == (3.0, 1.1, 0.9)
    assert card.license == "CC-BY-4.0"
    pred = model.predict(vol, device="cpu", uncertainty="entropy")
    got = pred.labels.data
    assert got.shape == vol.shape3 and np.allclose(pred.labels.affine, vol.affine)
    assert pred.uncertainty.data.shape == vol.shape3

    # nnU-Net's own loader (which unpickles fully) gives the same labels
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ref = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                          perform_everything_on_device=False, allow_tqdm=False)
    ref.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
    expected = ref.predict_single_npy_array(np.asarray(vol.data, np.float32)[None],
                                            {"spacing": list(vol.spacing)})
    np.testing.assert_array_equal(got, expected)
    dice = 2 * ((got > 0) & truth).sum() / ((got > 0).sum() + truth.sum())
    assert dice > 0.8, dice


def test_nnunet_tampered_checkpoint_refused(tmp_path):
    import os

    folder, _, _ = _nnunet_folder(tmp_path, train_steps=0)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = folder / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ck, weights_only=False)
    data["logging"]["x"] = Evil()
    torch.save(data, ck)
    with pytest.raises(MedSegError, match="refused to load"):
        load_model(folder)
    assert not marker.exists()
