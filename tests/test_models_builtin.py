"""The shipped abdomen-ct-small model on phantoms it was not trained on, and on a real CT."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.phantom import ABDOMEN_LABELS, make_abdomen_ct
from napari_medseg.models import list_models, load_model
from napari_medseg.models.registry import BUILTIN_DIR
from napari_medseg.training.train_builtin import HELD_OUT_SEEDS, dice_per_class

from _realdata import REAL as REALDATA

ORGANS = ("liver", "kidney_left", "kidney_right")
# The spleen is the hardest class of the phantom (small, close in HU to the liver,
# varied contrast and noise): held-out Dice 0.91 on the card's 8 cases, about 0.89
# on the three below.
SPLEEN_MIN = 0.85


@pytest.fixture(scope="module")
def model():
    return load_model("abdomen-ct-small")


def test_builtin_package_is_small_and_listed():
    folder = BUILTIN_DIR / "abdomen-ct-small"
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 2 * 1024 * 1024
    info = {i.name: i for i in list_models()}["abdomen-ct-small"]
    assert info.source == "builtin"
    assert info.card.label_names == ABDOMEN_LABELS
    synthetic = info.card.synthetic_metrics  # phantom scores (metrics.synthetic or legacy)
    dice = synthetic["dice"]
    assert all(dice[o] >= 0.9 for o in ORGANS) and dice["spleen"] >= SPLEEN_MIN, dice
    assert synthetic["held_out"]["cases"] >= 8


@pytest.mark.slow
def test_builtin_dice_on_unseen_phantoms(model):
    seeds = (424242, 5151, 777001)  # neither training seeds (1..64) nor the card's
    assert not set(seeds) & set(HELD_OUT_SEEDS)
    rows = []
    for seed in seeds:
        img, lab = make_abdomen_ct(seed=seed, vary=True)
        pred = model.predict(img, device="cpu")
        assert pred.labels.data.shape == img.shape3
        assert np.allclose(pred.labels.affine, img.affine)
        rows.append(dice_per_class(pred.labels.data, np.asarray(lab.data), ABDOMEN_LABELS))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ORGANS + ("spleen",)}
    assert all(mean[o] >= 0.9 for o in ORGANS) and mean["spleen"] >= SPLEEN_MIN, mean


@pytest.mark.slow
def test_builtin_on_resampled_and_cropped_input(model):
    """A finer, differently sized scan and a region: labels still land on its voxels."""
    img, lab = make_abdomen_ct(seed=777, shape=(80, 150, 140), spacing=(2.0, 1.3, 1.4))
    box = (slice(10, 70), slice(20, 130), slice(10, 130))
    pred = model.predict(img, device="cpu", region=box, fast=True)
    got = pred.labels.data
    outside = np.ones(img.shape3, bool)
    outside[box] = False
    assert not got[outside].any()
    ref = np.asarray(lab.data)
    dice = dice_per_class(got[box], ref[box], ABDOMEN_LABELS)
    assert dice["liver"] >= 0.9 and dice["kidney_left"] >= 0.85, dice
    assert dice["kidney_right"] >= 0.85 and dice["spleen"] >= 0.7, dice


def test_training_cases_vary_in_size_and_thin_slabs_pad_with_zeros():
    import torch

    from napari_medseg.training.train_builtin import (CASE_SHAPE, CASE_SHAPE_MAX, _thin_slab,
                                                      case_shape)

    shapes = {case_shape(i) for i in range(16)}
    assert len(shapes) > 8
    assert all(lo <= n <= hi and n % 8 == 0
               for s in shapes for n, lo, hi in zip(s, CASE_SHAPE, CASE_SHAPE_MAX))
    x, y = torch.ones(1, 32, 4, 4), torch.ones(32, 4, 4, dtype=torch.long)
    _thin_slab(x, y, 16)
    assert x[0, :8].eq(0).all() and x[0, 8:24].eq(1).all() and x[0, 24:].eq(0).all()
    assert y[:8].eq(0).all() and y[8:24].eq(1).all()


def test_training_cases_do_not_depend_on_workers_and_a_time_limit_ends_each_phase(tmp_path,
                                                                                   caplog):
    import logging

    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.models import load_model
    from napari_medseg.training.train_builtin import (PATCH, TARGET_SPACING, _cached_cases,
                                                      make_card, train)

    probe, _ = make_abdomen_ct(seed=0, shape=PATCH, spacing=TARGET_SPACING)
    card = make_card(dict(ABDOMEN_LABELS), probe.orientation_code())
    one = _cached_cases(3, card, None, workers=1)
    two = _cached_cases(3, card, tmp_path / "cases.npz", workers=2)
    for (x1, y1), (x2, y2) in zip(one, two):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    out = tmp_path / "pkg"
    with caplog.at_level(logging.WARNING, logger="napari_medseg.training.train_builtin"):
        train(out, n_cases=3, iters=100_000, finetune_iters=100_000, focus_iters=100_000,
              batch=2, cache=tmp_path / "cases.npz", time_limit=0.05)
    stopped = [r.getMessage() for r in caplog.records if "time limit" in r.getMessage()]
    assert [m.split()[:2] for m in stopped] == [["phase", "1"], ["phase", "2"], ["phase", "3"]]
    model = load_model(out)  # the early-stopped run is still a loadable package
    assert model.card.version and (out / "model.pt").is_file()


def test_window_augmentations_keep_the_window_and_move_image_and_labels_together():
    import torch

    from napari_medseg.training.train_builtin import WINDOW, _appearance, _deform

    torch.manual_seed(3)
    y = torch.zeros(2, 32, 64, 64, dtype=torch.long)
    y[:, 8:24, 16:48, 16:40] = 2
    y[:, 8:24, 16:48, 40:48] = 1
    hu = torch.full(y.shape, 40.0)
    hu[y == 1], hu[y == 2] = 100.0, 150.0
    hu[:, :, :8] = -1000.0  # air, clipped by the window
    x = ((hu.clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))[:, None]
    got = _appearance(x.clone(), y, 3)
    assert got.shape == x.shape and got.min() >= 0 and got.max() <= 1
    assert torch.equal(got[:, :, :, :8], x[:, :, :, :8])  # clipped voxels stay as they were
    change = (got - x)[:, 0, :, 8:]
    assert change.abs().mean() > 1e-3 and change.std() < 40.0 / (WINDOW[1] - WINDOW[0])
    # image and labels are warped by one field: each class keeps its intensity
    xw, yw = _deform(x, y)
    assert xw.shape == x.shape and yw.shape == y.shape and yw.dtype == torch.long
    assert set(yw.unique().tolist()) <= {0, 1, 2} and not torch.equal(yw, y)
    for c, v in ((1, 100.0), (2, 150.0)):
        inner = (yw == c) & (torch.nn.functional.max_pool3d(
            (yw != c).float()[:, None], 3, 1, 1)[:, 0] == 0)
        assert inner.sum() > 500
        expect = (v - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
        assert torch.allclose(xw[:, 0][inner], torch.tensor(expect), atol=1e-4)


@pytest.mark.skipif(not (REALDATA / "ct_abdomen_dicom").is_dir(),
                    reason="shared real scans not present")
def test_builtin_finds_the_real_liver_as_the_command_line_runs_it(model):
    from napari_medseg.core.stats import body_mask
    from napari_medseg.io import read_volume

    img = read_volume(REALDATA / "ct_abdomen_dicom", lazy=False)
    ref = np.rint(np.asarray(read_volume(REALDATA / "ct_abdomen_dicom_labels.nii.gz",
                                         lazy=False).data)).astype(int)
    pred = model.predict(img, device="cpu", crop_to_body=True)
    got = np.asarray(pred.labels.data)
    assert got.shape == ref.shape and np.allclose(pred.labels.affine, img.affine)
    assert pred.info["body_crop"] is not None  # the air above the patient is left out
    liver = model.card.label_names
    liver = next(c for c, n in liver.items() if n == "liver")
    a, b = got == liver, ref == 5  # TotalSegmentator's liver id
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.9
    body = body_mask(np.asarray(img.data), modality="CT")
    assert (got[~body] > 0).sum() <= 0.01 * (got > 0).sum()  # organs lie in the body


def test_class_shift_moves_each_organ_alone_and_lesions_with_their_liver():
    import torch

    from napari_medseg.training.train_builtin import WINDOW, _class_shift

    y = torch.zeros(16, 8, 8, 8, dtype=torch.long)
    y[:, 1:3], y[:, 3:5], y[:, 5] = 1, 2, 5
    x = torch.full((16, 1, 8, 8, 8), 0.5)
    x[:, :, 7] = 0.0  # clipped air
    torch.manual_seed(0)
    got = _class_shift(x.clone(), y, 6, 30.0)[:, 0]
    hu = (got - 0.5) * (WINDOW[1] - WINDOW[0])
    assert torch.equal(got[:, 7], x[:, 0, 7]) and torch.allclose(hu[:, 0], torch.tensor(0.0))
    liver, spleen, lesion = hu[:, 1, 0, 0], hu[:, 3, 0, 0], hu[:, 5, 0, 0]
    assert hu[:, :7].abs().max() <= 30.0 + 1e-3 and liver.std() > 5 and spleen.std() > 5
    assert torch.allclose(lesion, liver) and not torch.allclose(spleen, liver)
    assert torch.allclose(hu[:, 1:3], liver.view(-1, 1, 1, 1).expand(-1, 2, 8, 8))


def test_case_cache_is_reused_only_for_the_same_spleen_contrast(tmp_path):
    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.training.train_builtin import (PATCH, TARGET_SPACING, _cached_cases,
                                                      make_card)

    probe, _ = make_abdomen_ct(seed=0, shape=PATCH, spacing=TARGET_SPACING)
    card = make_card(dict(ABDOMEN_LABELS), probe.orientation_code())
    cache = tmp_path / "cases.npz"
    (x0, y0), = _cached_cases(1, card, cache)
    (xd, yd), = _cached_cases(1, card, cache, spleen_contrast=(-45.0, -40.0))
    np.testing.assert_array_equal(yd, y0)
    assert xd[y0 == 2].mean() < x0[y0 == 2].mean()  # regenerated, not the cached cases
    with np.load(cache) as z:
        assert list(z["spleen_contrast"]) == [-45.0, -40.0]
    (xr, _), = _cached_cases(1, card, cache, spleen_contrast=(-45.0, -40.0))
    np.testing.assert_array_equal(xr, xd)  # the same contrast reuses the file


def test_head_feet_flips_move_image_and_labels_together_and_allow_z_tta(tmp_path):
    import torch

    from napari_medseg.models import load_model
    from napari_medseg.training.train_builtin import _flip_z, train

    x = torch.arange(4 * 6 * 2 * 2, dtype=torch.float32).reshape(4, 1, 6, 2, 2)
    y = (x[:, 0] % 5).long()
    x0, y0 = x.clone(), y.clone()
    flips = _flip_z(x, y, np.random.default_rng(0))
    assert flips.any() and not flips.all()
    for b, f in enumerate(flips):
        want = x0[b].flip(1) if f else x0[b]
        torch.testing.assert_close(x[b], want)
        assert torch.equal(y[b], (x[b, 0] % 5).long())  # the labels followed the image
        assert torch.equal(y[b], y0[b].flip(0) if f else y0[b])
    many = np.concatenate([_flip_z(x.clone(), y.clone(), np.random.default_rng(s))
                           for s in range(50)])
    assert 0.35 < many.mean() < 0.65

    out = tmp_path / "pkg"
    train(out, n_cases=2, iters=2, finetune_iters=1, focus_iters=1, batch=2, mirror_z=True)
    model = load_model(out)
    assert model.card.mirror_axes == (0,) or list(model.card.mirror_axes) == [0]
    assert "--mirror-z" in model.card.training and "head-feet flip" in model.card.training
    from napari_medseg.core.phantom import make_abdomen_ct
    img, _ = make_abdomen_ct(seed=0, shape=(32, 64, 64), spacing=(2.5, 1.5, 1.5))
    assert model.card.default_tta is True  # trained for it: mirrored unless turned off
    pred = model.predict(img)
    assert pred.labels.data.shape == img.data.shape and pred.info["tta"] is True
    assert model.predict(img, tta=False).info["tta"] is False


def test_crop_pad_zeroes_image_and_labels_outside_one_rectangle_and_windows_vary(tmp_path):
    import torch

    from napari_medseg.models import load_model
    from napari_medseg.training.train_builtin import CROP_KEEP, VARY_WINDOW_YX, _crop_pad, train

    rng = np.random.default_rng(0)
    for _ in range(20):
        x = torch.rand(1, 6, 40, 50) + 0.1
        y = torch.randint(1, 5, (6, 40, 50))
        _crop_pad(x, y, rng)
        kept = (x[0] != 0).numpy()
        assert np.array_equal(kept, (y != 0).numpy())  # labels cut where the image is
        assert (kept == kept[:1]).all()  # the same rectangle on every slice
        rows, cols = np.flatnonzero(kept[0].any(1)), np.flatnonzero(kept[0].any(0))
        assert kept[0][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one rectangle
        for n, side in ((40, rows), (50, cols)):
            assert CROP_KEEP[0] * n - 1 <= len(side) <= CROP_KEEP[1] * n + 1

    from napari_medseg.models.networks import UNet3D
    from napari_medseg.training.train_builtin import FEATURES, PATCH, _phase

    class Recording(torch.nn.Module):  # the real network, with the shapes it was fed
        def __init__(self):
            super().__init__()
            self.net, self.seen = UNet3D(1, 3, FEATURES), []

        def forward(self, x):
            self.seen.append(tuple(x.shape))
            return self.net(x)

    data = [(rng.random((40, 140, 140), dtype=np.float32),
             rng.integers(0, 3, (40, 140, 140)).astype(np.uint8)) for _ in range(8)]
    net = Recording()
    _phase(net, data, 3, 12, 1e-3, 8, 0, "cosine", 0.5, 100, "t", vary_window=True)
    sides = {s[-1] for s in net.seen}
    assert len(sides) > 1 and sides <= set(VARY_WINDOW_YX)
    for b, _, z, h, w in net.seen:  # about the voxels of 8 PATCH windows per step
        assert z == PATCH[0] and h == w and 0.75 <= b * h * w / (8 * PATCH[1] * PATCH[2]) <= 1.2

    out = tmp_path / "pkg"
    train(out, n_cases=2, iters=2, finetune_iters=0, focus_iters=0, batch=2,
          vary_window=True, crop_share=0.5)
    card = load_model(out).card
    assert "--vary-window --crop-pad 0.5" in card.training
    assert "/".join(map(str, VARY_WINDOW_YX)) in card.training
    assert tuple(card.patch_size) == (PATCH[0], 96, 96)  # the middle of the trained sizes
    assert tuple(card.train_patch_size) == PATCH  # fine-tuning keeps training's voxels
    assert "cropped scan" in card.training


def test_default_tta_is_validated_and_read_by_predict_and_the_cli():
    from napari_medseg.cli import build_parser
    from napari_medseg.errors import MedSegError
    from napari_medseg.models import load_model
    from napari_medseg.models.card import ModelCard

    card = load_model("abdomen-ct-small").card
    assert card.default_tta is True and tuple(card.mirror_axes) == (0,)
    again = ModelCard.from_dict(card.to_dict())
    assert again.default_tta is True
    d = card.to_dict()
    with pytest.raises(MedSegError, match="default_tta"):
        ModelCard.from_dict(dict(d, default_tta="yes"))
    with pytest.raises(MedSegError, match="mirror_axes"):
        ModelCard.from_dict(dict(d, mirror_axes=[]))
    assert ModelCard.from_dict({k: v for k, v in d.items() if k != "default_tta"}) \
        .default_tta is False  # older cards: off
    p = build_parser()
    base = ["predict", "ct.nii.gz", "-m", "abdomen-ct-small", "-o", "seg.nii.gz"]
    assert p.parse_args(base).tta is None
    assert p.parse_args(base + ["--tta"]).tta is True
    assert p.parse_args(base + ["--no-tta"]).tta is False


def test_default_overlap_is_validated_and_read_by_predict_and_the_clis(model):
    from napari_medseg.cli import build_parser
    from napari_medseg.errors import MedSegError
    from napari_medseg.models.card import DEFAULT_OVERLAP, ModelCard

    card = model.card
    d = card.to_dict()
    assert ModelCard.from_dict(d).default_overlap == card.default_overlap
    older = ModelCard.from_dict({k: v for k, v in d.items() if k != "default_overlap"})
    assert older.default_overlap is None and older.overlap() == DEFAULT_OVERLAP == 0.5
    with pytest.raises(MedSegError, match="default_overlap"):
        ModelCard.from_dict(dict(d, default_overlap=1.0))
    quarter = ModelCard.from_dict(dict(d, default_overlap=0.25))
    assert quarter.overlap() == 0.25 and quarter.overlap(0.6) == 0.6  # the caller wins

    img, _ = make_abdomen_ct(seed=5, shape=(40, 150, 150))
    saved = card.default_overlap
    try:
        card.default_overlap = 0.25
        sparse = model.predict(img, device="cpu", tta=False)
        card.default_overlap = None
        dense = model.predict(img, device="cpu", tta=False)
        asked = model.predict(img, device="cpu", tta=False, overlap=0.25)
    finally:
        card.default_overlap = saved
    assert sparse.info["overlap"] == 0.25 and dense.info["overlap"] == 0.5
    assert sparse.info["windows"] < dense.info["windows"]
    assert asked.info["windows"] == sparse.info["windows"]
    np.testing.assert_array_equal(asked.labels.data, sparse.labels.data)

    base = ["predict", "ct.nii.gz", "-m", "abdomen-ct-small", "-o", "seg.nii.gz"]
    assert build_parser().parse_args(base).overlap is None  # None: the card's
    assert build_parser().parse_args(base + ["--overlap", "0.5"]).overlap == 0.5
    batch = ["batch", "ct.nii.gz", "-m", "abdomen-ct-small", "-o", "out"]
    assert build_parser().parse_args(batch).overlap is None
