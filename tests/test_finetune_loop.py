"""Fine-tuning for the review loop: resume after cancel, corrected-voxel weights,
partial labels kept by the base model's predictions, a new class, forgetting check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_medseg.core.ledger import CorrectionLedger
from napari_medseg.core.phantom import make_abdomen_ct
from napari_medseg.errors import Cancelled
from napari_medseg.io.export import export_training_case
from napari_medseg.models import load_model
from napari_medseg.models.networks import UNet3D
from napari_medseg.training.data import Augment, PatchSampler, TrainingCase
from napari_medseg.training.finetune import finetune
from napari_medseg.training.guard import (add_output_classes, fill_unsupervised, largest_drop,
                                          param_groups, supervised_classes)

SHAPE, SPACING, PATCH = (24, 48, 48), (5.0, 3.0, 3.0), (16, 32, 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small U-Net package for abdominal CT (random weights: fast to train)."""
    from conftest import write_tiny_abdomen_model

    return write_tiny_abdomen_model(tmp_path_factory.mktemp("base") / "tiny-abdomen",
                                    SPACING, PATCH, body_region="abdomen")


def _dataset(folder, seeds=(1, 2, 3), keep=None, ledger=True, extra=None):
    for s in seeds:
        img, lab = make_abdomen_ct(seed=s, shape=SHAPE, spacing=SPACING, vary=True)
        y = np.asarray(lab.data).copy()
        names = dict(lab.label_names)
        if keep is not None:  # a partial reference: only these classes labelled
            y[~np.isin(y, list(keep))] = 0
            names = {k: v for k, v in names.items() if k in keep}
        if extra is not None:  # a new structure, bright, labelled with a new id
            cid, cname = extra
            z, yy, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
            ball = (z - 12) ** 2 / 9 + (yy - 10 - s) ** 2 / 16 + (x - 24) ** 2 / 16 <= 1
            data = np.asarray(img.data).copy()
            data[ball] = 250.0
            img = img.with_data(data)
            y[ball] = cid
            names[cid] = cname
        led = None
        if ledger:
            pred = np.asarray(lab.data).copy()
            pred[pred == 2] = 0  # the "model" missed the spleen; the user painted it
            led = CorrectionLedger(pred, lab.spacing, lab.label_names)
        export_training_case([img], lab.with_data(y), folder, label_names=names, ledger=led)
    return folder


def _weights(path):
    return torch.load(path / "model.pt", map_location="cpu", weights_only=True)


def test_resume_after_cancel_matches_an_uninterrupted_run(tiny, tmp_path):
    ds = _dataset(tmp_path / "Dataset501_A")
    kw = dict(iterations=12, patch_size=PATCH, val_fraction=0, seed=3, checkpoint_every=5,
              checkpoint_root=tmp_path / "ckpt", forgetting_cases=0, lr=1e-3, replay_cases=1)
    full = finetune(tiny, ds, out_dir=tmp_path / "a", name="full", **kw)
    assert not any((tmp_path / "ckpt").iterdir())  # a finished run leaves no checkpoint

    seen = []
    with pytest.raises(Cancelled):
        finetune(tiny, ds, out_dir=tmp_path / "b", name="resumed",
                 progress=lambda d, t: seen.append(d), cancel=lambda: len(seen) >= 3 + 7,
                 **kw)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    (ckpt,) = list((tmp_path / "ckpt").iterdir())
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 7 and len(state["losses"]) == 7

    resumed = finetune(tiny, ds, out_dir=tmp_path / "b", name="resumed", resume=True, **kw)
    card = load_model(resumed).card
    assert card.metrics["fine_tune"]["resumed_from"] == 7
    assert card.metrics["fine_tune"]["replay_cases"] == 1 and "replayed synthetic" in card.training
    assert "resumed from a checkpoint at iteration 7" in card.training
    full_card = load_model(full).card
    assert card.metrics["fine_tune"]["loss_first"] == full_card.metrics["fine_tune"]["loss_first"]
    a, b = _weights(full), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not any((tmp_path / "ckpt").iterdir())
    # resume=True without a checkpoint starts afresh (and says nothing went wrong)
    again = finetune(tiny, ds, out_dir=tmp_path / "c", name="fresh", resume=True, **kw)
    assert load_model(again).card.metrics["fine_tune"]["resumed_from"] == 0


def test_cli_resume_flag(tiny, tmp_path, capsys):
    from napari_medseg.cli import main

    ds = _dataset(tmp_path / "Dataset502_Cli", seeds=(4,))
    code = main(["finetune", str(tiny), str(ds), "--iterations", "2", "--patch-size",
                 *map(str, PATCH), "--val-fraction", "0", "--out", str(tmp_path / "m"),
                 "--name", "cli-resume", "--resume", "--corrected-weight", "5"])
    err = capsys.readouterr().err
    assert code == 0, err
    ft = load_model(tmp_path / "m" / "cli-resume").card.metrics["fine_tune"]
    assert ft["corrected_weight"] == 5.0 and ft["resumed_from"] == 0


def test_corrected_voxels_weighted_in_the_windows():
    x = np.zeros((1, 8, 8, 8), np.float32)
    y = np.zeros((8, 8, 8), np.uint8)
    mask = np.zeros((8, 8, 8), bool)
    mask[:4] = True
    case = TrainingCase("c", x, y, corrected_mask=mask)
    xb, yb, wb = PatchSampler([case], (8, 8, 8), mirror_axes=()).sample(2, corrected_weight=4)
    assert wb.shape == yb.shape and set(np.unique(wb)) == {1.0, 4.0}
    assert (wb[:, :4] == 4).all() and (wb[:, 4:] == 1).all()
    assert len(PatchSampler([case], (8, 8, 8)).sample(1)) == 2  # unchanged without weights


def test_augmented_windows_keep_image_labels_and_weights_together():
    # a ball whose image is its label: zoom and rotation must move all three alike
    z, y, x = np.ogrid[:24, :48, :48]
    ball = (z - 12) ** 2 / 36 + (y - 24) ** 2 / 144 + (x - 20) ** 2 / 100 <= 1
    case = TrainingCase("c", ball[None].astype(np.float32) * 100, ball.astype(np.uint8),
                        corrected_mask=ball.copy())
    spatial = Augment(p_spatial=1.0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0,
                      p_gamma=0)
    rng = np.random.default_rng(3)
    moved = 0
    for _ in range(20):
        xw, yw, cw = spatial.window(case, (4, 8, 8), (16, 32, 32), rng)
        assert xw.shape == (1, 16, 32, 32) and yw.shape == cw.shape == (16, 32, 32)
        assert set(np.unique(yw)) <= {0, 1}
        assert (cw == (yw == 1)).all()  # the corrected mask follows the labels exactly
        inside = xw[0] > 50
        assert (inside != (yw == 1)).mean() < 0.02  # the image follows them too
        moved += int(not np.array_equal(yw, ball[4:20, 8:40, 8:40]))
    assert moved >= 18  # zoom and rotation changed the windows
    # without augmentation the window is the plain crop
    plain = PatchSampler([case], (16, 32, 32), mirror_axes=(), fg_fraction=0, seed=0)
    xb, yb = plain.sample(4)
    assert set(np.unique(xb)) <= {0.0, 100.0}


def test_intensity_augmentation_changes_values_not_shapes():
    x = np.random.default_rng(0).normal(size=(2, 8, 16, 16)).astype(np.float32)
    aug = Augment(p_noise=1, p_blur=1, p_brightness=1, p_contrast=1, p_gamma=1)
    out = aug.intensity(x, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out, x)
    assert np.array_equal(x, np.random.default_rng(0).normal(size=x.shape).astype(np.float32))
    none = Augment(p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_gamma=0)
    assert np.array_equal(none.intensity(x, np.random.default_rng(1)), x)


def test_finetune_records_augmentation(tiny, tmp_path):
    ds = _dataset(tmp_path / "Dataset504_Aug", seeds=(7,))
    path = finetune(tiny, ds, out_dir=tmp_path / "m", name="aug", iterations=2,
                    patch_size=PATCH, val_fraction=0, forgetting_cases=0, augment=True)
    card = load_model(path).card
    assert card.metrics["fine_tune"]["augment"] is True
    assert "intensity augmentation" in card.training


def test_replay_share_of_the_windows():
    ones = TrainingCase("real", np.ones((1, 8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8))
    zeros = TrainingCase("replay", np.zeros((1, 8, 8, 8), np.float32),
                         np.zeros((8, 8, 8), np.uint8))
    sampler = PatchSampler([ones], (8, 8, 8), replay=[zeros], replay_fraction=0.3, seed=1)
    xb, _ = sampler.sample(2000)
    share = float((xb[:, 0, 0, 0, 0] == 0).mean())
    assert 0.26 < share < 0.34
    assert (PatchSampler([ones], (8, 8, 8), replay=[], replay_fraction=0.3).sample(50)[0]
            == 1).all()


def test_partial_labels_keep_the_base_models_other_classes(tiny, tmp_path):
    assert supervised_classes(np.array([0, 1, 5]), None) == {1, 5}
    out = fill_unsupervised(np.array([0, 0, 1, 0]), np.array([3, 2, 2, 4]), {1, 2})
    assert out.tolist() == [3, 0, 1, 4]
    # liver and spleen only, no ledger: the kidneys and lesions come from the base model
    ds = _dataset(tmp_path / "Dataset503_Partial", seeds=(5, 6), keep=(1, 2), ledger=False)
    path = finetune(tiny, ds, out_dir=tmp_path / "m", name="partial", iterations=2,
                    patch_size=PATCH, val_fraction=0, forgetting_cases=0, replay_cases=0)
    card = load_model(path).card
    ft = card.metrics["fine_tune"]
    assert ft["guard"] is True and ft["filled_voxels"] > 0
    assert "kept as the base model predicts them" in card.training
    plain = finetune(tiny, ds, out_dir=tmp_path / "m", name="plain", iterations=2,
                     patch_size=PATCH, val_fraction=0, forgetting_cases=0, guard=False)
    assert load_model(plain).card.metrics["fine_tune"]["replay_cases"] == 0  # opt-in
    assert load_model(plain).card.metrics["fine_tune"]["filled_voxels"] == 0


def test_anchor_keeps_the_weights_near_the_base(tiny, tmp_path):
    from napari_medseg.training.guard import anchor_penalty, base_weights

    net = UNet3D(1, 3, (4, 8))
    pairs = base_weights(net, net.head)
    assert len(pairs) == len(list(net.parameters())) - 2  # the new head is free
    with torch.no_grad():
        for p, _ in pairs:
            p.add_(0.5)
    n = sum(p.numel() for p, _ in pairs)
    assert float(anchor_penalty(pairs)) == pytest.approx(0.25 * n, rel=1e-5)

    ds = _dataset(tmp_path / "Dataset505_Anchor", seeds=(5, 6), ledger=False)
    base = load_model(tiny).network.state_dict()

    def drift(anchor, name):
        path = finetune(tiny, ds, out_dir=tmp_path / "m", name=name, iterations=15, lr=3e-3,
                        patch_size=PATCH, val_fraction=0, forgetting_cases=0, anchor=anchor)
        model = load_model(path)
        tuned = model.network.state_dict()
        return model.card, sum(float(((tuned[k].float() - base[k].float()) ** 2).sum())
                               for k in base if base[k].is_floating_point())

    card, held = drift(30.0, "anchored")
    _, free = drift(0.0, "free")
    assert held < 0.5 * free, (held, free)
    assert card.metrics["fine_tune"]["anchor"] == 30.0 and "L2-SP" in card.training


def test_early_layers_get_a_lower_rate():
    groups = param_groups(UNet3D(1, 3, (4, 8)), 1e-3, 0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4), 1e-3]
    assert len(param_groups(UNet3D(1, 3, (4, 8)), 1e-3, 1.0)) == 1


def test_a_grown_output_layer_trains_faster():
    from napari_medseg.training.guard import NEW_HEAD_LR_FACTOR, output_head

    net = UNet3D(1, 3, (4, 8))
    head = output_head(net, 3)
    assert head is net.head
    groups = param_groups(net, 1e-3, 0.1, head)
    assert groups[-1]["lr"] == pytest.approx(1e-3 * NEW_HEAD_LR_FACTOR)
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert sorted(ids[-1]) == sorted(id(p) for p in head.parameters())
    every = [i for g in ids for i in g]
    assert len(every) == len(set(every)) == len(list(net.parameters()))  # each tensor once


def test_new_class_grows_the_output_layer(tiny, tmp_path):
    base = load_model(tiny)
    net = UNet3D(1, 6, (4, 8, 16))
    old = {k: v.clone() for k, v in net.state_dict().items()}
    card = add_output_classes(net, base.card, {6: "cyst"})
    assert card.n_classes == 7 and card.label_names[6] == "cyst"
    assert card.network["kwargs"]["out_channels"] == 7
    assert net.head.out_channels == 7
    torch.testing.assert_close(net.head.weight[:6], old["head.weight"])
    assert float(net.head.bias[6]) == pytest.approx(float(old["head.bias"][0]) - 2.0)
    with pytest.raises(Exception, match="ids after"):
        add_output_classes(UNet3D(1, 6, (4, 8)), base.card, {9: "x"})

    ds = _dataset(tmp_path / "Dataset504_Cyst", seeds=(7, 8, 9), extra=(6, "cyst"))
    path = finetune(tiny, ds, out_dir=tmp_path / "m", name="with-cyst", iterations=30,
                    lr=3e-3, patch_size=PATCH, val_fraction=0.34, new_classes={6: "cyst"},
                    forgetting_cases=1, replay_cases=0)
    model = load_model(path)
    assert model.card.label_names[6] == "cyst"
    m = model.card.metrics
    assert m["fine_tune"]["new_classes"] == {6: "cyst"}
    assert "cyst" in m["dice"] and m["dice_before"]["cyst"] == 0.0
    assert "new classes 6=cyst" in model.card.training
    # the cyst is one part in every corrected case: its prediction keeps its largest part
    assert 6 in model.card.postprocessing["largest_component"]
    assert m["fine_tune"]["largest_component_added"] == [6]
    # forgetting measured on a held-out synthetic phantom, the new class left out
    f = m["forgetting"]
    assert set(f["dice_before"]) >= {"liver"} and "cyst" not in f["dice_before"]
    assert f["largest_drop"] == largest_drop(f["dice_before"], f["dice_after"])
    img, _ = make_abdomen_ct(seed=7, shape=SHAPE, spacing=SPACING, vary=True)
    pred = model.predict(img, overlap=0.25)
    assert int(np.asarray(pred.labels.data).max()) <= 6


def test_live_report(tiny, tmp_path):
    ds = _dataset(tmp_path / "Dataset505_Live", seeds=(1, 2))
    events = []
    finetune(tiny, ds, out_dir=tmp_path / "m", name="live", iterations=10, patch_size=PATCH,
             val_fraction=0.5, forgetting_cases=0, report=events.append)
    losses = [e for e in events if "loss" in e]
    dice = [e for e in events if "val_dice" in e]
    assert [e["step"] for e in losses] == list(range(1, 11))
    assert dice and dice[-1]["step"] == 10 and 0.0 <= dice[-1]["val_dice"] <= 1.0


def test_a_non_finite_step_never_reaches_the_weights(tiny, tmp_path, monkeypatch):
    """CPU bf16 convolution backward now and then returns NaN: such a step is
    redone in float32, and one still non-finite is skipped, never applied."""
    from napari_medseg.training.data import PatchSampler

    ds = _dataset(tmp_path / "Dataset503_N", seeds=(1, 2))
    calls = []
    sample = PatchSampler.sample

    def poisoned(self, *a, **k):  # the third window batch holds a NaN voxel
        out = sample(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            out[0][0, 0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(PatchSampler, "sample", poisoned)
    path = finetune(tiny, ds, out_dir=tmp_path / "o", name="guarded", iterations=6,
                    patch_size=PATCH, val_fraction=0, seed=1, forgetting_cases=0, lr=1e-3)
    ft = load_model(path).card.metrics["fine_tune"]
    assert ft["skipped_steps"] == 1 and np.isfinite(ft["loss_first"])
    assert all(torch.isfinite(v).all() for v in _weights(path).values()
               if v.is_floating_point())
    # the run without the bad window: every step applied
    monkeypatch.setattr(PatchSampler, "sample", sample)
    clean = finetune(tiny, ds, out_dir=tmp_path / "c", name="clean", iterations=6,
                     patch_size=PATCH, val_fraction=0, seed=1, forgetting_cases=0, lr=1e-3)
    assert load_model(clean).card.metrics["fine_tune"]["skipped_steps"] == 0


def test_dataset_new_classes(tiny, tmp_path):
    from napari_medseg.errors import MedSegError
    from napari_medseg.training.data import dataset_new_classes

    card = load_model(tiny).card
    plain = _dataset(tmp_path / "Dataset506_Plain", seeds=(1,), ledger=False)
    assert dataset_new_classes(plain, card) == {}
    cyst = _dataset(tmp_path / "Dataset507_Cyst", seeds=(1,), ledger=False, extra=(6, "cyst"))
    assert dataset_new_classes(cyst, card) == {6: "cyst"}
    meta = json.loads((cyst / "dataset.json").read_text())
    meta["labels"]["cyst"] = 8  # a gap after the model's classes
    (cyst / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedSegError, match="ids right after"):
        dataset_new_classes(cyst, card)
    with pytest.raises(MedSegError, match="dataset.json"):
        dataset_new_classes(tmp_path / "missing", card)


def test_widget_adds_the_dataset_new_classes(make_napari_viewer, qtbot, tiny, tmp_path):
    """A class the annotator labelled that the model lacks: the Fine-tune dock adds it
    (unticked, the run stops with the message that names the class)."""
    import shutil

    from napari_medseg.paths import user_models_dir

    name = load_model(tiny).card.name
    user_models_dir().mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny, user_models_dir() / name)
    ds = _dataset(tmp_path / "Dataset508_Cyst", seeds=(7, 8), ledger=False, extra=(6, "cyst"))
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Fine-tune")
    widget.refresh_models()
    widget.model_box.setCurrentText(name)
    widget.dataset_edit.setText(str(ds))
    assert "New in this dataset: 6 cyst" in widget.classes_note.text()
    widget.iterations.setValue(2)
    widget.name_edit.setText("tiny-cyst")

    widget.add_classes_check.setChecked(False)
    job = widget.run(patch_size=PATCH, val_fraction=0, forgetting_cases=0)
    qtbot.waitUntil(lambda: not job.running and widget.run_button.isEnabled(), timeout=60_000)
    qtbot.waitUntil(lambda: "cyst" in widget.status.text(), timeout=10_000)
    assert job.result is None

    widget.add_classes_check.setChecked(True)
    job = widget.run(patch_size=PATCH, val_fraction=0, forgetting_cases=0)
    assert "adding 6 cyst" in widget.status.text()
    qtbot.waitUntil(lambda: widget.last_path is not None, timeout=120_000)
    assert job.error is None, job.error
    card = load_model(widget.last_path).card
    assert card.label_names[6] == "cyst"
    # adding a class to an abdominal CT model: phantoms replayed, weights left free
    ft = card.metrics["fine_tune"]
    assert ft["replay_cases"] == 4 and ft["anchor"] == 0.0 and ft["early_lr_factor"] == 1.0


def test_guard_defaults_for_new_classes(tiny):
    """Adding a class to an abdominal CT model replays phantoms and frees the weights;
    anything else keeps the weight-space guard; explicit settings win."""
    from napari_medseg.models.card import ModelCard
    from napari_medseg.training.finetune import (ANCHOR, EARLY_LR_FACTOR, NEW_CLASS_REPLAY,
                                                 _auto_guard)

    card = load_model(tiny).card
    assert _auto_guard(card, {6: "cyst"}, None, None, "auto") == (0.0, 1.0, NEW_CLASS_REPLAY)
    assert _auto_guard(card, {}, None, None, "auto") == (ANCHOR, EARLY_LR_FACTOR, 0)
    assert _auto_guard(card, {6: "cyst"}, None, None, 0) == (ANCHOR, EARLY_LR_FACTOR, 0)
    assert _auto_guard(card, {6: "cyst"}, 0.5, 0.2, 2) == (0.5, 0.2, 2)
    mr = ModelCard.from_dict({**card.to_dict(), "channels": [{"name": "T1",
                                                               "modality": "MR"}]}, "mr")
    assert _auto_guard(mr, {6: "cyst"}, None, None, "auto") == (ANCHOR, EARLY_LR_FACTOR, 0)


def test_single_part_classes(tiny):
    """A new class drawn as one part in every case gets the largest-component
    clean-up; one drawn in several sizeable parts anywhere does not."""
    from types import SimpleNamespace

    from napari_medseg.training.finetune import _single_part_classes, _with_lcc

    def case(*boxes, cid=6, shape=(8, 16, 16)):
        y = np.zeros(shape, np.uint8)
        for z0, y0, x0, n in boxes:
            y[z0:z0 + n, y0:y0 + n, x0:x0 + n] = cid
        return SimpleNamespace(y=y)

    one = case((1, 1, 1, 4))
    touching = case((1, 1, 1, 3), (4, 4, 4, 3))  # corner to corner: 26-connected
    stray = case((1, 1, 1, 4), (6, 12, 12, 1))  # a stray voxel: under 5 % of the class
    two = case((1, 1, 1, 3), (1, 10, 10, 3))
    assert _single_part_classes([one, touching, stray], {6: "tumour"}) == [6]
    assert _single_part_classes([one, two], {6: "tumour"}) == []
    assert _single_part_classes([one], {7: "absent"}) == []  # never drawn: no evidence
    assert _single_part_classes([one], {}) == []
    card = load_model(tiny).card
    before = list(card.postprocessing.get("largest_component") or [])
    both = _with_lcc(card, drop=before[:1], add=[5])
    assert both.postprocessing["largest_component"] == before[1:] + [5]
    assert _with_lcc(card) is card
