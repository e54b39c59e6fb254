"""Interactive engines: prompts, the classical engine, click simulation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medseg.errors import Cancelled, MedSegError
from napari_medseg.interactive import Prompts, make_engine
from napari_medseg.interactive.base import roi_around
from napari_medseg.interactive.classical import ClassicalEngine
from napari_medseg.interactive.simulate import dice, next_click, simulate_clicks

SPACING = (2.0, 1.0, 1.0)


def _ellipsoid(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


@pytest.fixture(scope="module")
def scene():
    """Blurred noisy image: a bright organ touching a same-intensity twin, a dark lesion."""
    rng = np.random.default_rng(1)
    shape = (24, 64, 64)
    organ = _ellipsoid(shape, (12, 32, 22), (8, 18, 14))
    twin = _ellipsoid(shape, (12, 32, 46), (7, 12, 13)) & ~organ
    lesion = _ellipsoid(shape, (12, 30, 20), (3, 6, 6))
    img = np.full(shape, 20.0, np.float32)
    img[organ] = 100
    img[twin] = 100
    img[lesion] = 40
    img = ndi.gaussian_filter(img, 0.8) + rng.normal(0, 8, shape).astype(np.float32)
    return img, organ & ~lesion, twin, lesion


def test_prompts_validate_bad_input():
    shape = (10, 20, 20)
    with pytest.raises(MedSegError, match="no prompts"):
        Prompts().validate(shape)
    with pytest.raises(MedSegError, match="only negative"):
        Prompts(negative=[[1, 2, 3]]).validate(shape)
    with pytest.raises(MedSegError, match="outside the image"):
        Prompts(positive=[[1, 2, 30]]).validate(shape)
    with pytest.raises(MedSegError, match="scribble layer has shape"):
        Prompts(scribbles=np.ones((5, 5, 5), np.uint8)).validate(shape)
    with pytest.raises(MedSegError, match=r"\(N, 3\)"):
        Prompts(positive=[[1, 2]])
    Prompts(positive=[[1, 2, 3]], boxes=[[[1, 2, 3], [1, 8, 9]]]).validate(shape)


def test_engines_refuse_2d_image_and_other_grid(scene):
    img = scene[0]
    eng = ClassicalEngine()
    with pytest.raises(MedSegError, match="3D"):
        eng.predict(img[0], SPACING[1:], Prompts(positive=[[0, 5, 5]]))
    scribbles = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(MedSegError, match="scribble"):
        eng.predict(img, SPACING, Prompts(positive=[[5, 5, 5]], scribbles=scribbles))
    with pytest.raises(MedSegError, match="unknown engine"):
        make_engine("magic")
    with pytest.raises(MedSegError, match="checkpoint"):
        make_engine("Segment Anything")


def test_roi_covers_points_and_stays_inside():
    pts = np.array([[2.0, 3.0, 4.0], [5.0, 90.0, 7.0]])
    roi = roi_around(pts, (10, 100, 50), size=(8, 32, 32), margin=4)
    for s, lo, hi, n in zip(roi, pts.min(0), pts.max(0), (10, 100, 50)):
        assert 0 <= s.start <= lo and hi < s.stop <= n
    assert roi[2].stop - roi[2].start == 32


def test_one_click_segments_the_organ_in_3d(scene):
    img, organ, twin, lesion = scene
    eng = ClassicalEngine()
    mask = eng.predict(img, SPACING, Prompts(positive=[[12, 32, 30]]))
    assert mask.dtype == bool and mask.shape == img.shape
    assert dice(mask, organ | twin) > 0.8  # the twin touches the organ
    assert (mask & lesion).sum() < 0.2 * lesion.sum()  # the lesion is another structure


def test_negative_click_splits_touching_structures(scene):
    img, organ, twin, _ = scene
    eng = ClassicalEngine()
    run = simulate_clicks(eng, img, SPACING, organ, n_clicks=3)
    assert len(run.prompts.negative) >= 1
    assert run.dice[-1] > run.dice[0] + 0.1 and run.dice[-1] > 0.8


def test_lesion_and_2d_mode(scene):
    img, _, _, lesion = scene
    eng = ClassicalEngine()
    run = simulate_clicks(eng, img, SPACING, lesion, n_clicks=3)
    assert run.dice[-1] > 0.7
    run2 = simulate_clicks(eng, img, SPACING, lesion, n_clicks=3, mode="2d", index=12)
    assert run2.dice[-1] > 0.85
    prompts = Prompts(positive=[[12, 30, 20]], mode="2d", index=12)
    mask = eng.predict(img, SPACING, prompts)
    assert mask[12].any() and not mask[11].any() and not mask[13].any()
    # a click on another slice does not count in 2D mode
    with pytest.raises(MedSegError, match="slice 11"):
        eng.predict(img, SPACING, Prompts(positive=[[12, 30, 20]], mode="2d", index=11))


def test_box_and_scribbles(scene):
    img, _, _, lesion = scene
    eng = ClassicalEngine()
    box = np.array([[[12, 23, 13], [12, 37, 27]]], float)
    mask = eng.predict(img, SPACING, Prompts(boxes=box, mode="2d", index=12))
    assert dice(mask[12], lesion[12]) > 0.8
    sc = np.zeros(img.shape, np.uint8)
    sc[12, 28:33, 18:23] = 1
    sc[12, 10:12, 10:40] = 2
    mask = eng.predict(img, SPACING, Prompts(scribbles=sc))
    assert dice(mask, lesion) > 0.75


def test_cancel_stops_the_update(scene):
    img = scene[0]
    with pytest.raises(Cancelled):
        ClassicalEngine().predict(img, SPACING, Prompts(positive=[[12, 32, 30]]),
                                  cancel=lambda: True)


def test_next_click_goes_to_the_largest_error():
    truth = np.zeros((20, 20), bool)
    truth[2:12, 2:12] = True
    pred = np.zeros_like(truth)
    p, positive = next_click(pred, truth)
    assert positive and 6 <= p[0] <= 7 and 6 <= p[1] <= 7
    pred = truth.copy()
    pred[13:20, 13:20] = True  # a spill-over is the largest error
    pred[2:12, 2] = False  # a thin miss is smaller
    p, positive = next_click(pred, truth)
    assert not positive and p[0] >= 13 and p[1] >= 13
    assert next_click(truth, truth) is None


def _ribbon_scene():
    """A thin bright curved shell (3 voxels thick) around a core, in a dark background."""
    rng = np.random.default_rng(3)
    shape = (32, 64, 64)
    outer = _ellipsoid(shape, (16, 32, 32), (13, 26, 26))
    inner = _ellipsoid(shape, (16, 32, 32), (10, 23, 23))
    img = np.full(shape, 10.0, np.float32)
    img[outer] = 120
    img[inner] = 60
    img = ndi.gaussian_filter(img, 0.7) + rng.normal(0, 5, shape).astype(np.float32)
    return img, outer & ~inner, outer


def test_thin_structure_is_not_opened_away():
    img, ribbon, outer = _ribbon_scene()
    x = 1 + int(np.argmax(ribbon[16, 32]))  # on the ribbon's side
    mask = ClassicalEngine().predict(img, (1.0, 1.0, 1.0), Prompts(positive=[[16, 32, x]]))
    assert (mask & ribbon).sum() > 0.9 * ribbon.sum()  # all around, not just near the click
    assert (mask & ~outer).sum() < 0.3 * ribbon.sum()  # one blurred voxel of edge


def test_negative_click_never_removes_the_far_side(scene):
    img, organ, twin, lesion = scene
    eng = ClassicalEngine()
    pos = [[12, 32, 30]]
    first = eng.predict(img, SPACING, Prompts(positive=pos))
    far = organ & (np.arange(64)[None, None, :] < 14)
    assert (first & far).sum() > 0.8 * far.sum()
    # background, the same-intensity twin, the dark lesion inside the organ
    for neg in ([12, 5, 5], [12, 32, 50], [12, 60, 60], [12, 30, 20]):
        mask = eng.predict(img, SPACING, Prompts(positive=pos, negative=[neg]))
        assert (mask & far).sum() > 0.9 * (first & far).sum(), neg
        assert dice(mask, organ) > 0.75, neg
        assert not mask[tuple(neg)], neg


def test_two_intensity_object_after_clicks_in_both_parts():
    """A kidney-like object: a medulla of one intensity inside a cortex of another."""
    rng = np.random.default_rng(5)
    shape = (32, 80, 64)
    kidney = _ellipsoid(shape, (16, 40, 32), (12, 30, 20))
    medulla = _ellipsoid(shape, (16, 40, 32), (8, 22, 13))
    img = np.full(shape, -100.0, np.float32)
    img[kidney] = 175
    img[medulla] = 110
    img = ndi.gaussian_filter(img, 0.8) + rng.normal(0, 6, shape).astype(np.float32)
    eng = ClassicalEngine()
    pos = [[16, 40, 32]]
    one = eng.predict(img, SPACING, Prompts(positive=pos))
    assert dice(one, medulla) > 0.8  # one click: the part of that intensity
    pos.append([16, 40, 15])  # in the cortex, on the side
    both = eng.predict(img, SPACING, Prompts(positive=pos))
    assert dice(both, kidney) > 0.85  # the cortex all around, not only near that click
    far = kidney & ~medulla & (np.arange(80)[None, :, None] > 60)
    assert (both & far).sum() > 0.8 * far.sum()


def _cortex_scene(thickness=3.0, blur=0.6, bias=0.1):
    """A folded gray-matter-like ribbon between bright white matter and dark
    CSF, high contrast, with a smooth multiplicative bias field (head MR)."""
    rng = np.random.default_rng(7)
    shape = (40, 64, 64)
    z, y, x = np.ogrid[:40, :64, :64]
    r = np.sqrt((z - 20.0) ** 2 + (y - 32) ** 2 + (x - 32) ** 2)
    fold = 2 * np.sin(6 * np.arctan2(y - 32, x - 32)) * np.cos((z - 20) / 4)
    wm_r = 17 - thickness + fold
    img = np.full(shape, 30.0, np.float32)
    img[r < 19] = 160
    ribbon = (r < 17) & (r >= wm_r)
    img[ribbon] = 520
    img[(r < 17) & (r < wm_r)] = 860
    img = ndi.gaussian_filter(img, blur) * np.exp(bias * np.sin(x / 15.0) * np.cos(y / 19.0))
    img = img + rng.normal(0, 20, shape).astype(np.float32)
    return img.astype(np.float32), ribbon


def test_high_contrast_thin_ribbon_keeps_its_shape():
    """Smoothing for noise must not blur a thin, high-contrast ribbon away."""
    img, ribbon = _cortex_scene()
    run = simulate_clicks(ClassicalEngine(), img, (1.0, 1.0, 1.0), ribbon, n_clicks=1)
    assert run.dice[0] > 0.9


def test_growths_kept_between_clicks_give_the_same_mask(scene):
    """An update reusing the previous updates' growths equals a fresh engine's."""
    img, organ, _, _ = scene
    eng = ClassicalEngine()
    run = simulate_clicks(eng, img, SPACING, organ, n_clicks=4)
    assert eng._growths.hits > 0  # later clicks did reuse the first click's growth
    again = eng.predict(img, SPACING, run.prompts)
    fresh = ClassicalEngine().predict(img, SPACING, run.prompts)
    assert np.array_equal(again, fresh)
    shifted = img + np.float32(5.0)  # another image: nothing reused from the first
    eng.predict(shifted, SPACING, run.prompts)
    assert np.array_equal(eng.predict(shifted, SPACING, run.prompts),
                          ClassicalEngine().predict(shifted, SPACING, run.prompts))


def test_2d_update_after_3d_updates_equals_a_fresh_engines(scene):
    """A slice is smoothed in-plane only, whatever 3D blocks the engine kept."""
    img, organ, _, _ = scene
    eng = ClassicalEngine()
    simulate_clicks(eng, img, SPACING, organ, n_clicks=2)  # keeps 3D-smoothed blocks
    prompts = Prompts(positive=[[12, 32, 22]], negative=[[12, 32, 44]], mode="2d", index=12)
    np.testing.assert_array_equal(eng.predict(img, SPACING, prompts),
                                  ClassicalEngine().predict(img, SPACING, prompts))


@pytest.mark.parametrize("noise,delta", [(4.0, 6.0), (4.0, 12.0), (8.0, 12.0)])
def test_negative_click_on_a_slightly_brighter_neighbour_only_splits(noise, delta):
    """A negative click on a touching neighbour a little brighter than the
    object (same tissue for the engine: nearer the object than a quarter of
    the way to the background) marks a watershed split; it must not also
    carve every voxel nearer its intensity out of the object (which riddles
    the object with noise-shaped holes around the click)."""
    rng = np.random.default_rng(1)
    shape = (24, 64, 64)
    organ = _ellipsoid(shape, (12, 32, 22), (8, 18, 14))
    twin = _ellipsoid(shape, (12, 32, 46), (7, 12, 13)) & ~organ
    img = np.full(shape, 20.0, np.float32)
    img[organ] = 100
    img[twin] = 100 + delta
    img = ndi.gaussian_filter(img, 0.8) + rng.normal(0, noise, shape).astype(np.float32)
    mask = ClassicalEngine().predict(
        img, SPACING, Prompts(positive=[[12, 32, 22]], negative=[[12, 32, 50]]))
    assert (mask & twin).sum() < 0.05 * twin.sum()
    assert (organ & ~mask).sum() < 0.05 * organ.sum()  # the carving lost 8-11 %
    assert dice(mask, organ) > 0.955


@pytest.mark.parametrize("thickness,blur", [(2.0, 0.6), (4.0, 1.0), (3.0, 1.0), (4.0, 1.4)])
def test_later_clicks_at_a_ribbons_edge_never_undo_it(thickness, blur):
    """Simulated clicks on a cortex-like ribbon land on its blurred edge; each
    may only move the edge there, never throw away the ribbon grown so far:
    a positive click's blend intensity taken as an object class did, and so
    did a watershed split from a negative click on the edge between the
    ribbon and the white matter flooding the whole ribbon (every voxel of a
    thin ribbon is edge) from a low-gradient spot."""
    img, ribbon = _cortex_scene(thickness=thickness, blur=blur)
    run = simulate_clicks(ClassicalEngine(), img, (1.0, 1.0, 1.0), ribbon, n_clicks=5)
    assert run.dice[0] > 0.9
    assert min(run.dice) > run.dice[0] - 0.03, run.dice


def test_thin_shell_is_trimmed_to_its_own_intensity():
    """Subarachnoid CSF in the head phantom: a 2 mm layer between the skull's
    inner table and the cortex. In the smoothed image the growth also takes
    the skull's thin dark blends; once negative clicks are in, the shell is
    trimmed to its own intensity in the raw image (the side towards the
    darker skull has no background class to bound it)."""
    from napari_medseg.core.phantom import make_head_mr

    img, lab = make_head_mr(seed=0)
    image = np.asarray(img.data, np.float32)
    cc, _ = ndi.label(np.asarray(lab.data) == 1)
    csf = cc == np.argmax(np.bincount(cc.ravel())[1:]) + 1  # the shell, not the ventricles
    plain = simulate_clicks(ClassicalEngine(thin_spread=0), image, img.spacing, csf,
                            n_clicks=3)
    trimmed = simulate_clicks(ClassicalEngine(), image, img.spacing, csf, n_clicks=3)
    assert len(trimmed.prompts.negative) >= 1
    assert plain.dice[-1] < 0.62
    assert trimmed.dice[-1] > plain.dice[-1] + 0.03
    assert trimmed.dice[0] == plain.dice[0]  # one click: nothing to trim yet
