"""The varied synthetic abdomen used to train the built-in CT model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.phantom.abdomen_synth import (
    SYNTH_LABELS,
    TISSUES,
    make_abdomen_ct_synth,
    make_abdomen_tissues,
    paint_ct,
)

SHAPE, SPACING = (48, 80, 100), (5.0, 4.0, 4.0)  # the default 240 x 320 x 400 mm, coarser
VOXEL_ML = float(np.prod(SPACING)) / 1000.0


@pytest.fixture(scope="module")
def cases():
    return {s: make_abdomen_tissues(s, SHAPE, SPACING) for s in (1, 2, 3, 4)}


def test_deterministic_and_on_its_grid(cases):
    tis, lab, grid = cases[1]
    tis2, lab2, _ = make_abdomen_tissues(1, SHAPE, SPACING)
    np.testing.assert_array_equal(tis, tis2)
    np.testing.assert_array_equal(lab, lab2)
    assert tis.shape == lab.shape == SHAPE and tis.dtype == lab.dtype == np.uint8
    assert int(tis.max()) < len(TISSUES) and set(np.unique(lab)) <= {0, *SYNTH_LABELS}
    other, _, _ = make_abdomen_tissues(2, SHAPE, SPACING)
    assert (other != tis).mean() > 0.1  # another seed is another anatomy


def _centre_mm(lab, grid, cid):
    """Mean (x, y, z) RAS mm of a class (x: patient's right +, y: anterior +)."""
    z, y, x = np.nonzero(lab == cid)
    return (grid.x.ravel()[x].mean(), grid.y.ravel()[y].mean(), grid.z.ravel()[z].mean())


def test_anatomy_in_place_and_plausible_sizes(cases):
    names = {n: c for c, n in SYNTH_LABELS.items()}
    for seed, (tis, lab, grid) in cases.items():
        ml = {n: float((lab == c).sum()) * VOXEL_ML for n, c in names.items()}
        # the field of view along z varies, so organs may be cut: only upper bounds
        # everywhere, lower bounds for the liver (always in view)
        assert 300 < ml["liver"] < 3500, (seed, ml)
        assert ml["spleen"] < 900 and ml["kidney_left"] < 450 and ml["kidney_right"] < 450
        liver = _centre_mm(lab, grid, names["liver"])
        aorta = _centre_mm(lab, grid, names["aorta"])
        ivc = _centre_mm(lab, grid, names["inferior_vena_cava"])
        assert liver[0] > aorta[0] + 20, seed  # liver on the patient's right
        assert ivc[0] > aorta[0], seed  # IVC right of the aorta
        if ml["spleen"] > 20:
            spleen = _centre_mm(lab, grid, names["spleen"])
            assert spleen[0] < aorta[0] - 40 and spleen[1] < liver[1], seed  # left, posterior
        for side, sign in (("kidney_left", -1), ("kidney_right", 1)):
            if ml[side] > 20:
                k = _centre_mm(lab, grid, names[side])
                assert sign * (k[0] - aorta[0]) > 20 and abs(k[1] - aorta[1]) < 60, seed


def test_painted_ct_is_in_hounsfield_units(cases):
    tis, lab, grid = cases[3]
    t = {n: i for i, n in enumerate(TISSUES)}
    for seed in range(6):
        hu = paint_ct(tis, SPACING, np.random.default_rng(seed))
        assert hu.dtype == np.float32 and hu.shape == tis.shape
        assert np.median(hu[tis == t["air"]]) < -900
        assert -150 < np.median(hu[tis == t["fat"]]) < -40
        assert -40 < np.median(hu[tis == t["liver"]]) < 150
        assert np.median(hu[tis == t["bone"]]) > 150
        if (tis == t["lung"]).sum() > 50:
            assert np.median(hu[tis == t["lung"]]) < -600
    native = paint_ct(tis, SPACING, np.random.default_rng(0), phase="native")
    arterial = paint_ct(tis, SPACING, np.random.default_rng(0), phase="arterial")
    aorta = tis == t["aorta"]
    assert np.median(arterial[aorta]) > np.median(native[aorta]) + 100


def test_make_abdomen_ct_synth_volumes():
    img, lab = make_abdomen_ct_synth(5, SHAPE, SPACING)
    assert img.modality == "CT" and img.shape3 == SHAPE and lab.is_label
    assert lab.label_names == SYNTH_LABELS
    np.testing.assert_allclose(img.spacing, SPACING)
    np.testing.assert_allclose(img.affine, lab.affine)
    assert img.orientation_code() == "LPS"
