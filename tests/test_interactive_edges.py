"""Boundary refinement of the click model's mask by local intensity models."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.interactive.edges import refine_edges


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)],
                        indexing="ij")
    return np.sqrt(sum(g ** 2 for g in grids))


def _dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("offset", [-1.0, 1.0])
def test_a_boundary_one_voxel_off_moves_onto_the_image_edge(offset):
    rng = np.random.default_rng(0)
    r = _ball((40, 40, 40), (20, 20, 20), 1.0)
    truth = r <= 10.0
    image = np.where(truth, 100.0, 20.0) + rng.normal(0, 5, truth.shape)
    logits = (10.0 + offset - r).astype(np.float32)  # the network's edge, one voxel off
    out = refine_edges(image, logits, (1.0, 1.0, 1.0))
    before, after = _dice(logits > 0, truth), _dice(out > 0, truth)
    assert before < 0.93
    assert after > 0.98 and after > before + 0.05
    # nothing changes further than the band from the first boundary
    far = np.abs(10.0 + offset - r) > 1.5 + 1e-6
    np.testing.assert_array_equal(out[far], logits[far])


def test_an_isodense_object_keeps_its_mask():
    rng = np.random.default_rng(1)
    r = _ball((40, 40, 40), (20, 20, 20), 1.0)
    image = rng.normal(50, 10, r.shape)  # inside and outside look alike
    logits = (10.0 - r).astype(np.float32)
    out = refine_edges(image, logits, (1.0, 1.0, 1.0))
    assert _dice(out > 0, logits > 0) > 0.97


def test_coarse_voxels_flat_masks_and_zero_weight_leave_the_logits():
    r = _ball((20, 30, 30), (10, 15, 15), 1.0)
    image = np.where(r <= 6, 100.0, 0.0)
    logits = (7.0 - r).astype(np.float32)
    # 4 mm voxels: no voxel lies within 1.5 mm of the boundary
    np.testing.assert_array_equal(refine_edges(image, logits, (4.0, 4.0, 4.0)), logits)
    np.testing.assert_array_equal(refine_edges(image, logits, (1, 1, 1), weight=0), logits)
    full = np.ones_like(logits)
    np.testing.assert_array_equal(refine_edges(image, full, (1, 1, 1)), full)
    # too few voxels in the rings for an intensity model
    tiny = (1.2 - r).astype(np.float32)
    np.testing.assert_array_equal(refine_edges(image, tiny, (1, 1, 1)), tiny)
    with pytest.raises(ValueError, match="shape"):
        refine_edges(image[:-1], logits, (1, 1, 1))


def test_anisotropic_voxels_use_millimetres_and_2d_works():
    r = _ball((40, 40), (20, 20), 1.0, (0.8, 0.8))
    truth = r <= 10.0
    image = np.where(truth, 80.0, 10.0)
    image[0, 0] = np.nan  # a NaN voxel is never read as an intensity
    logits = (10.8 - r).astype(np.float32)  # one 0.8 mm voxel off
    out = refine_edges(image, logits, (0.8, 0.8))
    assert _dice(out > 0, truth) > _dice(logits > 0, truth)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("slice_mm", [0.7, 5.0])
def test_a_one_slice_volume_is_refined_as_its_slice(slice_mm):
    """A 2D update refines its slice as a (1, y, x) volume: the slice's own spacing
    decides, whatever the slice thickness (no neighbour slice lies in the band)."""
    rng = np.random.default_rng(2)
    r = _ball((1500, 800), (750, 400), 1.0, (0.5, 0.5))  # over the rings' voxel budget
    image = np.where(r <= 100.0, 90.0, 30.0) + rng.normal(0, 8, r.shape)
    logits = (100.5 - r).astype(np.float32)
    flat = refine_edges(image, logits, (0.5, 0.5))
    assert (flat != logits).any()
    np.testing.assert_array_equal(
        refine_edges(image[None], logits[None], (slice_mm, 0.5, 0.5))[0], flat)
