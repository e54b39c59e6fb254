"""Big label stores in napari: multiscale display, and editing a region as ordinary labels.

napari shows an OME-Zarr label store (from :func:`napari_medseg.bigvolume.predict_to_zarr`)
as a multiscale Labels layer, which it cannot paint on. :func:`edit_view_region`
loads the region in view (or a given box) at full resolution as an ordinary
Labels layer placed on the same voxels; :func:`write_back_region` writes it into
the store (level 0 and the coarser levels over that region) and refreshes the
multiscale layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MedSegError
from .layers import volume_to_layer_data

__all__ = ["zarr_labels_layer_data", "zarr_layer_data", "add_zarr_labels", "edit_view_region",
           "write_back_region", "STORE_KEY"]

#: Layer metadata key: the store path (multiscale layer), or store path and region.
STORE_KEY = "medseg_zarr"


def zarr_labels_layer_data(path, name=None) -> tuple:
    """A LayerDataTuple ``(levels, kwargs, "labels")`` showing a label store multiscale."""
    from ..io.zarr import read_zarr, read_zarr_levels

    vol = read_zarr(path, is_label=True)
    data, kwargs, kind = volume_to_layer_data(vol, name=name or Path(path).name.split(".")[0])
    levels = read_zarr_levels(path)
    kwargs["multiscale"] = True
    kwargs["metadata"][STORE_KEY] = {"path": str(Path(path))}
    return levels, kwargs, "labels"


def zarr_layer_data(path) -> list:
    """Layer data for any Zarr store: a label store multiscale, an image lazily.

    Images keep their dask data (every level when the store has a pyramid) and
    take their contrast from the coarsest level, so nothing big is read.
    """
    from ..io.zarr import read_zarr, read_zarr_levels

    vol = read_zarr(path)
    if vol.is_label:
        return [zarr_labels_layer_data(path)]
    levels = read_zarr_levels(path) if vol.data.ndim == 3 else [vol.data]
    # the layer's placement comes from the level-0 affine; its contrast from the
    # coarsest level, read in memory (small)
    coarse = vol.with_data(np.asarray(levels[-1]))
    _, kwargs, kind = volume_to_layer_data(coarse, name=Path(path).name.split(".")[0])
    if len(levels) > 1:
        return [(levels, dict(kwargs, multiscale=True), kind)]
    return [(vol.data, kwargs, kind)]


def add_zarr_labels(viewer, path, name=None):
    """Add a label store to ``viewer`` as a multiscale Labels layer; return the layer."""
    data, kwargs, _ = zarr_labels_layer_data(path, name)
    return viewer.add_labels(data, **kwargs)


def _store_of(layer) -> str:
    info = (layer.metadata or {}).get(STORE_KEY) or {}
    if not info.get("path"):
        raise MedSegError("is not a label store layer; open the .ome.zarr labels first",
                          layer.name)
    return info["path"]


def edit_view_region(viewer, layer, region=None, margin_slices: int = 0):
    """Load a region of a multiscale label store layer as an ordinary Labels layer.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari.layers.Labels
        The multiscale layer of a label store.
    region : tuple of 3 slice, optional
        Array slices ``(Z, Y, X)`` of level 0; default: what the 2D canvas
        shows (the current slice x the visible rectangle, ``margin_slices``
        more slices on each side).

    Returns
    -------
    napari.layers.Labels
        Full-resolution labels of the region, on the same voxels (translated
        by the region's start), with the store and region in its metadata.

    Raises
    ------
    MedSegError
        In a 3D view without a region, or when the layer is out of view.
    """
    from ..io.zarr import read_zarr, read_zarr_region
    from .prediction import view_region

    path = _store_of(layer)
    if region is None:
        if viewer.dims.ndisplay != 2:
            raise MedSegError("editing a region needs the 2D view; switch to 2D and zoom in "
                              "on the part to edit", layer.name)
        region = view_region(layer, viewer, margin_slices=margin_slices)
    vol = read_zarr(path, is_label=True)
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, vol.shape3))
    values = read_zarr_region(path, region)
    start = np.array([s.start for s in region][::-1], float)  # (i, j, k)
    aff = vol.affine.copy()
    aff[:3, 3] = vol.affine[:3, :3] @ start + vol.affine[:3, 3]
    sub = vol.with_data(values, affine=aff)
    data, kwargs, _ = volume_to_layer_data(sub, name=f"{layer.name} [edit]")
    kwargs["metadata"][STORE_KEY] = {"path": path,
                                     "region": [[s.start, s.stop] for s in region]}
    return viewer.add_labels(data, **kwargs)


def write_back_region(viewer, region_layer, remove: bool = True) -> int:
    """Write an edited region layer into its label store; return the voxels changed.

    The multiscale layers showing that store are refreshed.
    """
    from ..io.zarr import read_zarr_region, write_zarr_region

    info = (region_layer.metadata or {}).get(STORE_KEY) or {}
    if not info.get("region"):
        raise MedSegError("is not a region loaded from a label store; use 'edit region' on "
                          "the multiscale labels first", region_layer.name)
    region = tuple(slice(int(a), int(b)) for a, b in info["region"])
    new = np.asarray(region_layer.data)
    old = read_zarr_region(info["path"], region)
    if new.shape != old.shape:
        raise MedSegError(f"has shape {new.shape} but its region is {old.shape}; do not "
                          "resize the layer", region_layer.name)
    changed = int(np.count_nonzero(new != old))
    if changed:
        write_zarr_region(info["path"], region, new)
    for lay in list(viewer.layers):
        meta = (getattr(lay, "metadata", None) or {}).get(STORE_KEY) or {}
        if meta.get("path") == info["path"] and not meta.get("region"):
            from ..io.zarr import read_zarr_levels

            lay.data = read_zarr_levels(info["path"])  # fresh arrays: no stale chunk cache
            lay.refresh()
    if remove:
        viewer.layers.remove(region_layer)
    return changed
