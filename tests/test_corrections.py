"""Correction operations on small anisotropic arrays, checked against geometry."""

import numpy as np
import pytest

from napari_medseg.core.corrections import (ellipsoid, fill_between_slices, fill_holes,
                                            keep_largest, logical_op, margin, merge,
                                            relabel, remove_islands, slice_range, smooth,
                                            split_components, threshold_paint)
from napari_medseg.errors import Cancelled, MedSegError

SPACING = (2.0, 0.8, 0.8)  # mm, (Z, Y, X)


def _mm_grid(shape, spacing, centre_vox):
    zz, yy, xx = np.indices(shape, dtype=float)
    c = np.asarray(centre_vox, float)
    return np.sqrt(((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2
                   + ((xx - c[2]) * spacing[2]) ** 2)


def _sphere(radius_mm, shape=(24, 60, 60), spacing=SPACING, label=1):
    d = _mm_grid(shape, spacing, [(s - 1) / 2 for s in shape])
    return (d <= radius_mm).astype(np.uint8) * label, d


@pytest.mark.parametrize("m", [2.0, -2.0])
def test_margin_on_sphere_matches_analytic_volume(m):
    R, sp = 10.0, (1.0, 0.6, 0.6)
    lab, d = _sphere(R, shape=(30, 50, 50), spacing=sp)
    out = margin(lab, 1, margin_mm=m, spacing=sp).result(lab)
    vol = (out == 1).sum() * np.prod(sp)
    assert vol == pytest.approx(4 / 3 * np.pi * (R + m) ** 3, rel=0.06)
    assert lab.sum() == _sphere(R, shape=(30, 50, 50), spacing=sp)[0].sum()  # input kept


@pytest.mark.parametrize("m", [2.0, -2.0])
def test_margin_is_sandwiched_between_balls_on_anisotropic_grid(m):
    # growing the discrete ball of radius R by m gives all voxels within R + m
    # of the centre, minus at most half a voxel diagonal (and the reverse for shrinking)
    R = 10.0
    lab, d = _sphere(R)
    out = margin(lab, 1, margin_mm=m, spacing=SPACING).result(lab)
    h = np.sqrt(sum(s * s for s in SPACING)) / 2
    assert np.all(out[d <= R + m - h] == 1)
    assert np.all(out[d > R + m + (h if m < 0 else 0)] == 0)


def test_margin_equals_brute_force_nearest_voxel_distance():
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(3)
    lab = (rng.random((8, 12, 12)) > 0.93).astype(np.uint8)
    sp = np.array((2.5, 0.7, 0.9))
    pts = np.argwhere(np.ones(lab.shape, bool)) * sp
    tree = cKDTree(np.argwhere(lab == 1) * sp)
    dist, _ = tree.query(pts)
    expected = (dist <= 1.75).reshape(lab.shape)
    out = margin(lab, 1, margin_mm=1.75, spacing=sp).result(lab)
    np.testing.assert_array_equal(out == 1, expected)
    tree_out = cKDTree(np.argwhere(lab == 0) * sp)
    dist, _ = tree_out.query(pts)
    expected = (lab == 1) & (dist > 1.05).reshape(lab.shape)
    out = margin(lab, 1, margin_mm=-1.05, spacing=sp).result(lab)
    np.testing.assert_array_equal(out == 1, expected)


def test_margin_is_exact_distance_along_each_axis():
    lab = np.zeros((11, 11, 11), np.uint8)
    lab[5, 5, 5] = 1
    out = margin(lab, 1, margin_mm=4.0, spacing=(2.0, 1.0, 0.5)).result(lab)
    assert np.flatnonzero(out[:, 5, 5]).tolist() == [3, 4, 5, 6, 7]      # 2 voxels of 2 mm
    assert np.flatnonzero(out[5, :, 5]).tolist() == list(range(1, 10))   # 4 voxels of 1 mm
    assert np.flatnonzero(out[5, 5, :]).tolist() == list(range(0, 11))   # 8+ voxels of 0.5


def test_margin_does_not_overwrite_other_classes_unless_asked():
    lab = np.zeros((1, 1, 7), np.uint8)
    lab[0, 0, 3] = 1
    lab[0, 0, 4] = 2
    assert margin(lab, 1, margin_mm=1.0).result(lab)[0, 0].tolist() == [0, 0, 1, 1, 2, 0, 0]
    assert margin(lab, 1, margin_mm=1.0, overwrite=True).result(lab)[0, 0].tolist() == \
        [0, 0, 1, 1, 1, 0, 0]


def test_ellipsoid_footprint_is_physical_sphere():
    fp = ellipsoid(2.0, (2.0, 0.8, 0.8))
    assert fp.shape == (3, 5, 5)
    d = _mm_grid(fp.shape, (2.0, 0.8, 0.8), (1, 2, 2))
    np.testing.assert_array_equal(fp, d <= 2.0)


def test_remove_islands_uses_mm3():
    lab = np.zeros((10, 20, 20), np.uint8)
    lab[1:3, 1:4, 1:4] = 1       # 18 voxels * 1.28 mm3 = 23.04 mm3
    lab[5:9, 10:16, 10:16] = 1   # 144 voxels = 184.3 mm3
    lab[8, 1, 18] = 2            # one voxel of class 2 = 1.28 mm3
    edit = remove_islands(lab, 1, min_volume_mm3=30.0, spacing=SPACING)
    out = edit.result(lab)
    assert (out == 1).sum() == 144 and (out == 2).sum() == 1
    assert edit.info["islands_removed"] == 1
    assert edit.region == (slice(1, 3), slice(1, 4), slice(1, 4))
    keep = remove_islands(lab, 1, min_volume_mm3=23.0, spacing=SPACING).result(lab)
    assert (keep == 1).sum() == 162
    all_classes = remove_islands(lab, None, min_volume_mm3=30.0, spacing=SPACING).result(lab)
    assert (all_classes == 2).sum() == 0 and (all_classes == 1).sum() == 144


def test_keep_largest_and_split():
    lab = np.zeros((6, 12, 12), np.uint8)
    lab[0:2, 0:2, 0:2] = 3        # 8
    lab[3:6, 5:10, 5:10] = 3      # 75
    lab[0, 10, 10] = 3            # 1
    lab[5, 0, 0] = 7
    out = keep_largest(lab, 3).result(lab)
    assert (out == 3).sum() == 75 and (out == 7).sum() == 1
    edit = split_components(lab, 3)
    out = edit.result(lab)
    assert edit.info["new_labels"] == [8, 9]
    assert (out == 3).sum() == 75 and (out == 8).sum() == 8 and (out == 9).sum() == 1


def test_split_refuses_ids_beyond_dtype():
    lab = np.zeros((1, 1, 5), np.uint8)
    lab[0, 0, [0, 2, 4]] = 1
    lab[0, 0, 1] = 255
    with pytest.raises(MedSegError):
        split_components(lab, 1)


def test_fill_holes_3d_and_per_slice():
    lab, d = _sphere(8.0)
    lab[d <= 4.0] = 0                       # closed cavity
    out = fill_holes(lab, 1).result(lab)
    np.testing.assert_array_equal(out, _sphere(8.0)[0])
    tube = np.zeros((8, 15, 15), np.uint8)
    tube[:, 3:12, 3:12] = 2
    tube[:, 6:9, 6:9] = 0                   # open at both ends: no 3D hole
    assert fill_holes(tube, 2).empty
    out = fill_holes(tube, 2, mode="slice").result(tube)
    assert (out == 2).sum() == 8 * 81
    other = tube.copy()
    other[:, 7, 7] = 5
    out = fill_holes(other, 2, mode="slice").result(other)
    assert (out == 5).sum() == 8                   # other classes kept by default
    out = fill_holes(other, 2, mode="slice", overwrite=True).result(other)
    assert (out == 5).sum() == 0


def test_smoothing_opening_closing_median():
    lab = np.zeros((9, 30, 30), np.uint8)
    lab[2:7, 5:25, 5:25] = 1
    spike = lab.copy()
    spike[4, 15, 25:29] = 1                  # a one-voxel thin spike
    out = smooth(spike, 1, method="opening", radius_mm=1.6, spacing=SPACING).result(spike)
    assert out[4, 15, 26:29].sum() == 0       # the part thinner than the disc goes
    assert out[4, 15, 10] == 1
    gap = lab.copy()
    gap[2:7, 14, 5:25] = 0                   # a one-voxel (0.8 mm) crack
    out = smooth(gap, 1, method="closing", radius_mm=1.6, spacing=SPACING).result(gap)
    assert out[2:7, 14, 6:24].all()
    noise = lab.copy()
    noise[4, 2, 2] = 1                       # isolated voxel
    noise[4, 10, 10] = 0                     # single-voxel dent
    out = smooth(noise, 1, method="median", radius_mm=1.6, spacing=SPACING).result(noise)
    assert out[4, 2, 2] == 0 and out[4, 10, 10] == 1
    assert smooth(lab, 1, method="median", radius_mm=0.5, spacing=SPACING).empty


def test_fill_between_slices_interpolates_disc_radius():
    shape = (11, 64, 64)
    sp = (3.0, 0.5, 0.5)
    lab = np.zeros(shape, np.uint8)
    yy, xx = np.indices(shape[1:])
    r2 = ((yy - 31.5) * 0.5) ** 2 + ((xx - 31.5) * 0.5) ** 2
    lab[0][r2 <= 4.0 ** 2] = 4
    lab[10][r2 <= 12.0 ** 2] = 4
    edit = fill_between_slices(lab, 4, spacing=sp)
    out = edit.result(lab)
    dist = np.sqrt(r2)
    for z in range(1, 10):
        r = 4.0 + (12.0 - 4.0) * z / 10          # radius grows linearly with z
        got = out[z] == 4
        area = got.sum() * 0.25
        assert area == pytest.approx(np.pi * r * r, rel=0.06), z
        assert np.all(got[dist <= r - 0.25]) and not np.any(got[dist > r + 0.25]), z
    np.testing.assert_array_equal(out[0], lab[0])
    assert edit.info["filled_voxels"] == int((out[1:10] == 4).sum())


def test_fill_between_slices_along_other_axis_and_errors():
    lab = np.zeros((7, 9, 9), np.uint8)
    lab[2:5, 2:5, 1] = 1
    lab[2:5, 2:5, 7] = 1
    out = fill_between_slices(lab, 1, axis=2).result(lab)
    assert (out[2:5, 2:5, 1:8] == 1).all() and (out == 1).sum() == 63
    assert fill_between_slices(lab, 1, axis=0).empty   # contiguous slices: no gap
    lab2 = np.zeros((5, 5, 5), np.uint8)
    lab2[2, 2, 2] = 1
    with pytest.raises(MedSegError):
        fill_between_slices(lab2, 1)


def test_logical_operations():
    lab = np.zeros((1, 1, 8), np.uint8)
    lab[0, 0] = [1, 1, 1, 2, 2, 0, 3, 0]
    a = lab.copy()
    m = np.zeros_like(lab, bool)
    m[0, 0, 2:6] = True
    assert logical_op(a, "union", 1, m).result(a)[0, 0].tolist() == [1, 1, 1, 2, 2, 1, 3, 0]
    assert logical_op(a, "union", 1, m, overwrite=True).result(a)[0, 0].tolist() == \
        [1, 1, 1, 1, 1, 1, 3, 0]
    assert logical_op(a, "intersect", 1, m).result(a)[0, 0].tolist() == \
        [0, 0, 1, 2, 2, 0, 3, 0]
    assert logical_op(a, "subtract", 1, m).result(a)[0, 0].tolist() == \
        [1, 1, 0, 2, 2, 0, 3, 0]
    assert logical_op(a, "invert", 1, mask=m).result(a)[0, 0].tolist() == \
        [1, 1, 0, 2, 2, 1, 3, 0]
    assert logical_op(a, "union", 1, 3).result(a)[0, 0].tolist() == [1, 1, 1, 2, 2, 0, 1, 0]
    with pytest.raises(MedSegError):
        logical_op(a, "xor", 1, 2)
    with pytest.raises(MedSegError):
        logical_op(a, "union", 1)


def test_relabel_merge_threshold_paint():
    lab = np.array([[[0, 1, 2, 3, 3]]], np.uint16)
    assert relabel(lab, {1: 3, 3: 1}).result(lab).tolist() == [[[0, 3, 2, 1, 1]]]
    assert merge(lab, [2, 3], 1).result(lab).tolist() == [[[0, 1, 1, 1, 1]]]
    with pytest.raises(MedSegError):
        relabel(lab.astype(np.uint8), {1: 300})
    img = np.array([[[-500, 50, 120, 400, 80]]], np.float32)
    paint = np.ones_like(lab, bool)
    out = threshold_paint(lab, paint, 5, image=img, lo=40, hi=200).result(lab)
    assert out.tolist() == [[[0, 5, 5, 3, 5]]]
    out = threshold_paint(lab, paint, 5, image=img, lo=40, hi=200, overwrite=False).result(lab)
    assert out.tolist() == [[[0, 1, 2, 3, 3]]]
    with pytest.raises(MedSegError):
        threshold_paint(lab, paint, 5, image=img, lo=300, hi=200)


def test_region_limits_every_change_and_edit_changes():
    lab, _ = _sphere(10.0)
    region = slice_range(10, 14)
    edit = margin(lab, 1, margin_mm=2.0, spacing=SPACING, region=region)
    out = edit.result(lab)
    np.testing.assert_array_equal(out[:10], lab[:10])
    np.testing.assert_array_equal(out[14:], lab[14:])
    full = margin(lab, 1, margin_mm=2.0, spacing=SPACING).result(lab)
    np.testing.assert_array_equal(out[10:14], full[10:14])   # same inside the region
    idx, vals = edit.changes(lab)
    assert idx[0].dtype == np.uint16
    diff = np.nonzero(out != lab)
    assert sorted(zip(*[i.tolist() for i in idx])) == sorted(zip(*[i.tolist() for i in diff]))
    assert (vals == 1).all()


def test_progress_and_cancel():
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[0, 0, 0], lab[3, 3, 3] = 1, 2
    seen = []
    remove_islands(lab, None, min_volume_mm3=5, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2, 2)
    with pytest.raises(Cancelled):
        remove_islands(lab, None, min_volume_mm3=5, cancel=lambda: True)
