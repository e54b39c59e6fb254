"""Big volumes: lazy OME-Zarr reading, streamed inference into a Zarr label store."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("zarr")

from napari_medseg.bigvolume import predict_to_zarr  # noqa: E402
from napari_medseg.core.planner import ENV_LIMIT  # noqa: E402
from napari_medseg.core.volume import Volume, make_affine  # noqa: E402
from napari_medseg.errors import MedSegError  # noqa: E402
from napari_medseg.io.zarr import (  # noqa: E402
    read_zarr,
    read_zarr_levels,
    read_zarr_region,
    write_zarr_image,
    write_zarr_region,
)


@pytest.fixture(scope="module")
def model():
    from napari_medseg.models import load_model

    m = load_model("abdomen-ct-small")
    # whole-volume post-processing is skipped on the lazy path; compare without it
    m.card = dataclasses.replace(m.card, postprocessing={})
    return m


def _ct(affine):
    from napari_medseg.core.phantom import make_abdomen_ct

    img, _ = make_abdomen_ct(seed=3, shape=(40, 96, 96), spacing=(2.0, 1.0, 1.0))
    data = np.asarray(img.data).astype(np.int16)
    return Volume(data, affine if affine is not None else img.affine, modality="CT",
                  source="ct")


@pytest.mark.parametrize("frame", ["lps", "ras"])
def test_streamed_run_equals_in_memory_run(model, tmp_path, frame):
    # LPS matches the card's orientation; RAS makes the run flip two axes
    vol = _ct(None if frame == "lps" else make_affine((2.0, 1.0, 1.0), (5.0, -3.0, 7.0)))
    store = write_zarr_image(tmp_path / "ct.ome.zarr", vol, chunks=(16, 48, 48))
    lazy = read_zarr(store)
    import dask.array as da

    assert isinstance(lazy.data, da.Array) and lazy.shape3 == vol.shape3
    assert np.allclose(lazy.affine, vol.affine)
    ref = model.predict(vol, device="cpu", restore="labels")  # the lazy path's restore
    out = tmp_path / "labels.ome.zarr"
    info = predict_to_zarr(model, lazy, out, device="cpu")
    got = read_zarr(out)
    assert got.is_label and got.label_names == model.card.label_names
    assert np.allclose(got.affine, vol.affine)
    labels = np.asarray(got.data)
    assert labels.shape == vol.shape3
    # enough labelled voxels (of the 96 mm doll-sized phantom) for the comparison to mean
    # something
    assert (labels > 0).sum() > 2000
    np.testing.assert_array_equal(labels, np.asarray(ref.labels.data))
    assert info["windows"] > 0 and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_slab_plan_tiles_the_grid_with_every_covering_window():
    from napari_medseg.bigvolume import slab_plan
    from napari_medseg.core.inference import window_starts

    for size, pz, overlap, rows in [(205, 32, 0.5, 64), (128, 32, 0.5, 48), (100, 24, 0.25, 30),
                                    (77, 16, 0.75, 20), (64, 32, 0.5, 1)]:
        zs = sorted(set(window_starts(size, pz, overlap)))
        plan = slab_plan(zs, pz, size, rows)
        assert plan[0][2] == 0 and plan[-1][3] == size
        assert all(a[3] == b[2] for a, b in zip(plan, plan[1:]))  # tiles, no gap or repeat
        for i, j, lo, hi in plan:
            assert lo < hi and zs[i] <= lo and hi <= zs[j] + pz
            for z in range(lo, hi):  # every window covering a kept slice ran in its slab
                covering = {m for m, s in enumerate(zs) if s <= z < s + pz}
                assert covering <= set(range(i, j + 1)), (size, z)
        assert len(plan) > 1 or rows >= size


def test_streamed_run_in_slabs_equals_in_memory_run(model, tmp_path):
    base = _ct(None)
    # 125 slices: a 100-slice model grid, whose last window row is not on the 16-slice step
    data = np.concatenate([base.data, base.data[::-1], base.data, base.data[:5]], axis=0)
    vol = Volume(data, base.affine, modality="CT", source="ct")
    ref = np.asarray(model.predict(vol, device="cpu", restore="labels").labels.data)
    store = write_zarr_image(tmp_path / "ct.ome.zarr", vol, chunks=(16, 48, 48))
    out = tmp_path / "labels.ome.zarr"
    info = predict_to_zarr(model, read_zarr(store), out, device="cpu", slab_rows=40)
    assert info["model_grid"][0] == 100 and info["slabs"] >= 3
    got = np.asarray(read_zarr(out).data)
    assert (got > 0).mean() > 0.02
    np.testing.assert_array_equal(got, ref)


def test_label_store_is_multiscale_and_a_region_edits_back(model, tmp_path):
    vol = _ct(None)
    vol = Volume(np.concatenate([vol.data] * 4, axis=0), make_affine((2.0, 1.0, 1.0)),
                 modality="CT")
    out = tmp_path / "labels.ome.zarr"
    predict_to_zarr(model, vol, out, device="cpu", fast=True, chunks=(32, 64, 64))
    levels = read_zarr_levels(out)
    assert len(levels) >= 2 and levels[1].shape == tuple(-(-s // 2) for s in vol.shape3)
    np.testing.assert_array_equal(np.asarray(levels[1]), np.asarray(levels[0])[::2, ::2, ::2])
    coarse = read_zarr(out, level=1)
    assert np.allclose(coarse.spacing, 2 * np.asarray(vol.spacing))
    region = (slice(10, 30), slice(20, 60), slice(30, 70))
    patch = read_zarr_region(out, region)
    patch[:] = 5
    write_zarr_region(out, region, patch)
    full = np.asarray(read_zarr_levels(out)[0])
    assert (full[region] == 5).all()
    np.testing.assert_array_equal(np.asarray(read_zarr_levels(out)[1]), full[::2, ::2, ::2])


def test_lazy_run_is_refused_when_the_model_grid_does_not_fit(model, tmp_path, monkeypatch):
    vol = _ct(None)
    monkeypatch.setenv(ENV_LIMIT, "8M")
    with pytest.raises(MedSegError, match="GiB"):
        predict_to_zarr(model, vol, tmp_path / "x.ome.zarr", device="cpu")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary store


def test_read_volume_and_cli_predict_take_zarr(tmp_path, capsys):
    from napari_medseg.cli import main
    from napari_medseg.io import format_of, read_volume

    vol = _ct(None)
    store = write_zarr_image(tmp_path / "ct.ome.zarr", vol, chunks=(16, 48, 48))
    assert format_of(store) == "zarr"
    got = read_volume(store)
    assert got.shape3 == vol.shape3 and np.allclose(got.affine, vol.affine)
    np.testing.assert_array_equal(np.asarray(got.data), np.asarray(vol.data))
    out = tmp_path / "seg.ome.zarr"
    rc = main(["predict", str(store), "-m", "abdomen-ct-small", "-o", str(out),
               "--device", "cpu", "--fast"])
    err = capsys.readouterr().err
    assert rc == 0 and "multiscale labels" in err
    assert read_zarr(out).shape3 == vol.shape3
    assert main(["predict", str(store), "-m", "abdomen-ct-small", "-o", str(out),
                 "--device", "cpu"]) == 2  # exists: refused without --overwrite
