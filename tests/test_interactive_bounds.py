"""Every engine's result is bounded: no floods, no collapses (issue 10, item 3).

The bounds live in the shared engine layer (``Engine.bound``), so an engine
class written anywhere gets them. Engines here that flood or collapse on
purpose show the bounds apply; the real CT (skipped where absent) shows they
hold on a real scan.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_medseg.interactive import ENGINES, Prompts, make_engine
from napari_medseg.interactive.base import Engine
from napari_medseg.interactive.bounds import Bounds, added_click, bound_result
from napari_medseg.interactive.classical import ClassicalEngine
from napari_medseg.interactive.simulate import (box_around, dice, next_click,
                                                scribble_along, simulate_clicks)

from _realdata import REAL

SPACING = (2.0, 1.0, 1.0)


def _ball(shape, centre, radius):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


class _Scripted(Engine):
    """An engine that answers each call with the next mask of a script."""

    name = "scripted"

    def __init__(self, masks):
        super().__init__()
        self.masks = list(masks)

    def predict_region(self, image, spacing, prompts, cancel=None):
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        m = self.masks.pop(0)
        if prompts.mode == "2d":  # one slice
            return m, tuple(slice(prompts.index, prompts.index + 1) if a == prompts.axis
                            else slice(0, n) for a, n in enumerate(m.shape))
        return m, tuple(slice(0, n) for n in m.shape)


class _Child(_Scripted):
    """A subclass that calls its parent's ``predict_region``: bounded once."""

    def predict_region(self, image, spacing, prompts, cancel=None):
        return super().predict_region(image, spacing, prompts, cancel)


def test_a_flood_from_one_click_is_bounded():
    shape = (40, 100, 100)
    image = np.zeros(shape, np.float32)
    flood = np.ones(shape, bool)
    click = [20, 50, 50]
    for cls in (_Scripted, _Child):
        eng = cls([flood])
        mask = eng.predict(image, SPACING, Prompts(positive=[click]))
        assert 0 < mask.sum() <= (Bounds().max_share + 0.01) * mask.size  # ties kept
        assert mask[tuple(click)]
        # what is kept is what lies nearest the click
        far = np.zeros(shape, bool)
        far[:, :5, :5] = True
        assert not (mask & far).any()
    raw = _Scripted([flood])
    raw.bounded = False
    assert raw.predict(image, SPACING, Prompts(positive=[click])).all()


def test_results_stay_near_the_prompts_and_inside_a_box():
    shape = (20, 400, 400)
    image = np.zeros(shape, np.float32)
    b = Bounds()
    # a click and a far blob the engine returned with it
    m = _ball(shape, (10, 50, 50), 8) | _ball(shape, (10, 350, 350), 8)
    mask = _Scripted([m]).predict(image, (1.0, 1.0, 1.0), Prompts(positive=[[10, 50, 50]]))
    assert mask[10, 50, 50] and not mask[10, 350, 350]
    assert b.max_radius_mm < np.hypot(300, 300)
    # a 2D box in 3D mode bounds the mask in-plane, not in depth
    m = np.zeros(shape, bool)
    m[:, 40:120, 40:120] = True
    box = [[[10, 60, 60], [10, 99, 99]]]
    mask = _Scripted([m]).predict(image, (1.0, 1.0, 1.0), Prompts(boxes=box))
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    assert ys.min() >= 60 - 0.1 * 39 - 2 and ys.max() <= 99 + 0.1 * 39 + 2
    assert mask[0].any() and mask[-1].any()
    # a positive click outside the box (on another slice) stretches the box to it
    box_and_click = Prompts(boxes=box, positive=[[4, 115, 75]])
    mask = _Scripted([m]).predict(image, (1.0, 1.0, 1.0), box_and_click)
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    assert mask[4, 104:120, 60:90].all() and ys.max() <= 115 + 0.1 * 55 + 2
    assert not mask[:, :, 40:50].any()  # the other axis still bounded by the box
    # in 2D mode, on the box's slice only
    mask = _Scripted([m[10:11]]).predict(
        image, (1.0, 1.0, 1.0), Prompts(boxes=box, mode="2d", index=10))
    assert mask[10].any() and not np.delete(mask, 10, axis=0).any()


def test_a_negative_click_never_empties_the_mask():
    shape = (30, 80, 80)
    image = np.zeros(shape, np.float32)
    obj = _ball(shape, (15, 40, 40), 12)
    pos, neg = [15, 40, 34], [15, 40, 48]
    eng = _Scripted([obj, np.zeros(shape, bool)])
    first = eng.predict(image, (1.0, 1.0, 1.0), Prompts(positive=[pos]))
    assert first.sum() == obj.sum()
    after = eng.predict(image, (1.0, 1.0, 1.0), Prompts(positive=[pos], negative=[neg]))
    assert after.any() and after[tuple(pos)] and not after[tuple(neg)]
    # the part away from the negative click is kept, the part around it goes
    x = np.arange(80)[None, None, :]
    assert after[obj & (x <= 38)].all() and not after[obj & (x >= 44)].any()


def test_a_negative_click_that_removes_most_keeps_the_positive_side():
    shape = (30, 80, 120)
    image = np.zeros(shape, np.float32)
    sp = (1.0, 1.0, 1.0)
    obj = np.zeros(shape, bool)
    obj[5:25, 30:50, 10:110] = True  # a long bar
    pos, neg = [15, 40, 20], [15, 40, 90]
    rest = obj.copy()
    rest[:, :, 14:] = False  # the engine keeps only the end of the bar
    eng = _Scripted([obj, rest])
    eng.predict(image, sp, Prompts(positive=[pos]))
    after = eng.predict(image, sp, Prompts(positive=[pos], negative=[neg]))
    x = np.arange(120)[None, None, :]
    assert after[obj & (x < 50)].all() and not after[obj & (x > 60)].any()


def test_a_collapse_keeps_a_heterogeneous_object_it_held_for_two_clicks():
    shape = (30, 80, 120)
    sp = (1.0, 1.0, 1.0)
    x = np.arange(120)[None, None, :]
    obj = np.zeros(shape, bool)
    obj[5:25, 30:50, 10:110] = True
    image = np.where(obj & (x < 60), 10.0, 4.0).astype(np.float32)  # half as dark as outside
    rest = obj & (x < 14)
    eng = _Scripted([obj, obj, rest])
    pos = [[15, 40, 20], [15, 40, 30]]
    eng.predict(image, sp, Prompts(positive=pos[:1]))
    eng.predict(image, sp, Prompts(positive=pos))
    after = eng.predict(image, sp, Prompts(positive=pos, negative=[[15, 40, 115]]))
    # held for two updates: kept on the positive side, dark part included
    assert after[obj & (x < 66)].all() and not after[obj & (x > 80)].any()


def test_a_positive_click_takes_back_nothing_a_negative_click_removed():
    shape = (30, 80, 160)
    image = np.zeros(shape, np.float32)
    sp = (1.0, 1.0, 1.0)
    obj = _ball(shape, (15, 40, 30), 10)
    spill = np.zeros(shape, bool)
    spill[12:18, 37:43, 40:150] = True  # leaks far along a thin same-intensity neighbour
    flood = obj | spill
    eng = _Scripted([flood, obj, flood])
    pos = [[15, 40, 30]]
    eng.predict(image, sp, Prompts(positive=pos))
    neg = [[15, 40, 120]]
    eng.predict(image, sp, Prompts(positive=pos, negative=neg))
    again = eng.predict(image, sp, Prompts(positive=pos + [[15, 40, 39]], negative=neg))
    assert again[obj].all()
    assert not again[:, :, 39 + int(Bounds().min_reach_mm) + 2:].any()


def test_a_positive_click_adds_near_itself_and_gives_up_nothing():
    shape = (30, 100, 100)
    image = np.zeros(shape, np.float32)
    sp = (1.0, 1.0, 1.0)
    obj = _ball(shape, (15, 50, 30), 10)
    flood = np.ones(shape, bool)
    eng = _Scripted([obj, flood])
    eng.predict(image, sp, Prompts(positive=[[15, 50, 30]]))
    grown = eng.predict(image, sp, Prompts(positive=[[15, 50, 30], [15, 50, 41]]))
    b = Bounds()
    side = 2 * int(b.edge_mm) + 1  # edge refinement (a box band at 1 mm voxels): free
    band = ndi.binary_dilation(obj, np.ones((side, side, side), bool))
    added = grown & ~band
    assert grown[obj].all()
    assert added.sum() <= b.growth * obj.sum() + 4 / 3 * np.pi * b.min_reach_mm ** 3 + 1
    assert grown[15, 50, 41] and not grown[15, 50, 95]
    # a positive click answered with a collapse keeps the object
    eng = _Scripted([obj, _ball(shape, (15, 50, 40), 2)])
    eng.predict(image, sp, Prompts(positive=[[15, 50, 30]]))
    kept = eng.predict(image, sp, Prompts(positive=[[15, 50, 30], [15, 50, 40]]))
    assert kept[obj].all()


def _two_steps(first, second, prompts1, prompts2, bounds):
    shape = first.shape
    eng = _Scripted([first, second])
    eng.bounds = bounds
    image = np.zeros(shape, np.float32)
    eng.predict(image, (1.0, 1.0, 1.0), prompts1)
    return eng.predict(image, (1.0, 1.0, 1.0), prompts2)


def test_a_click_changes_the_mask_only_near_itself():
    shape = (30, 80, 100)
    x = np.arange(shape[2])[None, None, :]
    obj = _ball(shape, (15, 40, 50), 12)
    shell = ndi.binary_dilation(obj, iterations=2) & ~obj
    inner = obj & ~ndi.binary_erosion(obj, iterations=2)
    pos1 = Prompts(positive=[[15, 40, 50]])
    # a positive click 2 mm off the edge: the engine grows the whole edge by
    # 2 voxels and also peels the far side
    pos2 = Prompts(positive=[[15, 40, 50], [15, 40, 64]])
    answer = (obj | shell) & ~(inner & (x < 44))
    far = x < 44  # farther than max(12, 5 x 2) mm from the click
    got = _two_steps(obj, answer, pos1, pos2, Bounds(local=5.0))
    assert got[15, 40, 63] and got[15, 40, 64]  # the edge at the click grew
    assert got[obj & far].all() and not got[shell & (x < 40)].any()  # far side as before
    # without the rule the engine's far changes (within the edge band) stand
    got = _two_steps(obj, answer, pos1, pos2, Bounds())
    assert not got[inner & (x < 40)].any() and got[shell & (x < 40)].any()
    # a negative click just inside the edge removes a cap there, not the far side
    neg2 = Prompts(positive=[[15, 40, 50]], negative=[[15, 40, 60]])
    answer = obj & (x < 56) & ~(inner & (x < 44))
    got = _two_steps(obj, answer, pos1, neg2, Bounds(local=5.0))
    assert not got[15, 40, 60] and got[obj & far].all()
    # a click deep in a missed part adds all of it
    part = _ball(shape, (15, 40, 80), 9)
    small = _ball(shape, (15, 40, 30), 8)
    got = _two_steps(small, small | part, Prompts(positive=[[15, 40, 30]]),
                     Prompts(positive=[[15, 40, 30], [15, 40, 80]]), Bounds(local=5.0))
    assert got[part].all() and got[small].all()


def test_added_click_knows_one_click_from_new_prompts():
    a = Prompts(positive=[[1, 2, 3]])
    b = Prompts(positive=[[1, 2, 3]], negative=[[4, 5, 6]])
    assert added_click(a, b)[1] is False and np.allclose(added_click(a, b)[0], [4, 5, 6])
    assert added_click(b, a) is None
    assert added_click(a, Prompts(positive=[[1, 2, 4], [5, 5, 5]])) is None
    assert added_click(a, Prompts(positive=[[1, 2, 3], [5, 5, 5]], mode="2d")) is None
    c = Prompts(positive=[[1, 2, 3], [5, 5, 5]], negative=[[4, 5, 6]])
    assert added_click(a, c) is None


def test_bound_result_on_its_own_returns_a_region_of_the_image():
    shape = (10, 50, 50)
    m = np.ones((10, 20, 20), bool)
    region = (slice(0, 10), slice(10, 30), slice(10, 30))
    out, reg = bound_result(m, region, shape, (1.0, 1.0, 1.0), Prompts(positive=[[5, 20, 20]]))
    full = np.zeros(shape, bool)
    full[reg] = out
    assert full[5, 20, 20] and full.sum() <= m.sum() and not full[:, :10].any()


# --------------------------------------------------------- SAM, nnInteractive
def _tiny_sam(tmp_path):
    from napari_medseg.interactive.sam import build_sam

    cfg = {"image_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2,
           "global_attn_indexes": [0], "window_size": 0, "prompt_embed_dim": 32,
           "mlp_dim": 64}
    torch.manual_seed(0)
    sam = build_sam(cfg)
    # a decoder whose mask logits are all high: every pixel of every slice
    with torch.no_grad():
        for p in sam.mask_decoder.output_hypernetworks_mlps.parameters():
            p.zero_()
        for m in sam.mask_decoder.output_upscaling:
            if isinstance(m, torch.nn.ConvTranspose2d):
                m.weight.zero_()
        last = sam.mask_decoder.output_hypernetworks_mlps
        for mlp in last:
            mlp.layers[-1].bias.fill_(1.0)
        for m in sam.mask_decoder.output_upscaling:
            if isinstance(m, torch.nn.ConvTranspose2d):
                m.bias.fill_(1.0)
    path = tmp_path / "flood_sam.pth"
    torch.save(sam.state_dict(), path)
    import json

    (tmp_path / "flood_sam.json").write_text(json.dumps(cfg))
    return path


def test_sam_adapter_flood_is_bounded(tmp_path):
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything is not installed")
    shape = (12, 64, 64)
    image = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    eng = make_engine("Segment Anything", _tiny_sam(tmp_path))
    click = [6, 32, 32]
    eng.bounded = False
    raw = eng.predict(image, (1.0, 1.0, 1.0), Prompts(positive=[click], mode="2d"))
    assert raw[6].mean() > 0.9  # the decoder floods the slice
    eng.bounded = True
    m = eng.predict(image, (1.0, 1.0, 1.0), Prompts(positive=[click], mode="2d"))
    assert m[6, 32, 32] and m[6].sum() <= (Bounds().max_share + 0.01) * 64 * 64
    assert issubclass(type(eng), Engine) and getattr(type(eng).predict_region, "_bounded")


def test_every_engine_class_is_bounded():
    from napari_medseg.interactive.nninteractive import NNInteractiveEngine
    from napari_medseg.interactive.sam import SamEngine

    classes = [ClassicalEngine, SamEngine, NNInteractiveEngine]
    if importlib.util.find_spec("sam2") is not None:
        from napari_medseg.interactive.sam2 import Sam2Engine

        classes.append(Sam2Engine)
    for cls in classes:
        assert getattr(cls.predict_region, "_bounded", False), cls
    for name in ENGINES:
        if not ENGINES[name]:
            assert getattr(type(make_engine(name)).predict_region, "_bounded", False), name


# -------------------------------------------------------------- classical
def test_classical_box_prompts_in_2d_and_3d():
    rng = np.random.default_rng(2)
    shape = (24, 64, 64)
    obj = _ball(shape, (12, 32, 24), 9) & (np.arange(24)[:, None, None] > 3)
    img = np.where(obj, 100.0, 20.0).astype(np.float32) + rng.normal(0, 6, shape)
    img = img.astype(np.float32)
    box, z = box_around(obj)
    eng = ClassicalEngine()
    m3 = eng.predict(img, SPACING, Prompts(boxes=box[None]))
    assert dice(m3, obj) > 0.8 and m3[z - 3].any() and m3[z + 3].any()
    m2 = eng.predict(img, SPACING, Prompts(boxes=box[None], mode="2d", index=z))
    assert dice(m2[z], obj[z]) > 0.85 and not np.delete(m2, z, axis=0).any()
    run = simulate_clicks(eng, img, SPACING, obj, n_clicks=3, box=True, rule="largest")
    assert len(run.dice) == 4 and run.dice[-1] > 0.8


def test_next_click_largest_rule_and_box_around():
    truth = np.zeros((1, 30, 30), bool)
    truth[0, 2:12, 2:12] = True  # 100 voxels
    truth[0, 20:22, 2:28] = True  # 52 voxels, a long thin part
    pred = np.zeros_like(truth)
    pred[0, 14:19, 14:19] = True  # 25 voxels of spill-over
    p, positive = next_click(pred, truth, rule="largest")
    assert positive and 2 <= p[1] <= 11 and 2 <= p[2] <= 11
    pred = truth.copy()
    pred[0, 2:12, 2:12] = False
    pred[0, 25:30, 10:30] = True  # a 100-voxel spill-over ties the 100-voxel miss
    p, positive = next_click(pred, truth, rule="largest")
    assert positive  # misses win ties
    with pytest.raises(ValueError):
        next_click(pred, truth, rule="nearest")
    corners, z = box_around(np.pad(truth, ((1, 1), (0, 0), (0, 0))))
    assert z == 1 and corners.tolist() == [[1, 2, 2], [1, 21, 27]]


def test_scribble_along_the_medial_axis_and_the_scribble_protocol():
    z, y, x = np.ogrid[:9, :40, :60]
    truth = ((y - 20) ** 2 / 10 ** 2 + (x - 30) ** 2 / 22 ** 2 <= 1) & (abs(z - 4) <= 3)
    truth[6] &= (x < 30)[0]  # a smaller slice: the stroke goes on the largest one
    sc, k = scribble_along(truth, (2.0, 1.0, 1.0))
    line = np.argwhere(sc == 1)
    assert truth[k].sum() == truth.sum((1, 2)).max() > truth[6].sum()
    assert np.all(line[:, 0] == k) and truth[sc == 1].all()
    # along the ellipse's long axis, well inside its edge
    assert np.ptp(line[:, 2]) > 20 and np.ptp(line[:, 1]) <= 4
    assert np.all(np.abs(line[:, 1] - 20) <= 3)
    sc2, k2 = scribble_along(truth, (2.0, 1.0, 1.0), axis=2, index=30)
    assert k2 == 30 and np.all(np.argwhere(sc2)[:, 2] == 30)

    class Echo(Engine):
        """Returns the object paint of its prompts: the stroke itself."""

        def predict_region(self, image, spacing, prompts, cancel=None):
            image, spacing, prompts = self.prepare(image, spacing, prompts)
            m = np.zeros(image.shape, bool) if prompts.scribbles is None \
                else prompts.scribbles == 1
            for p in prompts.positive:
                m[tuple(np.round(p).astype(int))] = True
            return m, tuple(slice(0, n) for n in image.shape)

    eng = Echo()
    eng.bounded = False
    run = simulate_clicks(eng, np.zeros(truth.shape, np.float32), (2.0, 1.0, 1.0), truth,
                          n_clicks=2, scribble=True)
    assert len(run.dice) == 3 and 0 < run.dice[0] < run.dice[-1]
    assert run.prompts.scribbles is not None and len(run.prompts.positive) == 2
    with pytest.raises(ValueError, match="box or a scribble"):
        simulate_clicks(eng, np.zeros(truth.shape), (1, 1, 1), truth, box=True, scribble=True)


# ----------------------------------------------------------------- real CT
def _real_ct():
    folder = REAL / "ct_abdomen_dicom"
    labels = REAL / "ct_abdomen_dicom_labels.nii.gz"
    if not (folder.is_dir() and labels.is_file()):
        pytest.skip("the shared real CT (../shared/realdata) is absent")
    from napari_medseg.io import read_volume

    img = read_volume(folder)
    lab = read_volume(labels, is_label=True)
    return (np.asarray(img.data, np.float32), tuple(img.spacing),
            np.asarray(lab.data).astype(np.int32))


@pytest.fixture(scope="module")
def real_ct():
    return _real_ct()


@pytest.mark.parametrize("label,name", [(64, "portal/splenic vein"), (6, "stomach")])
def test_one_click_on_a_low_contrast_organ_selects_no_flood(real_ct, label, name):
    image, spacing, lab = real_ct
    truth = lab == label
    click, _ = next_click(np.zeros_like(truth), truth, spacing, rule="largest")
    for engine in [n for n, needs_path in ENGINES.items() if not needs_path]:
        mask = make_engine(engine).predict(image, spacing, Prompts(positive=[click]))
        assert mask.sum() <= 3 * truth.sum(), (engine, name, int(mask.sum()),
                                               int(truth.sum()))


def test_negative_clicks_on_the_real_ct_never_empty_the_mask(real_ct):
    image, spacing, lab = real_ct
    eng = ClassicalEngine()
    for label in (52, 1):  # aorta, spleen
        truth = lab == label
        run = simulate_clicks(eng, image, spacing, truth, n_clicks=4, rule="largest")
        pos = run.prompts
        assert pos is not None and all(d > 0 for d in run.dice), (label, run.dice)
        # a negative click right next to the first click
        p = pos.positive[0]
        neg = p + [0, 0, 3]
        m = eng.predict(image, spacing, Prompts(positive=[p], negative=[neg]))
        assert m.any() and m[tuple(np.round(p).astype(int))], label


def test_nninteractive_adapter_flood_is_bounded(tmp_path):
    if importlib.util.find_spec("nnInteractive") is None:
        pytest.skip("nninteractive is not installed")
    from test_interactive_adapters import _nninteractive_folder

    folder = _nninteractive_folder(tmp_path / "model")
    ckpt_path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)  # written by this test
    w = ckpt["network_weights"]
    w["decoder.seg_layers.1.weight"].zero_()  # the last head says "object" everywhere
    w["decoder.seg_layers.1.bias"].copy_(torch.tensor([-10.0, 10.0]))
    torch.save(ckpt, ckpt_path)
    eng = make_engine("nnInteractive", folder, device="cpu", autozoom=False)
    shape = (24, 80, 80)
    image = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    click = [12, 40, 40]
    eng.bounded = False
    raw = eng.predict(image, SPACING, Prompts(positive=[click]))
    assert raw.mean() > 0.6  # the raw output floods its whole patch
    eng.bounded = True
    m = eng.predict(image, SPACING, Prompts(positive=[click]))
    assert m[tuple(click)] and m.sum() <= Bounds().max_share * m.size
    # a negative click answered with the same flood removes nothing beyond the
    # previous mask's edge band, and adds nothing
    m2 = eng.predict(image, SPACING, Prompts(positive=[click], negative=[[12, 40, 60]]))
    r = [int(Bounds().edge_mm // v) for v in SPACING]
    band = ndi.binary_dilation(m, np.ones([2 * v + 1 for v in r], bool))
    assert m2.sum() <= band.sum()


def _ball_and_tube(seed):
    """A noisy image with a ball and, apart from it, a thin tube of the same intensity."""
    shape = (24, 64, 64)
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 5, shape).astype(np.float32)
    ball = _ball(shape, (12, 32, 20), 6)
    tube = np.zeros(shape, bool)
    tube[:, 30:32, 48:50] = True
    image[ball | tube] += 100
    return image, ball, tube


@pytest.mark.parametrize("seed_mm", [4.0, None])
def test_a_positive_click_the_engine_ignores_still_marks_its_region(seed_mm):
    image, ball, tube = _ball_and_tube(3)
    eng = _Scripted([ball, ball])  # answers the second click as if it were not there
    eng.bounds = Bounds(seed_mm=seed_mm)
    m1 = eng.predict(image, SPACING, Prompts(positive=[[12, 32, 20]]))
    click = [12, 30, 48]
    m2 = eng.predict(image, SPACING, Prompts(positive=[[12, 32, 20], click]))
    assert (m2 & ball).sum() == ball.sum() == m1.sum()
    if seed_mm is None:
        assert not m2[tuple(click)]
        return
    added = m2 & ~ball
    assert m2[tuple(click)]
    assert (added & tube).sum() >= 8  # along the tube, within 4 mm of the click
    assert not (added & ~tube).any()  # nothing of the background
    z = np.nonzero(added.any(axis=(1, 2)))[0]
    assert z.min() >= 12 - 2 and z.max() <= 12 + 2  # 4 mm at 2 mm slices


def test_a_negative_click_adds_nothing_even_along_the_edge():
    shape = (24, 64, 64)
    image = np.zeros(shape, np.float32)
    first = _ball(shape, (12, 32, 32), 8)
    # the answer to the negative click: the edge widened all round, a cap removed
    answer = ndi.binary_dilation(first, iterations=2)
    answer[:, :, 36:] = False
    eng = _Scripted([first, answer])
    eng.predict(image, SPACING, Prompts(positive=[[12, 32, 32]]))
    m = eng.predict(image, SPACING, Prompts(positive=[[12, 32, 32]], negative=[[12, 32, 38]]))
    assert not (m & ~first).any()
    assert m.sum() == (first & answer).sum()


def test_an_ignored_click_in_2d_marks_its_slice_only():
    image, ball, tube = _ball_and_tube(4)
    eng = _Scripted([ball[12:13], ball[12:13]])  # the slice's answers, the click ignored
    kw = dict(mode="2d", axis=0, index=12)
    eng.predict(image, SPACING, Prompts(positive=[[12, 32, 20]], **kw))
    m = eng.predict(image, SPACING, Prompts(positive=[[12, 32, 20], [12, 30, 48]], **kw))
    assert m[12, 30, 48] and (m[12] & tube[12]).sum() == 4  # the tube's cross-section
    assert not np.delete(m, 12, axis=0).any()
    assert not (m & ~(ball | tube)).any()


@pytest.mark.parametrize("like", [0.3, None])
def test_rule_6_keeps_a_positive_click_to_the_objects_intensities(like):
    # an organ (100) touching a brighter neighbour (300); the answer to a click in
    # the organ's missed part takes the neighbour too
    shape = (24, 64, 64)
    rng = np.random.default_rng(5)
    image = rng.normal(0, 5, shape).astype(np.float32)
    organ = np.zeros(shape, bool)
    organ[6:18, 16:48, 10:40] = True
    neighbour = np.zeros(shape, bool)
    neighbour[6:18, 16:48, 40:54] = True
    image[organ] += 100
    image[neighbour] += 300
    first = organ.copy()
    first[:, :, 30:] = False
    eng = _Scripted([first, organ | neighbour])
    eng.bounds = Bounds(like=like)
    eng.predict(image, SPACING, Prompts(positive=[[12, 32, 20]]))
    m = eng.predict(image, SPACING, Prompts(positive=[[12, 32, 20], [12, 32, 35]]))
    assert (m & organ).sum() >= 0.995 * organ.sum()  # all but a few noise tails
    assert (m & neighbour).any() == (like is None)
