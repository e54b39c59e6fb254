"""Uncertainty-guided review: case ranking and region ranking on known maps."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.review import case_uncertainty, rank_cases, uncertain_regions


def _known_map():
    """Three blobs with known sizes and values on a 2 x 1 x 0.5 mm grid."""
    u = np.zeros((20, 40, 40), np.float32)
    u[2:6, 2:12, 2:12] = 0.8     # A: 400 voxels x 1 mm^3 = 0.4 mL, mean 0.8 -> score 0.32
    u[10:18, 20:30, 20:30] = 0.4  # B: 800 voxels = 0.8 mL, mean 0.4 -> score 0.32 (bigger)
    u[12:13, 2:4, 30:32] = 0.9    # C: 4 voxels = 0.004 mL, peak 1.0 at (12, 3, 30)
    u[12, 3, 30] = 1.0
    u[0, 39, 39] = 0.2            # below the threshold
    return u


def test_regions_sizes_in_ml_and_order():
    regions = uncertain_regions(_known_map(), spacing=(2.0, 1.0, 0.5), threshold=0.3)
    assert [r.n_voxels for r in regions] == [800, 400, 4]  # equal scores: the bigger first
    assert [round(r.volume_ml, 6) for r in regions] == [0.8, 0.4, 0.004]
    assert [r.rank for r in regions] == [0, 1, 2]
    b = regions[0]
    assert b.bbox == (10, 20, 20, 18, 30, 30)
    assert b.centroid == pytest.approx((13.5, 24.5, 24.5))
    assert b.mean == pytest.approx(0.4) and b.max == pytest.approx(0.4)
    assert regions[2].peak == (12, 3, 30) and regions[2].max == pytest.approx(1.0)


def test_regions_threshold_min_size_and_limit():
    u = _known_map()
    strong = uncertain_regions(u, spacing=(2.0, 1.0, 0.5), threshold=0.5)
    assert [r.n_voxels for r in strong] == [400, 4]  # B (0.4) is below 0.5
    big = uncertain_regions(u, spacing=(2.0, 1.0, 0.5), threshold=0.3, min_ml=0.01)
    assert [r.n_voxels for r in big] == [800, 400]
    assert len(uncertain_regions(u, threshold=0.3, max_regions=1)) == 1
    assert uncertain_regions(np.zeros((3, 3, 3)), threshold=0.3) == []
    # a higher value in A makes it hold the most uncertainty
    u[2:6, 2:12, 2:12] = 0.9
    assert uncertain_regions(u, spacing=(2.0, 1.0, 0.5))[0].n_voxels == 400


def test_regions_connectivity_and_bad_shape():
    u = np.zeros((3, 3, 3), np.float32)
    u[0, 0, 0] = u[1, 1, 1] = 1.0  # touch only by a corner
    assert len(uncertain_regions(u, connectivity=1)) == 2
    assert len(uncertain_regions(u, connectivity=3)) == 1
    with pytest.raises(ValueError, match="Z, Y, X"):
        uncertain_regions(np.zeros((3, 3)))


def test_case_ranking():
    assert case_uncertainty(_known_map()) == pytest.approx(
        (400 * 0.8 + 800 * 0.4 + 3 * 0.9 + 1.0 + 0.2) / (20 * 40 * 40), rel=1e-5)
    assert rank_cases({"a": 0.1, "b": None, "c": 0.3, "d": float("nan")}) == ["c", "a", "b", "d"]
