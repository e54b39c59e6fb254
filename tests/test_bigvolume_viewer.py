"""A label store in napari: multiscale layer, a region edited as ordinary labels and written back."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("zarr")

from napari_medseg._napari.bigvolume import (  # noqa: E402
    add_zarr_labels,
    edit_view_region,
    write_back_region,
)
from napari_medseg.core.volume import Volume, make_affine  # noqa: E402
from napari_medseg.io.zarr import ZarrLabelWriter, read_zarr_levels  # noqa: E402


def _store(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (64, 160, 160)).astype(np.uint8)
    ref = Volume(np.zeros(labels.shape, np.int16), make_affine((2.0, 0.5, 0.5), (10, 20, 30)),
                 modality="CT")
    with ZarrLabelWriter(tmp_path / "seg.ome.zarr", ref, np.uint8, {1: "a", 2: "b"},
                         {1: (1, 0, 0), 2: (0, 1, 0)}, chunks=(32, 64, 64)) as w:
        for z in range(0, 64, 32):
            w.write((slice(z, z + 32), slice(None), slice(None)), labels[z:z + 32])
    return tmp_path / "seg.ome.zarr", labels, ref


def test_multiscale_layer_and_region_edit(make_napari_viewer, tmp_path):
    path, labels, ref = _store(tmp_path)
    viewer = make_napari_viewer()
    layer = add_zarr_labels(viewer, path)
    assert layer.multiscale and len(layer.data) >= 2
    np.testing.assert_allclose(layer.scale, ref.spacing)
    region = (slice(5, 9), slice(40, 100), slice(50, 120))
    edit = edit_view_region(viewer, layer, region=region)
    assert not edit.multiscale and edit.data.shape == (4, 60, 70)
    np.testing.assert_array_equal(np.asarray(edit.data), labels[region])
    # the region layer sits on the same voxels: world position of its first voxel
    np.testing.assert_allclose(edit.data_to_world((0, 0, 0)), layer.data_to_world((5, 40, 50)))
    edit.data[:] = 2
    changed = write_back_region(viewer, edit)
    assert changed == int((labels[region] != 2).sum())
    assert edit not in viewer.layers
    full = np.asarray(read_zarr_levels(path)[0])
    assert (full[region] == 2).all()
    outside = full.copy()
    outside[region] = labels[region]
    np.testing.assert_array_equal(outside, labels)
    np.testing.assert_array_equal(np.asarray(layer.data[1]), full[::2, ::2, ::2])


def test_napari_reader_opens_stores_lazily(tmp_path):
    import dask.array as da

    from napari_medseg._napari._reader import get_reader
    from napari_medseg.io.zarr import write_zarr_image

    path, labels, ref = _store(tmp_path)
    reader = get_reader(str(path))
    assert reader is not None
    (data, kwargs, kind), = reader(str(path))
    assert kind == "labels" and kwargs["multiscale"] and len(data) >= 2
    img = Volume(da.from_array(np.arange(64 * 96 * 96, dtype=np.int32).reshape(64, 96, 96)
                               % 400 - 100, chunks=32).astype(np.int16), ref.affine,
                 modality="CT")
    ipath = write_zarr_image(tmp_path / "ct.ome.zarr", img)
    (idata, ikw, ikind), = get_reader(str(ipath))(str(ipath))
    assert ikind == "image" and isinstance(idata, da.Array) and idata.shape == (64, 96, 96)
    np.testing.assert_allclose(ikw["scale"], ref.spacing)
