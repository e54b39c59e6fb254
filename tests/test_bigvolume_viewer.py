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


def _written_only_there(path, labels, region, value):
    """The store's level 0: ``value`` in ``region``, the original labels elsewhere."""
    full = np.asarray(read_zarr_levels(path)[0])
    assert (full[region] == value).all()
    outside = full.copy()
    outside[region] = labels[region]
    np.testing.assert_array_equal(outside, labels)
    return full


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
    full = _written_only_there(path, labels, region, 2)
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


def test_correct_widget_edits_the_region_in_view_and_writes_it_back(make_napari_viewer,
                                                                     tmp_path):
    from napari_medseg._widgets.correct import CorrectWidget

    path, labels, ref = _store(tmp_path)
    viewer = make_napari_viewer()
    layer = add_zarr_labels(viewer, path)
    widget = CorrectWidget(viewer)
    widget.layer_combo.setCurrentText(layer.name)
    assert widget.store_box.isVisibleTo(widget)
    assert widget.edit_region_button.isEnabled() and not widget.write_back_button.isEnabled()
    widget.run()  # the multiscale layer itself is refused, never half-edited
    assert len(viewer.layers) == 1
    # 2D view on slice 20, zoomed in on part of the plane
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, layer.data_to_world((20, 0, 0))[0])
    scene = getattr(viewer, "scene", None)  # napari >= 0.9; older: viewer.camera
    camera = scene.camera if scene is not None else viewer.camera
    camera.center = tuple(layer.data_to_world((20, 60, 90))[1:])
    camera.zoom = 4 * max(viewer.canvas.size) / (160 * 0.5)
    widget.store_slices_spin.setValue(2)
    widget.edit_region_button.click()
    assert len(viewer.layers) == 2
    edit = viewer.layers[-1]
    assert widget.layer() is edit and widget.write_back_button.isEnabled()
    (z0, z1), (y0, y1), (x0, x1) = edit.metadata["medseg_zarr"]["region"]
    assert (z0, z1) == (18, 23)  # the current slice and two on each side
    assert 0 < (y1 - y0) < 160 and 0 < (x1 - x0) < 160 and y0 <= 60 < y1 and x0 <= 90 < x1
    region = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    np.testing.assert_array_equal(np.asarray(edit.data), labels[region])
    edit.data = np.full(edit.data.shape, 1, np.uint8)
    widget.write_back_button.click()
    assert edit not in viewer.layers
    _written_only_there(path, labels, region, 1)
