"""Pseudo-objects on real images: objects the image itself supports, without labels.

The click model is trained on synthetic objects, and also, where their licences
allow it, on the *images* (never the labels) of a few real scans, with objects
made from the image alone, in the manner of ScribblePrompt's synthetic labels
on real images: supervoxels (:func:`skimage.segmentation.slic`) merged with
their neighbours while their mean intensities differ by less than a random
multiple of the image's noise, then split into connected parts. Each part is a
region bounded by intensity edges, in real texture, noise, partial volume and
resolution: what a click on a real scan asks the model to find.

:data:`TRAINING_IMAGES` names the images used (paths relative to the
real-data folder); the other scans of that folder (``spleen_ct``, ``brats``
and sarcoma cases ``STS_006`` to ``STS_010``) are never seen in training, so
figures on them are held out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

#: Images (relative to the real-data folder) whose pixels, never labels, may be used in
#: training: their licences allow it (Apache-2.0, CC BY 3.0). Sarcoma cases 6-10 are kept out.
TRAINING_IMAGES = (
    ("ct_abdomen_dicom", "ct"),
    *((f"sarcoma/STS_00{i}/{m}_image.nii.gz", k) for i in range(1, 6)
      for m, k in (("CT", "ct"), ("MR_T1", "mr"), ("PET", "pet"))),
    ("brain_t1_aseg/t1.nii.gz", "mr"),
)

#: Object sizes (voxels) kept; size classes for a balanced draw of small and large objects.
MIN_VOXELS = 150
SIZE_BINS = (150, 2_000, 20_000)


def noise_sigma(img: np.ndarray, floor: float | None = None) -> float:
    """A robust estimate of the image noise: the MAD of neighbour differences.

    Only pairs of voxels above the image's 10th percentile count (not the air
    around a body or the zeros around a skull-stripped brain).

    Parameters
    ----------
    img : numpy.ndarray
        ``(Z, Y, X)`` float image.
    floor : float, optional
        The image's 10th percentile, where the caller has it already.

    Returns
    -------
    float
        Noise standard deviation in the image's units (> 0).
    """
    floor = np.percentile(img, 10) if floor is None else floor
    inside = (img[..., 1:] > floor) & (img[..., :-1] > floor)
    d = np.diff(img, axis=-1)[inside]
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    return max(float(np.median(np.abs(d - np.median(d)))) * 1.4826 / np.sqrt(2.0), 1e-6)


def _merge(seg: np.ndarray, img: np.ndarray, thresh: float) -> np.ndarray:
    """Merge adjacent supervoxels whose means differ by less than ``thresh``.

    Returns a relabelled ``seg`` (0 stays 0): single-linkage components of the
    graph of face-adjacent segments with close means.
    """
    n = int(seg.max()) + 1
    counts = np.bincount(seg.ravel(), minlength=n).astype(float)
    means = np.bincount(seg.ravel(), weights=img.ravel(), minlength=n) / np.maximum(counts, 1)
    pairs = []
    for ax in range(seg.ndim):
        a = np.moveaxis(seg, ax, 0)
        u, v = a[:-1].ravel(), a[1:].ravel()
        keep = (u != v) & (u > 0) & (v > 0)
        pairs.append(np.stack([u[keep], v[keep]], 1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    close = np.abs(means[pairs[:, 0]] - means[pairs[:, 1]]) < thresh
    pairs = pairs[close]
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    comp = comp + 1
    comp[0] = 0
    return comp[seg]


def pseudo_objects(img: np.ndarray, spacing, rng, segment_mm: float | None = None,
                   merge_sigmas: float | None = None, max_fraction: float = 0.3):
    """Objects supported by the image alone: ``(object ids, class of each id)``.

    Parameters
    ----------
    img : numpy.ndarray
        ``(Z, Y, X)`` real image, any units.
    spacing : sequence of 3 float
        Voxel size in mm.
    rng : numpy.random.Generator
    segment_mm : float, optional
        Supervoxel edge (mm); random in 5-12 mm by default.
    merge_sigmas : float, optional
        Neighbours merge while their means differ by less than this many noise
        standard deviations; random in 1-4 by default.
    max_fraction : float
        Parts larger than this share of the volume (background, body) are dropped.

    Returns
    -------
    objs : numpy.ndarray
        int32 ``(Z, Y, X)`` object ids, 0 where no object.
    classes : numpy.ndarray
        ``classes[i]`` is the size class (300, 301, 302) of object ``i``
        (``classes[0] == 0``), so that a draw by class balances sizes.
    """
    from skimage.segmentation import slic

    img = np.asarray(img, np.float32)
    sp = np.asarray(spacing, float)
    segment_mm = float(rng.uniform(5, 12)) if segment_mm is None else float(segment_mm)
    merge_sigmas = float(rng.uniform(1.0, 4.0)) if merge_sigmas is None else merge_sigmas
    lo, hi = np.percentile(img, [0.5, 99.5])
    norm = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    n_seg = max(int(np.prod(np.array(img.shape) * sp) / segment_mm ** 3), 8)
    seg = slic(norm, n_segments=n_seg, compactness=float(rng.uniform(0.02, 0.2)),
               spacing=sp, channel_axis=None, start_label=1, enforce_connectivity=True)
    # the darkest tenth: air around the body, outside a skull-stripped brain
    floor = np.percentile(img, 10)
    sigma = noise_sigma(img, floor)
    # means of supervoxels of ~hundreds of voxels: a threshold in noise units of the image
    merged = _merge(seg.astype(np.int64), img, merge_sigmas * sigma)
    # each merged group is connected: SLIC's supervoxels are, and merging joins neighbours
    sizes = np.bincount(merged.ravel())
    ids = np.flatnonzero((sizes >= MIN_VOXELS) & (sizes <= max_fraction * img.size))
    ids = ids[ids > 0]
    if ids.size:
        medians = np.asarray(ndi.median(img, merged, ids))
        ids = ids[medians > floor]
    lut = np.zeros(len(sizes), np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    objs = lut[merged]
    classes = np.concatenate([[0], 300 + np.searchsorted(SIZE_BINS, sizes[ids], "right") - 1])
    return objs, np.array(classes)


def load_training_images(root) -> list:
    """The images of :data:`TRAINING_IMAGES` under ``root``: ``[(name, image, spacing)]``.

    Missing images are left out (logged); labels are never read.
    """
    from ..io import read_volume

    root = Path(root)
    out = []
    for rel, _kind in TRAINING_IMAGES:
        path = root / rel
        if not path.exists():
            log.info("real training image %s is absent: left out", path)
            continue
        vol = read_volume(path, lazy=False)
        img = np.asarray(vol.data, np.float32)
        if img.ndim != 3:
            continue
        out.append((rel, img, np.asarray(vol.spacing, float)))
    return out


def build_real_pool(root, rng, maps_per_image: int = 3, cache=None) -> list:
    """Pool entries ``(image, spacing, object ids, classes)`` from the real images.

    Each image gets ``maps_per_image`` pseudo-object maps at random scales, so
    the same image offers both fine and coarse objects.

    ``cache``: an ``.npz`` file the pool is read from when it was built from the
    same folder, settings and generator state, and written to (atomically)
    otherwise; ``rng`` ends in the state building would leave it in.
    """
    import json

    key = json.dumps([str(Path(root).resolve()), int(maps_per_image),
                      rng.bit_generator.state], sort_keys=True, default=str)
    if cache is not None and Path(cache).is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    images = [(z[f"img{j}"], z[f"sp{j}"]) for j in range(int(z["n_images"]))]
                    pool = [(*images[int(z[f"src{i}"])], z[f"obj{i}"], z[f"cls{i}"])
                            for i in range(int(z["n_maps"]))]
                    rng.bit_generator.state = json.loads(str(z["rng_after"]))
                    log.info("real-image pseudo-object pool read from %s", cache)
                    return pool
        except (OSError, KeyError, ValueError) as err:
            log.warning("pseudo-object cache %s unreadable (%s): building it again", cache, err)
    pool, images, src = [], [], []
    for rel, img, sp in load_training_images(root):
        counts = []
        for _ in range(maps_per_image):
            objs, classes = pseudo_objects(img, sp, rng)
            counts.append(len(classes) - 1)
            if len(classes) > 1:
                pool.append((img, sp, objs, classes))
                src.append(len(images))
        images.append((img, sp))
        log.info("pseudo-objects on %s: %s", rel, counts)
    if cache is not None:
        from ..io.atomic import atomic_path

        arrays = {"key": np.array(key), "n_images": np.array(len(images)),
                  "n_maps": np.array(len(pool)),
                  "rng_after": np.array(json.dumps(rng.bit_generator.state, default=str))}
        for j, (img, sp) in enumerate(images):
            arrays.update({f"img{j}": img, f"sp{j}": sp})
        for i, ((_, _, objs, classes), j) in enumerate(zip(pool, src)):
            arrays.update({f"obj{i}": objs, f"cls{i}": classes, f"src{i}": np.array(j)})
        with atomic_path(cache, overwrite=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    return pool
