"""SAM2 and nnInteractive adapters, run end to end on checkpoints built here.

The checkpoints have random weights: they test the plumbing (loading, prompt
coordinates, 2D / 3D results on the image grid, caching), not quality.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from napari_medseg.core.phantom import make_abdomen_ct
from napari_medseg.errors import MedSegError
from napari_medseg.interactive import Prompts, make_engine

from _tiny_nnunet import TINY_PLAIN_UNET


@pytest.fixture(scope="module")
def phantom():
    img, lab = make_abdomen_ct(seed=0, shape=(24, 80, 80), spacing=(3.0, 2.0, 2.0))
    return np.asarray(img.data), img.spacing, np.asarray(lab.data)


# ------------------------------------------------------------------ nnInteractive
def _need_nninteractive():
    if importlib.util.find_spec("nnInteractive") is None:
        pytest.skip("nninteractive is not installed (pip install napari-medseg[nninteractive])")


PATCH = (64, 64, 64)  # nnInteractive's refinement keeps a 24-voxel margin: > 48 per axis


def _nninteractive_folder(root, patch=PATCH, info=None):
    """An nnInteractive model folder with random weights (plans, dataset, fold_0)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    arch = copy.deepcopy(TINY_PLAIN_UNET)
    resample = "resample_data_or_seg_to_shape"
    cfg = {"data_identifier": "nnInteractivePlans_3d", "preprocessor_name": "DefaultPreprocessor",
           "batch_size": 1, "patch_size": list(patch), "median_image_size_in_voxels": list(patch),
           "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
           "use_mask_for_norm": [False], "resampling_fn_data": resample,
           "resampling_fn_seg": resample, "resampling_fn_probabilities": resample,
           "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
           "resampling_fn_probabilities_kwargs": {}, "architecture": arch, "batch_dice": False}
    plans = {"dataset_name": "Dataset998_Tiny", "plans_name": "nnInteractivePlans",
             "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
             "original_median_shape_after_transp": list(patch),
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
             "configurations": {"3d_fullres_tiny": cfg}}
    ds = {"channel_names": {"0": "any"}, "labels": {"background": 0, "object": 1},
          "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "fold_0").mkdir(parents=True)
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(ds))
    # the layout of the published nnInteractive v1.0 folder (7 interaction channels)
    name = "inference_session_class.json" if info is None else "inference_info.json"
    (root / name).write_text(json.dumps(info or {"point_radius": 2, "interaction_decay": 0.9}))
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(
        pm, pm.get_configuration("3d_fullres_tiny"), 1 + 7, 2, enable_deep_supervision=False)
    ckpt = {"network_weights": net.state_dict(), "trainer_name": "nnInteractiveTrainer_stub",
            "init_args": {"plans": plans, "configuration": "3d_fullres_tiny", "fold": 0,
                          "dataset_json": ds},
            "current_epoch": 0, "_best_ema": np.float64(0.0), "optimizer_state": None}
    torch.save(ckpt, root / "fold_0" / "checkpoint_final.pth")
    return root


@pytest.fixture(scope="module")
def nni_engine(tmp_path_factory):
    _need_nninteractive()
    folder = _nninteractive_folder(tmp_path_factory.mktemp("nni") / "model")
    return make_engine("nnInteractive", folder, device="cpu", autozoom=False)


def _channel(session, name, positive=True):
    pos, neg = session.channel_mapping[name]
    return np.asarray(session.interactions[pos if positive else neg].float())


def test_nninteractive_points_box_3d(nni_engine, phantom):
    image, spacing, lab = phantom
    kid = np.round(np.argwhere(lab == 3).mean(0)).astype(int)
    neg = kid + [0, 0, 20]
    m = nni_engine.predict(image, spacing, Prompts(positive=[kid], negative=[neg]))
    assert m.shape == image.shape and m.dtype == bool and m.any()
    s = nni_engine.session
    pts_pos, pts_neg = _channel(s, "points"), _channel(s, "points", False)
    # the clicks land where they were given, in (z, y, x) array order
    assert tuple(np.unravel_index(pts_pos.argmax(), pts_pos.shape)) == tuple(kid)
    assert tuple(np.unravel_index(pts_neg.argmax(), pts_neg.shape)) == tuple(neg)
    # without autozoom one patch is predicted, centred on the positive click
    for ax, c in enumerate(kid):
        idx = np.nonzero(np.moveaxis(m, ax, 0).any(axis=(1, 2)))[0]
        assert idx.min() >= c - PATCH[ax] // 2 and idx.max() < c + PATCH[ax] // 2
    # a box drawn on one slice is a 2D box; prompts are replayed, not accumulated
    box = [[kid - [0, 6, 6], kid + [0, 6, 6]]]
    nni_engine.predict(image, spacing, Prompts(boxes=box))
    bb = _channel(s, "bbox2d")
    assert not _channel(s, "points").any()
    zs, ys, xs = np.nonzero(bb)
    assert set(zs) == {kid[0]} and ys.min() == kid[1] - 6 and ys.max() == kid[1] + 6
    assert xs.min() == kid[2] - 6 and xs.max() == kid[2] + 6
    with pytest.raises(MedSegError, match="one slice"):
        nni_engine.predict(image, spacing, Prompts(boxes=[[kid - 2, kid + 2]]))


def test_nninteractive_scribbles_2d_and_image_cache(nni_engine, phantom):
    image, spacing, lab = phantom
    kid = np.round(np.argwhere(lab == 3).mean(0)).astype(int)
    z = int(kid[0])
    sc = np.zeros(image.shape, np.uint8)
    sc[z, kid[1] - 2:kid[1] + 3, kid[2]] = 1
    sc[z, 5:8, 5:20] = 2
    nni_engine.ensure_image(image, spacing)
    prepared = nni_engine.session.preprocessed_image
    m = nni_engine.predict(image, spacing, Prompts(scribbles=sc, mode="2d", index=z))
    assert nni_engine.session.preprocessed_image is prepared  # normalised once per image
    assert m.shape == image.shape and not np.delete(m, z, axis=0).any()
    s = nni_engine.session
    assert np.array_equal(_channel(s, "scribble") > 0, sc == 1)
    assert np.array_equal(_channel(s, "scribble", False) > 0, sc == 2)
    mask, region = nni_engine.predict_region(image, spacing,
                                             Prompts(scribbles=sc, mode="2d", index=z))
    assert region[0] == slice(z, z + 1) and mask.shape == (1, *image.shape[1:])


def test_nninteractive_modern_capability_file(tmp_path, phantom):
    _need_nninteractive()
    info = {"inference_class": "nnInteractiveInferenceSession", "point_radius": 2,
            "supported_interactions": {"points": True, "bbox2d": True, "bbox3d": True,
                                       "scribble": True, "lasso": False},
            "interaction_channels": 6,  # besides prev_seg
            "channel_mapping": {"prev_seg": 0, "bbox2d": [1, 2], "bbox3d": [1, 2],
                                "lasso": [1, 2], "points": [3, 4], "scribble": [5, 6]}}
    folder = _nninteractive_folder(tmp_path / "model", info=info)
    eng = make_engine("nnInteractive", folder, device="cpu", autozoom=False)
    image, spacing, lab = phantom
    kid = np.round(np.argwhere(lab == 3).mean(0)).astype(int)
    m = eng.predict(image, spacing, Prompts(boxes=[[kid - [2, 6, 6], kid + [2, 6, 6]]]))
    assert m.shape == image.shape
    assert set(np.nonzero(_channel(eng.session, "bbox3d"))[0]) == set(range(kid[0] - 2,
                                                                        kid[0] + 3))


def test_nninteractive_refuses_bad_folders(tmp_path):
    _need_nninteractive()
    with pytest.raises(MedSegError, match="not found"):
        make_engine("nnInteractive", tmp_path / "missing").session
    with pytest.raises(MedSegError, match="plans.json"):
        make_engine("nnInteractive", tmp_path).session
    folder = _nninteractive_folder(tmp_path / "model")
    ck = folder / "fold_0" / "checkpoint_final.pth"
    # a pickled object beyond tensors and plain data is refused, not constructed
    torch.save({"network_weights": {}, "x": Fraction(1, 3)}, ck)
    with pytest.raises(MedSegError, match="refused"):
        make_engine("nnInteractive", folder).session
    torch.save({"network_weights": {"w": torch.zeros(1)},
                "trainer_name": "nnInteractiveTrainer_stub",
                "init_args": {"configuration": "3d_fullres_tiny"}}, ck)
    with pytest.raises(MedSegError, match="does not fit"):
        make_engine("nnInteractive", folder).session


def test_make_engine_needs_a_path():
    for name in ("nnInteractive", "SAM2"):
        with pytest.raises(MedSegError, match="choose a local"):
            make_engine(name)


# --------------------------------------------------------------------------- SAM2
def _need_sam2():
    if importlib.util.find_spec("sam2") is None:
        pytest.skip("sam2 is not installed (pip install napari-medseg[sam2])")


def _tiny_sam2(folder, size=64):
    """A SAM 2.1 checkpoint with random weights and its YAML config beside it.

    The package's hiera-t config, shrunk (8-wide trunk, 32-wide decoder, 64 px
    images); the object-score head is biased to "present" so that the random
    decoder's masks are not all suppressed.
    """
    import yaml
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    base = (importlib.util.find_spec("sam2").submodule_search_locations[0]
            + "/configs/sam2.1/sam2.1_hiera_t.yaml")
    cfg = OmegaConf.to_container(OmegaConf.load(base))
    m = cfg["model"]
    d, mem, feat = 32, 16, size // 16
    m.update(image_size=size, num_maskmem=3)
    m["image_encoder"]["trunk"].update(
        embed_dim=8, num_heads=1, stages=[1, 1, 2, 1], global_att_blocks=[3],
        window_pos_embed_bkg_spatial_size=[2, 2], window_spec=[4, 4, 2, 1])
    m["image_encoder"]["neck"].update(d_model=d, backbone_channel_list=[64, 32, 16, 8])
    m["image_encoder"]["neck"]["position_encoding"]["num_pos_feats"] = d
    ma = m["memory_attention"]
    ma.update(d_model=d, num_layers=1)
    ma["layer"].update(d_model=d, dim_feedforward=32)
    ma["layer"]["self_attention"].update(embedding_dim=d, feat_sizes=[feat, feat])
    ma["layer"]["cross_attention"].update(embedding_dim=d, feat_sizes=[feat, feat],
                                          kv_in_dim=mem)
    me = m["memory_encoder"]
    me.update(out_dim=mem, in_dim=d)
    me["position_encoding"]["num_pos_feats"] = mem
    me["mask_downsampler"]["embed_dim"] = d
    me["fuser"]["layer"]["dim"] = d
    me["fuser"]["num_layers"] = 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = instantiate(m, _recursive_=True)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    torch.save({"model": model.state_dict()}, folder / "tiny.pt")
    return folder / "tiny.pt"


@pytest.fixture(scope="module")
def sam2_ckpt(tmp_path_factory):
    _need_sam2()
    return _tiny_sam2(tmp_path_factory.mktemp("sam2"))


def test_sam2_2d_slices_and_feature_cache(sam2_ckpt, phantom):
    image, spacing, lab = phantom
    eng = make_engine("SAM2", sam2_ckpt, device="cpu")
    kid = np.argwhere(lab == 3).mean(0)
    z = int(round(kid[0]))
    p = Prompts(positive=[kid], mode="2d")
    m = eng.predict(image, spacing, p)
    assert m.shape == image.shape and m[z].any() and not np.delete(m, z, axis=0).any()
    assert list(eng._features) == [(0, z)]
    feats = eng._features[(0, z)][1]
    again = eng.predict(image, spacing, Prompts(positive=[kid], mode="2d"))
    assert np.array_equal(m, again) and eng._features[(0, z)][1] is feats  # not recomputed
    # a click elsewhere on the slice changes the result; a box is a prompt of its own
    other = eng.predict(image, spacing, Prompts(positive=[kid + [0, 20, -20]], mode="2d"))
    assert not np.array_equal(other, m)
    boxed = eng.predict(image, spacing, Prompts(boxes=[[kid - [0, 8, 8], kid + [0, 8, 8]]],
                                                mode="2d"))
    assert boxed[z].any()
    # a sagittal slice (axis 2)
    x = int(round(kid[2]))
    ms = eng.predict(image, spacing, Prompts(positive=[kid], mode="2d", axis=2, index=x))
    assert ms[:, :, x].any() and not np.delete(ms, x, axis=2).any()
    assert (2, x) in eng._features
    # scribbles become clicks; background alone is not enough
    sc = np.zeros(image.shape, np.uint8)
    sc[z, int(kid[1]) - 2:int(kid[1]) + 3, int(kid[2])] = 1
    assert eng.predict(image, spacing, Prompts(scribbles=sc, mode="2d", index=z))[z].any()
    with pytest.raises(MedSegError, match="positive"):
        eng.predict(image, spacing, Prompts(positive=[kid], negative=[kid + [1, 0, 0]],
                                            mode="2d", index=z + 1))


def test_sam2_3d_propagation(sam2_ckpt, phantom):
    image, spacing, lab = phantom
    eng = make_engine("SAM2", sam2_ckpt, device="cpu", max_slices=3)
    kid = np.argwhere(lab == 3).mean(0)
    z = int(round(kid[0]))
    m2 = eng.predict(image, spacing, Prompts(positive=[kid], mode="2d"))
    mask, region = eng.predict_region(image, spacing, Prompts(positive=[kid]))
    m3 = np.zeros(image.shape, bool)
    m3[region] = mask
    zs = np.nonzero(m3.any(axis=(1, 2)))[0]
    assert zs.min() >= z - 3 and zs.max() <= z + 3 and len(zs) > 1  # propagated, bounded
    assert np.array_equal(m3[z], m2[z])  # the prompted slice is SAM 2's own answer there
    assert {k for _, k in eng._features} <= set(range(z - 4, z + 5))  # only slices visited
    n = dict(eng._features)
    eng.predict(image, spacing, Prompts(positive=[kid], negative=[kid + [0, 3, 3]]))
    assert all(eng._features[k] is v for k, v in n.items())  # features reused


def test_sam2_checkpoint_checks(tmp_path, sam2_ckpt):
    from napari_medseg.interactive.sam2 import sam2_config

    with pytest.raises(MedSegError, match="not found"):
        make_engine("SAM2", tmp_path / "missing.pt").model
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"foo": torch.zeros(2)}}, bad)
    with pytest.raises(MedSegError, match="published"):
        make_engine("SAM2", bad).model
    torch.save({"model": {"foo": Fraction(1, 3)}}, bad)
    with pytest.raises(MedSegError, match="cannot read"):
        make_engine("SAM2", bad).model
    # a config may only build sam2 classes
    evil = tmp_path / "evil.pt"
    evil.write_bytes(sam2_ckpt.read_bytes())
    text = sam2_ckpt.with_suffix(".yaml").read_text()
    evil.with_suffix(".yaml").write_text(
        text.replace("sam2.modeling.memory_encoder.Fuser", "os.system", 1))
    with pytest.raises(MedSegError, match="only sam2"):
        make_engine("SAM2", evil).model
    # published checkpoints are recognised from their weights (SAM 2.1 hiera-t here)
    state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7),
             "no_obj_embed_spatial": torch.zeros(1, 64)}
    state.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(1)
                  for i in range(12)})
    cfg = sam2_config(tmp_path / "sam2.1_hiera_tiny.pt", state)
    assert cfg["image_encoder"]["trunk"]["stages"] == [1, 2, 7, 2]
    assert cfg["no_obj_embed_spatial"] is True
    # a checkpoint whose weights do not fit its config
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1)}},
               evil)
    evil.with_suffix(".yaml").write_text(text)
    with pytest.raises(MedSegError, match="does not fit"):
        make_engine("SAM2", evil).model


def test_widget_runs_sam2_from_a_chosen_checkpoint(make_napari_viewer, sam2_ckpt, phantom):
    from napari_medseg._widgets.interactive import InteractiveWidget

    image, spacing, lab = phantom
    viewer = make_napari_viewer()
    viewer.add_image(image, name="ct", scale=spacing)
    widget = InteractiveWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Interactive")
    widget.image_combo.setCurrentText("ct")
    widget.engine_combo.setCurrentText("SAM2")
    assert widget.engine_combo.currentText() == "SAM2"
    widget.path_edit.setText(str(sam2_ckpt))
    widget.mode_combo.setCurrentText("2D slice")
    widget.add_prompt_layers()
    kid = np.round(np.argwhere(lab == 3).mean(0))
    viewer.dims.set_point(0, kid[0] * spacing[0])
    pos = viewer.layers["positive"]
    pos.add(kid)
    widget.wait(30000)
    preview = viewer.layers["interactive preview"].data
    assert preview[int(kid[0])].any(), widget.status.text()
    assert not np.delete(preview, int(kid[0]), axis=0).any()
