"""Preprocessing to a model grid and its inverse: orientation, spacing, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.preprocess import (
    orientation_transform,
    preprocess,
    resample_linear,
    restore_labels,
    restore_map,
)
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError

SHAPE = (9, 14, 11)  # odd, anisotropic grid
SPACING = (3.0, 1.2, 0.8)


def _rot(axis: int, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# direction columns for voxel axes i, j, k (RAS)
DIRECTIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "sagittal_ASL": np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float),
    "oblique": _rot(2, 20) @ _rot(0, -12) @ np.diag([-1.0, -1.0, 1.0]),
    "oblique_coronal": _rot(1, 15) @ np.array([[1, 0, 0], [0, 0, -1], [0, -1, 0]], float),
}


def _volume(direction, data=None, shape=SHAPE, spacing=SPACING):
    if data is None:
        data = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    return Volume(data, make_affine(spacing, (12.0, -30.0, 7.5), direction), modality="CT")


def _blobs(shape=SHAPE):
    """A label map with three classes: a ball, a box and a thin slab."""
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    lab[(z - 4) ** 2 / 9 + (y - 6) ** 2 / 16 + (x - 5) ** 2 / 9 <= 1.2] = 1
    lab[1:4, 9:13, 1:5] = 2
    lab[6:8, 1:4, 6:10] = 3
    return lab


def _world(affine, idx_zyx):
    """World RAS of array indices ``(N, 3)`` in (Z, Y, X) order."""
    ijk = np.asarray(idx_zyx, float)[:, ::-1]
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@pytest.mark.parametrize("target", ["LPS", "RAS", "PIL"])
def test_reorientation_is_exact_and_keeps_world_positions(name, target):
    vol = _volume(DIRECTIONS[name])
    x, info = preprocess([vol], orientation=target, normalization={"kind": "none"})
    assert x.shape[0] == 1 and x.dtype == np.float32
    # the model grid points the way asked for
    out = Volume(x[0], info.model_affine)
    assert out.orientation_code() == target
    # every voxel keeps its value and its world position
    idx = np.indices(x.shape[1:]).reshape(3, -1).T
    src = np.linalg.solve(info.input_affine, np.c_[_world(info.model_affine, idx),
                                                   np.ones(len(idx))].T)[:3].T[:, ::-1]
    src = np.rint(src).astype(int)
    assert np.allclose(_world(info.input_affine, src), _world(info.model_affine, idx), atol=1e-6)
    np.testing.assert_array_equal(x[0].ravel(), vol.data[tuple(src.T)])
    # a spacing that already matches leaves the voxel count alone
    assert sorted(x.shape[1:]) == sorted(SHAPE)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_labels_round_trip_exactly_without_resampling(name):
    lab = _blobs()
    vol = _volume(DIRECTIONS[name], data=lab.astype(np.float32))
    target = tuple(vol.spacing[p] for p in orientation_transform(vol.affine, "LPS")[0])
    x, info = preprocess(vol, target_spacing=target, orientation="LPS",
                         normalization={"kind": "none"}, divisible_by=4)
    assert all(s % 4 == 0 for s in x.shape[1:])
    model_labels = np.rint(x[0]).astype(np.uint8)  # "prediction" on the padded model grid
    back = restore_labels(model_labels, info)
    assert back.shape == SHAPE and back.dtype == np.uint8
    np.testing.assert_array_equal(back, lab)


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("name", ["LPS", "LAS", "oblique", "sagittal_ASL"])
@pytest.mark.parametrize("target_spacing", [(1.5, 1.0, 1.0), (2.0, 0.6, 0.5)])
def test_labels_survive_resampling(name, target_spacing):
    shape = (21, 30, 27)
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    lab[((z - 10) * 3.0) ** 2 + ((y - 14) * 1.2) ** 2 + ((x - 12) * 0.8) ** 2 <= 12.0 ** 2] = 1
    lab[3:8, 3:12, 15:25] = 2
    vols = [_volume(DIRECTIONS[name], data=(lab == c).astype(np.float32), shape=shape)
            for c in (1, 2)]
    x, info = preprocess(vols, target_spacing=target_spacing, orientation="RAS",
                         normalization=[{"kind": "none"}, {"kind": "none"}])
    assert info.resampled
    pred = np.zeros(x.shape[1:], np.uint8)
    pred[x[0] > 0.5] = 1
    pred[x[1] > 0.5] = 2
    back = restore_labels(pred, info)
    assert back.shape == shape
    for c in (1, 2):
        assert _dice(back == c, lab == c) > 0.9


def test_resampled_grid_affine_places_voxels_in_the_right_world_position():
    vol = _volume(DIRECTIONS["oblique"], shape=(15, 20, 18))
    idx = np.indices(vol.shape3).reshape(3, -1).T
    world_x = _world(vol.affine, idx)[:, 0].reshape(vol.shape3).astype(np.float32)
    x, info = preprocess(vol.with_data(world_x), target_spacing=(1.3, 0.7, 1.1),
                         orientation="LPS", normalization=None)
    # a linear function of position is reproduced exactly (inside the clamped border)
    inner = np.indices(x.shape[1:])[:, 2:-2, 2:-2, 2:-2].reshape(3, -1).T
    expect = _world(info.model_affine, inner)[:, 0]
    np.testing.assert_allclose(x[0][tuple(inner.T)], expect, atol=1e-3)


def test_restore_map_is_float16_on_the_input_grid():
    vol = _volume(DIRECTIONS["LAS"])
    x, info = preprocess(vol, target_spacing=(1.0, 1.0, 1.0), orientation="LPS",
                         divisible_by=(1, 8, 8))
    m = np.full(x.shape[1:], 0.25, np.float32)
    back = restore_map(m, info)
    assert back.dtype == np.float16 and back.shape == SHAPE
    assert np.all(back == np.float16(0.25))
    with pytest.raises(MedSegError, match="model grid"):
        restore_map(np.zeros((3, 3, 3)), info)


def test_ct_window_and_mr_normalisation():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1200, 1500, SHAPE).astype(np.float32)
    x, _ = preprocess(_volume(None, ct), normalization=[{"kind": "ct", "window": [-200, 300]}])
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x[0][ct.clip(-200, 300) == ct], ((ct + 200) / 500)[
        ct.clip(-200, 300) == ct], rtol=1e-5)
    x, _ = preprocess(_volume(None, ct), normalization={"kind": "ct", "window": [-200, 300],
                                                        "mean": 50.0, "std": 100.0})
    assert np.isclose(x.max(), 2.5) and np.isclose(x.min(), -2.5)
    mr = np.zeros(SHAPE, np.float32)
    mr[2:7, 3:11, 2:9] = rng.gamma(2.0, 100.0, (5, 8, 7))
    mr[4, 5, 5] = 1e6  # an outlier the percentile clip removes
    x, _ = preprocess(_volume(None, mr), normalization={"kind": "mr"})
    fg = x[0][mr != 0]
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-3
    assert x[0].max() < 5


def test_errors_name_the_problem():
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(MedSegError, match="NaN"):
        preprocess(Volume(data, source="scan.nii.gz"))
    good = _volume(None)
    with pytest.raises(MedSegError, match="2 channel"):
        preprocess([good], normalization=[{"kind": "ct"}, {"kind": "mr"}])
    other = Volume(np.zeros(SHAPE, np.float32), make_affine((1, 1, 1)))
    with pytest.raises(MedSegError, match="one voxel grid"):
        preprocess([good, other], normalization={"kind": "none"})
    with pytest.raises(MedSegError, match="orientation"):
        preprocess(good, orientation="LPX")
    with pytest.raises(MedSegError, match="normalization kind"):
        preprocess(good, normalization={"kind": "magic"})


def test_multichannel_volume_counts_as_channels():
    data = np.stack([np.full(SHAPE, 1.0), np.full(SHAPE, 2.0)]).astype(np.float32)
    vol = Volume(data, make_affine(SPACING))
    x, info = preprocess(vol, normalization=None)
    assert x.shape == (2,) + SHAPE and info.input_shape == SHAPE
    assert np.all(x[1] == 2.0)


def test_linear_resampling_is_chunked_consistently():
    a = np.random.default_rng(3).normal(size=(40, 7, 9)).astype(np.float32)
    torch = pytest.importorskip("torch")
    out = resample_linear(a, (57, 11, 5))
    ref = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], size=(57, 11, 5),
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
