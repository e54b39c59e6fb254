"""TotalSegmentator weights folders: discovery, class map, five-part merge, roi subset.

The folders are built in TotalSegmentator's exact layout with tiny random-weight
networks (``_tiny_totalseg``). The reference for the merge follows
TotalSegmentator's own steps with nibabel and ``nnUNetPredictor``: closest
canonical orientation, ``ndimage.zoom(order=1, mode="nearest")`` to 1.5 mm cast
to int32, each part through nnU-Net (step 0.8, fp32 sums), the parts merged by
class name in part order, labels zoomed back with order 0 and the orientation
undone. Where the ``totalsegmentator`` package is installed, ``total-fast`` is
also compared with TotalSegmentator's own ``python_api.totalsegmentator``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nnunetv2")

from napari_medseg.core.volume import Volume, make_affine  # noqa: E402
from napari_medseg.errors import MedSegError  # noqa: E402
from napari_medseg.models import list_models, load_model  # noqa: E402
from napari_medseg.models.totalseg import discover, weights_dir  # noqa: E402

from _tiny_totalseg import TOTALSEG_MR_PARTS, TOTALSEG_PARTS, make_totalseg_home  # noqa: E402
from test_nnunet_native import _ct, _reference  # noqa: E402

ALL_NAMES = [n for _, _, names in TOTALSEG_PARTS.values() for n in names]
MR_NAMES = TOTALSEG_MR_PARTS[0] + TOTALSEG_MR_PARTS[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_totalseg_home(tmp_path_factory.mktemp("totalseg_home"), mr=True)


@pytest.fixture
def ts_env(home, monkeypatch):
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    return home


def _oblique_ct():
    th = np.deg2rad(12)
    rot = np.array([[-np.cos(th), 0, np.sin(th)], [0, -1, 0], [np.sin(th), 0, np.cos(th)]])
    return Volume(_ct((13, 22, 19), seed=4), make_affine((2.4, 1.9, 2.1), (-20, 15, 40), rot),
                  modality="CT")


def test_weights_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.delenv("TOTALSEG_HOME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights_dir() == tmp_path / ".totalsegmentator" / "nnunet" / "results"
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts"))
    assert weights_dir() == tmp_path / "ts" / "nnunet" / "results"
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w"
    assert discover() == []  # nothing there: nothing offered, nothing downloaded


def test_discovery_cards_and_class_names(ts_env):
    infos = {i.name: i for i in list_models() if i.source == "totalseg"}
    assert {"total", "total-fast", "total_mr-fast"} <= set(infos)
    card = infos["total"].card
    assert card.label_names == {i + 1: n for i, n in enumerate(ALL_NAMES)}
    assert card.target_spacing == (1.5, 1.5, 1.5) and card.orientation == "RAS"
    assert card.license.startswith("Apache-2.0")
    assert card.extra["dataset_ids"] == [291, 292, 293, 294, 295]
    # the same names either way (the folders carry TotalSegmentator's own class lists)
    from napari_medseg.models.totalseg import _package_maps

    source = "totalsegmentator package" if _package_maps() is not None else "dataset.json"
    assert card.extra["class_map"] == source and card.extra["step"] == 0.8
    assert "TotalSegmentator" in card.training
    fast = infos["total-fast"].card
    assert fast.label_names == card.label_names and fast.target_spacing == (3.0, 3.0, 3.0)
    mr = infos["total_mr-fast"].card
    assert mr.channels[0]["modality"] == "MR"
    assert mr.label_names == {i + 1: n for i, n in enumerate(MR_NAMES)}


def test_other_dataset_folders_are_offered(tmp_path, monkeypatch):
    from _tiny_totalseg import make_result_folder

    results = tmp_path / "nnunet" / "results"
    make_result_folder(results, "Dataset258_lung_vessels_248subj",
                       ["lung_vessels", "lung_trachea_bronchia"], spacing=(1.0, 1.0, 1.0),
                       patch=(16, 16, 16))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    (task,) = discover()
    assert task.name == "totalseg-Dataset258_lung_vessels_248subj"
    assert task.classes == {1: "lung_vessels", 2: "lung_trachea_bronchia"}
    assert "licence" in task.license  # not claimed Apache-2.0 for a task it does not know


def test_total_mr_two_parts_discovered_merged_and_run(tmp_path, monkeypatch):
    """``total_mr``: its two 1.5 mm part folders (the newer 730 + 731 preferred to
    850 + 851 when both are there) offered as one task, classes numbered in part order."""
    from _tiny_totalseg import make_result_folder

    results = tmp_path / "nnunet" / "results"
    parts = {730: ("Dataset730_TotalSegmentatorMRI_part1_organs_495subj",
                   TOTALSEG_MR_PARTS[0]),
             731: ("Dataset731_TotalSegmentatorMRI_part2_muscles_495subj",
                   TOTALSEG_MR_PARTS[1]),
             850: ("Dataset850_TotalSegMRI_part1_organs_1088subj", ["spleen", "liver"]),
             851: ("Dataset851_TotalSegMRI_part2_muscles_1088subj", ["brain"])}
    for tid, (dname, names) in parts.items():
        make_result_folder(results, dname, names, spacing=(1.5, 1.5, 1.5), patch=(16, 16, 16),
                           trainer="nnUNetTrainerNoMirroring", seed=tid, mirror_axes=None,
                           normalization="ZScoreNormalization", channel="MRI")
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    tasks = {t.name: t for t in discover()}
    mr = tasks["total_mr"]
    assert mr.dataset_ids == [730, 731] and mr.spacing == 1.5 and mr.modality == "MR"
    n0, n = len(TOTALSEG_MR_PARTS[0]), len(MR_NAMES)
    assert mr.classes == {i + 1: name for i, name in enumerate(MR_NAMES)}
    assert mr.part_maps == [{k: k for k in range(1, n0 + 1)},
                            {k: n0 + k for k in range(1, n - n0 + 1)}]
    # the older pair is not claimed by total_mr, so it is offered under its folder names
    assert {"totalseg-Dataset850_TotalSegMRI_part1_organs_1088subj",
            "totalseg-Dataset851_TotalSegMRI_part2_muscles_1088subj"} <= set(tasks)
    model = load_model("total_mr")
    for p in model.parts:
        p.amp = "off"
    assert model.parts_for(["brain"]) == [1]
    vol = Volume(_ct((13, 22, 19), seed=6) / 4.0 + 300.0,
                 make_affine((2.0, 1.4, 1.3), (0, 0, 0), np.eye(3)), modality="MR")
    labels, info = model.run(vol, device="cpu")
    assert labels.shape == vol.shape3 and info["parts_run"] == 2
    assert set(np.unique(labels).tolist()) <= set(range(n + 1))
    sub, info = model.run(vol, device="cpu", roi_subset=["brain"])
    assert info["parts_run"] == 1 and set(np.unique(sub).tolist()) <= {0, n}


def _totalseg_reference(home, vol, part_ids):
    """TotalSegmentator's steps with nibabel and nnUNetPredictor (fp32 sums).

    Returns the merged labels on the input grid and where they are clear: where
    every part's top two logits (on the 1.5 mm grid) differ by more than 1e-3,
    carried back to the input grid as the labels are.
    """
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
    from scipy import ndimage

    img = nib.Nifti1Image(np.asarray(vol.data).transpose(2, 1, 0), vol.affine)
    can = nib.as_closest_canonical(img)
    zooms = np.array(can.header.get_zooms()[:3], float)
    zoom = zooms / 1.5
    rsp = ndimage.zoom(can.get_fdata(), zoom, order=1, mode="nearest").astype(np.int32)
    x = rsp.transpose(2, 1, 0).astype(np.float32)[None]  # SimpleITK's (z, y, x)
    spacing = [float(np.float32(s)) for s in (zooms / zoom)[::-1]]
    name_to_id = {n: i + 1 for i, n in enumerate(ALL_NAMES)}
    merged = np.zeros(rsp.shape, np.uint8)
    clear = np.ones(rsp.shape, np.uint8)
    results = home / "nnunet" / "results"
    for part, (tid, dname, names) in TOTALSEG_PARTS.items():
        if tid not in part_ids:
            continue
        folder = next((results / dname).iterdir())
        logits, seg, props = _reference(folder, x, spacing, step=0.8)
        assert logits.shape[1:] == x.shape[1:]  # nothing cropped (air is not zero)
        top2 = np.sort(logits, axis=0)[-2:]
        clear &= ((top2[1] - top2[0]) > 1e-3).transpose(2, 1, 0)
        seg = seg.transpose(2, 1, 0)
        for j, n in enumerate(names, start=1):
            merged[seg == j] = name_to_id[n]
    out = []
    for a in (merged, clear):
        back = ndimage.zoom(a, np.array(can.shape) / np.array(a.shape), order=0,
                            mode="nearest")
        a = nib.Nifti1Image(back, can.affine).as_reoriented(
            ornt_transform(axcodes2ornt("RAS"), io_orientation(img.affine)))
        out.append(np.asarray(a.dataobj).transpose(2, 1, 0))
    return out[0], out[1].astype(bool)


@pytest.mark.parametrize("shape,zoom,dtype", [
    ((13, 17, 11), (0.55, 0.7, 1.3), np.int16),
    ((20, 9, 31), (1.7, 0.33, 0.5), np.float32),
    ((30, 40, 50), (0.8 / 3, 0.8 / 3, 0.5), np.int16),
    ((8, 8, 8), (1.0, 1.0, 1.0), np.float32),
    ((13, 22, 19), (1.42, 1.27, 1.62), np.float32),  # zooming back falls outside: clamped
])
@pytest.mark.parametrize("order", [1, 3])
def test_resampling_steps_equal_scipy_zoom_as_totalsegmentator_calls_it(shape, zoom, dtype,
                                                                         order):
    """The image and label zooms give the voxels of TotalSegmentator's ``change_spacing``
    (``ndimage.zoom(img.get_fdata(), zoom, order, mode="nearest")``)."""
    from scipy import ndimage

    from napari_medseg.models.totalseg import _nearest_zoom_xyz, _zoom_xyz

    rng = np.random.default_rng(sum(shape))
    a = rng.normal(0, 300, shape).astype(dtype)
    ref = ndimage.zoom(a.transpose(2, 1, 0).astype(np.float64), zoom, order=order,
                       mode="nearest").astype(np.int32).transpose(2, 1, 0)
    got = _zoom_xyz(a, zoom, order, np.int32)
    assert got.dtype == np.int32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, ref)
    lab = rng.integers(0, 118, ref.shape).astype(np.uint8)
    back = np.array(shape[::-1], float) / np.array(ref.shape[::-1], float)
    ref0 = ndimage.zoom(lab.transpose(2, 1, 0), back, order=0, mode="nearest") \
        .transpose(2, 1, 0)
    got0 = _nearest_zoom_xyz(lab, back)
    assert got0.shape == shape
    np.testing.assert_array_equal(got0, ref0)


def test_total_five_part_merge_matches_totalsegmentator_steps(ts_env):
    vol = _oblique_ct()
    model = load_model("total")
    assert [p.folder.parent.name[:10] for p in model.parts] == \
        [f"Dataset{t}" for t in (291, 292, 293, 294, 295)]
    for p in model.parts:
        p.amp = "off"
    pred = model.predict(vol, device="cpu")
    got = pred.labels.data
    assert got.shape == vol.shape3 and np.allclose(pred.labels.affine, vol.affine)
    assert pred.info["parts_run"] == 5
    ref, clear = _totalseg_reference(ts_env, vol, {291, 292, 293, 294, 295})
    # labels equal wherever every part's top two logits differ by more than 1e-3
    np.testing.assert_array_equal(got[clear], ref[clear])
    assert clear.mean() > 0.9, clear.mean()
    assert (got == ref).mean() > 0.995, (got == ref).mean()
    present = set(np.unique(got).tolist()) - {0}
    # classes from at least three different parts survive the merge
    part_of = {i + 1: k for i, k in enumerate(n for n, (_, _, names) in TOTALSEG_PARTS.items()
                                              for _ in names)}
    assert len({part_of[c] for c in present}) >= 3
    assert pred.labels.label_names[5] == "liver" and pred.labels.label_names[25] == "sacrum"


def test_roi_subset_runs_only_the_needed_parts(ts_env):
    vol = _oblique_ct()
    model = load_model("total")
    for p in model.parts:
        p.amp = "off"
    assert model.parts_for(["liver", "aorta"]) == [0, 2]
    with pytest.raises(MedSegError, match="no class"):
        model.parts_for(["not_an_organ"])
    full, _ = model.run(vol, device="cpu")
    sub, info = model.run(vol, device="cpu", roi_subset=["liver", "aorta"])
    assert info["parts_run"] == 2
    ids = {ALL_NAMES.index("liver") + 1, ALL_NAMES.index("aorta") + 1}
    assert set(np.unique(sub).tolist()) <= ids | {0}
    shared = np.isin(full, list(ids))
    np.testing.assert_array_equal(sub[shared], full[shared])
    ref, clear = _totalseg_reference(ts_env, vol, {291, 293})
    ref = ref * np.isin(ref, list(ids))
    np.testing.assert_array_equal(sub[clear], ref[clear])
    assert (sub == ref).mean() > 0.995


def test_total_fast_and_reference_backend(ts_env):
    vol = _oblique_ct()
    model = load_model("total-fast")
    model.parts[0].amp = "off"
    ours = model.predict(vol, device="cpu")
    assert ours.labels.shape3 == vol.shape3 and ours.info["parts_run"] == 1
    model.backend = "nnunetv2"
    ref = model.predict(vol, device="cpu")
    assert ref.info["backend"] == "nnunetv2"
    assert (ours.labels.data == ref.labels.data).mean() > 0.99


def test_unknown_task_names_the_folder(ts_env):
    from napari_medseg.models.totalseg import load_totalseg

    with pytest.raises(MedSegError, match="TOTALSEG_HOME_DIR"):
        load_totalseg("total_mr")


@pytest.fixture
def no_network(monkeypatch):
    """Any TCP/UDP connection attempt fails the test (local sockets stay allowed)."""
    import socket

    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded)


@pytest.mark.parametrize("task", ["total-fast", "total"])
def test_totalseg_equals_totalsegmentator_itself(task, tmp_path, monkeypatch, no_network):
    """``total-fast`` and ``total`` through our engine against TotalSegmentator's ``python_api``.

    Both read the same weights folder (random-weight 117-class 3 mm network, or
    the five 1.5 mm parts) and the same oblique, axis-flipped CT (1.5 mm for
    ``total-fast``, 2.4 x 1.9 x 2.1 mm for ``total``), fully offline.
    TotalSegmentator runs nnUNetPredictor, which sums the window logits in a
    float16 buffer; ours runs in fp32. Labels must be equal wherever, in every
    part, the fp32 top two logits differ by more than twice the float16 buffer's
    own error at that voxel (measured here with nnUNetPredictor on
    TotalSegmentator's resampled image), i.e. wherever that rounding cannot
    swap them.
    """
    pytest.importorskip("totalsegmentator")
    import inspect
    import json

    import nibabel as nib
    import totalsegmentator.nnunet as ts_nnunet
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation import \
        nnUNetTrainerNoMirroring as nomirror
    from nnunetv2.training.nnUNetTrainer.variants.training_length import \
        nnUNetTrainer_Xepochs_NoMirroring as xepochs
    from totalsegmentator.alignment import undo_canonical
    from totalsegmentator.map_to_binary import class_map
    from totalsegmentator.python_api import totalsegmentator
    from totalsegmentator.resampling import change_spacing

    import test_nnunet_native

    # the image resampling order of the installed TotalSegmentator (1 in v2.18)
    order = inspect.signature(totalsegmentator).parameters.get("resampling_order")
    if order is None:
        pytest.skip("this TotalSegmentator has no resampling_order option")
    order = order.default
    assert ALL_NAMES == [class_map["total"][k] for k in sorted(class_map["total"])]
    fast = task == "total-fast"
    home = make_totalseg_home(tmp_path / "ts_home", parts=not fast, fast=fast)
    # TotalSegmentator's own switches: no usage statistics, disclaimer already shown
    # (a licence number is only checked online when one is passed; none is)
    (home / "config.json").write_text(json.dumps({
        "totalseg_id": "totalseg_test", "send_usage_stats": False, "prediction_counter": 0,
        "statistics_disclaimer_shown": True}))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # it sets these
        monkeypatch.setenv(k, str(home / "nnunet" / "results"))
    # nnU-Net's search through every trainer module imports optional packages (timm,
    # torchvision) that may be broken; TotalSegmentator's own trainer table gives it
    # nnU-Net's classes directly
    monkeypatch.setitem(ts_nnunet.custom_trainers, "nnUNetTrainer_4000epochs_NoMirroring",
                        xepochs.nnUNetTrainer_4000epochs_NoMirroring)
    monkeypatch.setitem(ts_nnunet.custom_trainers, "nnUNetTrainerNoMirroring",
                        nomirror.nnUNetTrainerNoMirroring)

    th = np.deg2rad(12)
    rot = np.array([[-np.cos(th), 0, np.sin(th)], [0, -1, 0], [np.sin(th), 0, np.cos(th)]])
    shape, zooms = ((24, 40, 36), (1.5, 1.5, 1.5)) if fast else ((13, 22, 19), (2.4, 1.9, 2.1))
    affine = make_affine(zooms, (-20, 15, 40), rot)
    data = np.round(test_nnunet_native._ct(shape, seed=4)).astype(np.int16)
    img = nib.Nifti1Image(data.transpose(2, 1, 0), affine)

    out = totalsegmentator(img, None, task="total", fast=fast, device="cpu", quiet=True,
                           ml=True, nr_thr_resamp=1, nr_thr_saving=1)
    theirs = np.asarray(out.dataobj).transpose(2, 1, 0)

    model = load_model(task)
    for p in model.parts:
        p.amp = "off"
    model.resampling_order = order
    ours = model.predict(Volume(data, affine, modality="CT"), device="cpu").labels.data
    assert ours.shape == theirs.shape == data.shape

    # near-ties: fp32 logits and nnUNetPredictor's float16-buffer logits of each part on
    # TotalSegmentator's own resampled image, carried back as it carries labels
    can = nib.as_closest_canonical(img)
    target = 3.0 if fast else 1.5
    rsp = change_spacing(can, target, order=order, dtype=np.int32)
    x = np.asarray(rsp.dataobj).transpose(2, 1, 0).astype(np.float32)[None]
    spacing = [float(s) for s in rsp.header.get_zooms()[::-1]]
    results = home / "nnunet" / "results"
    parts = [("Dataset297_TotalSegmentator_total_3mm_1559subj", ALL_NAMES)] if fast else \
        [(dname, names) for _, dname, names in TOTALSEG_PARTS.values()]
    merged32 = np.zeros(x.shape[1:], np.uint8)
    clear = np.ones(x.shape[1:], bool)
    for dname, names in parts:
        folder = next((results / dname).iterdir())
        step = 0.5 if fast else 0.8
        with monkeypatch.context() as m:
            l32, seg32, _ = test_nnunet_native._reference(folder, x, spacing, step=step)
            m.setattr(test_nnunet_native, "_fp32_class", lambda: nnUNetPredictor)
            l16, _, _ = test_nnunet_native._reference(folder, x, spacing, step=step)
        top2 = np.sort(l32, axis=0)[-2:]
        clear &= (top2[1] - top2[0]) > 2 * np.abs(l16 - l32).max(axis=0)
        for j, n in enumerate(names, start=1):
            merged32[seg32 == j] = ALL_NAMES.index(n) + 1

    def back(a):
        a = nib.Nifti1Image(a.transpose(2, 1, 0).astype(np.uint8), rsp.affine)
        a = change_spacing(a, target, can.shape, order=0, dtype=np.uint8,
                           force_affine=can.affine)
        return np.asarray(undo_canonical(a, img).dataobj).transpose(2, 1, 0)

    clear = back(clear).astype(bool)
    np.testing.assert_array_equal(ours[clear], theirs[clear])
    assert clear.mean() > 0.98, clear.mean()
    assert (ours == theirs).mean() > 0.99, (ours == theirs).mean()
    np.testing.assert_array_equal(ours, back(merged32))  # ours is the fp32 run, voxel for voxel
    assert len(np.unique(theirs)) > 10
