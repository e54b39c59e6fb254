"""OME-Zarr / Zarr volumes: read lazily as dask arrays, write labels chunk by chunk.

Reading (:func:`read_zarr`): an OME-Zarr image (NGFF 0.4 ``multiscales``, Zarr
v2 or v3 on disk) or a plain Zarr array opens as a
:class:`~napari_medseg.core.volume.Volume` whose data is the full-resolution
level as a dask array: nothing is read until a region is needed. The voxel size
and origin come from the level's ``scale`` and ``translation``; OME-Zarr has no
direction cosines, so the full affine we wrote is kept in our own attribute
``napari_medseg.affine`` and wins when present. Without either the axes are
taken as RAS (``x`` right, ``y`` anterior, ``z`` superior).

Writing (:class:`ZarrLabelWriter`): an OME-Zarr label image (``multiscales``
with the image's scale and translation, ``image-label`` colours, and our
``napari_medseg`` attribute with the affine, class names and colours) whose
level 0 is filled slab by slab, then a pyramid of 2x nearest-neighbour levels
for display. The store is built in the target folder's hidden temporary folder
(``.napari-medseg-tmp/``, as :mod:`napari_medseg.io.atomic` does for files) and
renamed into place at the end, so an interrupted run never leaves a half store
under the final name, and the next write removes what a killed run left.

Needs the ``zarr`` package (``pip install "napari-medseg[zarr]"``).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..core.volume import Volume, make_affine
from ..errors import MedSegError

__all__ = ["is_zarr", "read_zarr", "zarr_geometry", "ZarrLabelWriter", "read_zarr_levels",
           "read_zarr_region", "write_zarr_region", "write_zarr_image"]

log = logging.getLogger(__name__)

OUR_KEY = "napari_medseg"


def _temp_store(path: Path) -> Path:
    """A temporary store path in the folder's hidden temporary folder (see ``io.atomic``).

    Named like ``atomic_path``'s files (host, pid), so ``clean_stale`` removes
    the stores of runs that were killed.
    """
    from .atomic import _HOST, temp_dir

    return temp_dir(path.parent) / f"{_HOST}~{os.getpid()}~{uuid.uuid4().hex[:12]}~{path.name}"


def _publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary store to ``path`` (replacing an old one)."""
    from .atomic import _rmdir_if_empty

    old = None
    if path.exists():
        old = _temp_store(path)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _rmdir_if_empty(tmp.parent)


def _zarr():
    try:
        import zarr
    except ImportError as exc:
        raise MedSegError('reading or writing Zarr needs the zarr package; '
                          'pip install "napari-medseg[zarr]"') from exc
    return zarr


def is_zarr(path) -> bool:
    """True for a folder that is a Zarr group or array (``.zarr`` name or Zarr metadata)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return p.name.lower().endswith(".zarr") or any(
        (p / n).exists() for n in (".zgroup", ".zarray", "zarr.json"))


def _attrs(node) -> dict:
    a = dict(node.attrs)
    return a.get("ome", a) if isinstance(a.get("ome"), dict) else a


def _open(path):
    zarr = _zarr()
    try:
        return zarr.open(str(path), mode="r")
    except Exception as exc:  # corrupt or not zarr
        raise MedSegError(f"cannot open as Zarr ({type(exc).__name__}: {exc}); check the "
                          "folder is a Zarr store", str(path)) from exc


def _levels(node) -> tuple[list, list, dict]:
    """``(paths, transforms per level, attrs)`` of an OME-Zarr group; a plain array: one level."""
    if not hasattr(node, "shape"):
        attrs = _attrs(node)
        ms = (attrs.get("multiscales") or [None])[0]
        if not ms:
            keys = sorted(k for k in node.array_keys())
            if not keys:
                raise MedSegError("the Zarr group holds no array and no OME multiscales")
            return [keys[0]], [[]], attrs
        paths = [d["path"] for d in ms["datasets"]]
        tfs = [d.get("coordinateTransformations", []) for d in ms["datasets"]]
        glob_tf = ms.get("coordinateTransformations", [])
        return paths, [t + glob_tf for t in tfs], dict(attrs, _axes=ms.get("axes"))
    return [None], [[]], _attrs(node)


def _scale_translation(tfs, ndim):
    scale, trans = np.ones(ndim), np.zeros(ndim)
    for t in tfs:
        if t.get("type") == "scale":
            scale = scale * np.asarray(t["scale"], float)
        elif t.get("type") == "translation":
            trans = trans * 1.0 + np.asarray(t["translation"], float)
    return scale, trans


def _spatial(axes, ndim):
    """Indices of the z, y, x axes (the last three when unnamed)."""
    if not axes:
        return list(range(ndim - 3, ndim))
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    try:
        return [names.index(n) for n in ("z", "y", "x")]
    except ValueError:
        return list(range(ndim - 3, ndim))


def zarr_geometry(path) -> tuple[tuple, np.ndarray]:
    """``(shape (Z, Y, X), RAS affine)`` of a Zarr volume from its metadata only."""
    vol = read_zarr(path)
    return vol.shape3, vol.affine


def read_zarr(path, lazy: bool = True, is_label: bool | None = None, level: int = 0) -> Volume:
    """Open an OME-Zarr or Zarr volume as a Volume backed by a dask array.

    Parameters
    ----------
    path : str or Path
        The store folder (``*.zarr`` / ``*.ome.zarr``).
    lazy : bool
        Keep the data as a dask array (True) or read it into memory.
    is_label : bool, optional
        Force a label map (default: our attribute says, or an ``image-label``).
    level : int
        Pyramid level (0 = full resolution).

    Returns
    -------
    Volume
        ``(Z, Y, X)`` or ``(C, Z, Y, X)`` dask data with its affine.
    """
    import dask.array as da

    path = Path(path)
    node = _open(path)
    paths, tfs, attrs = _levels(node)
    if level >= len(paths):
        raise MedSegError(f"the store has {len(paths)} level(s); level {level} does not exist",
                          str(path))
    arr = node if paths[level] is None else node[paths[level]]
    data = da.from_zarr(arr)
    ndim = data.ndim
    if ndim < 3:
        raise MedSegError(f"is {ndim}D; napari-medseg needs a 3D volume", str(path))
    sp = _spatial(attrs.get("_axes"), ndim)
    other = [i for i in range(ndim) if i not in sp]
    data = data.transpose(other + sp)
    # squeeze time / single channel axes
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim > 4:
        raise MedSegError(f"has shape {data.shape}; only (Z, Y, X) or (C, Z, Y, X) is read",
                          str(path))
    scale, trans = _scale_translation(tfs[level], ndim)
    ours = attrs.get(OUR_KEY) or {}
    if ours.get("affine") is not None:
        aff = np.asarray(ours["affine"], float)
        if level:  # a coarser level of our own store: every f-th voxel of level 0
            f = np.asarray(scale)[sp] / np.asarray(_scale_translation(tfs[0], ndim)[0])[sp]
            aff = aff.copy()
            for n in range(3):
                aff[:3, 2 - n] = aff[:3, 2 - n] * f[n]
    else:
        aff = make_affine(np.asarray(scale)[sp], np.asarray(trans)[sp][::-1])
    names = {int(k): v for k, v in (ours.get("label_names") or {}).items()}
    colors = {int(k): tuple(v) for k, v in (ours.get("label_colors") or {}).items()}
    label = bool(is_label) if is_label is not None else bool(
        ours.get("is_label") or attrs.get("image-label") is not None)
    if not lazy:
        data = np.asarray(data)
    return Volume(data, aff, modality=ours.get("modality", "unknown"), is_label=label,
                  label_names=names, label_colors=colors, source=str(path))


def read_zarr_levels(path) -> list:
    """Every pyramid level of an OME-Zarr store as dask arrays (``(Z, Y, X)``), finest first."""
    import dask.array as da

    node = _open(path)
    paths, _, _ = _levels(node)
    return [da.from_zarr(node if p is None else node[p]) for p in paths]


# ------------------------------------------------------------------ writing
class ZarrLabelWriter:
    """Build an OME-Zarr label store slab by slab, then publish it atomically.

    Parameters
    ----------
    path : str or Path
        Target folder (``*.ome.zarr``).
    ref : Volume
        The image the labels belong to (shape and affine).
    dtype : numpy dtype
        ``uint8`` or ``uint16``.
    label_names, label_colors : dict
        Class names and RGB colours in [0, 1].
    chunks : tuple of 3 int
        Zarr chunk shape.
    overwrite : bool
        Replace an existing store.

    Examples
    --------
    >>> with ZarrLabelWriter(out, ref, np.uint8) as w:     # doctest: +SKIP
    ...     w.write((slice(0, 64), slice(None), slice(None)), slab)
    """

    def __init__(self, path, ref: Volume, dtype=np.uint8, label_names=None, label_colors=None,
                 chunks=(64, 128, 128), overwrite=False, extra_meta=None):
        zarr = _zarr()
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise MedSegError("exists; choose another name or allow overwriting", str(self.path))
        if not self.path.parent.is_dir():
            raise MedSegError(f"folder {self.path.parent} does not exist; create it first",
                              str(self.path))
        self.tmp = _temp_store(self.path)
        self.shape = tuple(int(s) for s in ref.shape3)
        self.ref = ref
        self.names = {int(k): str(v) for k, v in (label_names or {}).items()}
        self.colors = {int(k): [float(c) for c in v] for k, v in (label_colors or {}).items()}
        self.extra = dict(extra_meta or {})
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        self.chunks = tuple(min(int(c), s) for c, s in zip(chunks, self.shape))
        self.dtype = np.dtype(dtype)
        self.level0 = self.group.create_array("0", shape=self.shape, chunks=self.chunks,
                                              dtype=self.dtype, fill_value=0)
        self.n_levels = 1

    def write(self, region, values) -> None:
        """Write ``values`` into ``region`` (three slices) of level 0."""
        self.level0[tuple(region)] = np.asarray(values, dtype=self.dtype)

    def _pyramid(self, min_size=64):
        """2x nearest-neighbour levels (every second voxel) until the largest axis <= 2 min_size."""
        import dask.array as da

        src = da.from_zarr(self.level0)
        level = 1
        while max(src.shape) > 2 * min_size and min(src.shape) >= 2 and level < 8:
            src = src[::2, ::2, ::2]
            arr = self.group.create_array(str(level), shape=src.shape, chunks=tuple(
                min(c, s) for c, s in zip(self.chunks, src.shape)), dtype=self.dtype,
                fill_value=0)
            src = src.rechunk(arr.chunks)
            da.to_zarr(src, arr)
            src = da.from_zarr(arr)
            level += 1
        self.n_levels = level

    def _metadata(self):
        ref = self.ref
        spacing = [float(s) for s in ref.spacing]
        # the world position of voxel (0, 0, 0) along each array axis: exact for an axis-
        # aligned affine; the full affine (direction cosines) goes in our own attribute
        origin_zyx = [float(v) for v in ref.affine[:3, 3][::-1]]
        datasets = []
        for lv in range(self.n_levels):
            f = 2 ** lv
            datasets.append({"path": str(lv), "coordinateTransformations": [
                {"type": "scale", "scale": [s * f for s in spacing]},
                {"type": "translation", "translation": origin_zyx}]})
        ms = {"version": "0.4", "name": self.path.name,
              "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"],
              "datasets": datasets}
        colors = [{"label-value": k, "rgba": [int(round(255 * c)) for c in
                                               (list(v[:3]) + [1.0])[:4]]}
                  for k, v in sorted(self.colors.items())]
        self.group.attrs.update({
            "multiscales": [ms],
            "image-label": {"version": "0.4", "colors": colors},
            OUR_KEY: dict({"affine": np.asarray(ref.affine, float).tolist(), "is_label": True,
                           "label_names": {str(k): v for k, v in self.names.items()},
                           "label_colors": {str(k): v for k, v in self.colors.items()},
                           "modality": ref.modality, "source": ref.source}, **self.extra)})

    def close(self) -> Path:
        """Build the pyramid, write the metadata and rename the store into place."""
        self._pyramid()
        self._metadata()
        _publish(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the temporary store."""
        from .atomic import _rmdir_if_empty

        shutil.rmtree(self.tmp, ignore_errors=True)
        _rmdir_if_empty(self.tmp.parent)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_zarr_image(path, vol: Volume, chunks=(64, 128, 128), overwrite=False) -> Path:
    """Write an image Volume as a one-level OME-Zarr store, chunk by chunk (dask data stays lazy).

    The store is built in a hidden folder beside ``path`` and renamed into place.
    """
    import dask.array as da

    zarr = _zarr()
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedSegError("exists; choose another name or allow overwriting", str(path))
    if vol.data.ndim != 3:
        raise MedSegError("only single-channel (Z, Y, X) images are written to Zarr", str(path))
    tmp = _temp_store(path)
    try:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        ch = tuple(min(int(c), s) for c, s in zip(chunks, vol.shape3))
        arr = g.create_array("0", shape=vol.shape3, chunks=ch, dtype=vol.data.dtype,
                             fill_value=0)
        data = vol.data if isinstance(vol.data, da.Array) else da.from_array(vol.data, ch)
        da.to_zarr(data.rechunk(ch), arr)
        spacing = [float(s) for s in vol.spacing]
        ms = {"version": "0.4", "name": path.name,
              "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"],
              "datasets": [{"path": "0", "coordinateTransformations": [
                  {"type": "scale", "scale": spacing},
                  {"type": "translation",
                   "translation": [float(v) for v in vol.affine[:3, 3][::-1]]}]}]}
        g.attrs.update({"multiscales": [ms], OUR_KEY: {
            "affine": np.asarray(vol.affine, float).tolist(), "modality": vol.modality,
            "is_label": bool(vol.is_label)}})
        _publish(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            from .atomic import _rmdir_if_empty

            _rmdir_if_empty(tmp.parent)
    return path


def read_zarr_region(path, region) -> np.ndarray:
    """Level-0 voxels of ``region`` (three slices) of a label store, in memory."""
    node = _open(path)
    paths, _, _ = _levels(node)
    arr = node if paths[0] is None else node[paths[0]]
    return np.asarray(arr[tuple(region)])


def write_zarr_region(path, region, values) -> None:
    """Write ``values`` back into ``region`` of a label store and refresh its pyramid there.

    Level 0 gets the values; every coarser level gets every second voxel of
    the (chunk-aligned) region again, so the multiscale display matches.
    """
    zarr = _zarr()
    g = zarr.open_group(str(path), mode="r+")
    paths, _, _ = _levels(g)
    arr = g[paths[0]]
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, arr.shape))
    arr[region] = np.asarray(values, dtype=arr.dtype)
    for lv, p in enumerate(paths[1:], start=1):
        f = 2 ** lv
        lo = [(s.start // f) for s in region]
        hi = [min(-(-s.stop // f), n) for s, n in zip(region, g[p].shape)]
        src = arr[tuple(slice(a * f, b * f, f) for a, b in zip(lo, hi))]
        g[p][tuple(slice(a, a + n) for a, n in zip(lo, src.shape))] = src
