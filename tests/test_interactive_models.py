"""Learned engines: the shipped click model, its training script, SAM and nnInteractive."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from napari_medseg.core.phantom import make_abdomen_ct
from napari_medseg.errors import MedSegError
from napari_medseg.interactive import Prompts, make_engine
from napari_medseg.interactive import click_roi as roi
from napari_medseg.interactive.click_model import (ARCH, IN_CHANNELS, WEIGHTS, ClickModelEngine,
                                                   ClickNet, box_map, click_channels,
                                                   load_click_net)
from napari_medseg.interactive.simulate import next_click, simulate_clicks

from _realdata import REAL


@pytest.fixture(scope="module")
def phantom():
    img, lab = make_abdomen_ct(seed=0, shape=(32, 96, 96), spacing=(3.0, 2.0, 2.0))
    return np.asarray(img.data), img.spacing, np.asarray(lab.data)


def test_shipped_click_weights_are_small_plain_and_tagged():
    from napari_medseg.interactive.click_model import SHIPPED

    assert sum(p.stat().st_size for p in {WEIGHTS, *SHIPPED}) < 20e6
    for path in (WEIGHTS, *SHIPPED):
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        assert bytes(state["_arch"].tolist()).decode() == ARCH
        net = load_click_net(path)
        out = net(torch.zeros(1, IN_CHANNELS, 8, 16, 16))
        assert out.shape == (1, 1, 8, 16, 16)
    assert [n.width for n in ClickModelEngine().nets] == [16, 24]


def test_old_or_foreign_click_weights_are_refused(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"_width": torch.tensor(16), "stem.0.weight": torch.zeros(16, 3, 3, 3, 3)}, old)
    with pytest.raises(MedSegError, match="format 'v1'.*retrain"):
        load_click_net(old)
    with pytest.raises(MedSegError, match="not found"):
        load_click_net(tmp_path / "missing.pt")


def test_click_channels_normalise_to_the_click():
    crop = np.full((8, 16, 16), 500.0, np.float32)
    crop[:, :, 8:] = 900
    prev = np.zeros(crop.shape, np.float32)
    prev[:, :, :8] = 1
    x = click_channels(crop, np.array([[4.0, 8.0, 3.0]]), np.zeros((0, 3)), prev)
    assert x.shape == (6, 8, 16, 16) and x.dtype == np.float32
    assert abs(x[0, 4, 8, 3]) < 1e-6 and x[0, 4, 8, 12] > 0
    assert x[1, 4, 8, 3] == pytest.approx(0.0) and x[1, 4, 8, 12] == pytest.approx(1.0)
    assert x[2, 4, 8, 3] == pytest.approx(1.0) and x[3].max() == 0
    assert np.array_equal(x[4], prev) and x[5].max() == 0
    assert click_channels(crop, [[4, 8, 3]], np.zeros((0, 3)))[4].max() == 0
    # a box alone: centred on the intensity of the box's core, drawn in the box channel
    xb = click_channels(crop, np.zeros((0, 3)), np.zeros((0, 3)),
                        boxes=[[[4, 2, 9], [4, 14, 15]]])
    assert abs(xb[0, 4, 8, 12]) < 1e-6 and xb[0, 4, 8, 3] < 0
    assert xb[5, 4, 2:15, 9:16].min() == 1 and xb[5].sum() == 13 * 7
    with pytest.raises(ValueError):
        click_channels(crop, np.zeros((0, 3)), np.zeros((0, 3)))


def test_box_map_fills_flat_and_3d_boxes():
    m = box_map([[[2.2, 1, 1], [2.4, 3, 4]], [[0, 0, 0], [1, 1, 1]]], (4, 6, 6))
    assert m[2, 1:4, 1:5].min() == 1 and m[0:2, 0:2, 0:2].min() == 1
    assert m.sum() == 12 + 8


def test_grid_plan_keeps_the_budget_and_the_image_resolution():
    # a large region is coarsened to the budget, nearly isotropic in mm
    g = roi.plan_grid((64, 128, 128), (2.5, 1.5, 1.5), roi.BUDGET_3D)
    assert all(n % roi.MULTIPLE == 0 for n in g)
    assert np.prod(g) <= 1.15 * roi.BUDGET_3D
    mm = np.array((64 * 2.5, 128 * 1.5, 128 * 1.5)) / g
    assert mm.max() / mm.min() < 1.4
    # a small region keeps (about) the image's voxels, never finer
    assert roi.plan_grid((16, 24, 24), (1.0, 1.0, 1.0), roi.BUDGET_3D) == (16, 24, 24)
    # a 2D slab keeps its slices and fits the in-plane budget
    g2 = roi.plan_grid((8, 400, 300), (5.0, 0.5, 0.5), roi.INPLANE_2D, fixed=(0,))
    assert g2[0] == 8 and g2[1] * g2[2] <= 1.15 * roi.INPLANE_2D
    # cell-centred mapping of points onto the grid
    p = roi.to_grid([[0, 0, 0], [63, 127, 127]], np.zeros(3), np.array([64, 128, 128]),
                    (32, 64, 64))
    assert np.allclose(p[0], -0.25) and np.allclose(p[1], [31.25, 63.25, 63.25])
    lo, hi = roi.grow_box(np.array([10, 10, 10]), np.array([20, 20, 20]), [(0, 0), (2, 1)],
                          (100, 100, 25))
    assert lo.tolist() == [0, 10, 10] and hi.tolist() == [20, 20, 25]


def test_click_model_segments_organs_and_refines(phantom):
    image, spacing, lab = phantom
    eng = make_engine("click model")
    assert isinstance(eng, ClickModelEngine)
    for k in (1, 3):  # liver (larger than the first 64 mm region) and a kidney
        run = simulate_clicks(eng, image, spacing, lab == k, n_clicks=3)
        assert run.dice[-1] > 0.7, (k, run.dice)  # trained, not random (untrained: < 0.4)
    with pytest.raises(MedSegError, match="only negative prompts"):
        eng.predict(image, spacing, Prompts(scribbles=2 * _scribble(image.shape)))
    m = eng.predict(image, spacing, Prompts(positive=[[16, 40, 30]], mode="2d", index=16))
    assert m.shape == image.shape and not m[15].any() and not m[17].any()


def test_click_model_redecides_only_the_boundary_band_by_the_image():
    from scipy import ndimage as ndi

    from napari_medseg.interactive.edges import BAND_MM

    img, lab = make_abdomen_ct(seed=0, shape=(32, 96, 96), spacing=(2.0, 0.8, 0.8))
    image, spacing, truth = np.asarray(img.data), img.spacing, np.asarray(lab.data) == 1
    click = Prompts(positive=[next_click(np.zeros_like(truth), truth)[0]])
    masks = []
    for weight in (1.0, 0.0):
        m, region = ClickModelEngine(edge_weight=weight).predict_region(image, spacing, click)
        full = np.zeros(truth.shape, bool)
        full[region] = m
        masks.append(full)
    refined, plain = masks
    changed = refined ^ plain
    assert changed.sum() > 100  # 0.8 mm voxels lie in the band: the image had its say
    depth = np.where(plain, ndi.distance_transform_edt(plain, sampling=spacing),
                     ndi.distance_transform_edt(~plain, sampling=spacing))
    assert depth[changed].max() <= BAND_MM  # and only there


def test_click_model_leaves_coarse_voxels_to_the_network(phantom):
    image, spacing, lab = phantom  # 3 x 2 x 2 mm: no voxel within the band
    click = Prompts(positive=[_deepest(lab == 3)])
    a = ClickModelEngine().predict(image, spacing, click)
    b = ClickModelEngine(edge_weight=0).predict(image, spacing, click)
    np.testing.assert_array_equal(a, b)


def _deepest(mask):
    """The deepest voxel of ``mask``: a user's first click on it."""
    return next_click(np.zeros_like(mask), mask)[0]


def test_first_click_sizes_trade_large_organs_for_small_ones():
    from napari_medseg.interactive import engine_info
    from napari_medseg.interactive.simulate import dice

    img, lab = make_abdomen_ct(seed=0, shape=(48, 128, 128), spacing=(2.5, 1.5, 1.5))
    image, lab = np.asarray(img.data, np.float32), np.asarray(lab.data)
    eng = make_engine("click model")
    assert eng.first_size == 0 and eng.first_sizes_mm == engine_info("click model").first_sizes_mm
    liver, kidney = lab == 1, lab == 3
    scores = {}
    for size in (0, 1):
        eng.first_size = size
        for name, truth in (("liver", liver), ("kidney", kidney)):
            # the same prompts again: the cache must not answer for another size
            m = eng.predict(image, img.spacing, Prompts(positive=[_deepest(truth)]))
            scores[name, size] = dice(m, truth)
    # the 64 mm cube takes a part of the 17 cm liver, the 128 mm one most of it;
    # for the kidney the finest cube is the better one
    assert scores["liver", 1] > scores["liver", 0] + 0.2, scores
    assert scores["kidney", 0] > scores["kidney", 1] + 0.2, scores
    # later clicks refine whatever the size; a bad size is refused
    run = simulate_clicks(eng, image, img.spacing, liver, n_clicks=3)
    assert min(run.dice) > 0.65, run.dice
    # in 2D mode the size is the square around the click on its slice, with the
    # same trade (bf16 and float32 agree on these to 0.003)
    flat = {}
    for name, truth in (("liver", liver), ("kidney", kidney)):
        c = _deepest(truth)
        z = int(c[0])
        for size in (0, 1):
            eng.first_size = size
            m = eng.predict(image, img.spacing, Prompts(positive=[c], mode="2d", index=z))
            assert not np.delete(m, z, axis=0).any()
            flat[name, size] = dice(m[z], truth[z])
    assert flat["liver", 1] > flat["liver", 0] + 0.02, flat
    assert flat["kidney", 0] > flat["kidney", 1] + 0.2, flat
    with pytest.raises(ValueError, match="first_size"):
        eng.first_size = 3


def test_channels_last_inference_matches_the_plain_networks(phantom):
    image, spacing, lab = phantom
    eng = ClickModelEngine(amp="off")
    assert all(n.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
               for n in eng.nets)
    rng = np.random.default_rng(0)
    crop = image[:16, :32, :32].astype(np.float32)
    pos, neg = np.array([[8.0, 16, 16]]), np.zeros((0, 3))
    prev = (rng.random(crop.shape) > 0.5).astype(np.float32)
    got = eng._forward(crop, pos, neg, prev, np.zeros((0, 2, 3)), flips=((), (0, 1, 2)))
    x = torch.from_numpy(click_channels(crop, pos, neg, prev, np.zeros((0, 2, 3))))[None]
    with torch.inference_mode():
        want = 0
        for w in eng.weights:
            net = load_click_net(w)
            want = want + net(x) + torch.flip(net(torch.flip(x, (2, 3, 4))), (2, 3, 4))
    want = (want / (2 * len(eng.weights)))[0, 0].numpy()
    assert got.flags.c_contiguous and got.shape == crop.shape
    assert np.allclose(got, want, atol=1e-3), float(np.abs(got - want).max())


def _scribble(shape):
    s = np.zeros(shape, np.uint8)
    s[16, 40:44, 30:34] = 1
    return s


def test_scribble_strokes_become_clicks_along_them():
    from napari_medseg.interactive.base import scribble_clicks

    sc = np.zeros((10, 80, 80), np.uint8)
    sc[4, 40, 5:75] = 1  # a straight stroke of 70 voxels (35 mm at 0.5 mm)
    sc[7, 10:13, 10:13] = 2  # a background dab
    pos, neg = scribble_clicks(Prompts(scribbles=sc), (2.0, 0.5, 0.5), step_mm=10.0)
    assert len(neg) == 1 and np.allclose(neg[0], [7, 11, 11])
    assert np.all(sc[tuple(pos.astype(int).T)] == 1)
    assert np.allclose(pos[0], [4, 40, 40], atol=1)  # the stroke's middle first
    along = np.sort(pos[:, 2])
    assert 3 <= len(pos) <= 6 and np.diff(along).max() * 0.5 <= 20.0
    far = np.abs(np.arange(5, 75)[:, None] - pos[:, 2][None]).min(1) * 0.5
    assert far.max() <= 10.0  # every voxel of the stroke within 10 mm of a point
    # a long stroke stops at per_stroke points; in 2D only the prompts' slice counts
    pos, _ = scribble_clicks(Prompts(scribbles=sc), (2.0, 5.0, 5.0), per_stroke=4)
    assert len(pos) == 4
    pos, neg = scribble_clicks(Prompts(scribbles=sc, mode="2d", index=7), (2.0, 0.5, 0.5))
    assert len(pos) == 0 and len(neg) == 1
    assert scribble_clicks(Prompts(positive=[[1, 1, 1]]), (1, 1, 1))[0].shape == (0, 3)


def test_click_model_takes_scribbles_in_2d_and_3d(phantom):
    image, spacing, lab = phantom
    truth = lab == 3
    z = int(np.argmax(truth.sum((1, 2))))
    ys, xs = np.nonzero(truth[z])
    y = int(np.median(ys))
    row = np.nonzero(truth[z, y])[0]
    sc = np.zeros(truth.shape, np.uint8)
    sc[z, y, row.min() + 2:row.max() - 1] = 1  # a stroke across the kidney
    eng = ClickModelEngine()
    m = eng.predict(image, spacing, Prompts(scribbles=sc))
    inter = (m & truth).sum()
    assert 2 * inter / (m.sum() + truth.sum()) > 0.6
    assert m[sc == 1].all()  # the painted voxels are in
    # background paint over the far half of the kidney's slice takes it out, and
    # the object stays
    bg = sc.copy()
    bg[z][truth[z] & (np.arange(truth.shape[1])[:, None] > y + 2)] = 2
    m2 = eng.predict(image, spacing, Prompts(scribbles=bg))
    assert not m2[bg == 2].any() and m2[bg == 1].all() and (m2 & truth).sum() > 0.3 * inter
    # a positive click after the stroke refines the stroke's answer (kept as the
    # previous mask), the paint stays in
    eng = ClickModelEngine()
    eng.predict(image, spacing, Prompts(scribbles=sc))
    first = eng._last[4].sum()
    miss = np.argwhere(truth & ~m)
    click = miss[len(miss) // 2] if len(miss) else np.argwhere(truth)[0]
    m3 = eng.predict(image, spacing, Prompts(positive=[click], scribbles=sc))
    assert m3[tuple(click)] and m3[sc == 1].all() and eng._last[1].shape[0] >= 2
    assert abs(int(m3.sum()) - int(first)) < truth.sum()  # a refinement, not a restart
    # 2D: the answer lies on the stroke's slice
    m4 = ClickModelEngine().predict(image, spacing, Prompts(scribbles=sc, mode="2d", index=z))
    assert m4[z][sc[z] == 1].all() and not np.delete(m4, z, axis=0).any()
    d2 = 2 * (m4[z] & truth[z]).sum() / (m4[z].sum() + truth[z].sum())
    assert d2 > 0.7, d2


def test_click_model_takes_boxes_in_2d_and_3d(phantom):
    image, spacing, lab = phantom
    truth = lab == 3
    eng = ClickModelEngine()
    for mode in ("3d", "2d"):  # the challenge's protocol: a box, then 5 clicks
        run = simulate_clicks(eng, image, spacing, truth, n_clicks=5, box=True, mode=mode)
        assert run.dice[0] > 0.6, (mode, run.dice)  # the box alone finds the kidney
        assert run.dice[-1] >= run.dice[0] - 0.05, (mode, run.dice)
    pts = np.argwhere(truth)
    box3 = np.array([pts.min(0), pts.max(0)], float)
    m = eng.predict(image, spacing, Prompts(boxes=[box3]))
    inside = np.zeros(truth.shape, bool)
    inside[tuple(slice(int(a), int(b) + 1) for a, b in zip(*box3))] = True
    assert m[inside].sum() > 0.6 * truth.sum() and m[~inside].sum() < 0.5 * truth.sum()


def test_click_model_feeds_back_its_last_mask(phantom):
    image, spacing, lab = phantom
    eng = ClickModelEngine()
    kid = np.argwhere(lab == 3).mean(0)
    first = Prompts(positive=[kid])
    m1 = eng.predict(image, spacing, first)
    assert eng._previous(eng._last[0], Prompts(positive=[kid], negative=[[2, 2, 2]]))
    again = eng.predict(image, spacing, Prompts(positive=[kid]))  # unchanged prompts: cached
    assert np.array_equal(m1, again)
    # another image (or prompts that do not extend the last ones) start afresh
    assert eng._previous(eng._last[0], Prompts(positive=[kid + 1])) is None
    m2 = eng.predict(image, spacing, Prompts(positive=[kid], negative=[[2, 2, 2]]))
    assert m2.shape == image.shape and m2.any()


def test_click_model_2d_on_another_axis(phantom):
    image, spacing, lab = phantom
    kid = np.round(np.argwhere(lab == 3).mean(0)).astype(int)
    m = ClickModelEngine().predict(image, spacing,
                                   Prompts(positive=[kid], mode="2d", axis=2, index=kid[2]))
    assert m.shape == image.shape and m[:, :, kid[2]].any()
    assert not np.delete(m, kid[2], axis=2).any()


def test_training_script_writes_loadable_weights(tmp_path):
    from napari_medseg.training.train_click_model import train

    out = tmp_path / "w.pt"
    summary = train(out, steps=3, width=4, n_phantoms=1, cache=tmp_path / "pool.npz",
                    work_dir=tmp_path / "run")
    assert summary["steps"] == 3 and out.is_file() and (tmp_path / "pool.npz").is_file()
    net = load_click_net(out)
    assert isinstance(net, ClickNet) and net.width == 4
    # a run started again with the same folder resumes from its checkpoint
    again = train(out, steps=5, width=4, n_phantoms=1, cache=tmp_path / "pool.npz",
                  work_dir=tmp_path / "run")
    assert again["steps"] == 5 and again["seconds"] < summary["seconds"] + 60


def test_training_averages_examples_into_one_step(tmp_path):
    import torch

    from napari_medseg.training.train_click_model import train

    out = tmp_path / "w.pt"
    first = train(out, steps=1, width=4, n_phantoms=1, cache=tmp_path / "pool.npz", seed=3)
    before = {k: v.clone() for k, v in load_click_net(out).state_dict().items()}
    summary = train(out, steps=2, width=4, n_phantoms=1, cache=tmp_path / "pool.npz",
                    init=out, accumulate=3, seed=4)
    assert first["examples"] == 1 and summary["steps"] == 2 and summary["examples"] == 6
    after = load_click_net(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_training_with_data_workers_is_reproducible(tmp_path):
    import torch

    from napari_medseg.training.train_click_model import train

    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.pt"
        summary = train(out, steps=2, width=4, n_phantoms=1, cache=tmp_path / "pool.npz",
                        seed=7, accumulate=2, workers=1)
        assert summary["steps"] == 2 and summary["examples"] == 4
        runs.append(load_click_net(out).state_dict())
    # the workers' examples follow the run's seed: the same seed, the same weights
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = train(tmp_path / "c.pt", steps=2, width=4, n_phantoms=1,
                  cache=tmp_path / "pool.npz", seed=8, accumulate=2, workers=1)
    assert other["steps"] == 2
    third = load_click_net(tmp_path / "c.pt").state_dict()
    assert any(not torch.equal(runs[0][k], third[k]) for k in third)


def test_training_schedule_can_follow_the_clock(tmp_path):
    import torch

    from napari_medseg.training.train_click_model import train

    with pytest.raises(ValueError, match="schedule"):
        train(tmp_path / "x.pt", steps=1, width=4, n_phantoms=1, schedule="time")
    summary = train(tmp_path / "w.pt", steps=10 ** 6, width=4, n_phantoms=1,
                    cache=tmp_path / "pool.npz", minutes=0.1, schedule="time", lr=1e-3,
                    work_dir=tmp_path / "run")
    assert 1 < summary["steps"] < 10 ** 6
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert float(state["seconds"]) >= 6.0
    # the cosine decay ran out with the time, not with the million steps (after the
    # warm-up's share alone the rate would be 1e-3 * warm)
    warm = min(1.0, summary["steps"] / 200)
    assert state["opt"]["param_groups"][0]["lr"] < 0.2 * 1e-3 * warm


def test_inside_cubes_see_mostly_the_object():
    from napari_medseg.training.train_click_model import _deep_click, _inside_cube

    z, y, x = np.mgrid[:40, :80, :80]
    ball = ((z - 20) * 2.0) ** 2 + (y - 40.0) ** 2 + (x - 40.0) ** 2 < 30.0 ** 2
    sp = (2.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(20):
        click, depth = _deep_click(ball, sp, rng)
        lo, hi = _inside_cube(click, depth, sp, ball.shape, rng)
        assert np.all(lo <= click) and np.all(click < hi)
        fractions.append(ball[tuple(slice(a, b) for a, b in zip(lo, hi))].mean())
    # cubes of 1.0-1.8 times the click's depth: mostly object, some edge seen
    assert min(fractions) > 0.5 and max(fractions) > 0.95 and min(fractions) < 0.95


def test_synthetic_objects_cover_shapes_and_appearances():
    from napari_medseg.training.synth import random_label_map, synth_example

    rng = np.random.default_rng(3)
    lab = random_label_map((16, 32, 32), rng)
    assert lab.shape == (16, 32, 32) and lab.min() >= 1 and len(np.unique(lab)) >= 3
    sizes, cts = [], 0
    for _ in range(12):
        ex = synth_example((16, 32, 32), rng)
        if ex is None:
            continue
        img, mask, click = ex
        assert img.shape == mask.shape and img.dtype == np.float32 and np.isfinite(img).all()
        assert 20 <= mask.sum() < 0.7 * mask.size and click is None
        sizes.append(int(mask.sum()))
        cts += int(img.min() < -50)  # Hounsfield-like examples
    assert len(sizes) >= 6 and max(sizes) > 4 * min(sizes) and cts >= 1
    # centred targets: the structure under the grid's centre, whatever its size
    filled = 0
    for _ in range(8):
        ex = synth_example((16, 32, 32), rng, centre=True)
        if ex is None:
            continue
        img, mask, click = ex
        assert mask[tuple(np.round(click).astype(int))]
        assert np.abs(click - np.array([8, 16, 16])).max() <= 1
        filled += int(mask.sum() > 0.5 * mask.size)
    assert filled >= 1


def _need_sam():
    from napari_medseg.interactive.sam import sam_available

    if not sam_available():
        pytest.skip("segment-anything is not installed (pip install napari-medseg[sam])")


def _tiny_sam(tmp_path):
    from napari_medseg.interactive.sam import build_sam

    cfg = {"image_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2,
           "global_attn_indexes": [1], "window_size": 4, "prompt_embed_dim": 32,
           "mlp_dim": 64}
    torch.manual_seed(0)
    sam = build_sam(cfg)
    path = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    (tmp_path / "tiny_sam.json").write_text(json.dumps(cfg))
    return path


def test_sam_adapter_plumbing_with_random_weights(tmp_path, phantom):
    _need_sam()
    image, spacing, lab = phantom
    eng = make_engine("Segment Anything", _tiny_sam(tmp_path))
    kid = np.argwhere(lab == 3).mean(0)
    m2 = eng.predict(image, spacing, Prompts(positive=[kid], mode="2d"))
    z = int(round(kid[0]))
    assert m2.shape == image.shape and not np.delete(m2, z, axis=0).any()
    box = [[kid - [0, 8, 8], kid + [0, 8, 8]]]
    m3 = eng.predict(image, spacing, Prompts(positive=[kid], boxes=box))
    assert m3.shape == image.shape and m3.dtype == bool
    assert len(eng._emb) >= 1  # slice embeddings are cached
    n = len(eng._emb)
    eng.predict(image, spacing, Prompts(positive=[kid], mode="2d"))
    assert len(eng._emb) == n


def test_sam_adapter_rejects_bad_checkpoints(tmp_path):
    _need_sam()
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(2)}, bad)
    with pytest.raises(MedSegError, match="known size"):
        make_engine("Segment Anything", bad).sam
    with pytest.raises(MedSegError, match="not found"):
        make_engine("Segment Anything", tmp_path / "missing.pth").sam


@pytest.mark.skipif(
    not os.environ.get("NAPARI_MEDSEG_NNINTERACTIVE_MODEL"),
    reason="opt-in check with published nnInteractive weights: set "
           "NAPARI_MEDSEG_NNINTERACTIVE_MODEL to their folder (the plumbing is tested with "
           "a random-weights model in test_interactive_adapters.py)")
def test_nninteractive_adapter(phantom):
    pytest.importorskip("nnInteractive")
    image, spacing, lab = phantom
    eng = make_engine("nnInteractive", os.environ["NAPARI_MEDSEG_NNINTERACTIVE_MODEL"])
    kid = np.argwhere(lab == 3).mean(0)
    m = eng.predict(image, spacing, Prompts(positive=[kid]))
    assert m.shape == image.shape and m.any()


def test_nninteractive_adapter_explains_missing_model(tmp_path):
    eng = make_engine("nnInteractive", tmp_path)
    with pytest.raises(MedSegError, match="nnInteractive"):
        eng.session


@pytest.fixture(scope="module")
def real_ct():
    """The shared real abdominal CT: ``(HU array, spacing, reference label ids)``."""
    if not (REAL / "ct_abdomen_dicom").is_dir():
        pytest.skip("the shared real scans (../shared/realdata) are not here")
    from napari_medseg.io import read_volume

    img = read_volume(REAL / "ct_abdomen_dicom")
    ref = read_volume(REAL / "ct_abdomen_dicom_labels.nii.gz")
    return np.asarray(img.data, np.float32), img.spacing, np.asarray(ref.data)


def test_default_engine_three_clicks_on_a_real_liver(real_ct):
    import napari_medseg.interactive as interactive

    image, spacing, ref = real_ct
    engine = make_engine(getattr(interactive, "DEFAULT_ENGINE", "click model"))
    run = simulate_clicks(engine, image, spacing, ref == 5, n_clicks=3, rule="largest")
    assert run.dice[-1] >= 0.8, run.dice


def test_a_stroke_along_a_real_liver_takes_it_without_flooding(real_ct):
    """One stroke along the medial axis of the real liver's largest slice: its
    points, given to the network one at a time, are bounded as clicks are.
    Unbounded, the later points flooded the liver's neighbours (1.24 M voxels,
    Dice 0.46); bounded, Dice 0.86."""
    from napari_medseg.interactive.simulate import dice, scribble_along

    image, spacing, ref = real_ct
    liver = ref == 5
    paint, _ = scribble_along(liver, spacing)
    m = ClickModelEngine().predict(image, spacing, Prompts(scribbles=paint))
    assert m[paint == 1].all()
    assert m.sum() < 1.5 * liver.sum() and dice(m, liver) >= 0.8, (m.sum(), dice(m, liver))


def test_a_wider_first_click_takes_a_real_liver_whole(real_ct):
    from napari_medseg.interactive.simulate import dice

    image, spacing, ref = real_ct
    liver = ref == 5
    eng = make_engine("click model")
    # the benchmark's first click: the liver's deepest voxel in mm
    click = Prompts(positive=[next_click(np.zeros_like(liver), liver, spacing, "largest")[0]])
    small = dice(eng.predict(image, spacing, click), liver)
    eng.first_size = 1
    wide = dice(eng.predict(image, spacing, click), liver)
    assert small < 0.3 and wide > 0.55, (small, wide)


def _two_region_image(rng):
    """A noisy image: a bright ball and a darker slab in a mid-grey body, in air."""
    z, y, x = np.mgrid[:24, :48, :48]
    img = np.full((24, 48, 48), -1000.0, np.float32)
    body = (y - 24) ** 2 + (x - 24) ** 2 < 22 ** 2
    img[body] = 40.0
    ball = ((z - 12) ** 2 * 4 + (y - 20) ** 2 + (x - 18) ** 2) < 8 ** 2
    img[ball] = 160.0
    slab = body & (x > 32) & (np.abs(z - 12) < 8)
    img[slab] = -60.0
    return img + rng.normal(0, 12, img.shape).astype(np.float32), ball, slab


def test_pseudo_objects_follow_the_image_edges():
    from napari_medseg.training.pseudo_objects import noise_sigma, pseudo_objects

    rng = np.random.default_rng(0)
    img, ball, slab = _two_region_image(rng)
    assert 8 < noise_sigma(img) < 16  # the added noise (12), not the air/body jump
    objs, classes = pseudo_objects(img, (2.0, 1.0, 1.0), rng, segment_mm=5, merge_sigmas=2)
    assert objs.shape == img.shape and classes[0] == 0 and len(classes) == objs.max() + 1
    assert set(np.unique(classes[1:])) <= {300, 301, 302}
    for truth in (ball, slab):  # the object under each region's centre is that region
        c = tuple(int(v) for v in np.mean(np.argwhere(truth), 0).round())
        obj = objs == objs[c]
        assert objs[c] > 0
        dice = 2 * (obj & truth).sum() / (obj.sum() + truth.sum())
        assert dice > 0.8, dice
    assert not objs[img < -500].any()  # nothing in the air around the body


def test_training_takes_pseudo_objects_on_real_images(tmp_path):
    import nibabel as nib

    from napari_medseg.training.pseudo_objects import TRAINING_IMAGES, build_real_pool
    from napari_medseg.training.train_click_model import train

    rng = np.random.default_rng(1)
    img, _, _ = _two_region_image(rng)
    rel = "brain_t1_aseg/t1.nii.gz"
    assert (rel, "mr") in TRAINING_IMAGES
    (tmp_path / "real" / "brain_t1_aseg").mkdir(parents=True)
    nib.save(nib.Nifti1Image(img.transpose(2, 1, 0), np.diag([1.0, 1.0, 2.0, 1.0])),
             tmp_path / "real" / rel)
    # labels beside the image are never read: a broken one cannot matter
    (tmp_path / "real" / "brain_t1_aseg" / "labels.nii.gz").write_bytes(b"not a nifti")
    pool = build_real_pool(tmp_path / "real", np.random.default_rng(2), maps_per_image=2)
    assert len(pool) == 2 and pool[0][0].shape == img.shape
    assert np.allclose(pool[0][1], (2.0, 1.0, 1.0))
    # a cached pool is the same pool, for the same folder and generator state only
    cache = tmp_path / "real_pool.npz"
    r1, r2 = np.random.default_rng(2), np.random.default_rng(2)
    built = build_real_pool(tmp_path / "real", r1, maps_per_image=2, cache=cache)
    assert cache.is_file()
    read = build_real_pool(tmp_path / "real", r2, maps_per_image=2, cache=cache)
    assert r1.random() == r2.random()  # the generator ends where building leaves it
    assert len(built) == len(read) == len(pool)
    for a, b, c in zip(pool, built, read):
        assert all(np.array_equal(x, y) and np.array_equal(y, z) for x, y, z in zip(a, b, c))
    other = build_real_pool(tmp_path / "real", np.random.default_rng(3), maps_per_image=2,
                            cache=cache)
    assert not np.array_equal(other[0][2], built[0][2])
    out = tmp_path / "w.pt"
    summary = train(out, steps=3, width=4, n_phantoms=0, real_dir=tmp_path / "real",
                    real_share=1.0, synth_share=0.0, real_cache=tmp_path / "rc.npz")
    assert (tmp_path / "rc.npz").is_file()
    assert summary["steps"] == 3 and isinstance(load_click_net(out), ClickNet)


def test_click_model_honours_a_click_its_refinement_left_out(real_ct):
    # the real stomach: gas, fluid and wall. The network answers the click on
    # its wall, then leaves out the fluid under the next click; without the
    # engine's fallback the simulated user clicked the same voxel four times
    image, spacing, ref = real_ct
    engine = ClickModelEngine()
    run = simulate_clicks(engine, image, spacing, ref == 6, n_clicks=4, rule="largest")
    clicks = [tuple(p) for p in run.prompts.positive]
    assert len(set(clicks)) == len(clicks), clicks
    mask = engine.predict(image, spacing, run.prompts)
    for p in run.prompts.positive:
        assert mask[tuple(np.round(p).astype(int))], p
    assert run.dice[-1] > 0.3, run.dice


def test_a_real_ventricle_grows_past_its_box_with_clicks():
    """The challenge's box + clicks on the real T1 MR's left lateral ventricle (aseg
    label 4): the box on its largest axial slice is far narrower than the ventricle's
    horns on other slices; two corrective clicks there must take them in (bounds rule
    1 stretches the box to the clicks: 0.43 -> 0.85 where the box held them to 0.61)."""
    path = REAL / "brain_t1_aseg"
    if not (path / "t1.nii.gz").is_file() or not (path / "labels.nii.gz").is_file():
        pytest.skip("the shared real scans (../shared/realdata) are not here")
    from napari_medseg.io import read_volume

    img = read_volume(path / "t1.nii.gz")
    ventricle = np.asarray(read_volume(path / "labels.nii.gz", is_label=True).data) == 4
    run = simulate_clicks(make_engine("click model"), np.asarray(img.data, np.float32),
                          img.spacing, ventricle, n_clicks=2, box=True, rule="largest")
    assert run.dice[0] < 0.6 and run.dice[-1] >= 0.75, run.dice
