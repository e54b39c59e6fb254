"""Synthetic phantoms: geometry, anatomy, labels, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.phantom import (
    ABDOMEN_LABELS,
    HEAD_LABELS,
    make_abdomen_ct,
    make_head_mr,
)

SMALL_CT = {"shape": (24, 48, 48), "spacing": (5.0, 3.5, 3.5)}
SMALL_MR = {"shape": (32, 40, 32), "spacing": (4.0, 3.2, 3.2)}


def _world_centroid(lab, k):
    """Mean RAS position (mm) of the voxels of class ``k``."""
    zz, yy, xx = np.nonzero(lab.data == k)
    ijk = np.stack([xx, yy, zz, np.ones_like(xx)]).astype(float)
    return (lab.affine @ ijk)[:3].mean(axis=1)


def test_abdomen_contract_defaults():
    img, lab = make_abdomen_ct()
    assert img.data.shape == lab.data.shape == (64, 128, 128)
    assert img.data.dtype == np.float32 and lab.data.dtype == np.uint8
    assert img.modality == "CT" and lab.is_label and not img.is_label
    np.testing.assert_allclose(img.spacing, (2.5, 1.5, 1.5))
    np.testing.assert_array_equal(img.affine, lab.affine)
    assert lab.label_names == ABDOMEN_LABELS
    assert set(lab.label_colors) == set(ABDOMEN_LABELS)
    assert set(np.unique(lab.data)) == {0, *ABDOMEN_LABELS}


@pytest.mark.parametrize("vary", [False, True])
def test_abdomen_anatomy_and_hu(vary):
    img, lab = make_abdomen_ct(seed=3, vary=vary, **SMALL_CT)
    d, ldat = img.data, lab.data
    # patient's right is +x in RAS: liver and right kidney there, spleen left
    assert _world_centroid(lab, 1)[0] > 10
    assert _world_centroid(lab, 2)[0] < -10
    assert _world_centroid(lab, 4)[0] > 5 > -5 > _world_centroid(lab, 3)[0]
    # spleen posterior to the liver centre, kidneys posterior to the liver
    assert _world_centroid(lab, 3)[1] < _world_centroid(lab, 1)[1]
    assert np.median(d[0, :3, :3]) < -900  # air in the corner
    assert 50 < np.median(d[ldat == 1]) < 150  # enhanced liver
    assert np.median(d[ldat == 5]) < np.median(d[ldat == 1]) - 15  # hypodense lesion
    assert np.median(d[ldat == 3]) > np.median(d[ldat == 1])  # kidney brighter
    assert (d > 400).sum() > 50  # bone exists, unlabelled
    assert (ldat[d > 400] > 0).mean() < 0.05  # bone is not an organ
    # lesions lie inside the liver's outline
    lesion = ldat == 5
    assert lesion.any()
    from scipy import ndimage as ndi
    liver_hull = ndi.binary_fill_holes(ndi.binary_closing((ldat == 1) | lesion, iterations=2))
    assert liver_hull[lesion].mean() > 0.95


def test_abdomen_deterministic_and_seeded():
    a_img, a_lab = make_abdomen_ct(seed=1, **SMALL_CT)
    b_img, b_lab = make_abdomen_ct(seed=1, **SMALL_CT)
    np.testing.assert_array_equal(a_img.data, b_img.data)
    np.testing.assert_array_equal(a_lab.data, b_lab.data)
    c_img, c_lab = make_abdomen_ct(seed=2, **SMALL_CT)
    # vary=False: same anatomy, different noise
    np.testing.assert_array_equal(a_lab.data, c_lab.data)
    assert not np.array_equal(a_img.data, c_img.data)
    v1 = make_abdomen_ct(seed=1, vary=True, **SMALL_CT)[1].data
    v2 = make_abdomen_ct(seed=2, vary=True, **SMALL_CT)[1].data
    np.testing.assert_array_equal(v1, make_abdomen_ct(seed=1, vary=True, **SMALL_CT)[1].data)
    assert not np.array_equal(v1, v2)


def test_abdomen_contrast_phases_keep_the_anatomy():
    livers, gaps = [], []
    for seed in range(1, 9):
        _, plain = make_abdomen_ct(seed=seed, vary=True, **SMALL_CT)
        img, lab = make_abdomen_ct(seed=seed, vary=True, phases=True, **SMALL_CT)
        np.testing.assert_array_equal(lab.data, plain.data)  # the phase draws its own stream
        liver = float(np.median(img.data[lab.data == 1]))
        livers.append(liver)
        gaps.append(float(np.median(img.data[lab.data == 2])) - liver)
    # non-contrast (~55 HU) to portal-venous (~118 HU) livers; spleens darker and brighter
    assert min(livers) < 80 < max(livers)
    assert min(gaps) < 0 < max(gaps)
    # without vary the option changes nothing
    a = make_abdomen_ct(seed=3, phases=True, **SMALL_CT)[0].data
    np.testing.assert_array_equal(a, make_abdomen_ct(seed=3, **SMALL_CT)[0].data)


def test_spleen_contrast_sets_the_spleen_against_the_liver_and_nothing_else():
    from napari_medseg.core.phantom.abdomen import SPLEEN_CONTRAST

    for seed in (2, 5):
        img, lab = make_abdomen_ct(seed=seed, vary=True, **SMALL_CT)
        same, _ = make_abdomen_ct(seed=seed, vary=True, spleen_contrast=SPLEEN_CONTRAST,
                                  **SMALL_CT)
        np.testing.assert_array_equal(img.data, same.data)  # the default is that range
        dark, dlab = make_abdomen_ct(seed=seed, vary=True, spleen_contrast=(-45, -40),
                                     **SMALL_CT)
        np.testing.assert_array_equal(dlab.data, lab.data)
        a, b, y = np.asarray(img.data), np.asarray(dark.data), np.asarray(lab.data)
        gap = float(np.median(b[y == 2]) - np.median(b[y == 1]))
        assert -47 < gap < -36, gap
        # voxels away from the spleen are unchanged
        far = np.ones(y.shape, bool)
        far[max(0, np.argwhere(y == 2)[:, 0].min() - 3):np.argwhere(y == 2)[:, 0].max() + 4] = False
        np.testing.assert_array_equal(a[far], b[far])


def test_vary_spleens_are_crescents_of_adult_size(monkeypatch):
    import napari_medseg.core.phantom.abdomen as abdomen

    def spleen(seed):
        lab = make_abdomen_ct(seed=seed, vary=True, shape=(64, 160, 160),
                              spacing=(2.5, 1.5, 1.5))[1].data
        return lab == 2

    def to_centre_mm(mask):  # in-plane distance of the centroid to the grid's centre
        return float(np.hypot(*(np.argwhere(mask)[:, 1:].mean(0) - 80))) * 1.5

    bent = {s: spleen(s) for s in range(1, 5)}
    monkeypatch.setattr(abdomen, "_SPLEEN_BEND", (0.0, 0.0))
    for s, mask in bent.items():
        assert 40 < mask.sum() * 2.5 * 1.5 * 1.5 / 1000 < 700  # mL
        # the ends bend towards the hilum, so the crescent sits nearer the middle
        assert to_centre_mm(mask) < to_centre_mm(spleen(s)) - 1.0


def test_abdomen_noise_level():
    img, lab = make_abdomen_ct(seed=0)
    d = img.data
    air = d[:, :6, :6]  # outside the body, clipped at -1024 partly
    liver = d[lab.data == 1]
    assert 5 < float(np.std(liver)) < 60
    assert float(air.mean()) < -950


@pytest.mark.parametrize("vary", [False, True])
def test_head_anatomy(vary):
    img, lab = make_head_mr(seed=5, vary=vary, **SMALL_MR)
    d, ldat = img.data, lab.data
    assert img.modality == "MR" and lab.label_names == HEAD_LABELS
    assert set(np.unique(ldat)) == {0, *HEAD_LABELS}
    med = {k: float(np.median(d[ldat == k])) for k in (1, 2, 3)}
    assert med[3] > med[2] > med[1]  # T1: WM > GM > CSF
    assert float(d.min()) >= 0  # magnitude image
    assert np.median(d[ldat == 4]) < med[3]


def test_head_bias_field_is_smooth_and_present():
    img, lab = make_head_mr(seed=0)
    d, wm = img.data, lab.data == 3
    zz, yy, xx = np.nonzero(wm)
    left = d[wm & (np.arange(d.shape[2]) < np.median(xx))[None, None, :]].mean()
    right = d[wm & (np.arange(d.shape[2]) >= np.median(xx))[None, None, :]].mean()
    assert abs(left - right) / max(left, right) > 0.005  # a bias exists
    assert float(np.std(d[wm]) / np.mean(d[wm])) < 0.4


def test_speed_budget_is_small():
    # generous bound for a shared CI machine; the 0.5 s target is in benchmarks
    import time

    t = time.perf_counter()
    make_abdomen_ct(seed=0, vary=True)
    assert time.perf_counter() - t < 5.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_abdomen_ct(shape=(4, 64))
    with pytest.raises(ValueError):
        make_head_mr(spacing=(0, 1, 1))
