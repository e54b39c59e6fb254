"""nnU-Net v2 folders in the plugin's engine agree with nnUNetPredictor (fp32 runs).

The reference is ``nnUNetPredictor`` itself: its preprocessing, its window
positions, Gaussian, mirroring and fold averaging, and its export. nnunetv2
(2.x) accumulates the blended logits in float16 on every device, which alone
moves logits by ~1e-3; for an fp32 reference the subclass below keeps that one
buffer in float32 and changes nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

from napari_medseg.core.volume import Volume, make_affine  # noqa: E402
from napari_medseg.models import load_model  # noqa: E402
from napari_medseg.models.nnunet_native import (LogitResampler, nnunet_gaussian,  # noqa: E402
                                                nnunet_window_starts)

from _tiny_totalseg import make_result_folder  # noqa: E402


def _fp32_class():
    """nnUNetPredictor with its blended-logit buffer in float32 instead of float16."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class Fp32Predictor(nnUNetPredictor):
        @torch.inference_mode()
        def _internal_predict_sliding_window_return_logits(self, data, slicers,
                                                           do_on_device=True):
            from nnunetv2.inference.sliding_window_prediction import compute_gaussian

            logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]))
            weights = torch.zeros(data.shape[1:])
            g = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                 value_scaling_factor=10, device=torch.device("cpu"))
            for sl in slicers:
                pred = self._internal_maybe_mirror_and_predict(data[sl][None])[0]
                logits[sl] += pred * g
                weights[sl[1:]] += g
            return logits / weights

    return Fp32Predictor


def _fp32_predictor(folder, tta, folds, step=0.5):
    Fp32Predictor = _fp32_class()
    p = Fp32Predictor(tile_step_size=step, use_gaussian=True, use_mirroring=tta,
                      perform_everything_on_device=False, device=torch.device("cpu"),
                      verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    # nnU-Net's own initialisation from the folder, minus its search through every
    # trainer module (some import optional packages): the plans' network, the folds' weights
    import json

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from napari_medseg.models.nnunet import load_checkpoint

    pm = PlansManager(json.loads((folder / "plans.json").read_text()))
    ds = json.loads((folder / "dataset.json").read_text())
    cm = pm.get_configuration("3d_fullres")
    ckpts = [load_checkpoint(folder / f"fold_{f}" / "checkpoint_final.pth") for f in folds]
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1,
                                 pm.get_label_manager(ds).num_segmentation_heads,
                                 allow_init=False, deep_supervision=False)
    p.manual_initialization(net, pm, cm, [c["network_weights"] for c in ckpts], ds,
                            ckpts[0]["trainer_name"], ckpts[0]["inference_allowed_mirroring_axes"])
    return p


def _reference(folder, x, spacing, tta=False, folds=(0,), step=0.5):
    """nnUNetPredictor's resampled logits (cropped, transposed frame) and its labels."""
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import \
        convert_predicted_logits_to_segmentation_with_correct_shape

    p = _fp32_predictor(folder, tta, folds, step)
    pm, cm = p.plans_manager, p.configuration_manager
    ppa = PreprocessAdapterFromNpy([x], [None], [{"spacing": list(spacing)}], [None], pm,
                                   p.dataset_json, cm, num_threads_in_multithreaded=1,
                                   verbose=False)
    dct = next(ppa)
    logits = p.predict_logits_from_preprocessed_data(dct["data"]).cpu()
    props = dct["data_properties"]
    sp_t = [props["spacing"][i] for i in pm.transpose_forward]
    shape = props["shape_after_cropping_and_before_resampling"]
    res = cm.resampling_fn_probabilities(logits, shape,
                                         cm.spacing, sp_t)
    labels = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pm, cm, p.label_manager, props)
    return np.asarray(res, np.float32), np.asarray(labels), props


def _compare(model, x, spacing, tta=False, folds=(0,)):
    ours = model.run_array(x, spacing, device="cpu", tta=tta, keep_logits=True)
    ref_logits, ref_labels, props = _reference(model.folder, x, spacing, tta, folds)
    assert ours.logits.shape == ref_logits.shape
    err = np.abs(ours.logits - ref_logits).max()
    assert err <= 1e-4 * np.abs(ref_logits).max(), (err, np.abs(ref_logits).max())
    assert ours.labels.shape == ref_labels.shape == x.shape[1:]
    # labels equal wherever the top two logits differ by more than 1e-3
    top2 = np.sort(ref_logits, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3
    t = model.plans_manager.transpose_forward
    box = tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])
    ours_t = ours.labels.transpose(t)
    ref_t = ref_labels.transpose(t)
    np.testing.assert_array_equal(ours_t[box][clear], ref_t[box][clear])
    outside = np.ones(ours_t.shape, bool)
    outside[box] = False
    assert not ours_t[outside].any() and not ref_t[outside].any()
    assert clear.mean() > 0.95  # the check covers nearly every voxel
    assert len(np.unique(ref_labels)) > 2  # a real multi-class result, not all one class
    return ours


def _ct(shape, seed=0, border=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (y ** 2 + x ** 2) < 0.8
    a = np.where(body, 40.0, -1000.0) + 900.0 * ((z * 3 + y * 2 + x) > 0.5) * body
    a += rng.normal(0, 30, shape)
    if border:
        a[:border], a[-border:] = 0, 0
        a[:, :border] = 0
    return a.astype(np.float32)


def test_window_starts_and_gaussian_follow_nnunet():
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian, compute_steps_for_sliding_window)

    for size, win in [(110, 64), (37, 16), (16, 16), (129, 48), (300, 112)]:
        assert nnunet_window_starts(size, win, 0.5) == \
            compute_steps_for_sliding_window((size,), (win,), 0.5)[0]
        assert nnunet_window_starts(size, win, 0.2) == \
            compute_steps_for_sliding_window((size,), (win,), 0.8)[0]
    for patch in [(16, 16, 16), (8, 20, 12), (28, 28)]:
        ref = compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).float()
        assert torch.equal(nnunet_gaussian(patch), ref)


@pytest.mark.parametrize("case", ["separate_z", "trilinear"])
def test_streamed_export_equals_nnunet_resampling(case):
    """Logits fed cell by cell come out as nnU-Net's resample_data_or_seg_to_shape."""
    from nnunetv2.preprocessing.resampling.default_resampling import \
        resample_data_or_seg_to_shape

    rng = np.random.default_rng(1)
    if case == "separate_z":
        in_shape, out_shape, cur, new = (20, 17, 23), (9, 31, 12), [3.0, 1, 1], [6.5, 0.55, 1.9]
        modes = ["nearest", "linear", "linear"]
    else:
        in_shape, out_shape, cur, new = (21, 17, 13), (30, 11, 20), [1, 1, 1], [0.7, 1.5, 0.65]
        modes = ["linear"] * 3
    k = 4
    logits = rng.normal(size=(k,) + in_shape).astype(np.float32)
    ref = resample_data_or_seg_to_shape(logits, out_shape, cur, new, is_seg=False, order=1,
                                        order_z=0, force_separate_z=None)
    r = LogitResampler(k, in_shape, out_shape, modes, keep_logits=True)
    for z0 in range(0, in_shape[0], 4):  # cells in z order, y and x blocks within
        for y0 in range(0, in_shape[1], 8):
            for x0 in range(0, in_shape[2], 5):
                region = (slice(z0, min(z0 + 4, in_shape[0])), slice(y0, min(y0 + 8, in_shape[1])),
                          slice(x0, min(x0 + 5, in_shape[2])))
                r(region, torch.from_numpy(logits[(slice(None),) + region]))
    labels = r.finish()
    np.testing.assert_allclose(r.logits, ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(labels, ref.argmax(0))
    assert r.peak_slices < in_shape[0] // 2  # slices are dropped once used


@pytest.mark.parametrize("case", ["ct_iso", "ct_aniso", "zscore_mask_transposed", "same_grid"])
def test_preprocessing_equals_run_case_npy(tmp_path, case):
    """The engine's preprocessing gives run_case_npy's array and properties exactly."""
    import json

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from napari_medseg.models.nnunet_native import preprocess_case

    kw = {"ct_iso": dict(spacing=(2.0, 1.5, 1.5)), "ct_aniso": dict(spacing=(2.5, 0.7, 0.7)),
          "zscore_mask_transposed": dict(spacing=(1.0, 1.2, 0.9), transpose=(2, 0, 1),
                                         normalization="ZScoreNormalization"),
          "same_grid": dict(spacing=(1.0, 1.0, 1.0))}[case]
    folder = make_result_folder(tmp_path, "Dataset506_Pre", ["a"], patch=(8, 16, 16), **kw)
    plans = json.loads((folder / "plans.json").read_text())
    if case == "zscore_mask_transposed":
        plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [True]
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    ds = json.loads((folder / "dataset.json").read_text())
    x = _ct((17, 33, 26), seed=4, border=3)[None]
    spacing = (1.0, 1.0, 1.0) if case == "same_grid" else (2.2, 0.8, 1.1)
    ref, _, ref_props = cm.preprocessor_class(verbose=False).run_case_npy(
        x.copy(), None, {"spacing": list(spacing)}, pm, cm, ds)
    got, props = preprocess_case(pm, cm, ds, x, spacing)
    assert got.dtype == ref.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    for key in ("shape_before_cropping", "bbox_used_for_cropping",
                "shape_after_cropping_and_before_resampling", "spacing"):
        assert np.array_equal(np.asarray(props[key]), np.asarray(ref_props[key])), key
    assert np.array_equal(x, _ct((17, 33, 26), seed=4, border=3)[None])  # input untouched


def test_anisotropic_odd_volume_with_zero_border_matches_predictor(tmp_path):
    """Separate-z resampling both ways, crop to non-zero, CT normalisation, 2 folds."""
    folder = make_result_folder(tmp_path, "Dataset501_Aniso", ["a", "b", "c", "d"],
                                spacing=(2.5, 1.0, 1.0), patch=(8, 16, 16), folds=(0, 1), seed=3)
    model = load_model(folder)
    model.amp = "off"
    x = _ct((13, 37, 29), seed=1, border=2)[None]
    ours = _compare(model, x, (3.0, 0.8, 0.8), folds=(0, 1))
    assert ours.info["export"] == "streamed"


def test_transposed_plans_zscore_and_mirroring_match_predictor(tmp_path):
    """transpose_forward, z-score normalisation, trilinear export, mirror TTA."""
    folder = make_result_folder(tmp_path, "Dataset502_Iso", ["a", "b", "c"],
                                spacing=(1.0, 1.0, 1.0), patch=(16, 8, 16), seed=5,
                                transpose=(2, 0, 1), normalization="ZScoreNormalization")
    model = load_model(folder)
    model.amp = "off"
    x = _ct((19, 14, 23), seed=2)[None]
    _compare(model, x, (1.3, 1.1, 0.9), tta=True)


def test_oblique_volume_through_predict_matches_reference_backend(tmp_path):
    """Model.predict on an oblique Volume: native and nnUNetPredictor backends agree."""
    folder = make_result_folder(tmp_path, "Dataset503_Oblique", ["a", "b", "c"],
                                spacing=(2.0, 1.2, 1.2), patch=(8, 16, 16), seed=7)
    th = np.deg2rad(20)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    vol = Volume(_ct((11, 27, 21), seed=3), make_affine((2.5, 1.0, 1.1), (5, -3, 8), rot),
                 modality="CT")
    model = load_model(folder)
    model.amp = "off"
    seen = []
    pred = model.predict(vol, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert pred.info["backend"] == "native" and seen and seen[-1][0] == seen[-1][1]
    # the oblique volume's array and spacing, as predict hands them over: logits within
    # 1e-4 relative of nnUNetPredictor's, labels equal away from near-ties
    ours = _compare(model, np.asarray(vol.data)[None], vol.spacing)
    np.testing.assert_array_equal(ours.labels, pred.labels.data)
    assert pred.labels.shape3 == vol.shape3 and np.allclose(pred.labels.affine, vol.affine)
    ref_logits, ref_labels, props = _reference(folder, np.asarray(vol.data)[None], vol.spacing)
    top2 = np.sort(ref_logits, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3
    box = tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])
    np.testing.assert_array_equal(pred.labels.data[box][clear], ref_labels[box][clear])
    model.backend = "nnunetv2"
    ref = model.predict(vol, device="cpu")
    assert ref.info["backend"] == "nnunetv2"
    # the stock predictor sums in float16: equal except near ties
    assert (ref.labels.data == pred.labels.data).mean() > 0.99


def test_bf16_run_keeps_export_slices_in_float16_and_agrees_with_fp32(tmp_path):
    """Mixed precision: the export holds float16 slices; labels as the fp32 run's."""
    folder = make_result_folder(tmp_path, "Dataset507_Bf16", ["a", "b", "c"],
                                spacing=(2.0, 1.2, 1.2), patch=(8, 16, 16), seed=9)
    model = load_model(folder)
    x = _ct((15, 31, 27), seed=6)[None]
    model.amp = "off"
    ref = model.run_array(x, (2.5, 1.0, 1.1), device="cpu")
    model.amp = "bf16"
    seen = []
    orig = LogitResampler.__init__

    def spy(self, *a, **kw):
        orig(self, *a, **kw)
        seen.append(self.store_dtype)

    LogitResampler.__init__ = spy
    try:
        got = model.run_array(x, (2.5, 1.0, 1.1), device="cpu")
    finally:
        LogitResampler.__init__ = orig
    assert got.info["amp"] == "bf16" and got.info["export"] == "streamed"
    assert seen == [torch.float16]
    assert (got.labels == ref.labels).mean() > 0.97
    assert len(np.unique(ref.labels)) > 2


def test_lean_unet_gives_the_networks_own_outputs(tmp_path):
    """The plain U-Net run by LeanUNet: bit-identical outputs in fp32 and, with the
    concatenations kept, in bf16; the split concatenations (bf16's default) agree to
    bf16 rounding."""
    from napari_medseg.core.inference import _cpu_fast_path
    from napari_medseg.core.policy import bf16_supported
    from napari_medseg.models.nnunet_native import LeanUNet

    folder = make_result_folder(tmp_path, "Dataset508_Lean", ["a", "b"],
                                spacing=(1.0, 1.0, 1.0), patch=(8, 16, 16), seed=13)
    model = load_model(folder)
    net = model.native_network("cpu")
    assert isinstance(net, LeanUNet) and net.network is model.network
    assert net.split_concat == "auto"
    x = torch.from_numpy(_ct((8, 16, 16), seed=7)[None, None] / 500.0)
    with torch.inference_mode():
        assert torch.equal(net(x), model.network(x))  # fp32: "auto" does not split
        if not bf16_supported("cpu"):  # the pipeline runs fp32 there (checked above)
            pytest.skip("this CPU has no native bf16: the bf16 path is not taken")
        with _cpu_fast_path(net, torch.device("cpu"), torch.bfloat16), \
                torch.autocast("cpu", torch.bfloat16):
            xc = x.contiguous(memory_format=torch.channels_last_3d)
            ref = model.network(xc)
            net.split_concat = False
            assert torch.equal(net(xc), ref)
            net.split_concat = "auto"
            got = net(xc)
    assert got.dtype == ref.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    err = (got.float() - ref.float()).abs().max()
    assert 0 < err <= 0.03 * ref.float().abs().max()  # split, so not bit-identical
    model.network.decoder.deep_supervision = True
    assert not LeanUNet.fits(model.network)  # deep supervision: the stock forward


@pytest.mark.parametrize("fused", [True, False])
def test_split_concatenation_gives_the_concatenated_convolution(tmp_path, monkeypatch, fused):
    """conv(cat(up, skip)) as two convolutions added (oneDNN's fused add, or a plain
    add): fp32 logits within 1e-4 relative of the stock network's, the same labels."""
    import napari_medseg.models.nnunet_native as nn_

    folder = make_result_folder(tmp_path, "Dataset509_Split", ["a", "b", "c"],
                                spacing=(1.0, 1.0, 1.0), patch=(8, 16, 16), seed=17,
                                features=(4, 8, 16))
    model = load_model(folder)
    net = nn_.LeanUNet(model.network, split_concat=True)
    calls = []
    orig = nn_._concat_conv
    monkeypatch.setattr(nn_, "_concat_conv", lambda *a: calls.append(1) or orig(*a))
    monkeypatch.setattr(nn_, "_FUSED_ADD", {} if fused else {torch.float32: False})
    x = torch.from_numpy(_ct((8, 16, 16), seed=9)[None, None] / 500.0)
    x = torch.cat([x, x.flip(2)])  # two windows in a batch
    with torch.inference_mode():
        ref = model.network(x)
        got = net(x)
        got2 = net(x)  # the fused op after its one-time check
    assert len(calls) == 2 * len(model.network.decoder.stages)  # every decoder stage split
    if fused and torch.backends.mkldnn.is_available():
        assert nn_._FUSED_ADD == {torch.float32: True}
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
    assert ((got2 - ref).abs().max() / ref.abs().max()).item() < 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # a wrong split (the two inputs' weights swapped) is caught by the same check
    conv = model.network.decoder.stages[-1].convs[0].conv
    with torch.no_grad():
        c = conv.weight.shape[1] // 2
        conv.weight.copy_(torch.cat([conv.weight[:, c:], conv.weight[:, :c]], 1))
    with torch.inference_mode():
        bad = nn_.LeanUNet(model.network, split_concat=False)(x)
    assert ((bad - ref).abs().max() / ref.abs().max()).item() > 1e-3


def test_no_mirroring_trainer_never_mirrors(tmp_path):
    """A ``NoMirroring`` trainer's folder runs unmirrored even with TTA asked for (and
    even if its checkpoint lists mirror axes); a plain trainer's folder mirrors."""
    x = _ct((13, 21, 18), seed=8)[None]
    spacing = (1.0, 1.0, 1.0)
    runs = {}
    for trainer in ("nnUNetTrainerNoMirroring", "nnUNetTrainer"):
        folder = make_result_folder(tmp_path / trainer, "Dataset510_Mirror", ["a", "b", "c"],
                                    spacing=spacing, patch=(8, 16, 16), seed=19,
                                    trainer=trainer, mirror_axes=(0, 1, 2))
        model = load_model(folder)
        model.amp = "off"
        runs[trainer] = (model, [model.run_array(x, spacing, device="cpu", tta=tta,
                                                 keep_logits=True) for tta in (False, True)])
    model, (plain, tta) = runs["nnUNetTrainerNoMirroring"]
    assert model.mirror_axes_nn is None
    np.testing.assert_array_equal(tta.logits, plain.logits)
    model, (plain, tta) = runs["nnUNetTrainer"]
    assert model.mirror_axes_nn == (0, 1, 2)
    assert np.abs(tta.logits - plain.logits).max() > 1e-3  # mirroring changes the logits


def test_cancel_stops_native_run(tmp_path):
    from napari_medseg.errors import Cancelled

    folder = make_result_folder(tmp_path, "Dataset504_Cancel", ["a"], spacing=(1.0, 1.0, 1.0),
                                patch=(8, 8, 8))
    model = load_model(folder)
    calls = []
    with pytest.raises(Cancelled):
        model.predict(Volume(_ct((20, 20, 20))), device="cpu",
                      cancel=lambda: calls.append(1) or len(calls) > 2)


def test_118_class_run_holds_a_few_slices_of_logits(tmp_path):
    """A TotalSegmentator-shaped output (118 logits): the export keeps a few slices."""
    names = [f"c{i}" for i in range(1, 118)]
    folder = make_result_folder(tmp_path, "Dataset505_Many", names, spacing=(1.5, 1.5, 1.5),
                                patch=(8, 16, 16), seed=11)
    model = load_model(folder)
    model.amp = "off"
    x = _ct((40, 18, 17), seed=5)[None]
    spacing = (1.2, 1.6, 1.7)
    res = model.run_array(x, spacing, device="cpu")
    assert res.info["export"] == "streamed"
    z_net = res.info["network_shape"][0]
    # one band of cells being finished (half a window) plus the band before it that linear
    # interpolation still needs: about one window's depth (8) + 1, of 32 slices
    assert res.info["export_peak_slices"] <= 9 and z_net == 32
    _, ref_labels, props = _reference(folder, x, spacing)
    assert (res.labels == ref_labels).mean() > 0.99
    assert len(np.unique(res.labels)) > 10


def test_2d_configuration_matches_predictor(tmp_path):
    """A 2d configuration: slice by slice, 2D Gaussian and windows, export per slice."""
    import copy
    import json

    from _tiny_totalseg import plans_dict

    plans = plans_dict("Dataset506_Flat", (1.0, 1.0, 1.0), (16, 16, 16))
    cfg = plans["configurations"].pop("3d_fullres")
    arch = copy.deepcopy(cfg["architecture"])
    kw = arch["arch_kwargs"]
    kw.update(conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3]] * 3,
              strides=[[1, 1], [2, 2], [2, 2]],
              norm_op="torch.nn.modules.instancenorm.InstanceNorm2d")
    cfg.update(data_identifier="nnUNetPlans_2d", patch_size=[16, 16], spacing=[0.9, 0.9],
               architecture=arch, median_image_size_in_voxels=[40, 40])
    plans["configurations"]["2d"] = cfg
    ds = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
          "numTraining": 3, "file_ending": ".nii.gz"}
    folder = tmp_path / "Dataset506_Flat" / "nnUNetTrainer__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(ds))
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration("2d")
    torch.manual_seed(21)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 4,
                                 deep_supervision=False)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1),
                "init_args": {"configuration": "2d"}},
               folder / "fold_0" / "checkpoint_final.pth")
    model = load_model(folder)
    model.amp = "off"
    x = _ct((5, 23, 19), seed=6)[None]
    spacing = (2.0, 0.7, 0.8)
    ours = model.run_array(x, spacing, device="cpu", keep_logits=True)
    ref_logits, ref_labels, _ = _reference_2d(folder, x, spacing)
    err = np.abs(ours.logits - ref_logits).max()
    assert err <= 1e-4 * np.abs(ref_logits).max()
    top2 = np.sort(ref_logits, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3
    np.testing.assert_array_equal(ours.labels[clear], ref_labels[clear])


def _reference_2d(folder, x, spacing):
    import json

    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import \
        convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(json.loads((folder / "plans.json").read_text()))
    ds = json.loads((folder / "dataset.json").read_text())
    cm = pm.get_configuration("2d")
    from napari_medseg.models.nnunet import load_checkpoint

    ck = load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 4,
                                 allow_init=False, deep_supervision=False)
    p = _fp32_class()(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                      perform_everything_on_device=False, device=torch.device("cpu"),
                      verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    p.manual_initialization(net, pm, cm, [ck["network_weights"]], ds, "nnUNetTrainer", (0, 1))
    ppa = PreprocessAdapterFromNpy([x], [None], [{"spacing": list(spacing)}], [None], pm, ds, cm,
                                   num_threads_in_multithreaded=1, verbose=False)
    dct = next(ppa)
    logits = p.predict_logits_from_preprocessed_data(dct["data"]).cpu()
    props = dct["data_properties"]
    sp_t = [props["spacing"][i] for i in pm.transpose_forward]
    shape = props["shape_after_cropping_and_before_resampling"]
    res = cm.resampling_fn_probabilities(logits, shape,
                                         [sp_t[0], *cm.spacing], sp_t)
    labels = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pm, cm, p.label_manager, props)
    return np.asarray(res, np.float32), np.asarray(labels), props
