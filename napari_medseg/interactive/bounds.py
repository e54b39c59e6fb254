"""Plausibility bounds every engine's result goes through: no floods, no collapses.

An interactive engine (region growing, SAM, nnInteractive, a learned click
model) can answer a click with far more than the image supports around it (a
flood into every tissue of similar intensity) or answer a further click by
throwing away most of what was right (a collapse). :class:`Engine
<napari_medseg.interactive.base.Engine>` passes every result through
:func:`bound_result`, which applies these rules, each from the prompts and the
previous result alone (no engine internals, no image statistics):

1. **Reach.** Nothing lies farther than ``max_radius_mm`` from a positive
   prompt (click, object scribble or box); in-plane, nothing lies outside a
   box (plus a margin) stretched to take in the positive clicks. A result
   from a *single* click (no box, no previous result) holds at most
   ``max_share`` of the image (of the slice in 2D mode): beyond that, the
   voxels nearest the click.
2. **A positive click adds near itself.** Against the previous result of the
   same object (the prompts before this click), what the click adds beyond
   ``edge_mm`` of the previous mask is at most ``growth`` times the previous
   volume plus a ball of ``min_reach_mm`` (the voxels nearest the click
   first), hangs together with the click or the previous mask and takes
   back nothing earlier negative clicks removed farther than
   ``min_reach_mm`` from the click. What it
   removes farther than ``edge_mm`` from the new mask's edge (a part of the
   object given up) is restored.
3. **A negative click removes near itself** and adds nothing: what its
   answer adds to the previous mask is dropped, even along its edge (a
   network's answer to a negative click sometimes widened the whole
   boundary); when the result lost every
   positive prompt the previous one held or kept less than ``keep`` of it (it
   emptied or collapsed), the part of the previous mask nearer the positive
   prompts than the new negative click is kept: what the mask held for two
   updates whatever its intensity, what the click before added only when its
   intensity is nearer the object's than the negative click's.
4. **A click changes the mask near itself** (``local``, on for the click
   model). Beyond a radius that grows with the click's distance to the
   previous mask's edge, the previous mask stays as it was: a click that
   fixes a margin cannot move the object's far side, a click deep in a
   missed part can add that part. It keeps a further click from undoing
   what was right far from it, in the manner of FocalClick's local
   refinement.
5. **A positive click is never ignored** (``seed_mm``, needs the image). When
   the result leaves out the voxel of the click just added (or of a first
   click), the voxels of the click's intensity (within three times the
   local noise) connected to it within ``seed_mm`` are added. Without it an
   engine that cannot see a thin part (a ventricle's horn) answers the same
   click the same way, and the user's next click lands on the same spot.
6. **A positive click adds what looks like the object** (``like``, on for the
   click model, needs the image). What the click adds lies within the
   intensity range of the previous mask (its 2nd to 98th percentile, widened
   to the click's own intensity) plus ``like`` times that range on each side;
   the rest of the addition is dropped. A network asked to grow a large organ
   sometimes takes its neighbours of other intensity too (click-model weights
   of phase 10 added 293k voxels outside the real liver at its third click).

Without rule 4, a positive click's boundary refinements within ``edge_mm`` are
never touched, so an engine that is right is left alone; the rules only cut
what no single click can mean.
All coordinates are array indices ``(z, y, x)``; distances are in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Bounds", "Previous", "bound_result", "added_click", "like_around"]


@dataclass(frozen=True)
class Bounds:
    """Parameters of :func:`bound_result`.

    Parameters
    ----------
    max_radius_mm : float
        Farthest a result reaches from the nearest positive prompt (mm).
    max_share : float
        Share of the image's voxels (the slice's in 2D) a single click may select.
    box_margin : float
        Margin around a box, as a share of its size (plus one voxel).
    growth : float
        A positive click adds at most this many times the previous volume
        beyond ``edge_mm`` of the previous mask.
    min_reach_mm : float
        A positive click may always add a ball (disc in 2D) of this radius (mm).
    edge_mm : float
        Changes within this distance of the previous mask's edge are
        boundary refinement: never bounded (mm).
    keep : float
        A negative click that leaves less than this share of the previous
        mask removes only what lies nearer to it than to the positive prompts.
    local : float or None
        A click at distance ``d`` (mm) from the previous mask's edge (from
        outside for a positive click, from inside for a negative one)
        changes nothing farther than ``max(min_reach_mm, local * d)`` from
        itself: a click just off the edge fixes the edge there, a click deep
        in a missed or spilled part fixes a part of that size. Everything
        beyond is the previous result. None: no such limit.
    seed_mm : float or None
        Rule 5: radius (mm) of the region of like intensity added around a
        positive click the result left out. None: the click may stay out.
    like : float or None
        Rule 6: how far (as a share of the previous mask's 2nd-98th percentile
        intensity range) beyond that range what a positive click adds may lie.
        None: no such limit.
    """

    max_radius_mm: float = 150.0
    max_share: float = 0.5
    box_margin: float = 0.1
    growth: float = 2.0
    min_reach_mm: float = 12.0
    edge_mm: float = 3.0
    keep: float = 0.5
    local: float | None = None
    seed_mm: float | None = 4.0
    like: float | None = None


@dataclass
class Previous:
    """The previous bounded result of the same object, and the click added since.

    Parameters
    ----------
    mask : bool array
        Mask on ``region`` of the image.
    region : tuple of 3 slice
    point : (3,) float array
        The click added since (array indices).
    positive : bool
        Whether it is a positive click.
    removed : bool array of the image's shape, optional
        What negative clicks removed from this object so far (beyond the edge
        band); :func:`bound_result` adds to it in place.
    older : (mask, region), optional
        The result before ``mask`` (one click earlier), when known.
    """

    mask: np.ndarray
    region: tuple
    point: np.ndarray
    positive: bool
    removed: np.ndarray | None = None
    older: tuple | None = None


def added_click(old, new) -> tuple[np.ndarray, bool] | None:
    """The one click ``new`` prompts add to ``old`` ones, or None.

    ``new`` must repeat ``old`` (same mode, slice, boxes and scribble layer,
    the same clicks in the same order) plus exactly one positive or negative
    click.
    """
    if (old.mode, old.axis, old.index) != (new.mode, new.axis, new.index):
        return None
    if old.scribbles is not new.scribbles or old.boxes.shape != new.boxes.shape \
            or not np.allclose(old.boxes, new.boxes):
        return None
    dp = len(new.positive) - len(old.positive)
    dn = len(new.negative) - len(old.negative)
    if sorted((dp, dn)) != [0, 1]:
        return None
    for a, b in ((old.positive, new.positive), (old.negative, new.negative)):
        if len(a) and not np.allclose(a, b[:len(a)]):
            return None
    return (new.positive[-1], True) if dp else (new.negative[-1], False)


# ---------------------------------------------------------------- geometry
def _domain(shape, parts, prompts, flat_axis) -> tuple:
    """The bounding box (slices) of the masks in ``parts`` (``[(mask, region)]``)
    and of the prompt points, one voxel wider, inside ``shape``."""
    lo = np.array(shape, int)
    hi = np.zeros(3, int)
    for mask, region in parts:
        if mask is None or not mask.any():
            continue
        idx = [np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
               for a in range(3)]
        lo = np.minimum(lo, [r.start + i[0] for r, i in zip(region, idx)])
        hi = np.maximum(hi, [r.start + i[-1] + 1 for r, i in zip(region, idx)])
    pts = prompts.all_points()
    if len(pts):
        lo = np.minimum(lo, np.floor(pts.min(0)).astype(int))
        hi = np.maximum(hi, np.ceil(pts.max(0)).astype(int) + 1)
    lo = np.clip(lo - 1, 0, shape)
    hi = np.clip(hi + 1, 0, shape)
    hi = np.maximum(hi, lo + 1)
    if flat_axis is not None:
        lo[flat_axis], hi[flat_axis] = prompts.index, prompts.index + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _paste(mask, region, domain) -> np.ndarray:
    """``mask`` (on ``region``) as a bool array on ``domain``."""
    out = np.zeros(tuple(s.stop - s.start for s in domain), bool)
    if mask is None:
        return out
    src = tuple(slice(max(d.start - r.start, 0), min(d.stop, r.stop) - r.start)
                for r, d in zip(region, domain))
    dst = tuple(slice(max(r.start - d.start, 0), min(d.stop, r.stop) - d.start)
                for r, d in zip(region, domain))
    if all(s.stop > s.start for s in src):
        out[dst] |= np.asarray(mask, bool)[src]
    return out


def _dist_to_points(domain, points, spacing) -> np.ndarray:
    """Per voxel of ``domain``, the distance (mm) to the nearest of ``points``."""
    axes = [(np.arange(s.start, s.stop, dtype=np.float32), float(sp))
            for s, sp in zip(domain, spacing)]
    best = None
    for p in points:
        d = [((a - float(c)) * sp) ** 2 for (a, sp), c in zip(axes, p)]
        d2 = d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :]
        best = d2 if best is None else np.minimum(best, d2)
    return np.sqrt(best)


def _within(mask, spacing, mm) -> np.ndarray:
    """Voxels within about ``mm`` of ``mask``: a dilation by a box of half-size
    ``mm`` along each axis (a tolerance band, cheap on large masks)."""
    out = np.array(mask, bool, copy=True)
    for a, sp in enumerate(spacing):
        steps = min(int(mm // sp), out.shape[a] - 1)
        if steps <= 0:
            continue
        src = out.copy()
        for k in range(1, steps + 1):
            lo = tuple(slice(k, None) if b == a else slice(None) for b in range(out.ndim))
            hi = tuple(slice(None, -k) if b == a else slice(None) for b in range(out.ndim))
            out[lo] |= src[hi]
            out[hi] |= src[lo]
    return out


def _nearest(mask, domain, point, spacing, count: int) -> np.ndarray:
    """The ``count`` voxels of ``mask`` nearest ``point``."""
    if mask.sum() <= count:
        return mask
    idx = np.flatnonzero(mask)
    out = np.zeros(mask.shape, bool)
    if count >= 1:
        d = _dist_to_points(domain, [point], spacing).ravel()[idx]
        out.ravel()[idx[np.argpartition(d, count - 1)[:count]]] = True
    return out


def _positive_points(prompts, limit: int = 256) -> np.ndarray:
    """Where the object is said to be: positive clicks, box centres (their
    whole extent in-plane), object scribble voxels (a sample)."""
    pts = [prompts.positive]
    for lo, hi in prompts.boxes:
        pts.append(((lo + hi) / 2)[None])
    if prompts.scribbles is not None:
        sc = np.argwhere(np.asarray(prompts.scribbles) == 1)
        if len(sc) > limit:
            sc = sc[np.linspace(0, len(sc) - 1, limit).astype(int)]
        pts.append(sc.astype(float))
    pts = [p for p in pts if len(p)]
    return np.concatenate(pts) if pts else np.zeros((0, 3))


def _reach(domain, spacing, prompts, bounds: Bounds, flat_axis) -> np.ndarray:
    """Rule 1: where a result may lie, on ``domain``."""
    pos = _positive_points(prompts)
    shape = tuple(s.stop - s.start for s in domain)
    corners = np.array(np.meshgrid(*[(s.start, s.stop - 1) for s in domain],
                                   indexing="ij")).reshape(3, -1).T
    reach = np.sqrt((((corners[None] - pos[:, None]) * spacing) ** 2).sum(-1)).max(1) \
        if len(pos) else np.zeros(0)
    if not len(pos) or np.any(reach <= bounds.max_radius_mm):
        allowed = np.ones(shape, bool)  # the domain lies in the ball around a prompt
    else:
        allowed = _dist_to_points(domain, pos, spacing) <= bounds.max_radius_mm
    if len(prompts.boxes):
        inbox = np.zeros(allowed.shape, bool)
        for lo, hi in prompts.boxes:
            flat = [a for a in range(3) if hi[a] - lo[a] < 1]
            lo, hi = _box_with_clicks(lo, hi, prompts.positive, flat)
            sl = []
            for a, d in enumerate(domain):
                if a in flat and a != flat_axis:
                    sl.append(slice(None))  # a 2D box in 3D: any depth (within reach)
                    continue
                m = bounds.box_margin * (hi[a] - lo[a]) + 1
                a0 = int(np.floor(lo[a] - m + 0.5)) - d.start
                a1 = int(np.floor(hi[a] + m + 0.5)) + 1 - d.start
                sl.append(slice(max(a0, 0), max(a1, 0)))
            inbox[tuple(sl)] = True
        allowed &= inbox
    return allowed


def _box_with_clicks(lo, hi, positive, flat) -> tuple[np.ndarray, np.ndarray]:
    """A box's corners stretched to take in the positive clicks along its
    extended axes (not ``flat``, the depth of a 2D box). The box drawn on one
    slice says where the object lies there; a positive click outside it says
    that the object reaches farther (a ventricle's horn, a colon's loop)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    if not len(positive):
        return lo, hi
    ext = np.array([a not in flat for a in range(3)])
    p = np.asarray(positive, float)
    return (np.where(ext, np.minimum(lo, p.min(0)), lo),
            np.where(ext, np.maximum(hi, p.max(0)), hi))


def _voxel(point, domain) -> tuple | None:
    idx = tuple(int(round(float(c))) - d.start for c, d in zip(point, domain))
    if all(0 <= i < d.stop - d.start for i, d in zip(idx, domain)):
        return idx
    return None


def _positive_step(new, old, point, spacing, domain, bounds: Bounds,
                   removed=None, radius=None) -> np.ndarray:
    """Rule 2 on ``domain``: a positive click (at ``point``) adds near itself,
    takes back nothing negative clicks removed (``removed``, on ``domain``)
    farther than ``min_reach_mm`` from itself, and gives up nothing beyond
    the edge band; with rule 4 (``radius``, mm) it adds nothing beyond
    ``radius`` before the volume cap is counted."""
    out = new.copy()
    n_old = int(old.sum())
    # restore parts of the object the click gave up (beyond the edge band)
    lost = old & ~new
    if lost.any():
        far = lost & ~_within(new, spacing, bounds.edge_mm)
        if far.any():
            lab, _ = ndi.label(lost)
            keep = np.unique(lab[far])
            out |= np.isin(lab, keep[keep > 0])
    # additions beyond the edge band stay near the click and bounded in volume
    add = new & ~old & ~_within(old, spacing, bounds.edge_mm)
    if not add.any() or n_old == 0:
        return out
    # what negative clicks removed is not taken back, but near this click
    if removed is not None and (add & removed).any():
        drop = add & removed & (_dist_to_points(domain, [point], spacing)
                                > bounds.min_reach_mm)
        out &= ~drop
        add &= ~drop
        if not add.any():
            return out
    if radius is not None:
        drop = add & ~_near_click(old, old | add, domain, point, spacing, radius)
        out &= ~drop
        add &= ~drop
        if not add.any():
            return _connected(out, old, point, domain)
    vox = float(np.prod([s for s, n in zip(spacing, add.shape) if n > 1]))
    ball = (4 / 3 * np.pi * bounds.min_reach_mm ** 3 if add.ndim - add.shape.count(1) == 3
            else np.pi * bounds.min_reach_mm ** 2)
    cap = int(bounds.growth * n_old + ball / vox)
    out &= ~(add & ~_nearest(add, domain, point, spacing, cap))
    return _connected(out, old, point, domain)


def _like_step(new, old, point, image, domain, like: float) -> np.ndarray:
    """Rule 6 on ``domain``: what a positive click (at ``point``) adds to ``old``
    lies within ``old``'s 2nd-98th percentile intensities, widened to the
    click's own, plus ``like`` times that range on each side."""
    add = new & ~old
    if not old.any() or not add.any():
        return new
    vals = np.asarray(image[domain], np.float32)
    lo, hi = np.percentile(vals[old], [2, 98])
    c = _value_at(image, point)
    margin = like * float(hi - lo)
    lo, hi = min(float(lo), c) - margin, max(float(hi), c) + margin
    out = new & ~(add & ((vals < lo) | (vals > hi)))
    return _connected(out, old, point, domain)


def _connected(out, old, point, domain) -> np.ndarray:
    """The parts of ``out`` that hang together with ``old`` or the click."""
    seeds = old & out
    v = _voxel(point, domain)
    if v is not None and out[v]:
        seeds[v] = True
    if seeds.any():
        lab, _ = ndi.label(out)
        keep = np.unique(lab[seeds])
        out = np.isin(lab, keep[keep > 0])
    return out


def _local_radius(old, domain, point, positive, spacing, bounds) -> float:
    """Rule 4's radius (mm): ``max(min_reach_mm, local * d)``, ``d`` the
    click's distance to ``old`` (a positive click) or to the outside of
    ``old`` (a negative one), on ``domain``."""
    d = _distance_to_mask(old if positive else ~old, domain, point, spacing)
    return max(bounds.min_reach_mm, bounds.local * d)


def _near_click(old, new, domain, point, spacing, radius) -> np.ndarray:
    """Where ``new`` differs from ``old`` within ``radius`` (mm) of the
    click at ``point``, on ``domain``."""
    changed = np.flatnonzero(new != old)
    out = np.zeros(old.shape, bool)
    if len(changed):
        idx = np.stack(np.unravel_index(changed, old.shape), 1)
        out.ravel()[changed[_distances(idx, domain, point, spacing) <= radius]] = True
    return out


def _distances(idx, domain, point, spacing) -> np.ndarray:
    """Distances (mm) from ``point`` (image indices) to voxels ``idx`` of ``domain``."""
    start = np.array([d.start for d in domain], float)
    diff = (idx + start - np.asarray(point, float)) * np.asarray(spacing, float)
    return np.sqrt((diff * diff).sum(1))


def _distance_to_mask(mask, domain, point, spacing) -> float:
    """Distance (mm) from ``point`` (image indices) to the nearest voxel of
    ``mask`` (on ``domain``); 0 when the point lies in it, the domain's
    diagonal when the mask is empty. Searched in growing windows around the
    point: a voxel found within a window's half-size is the nearest."""
    sp = np.asarray(spacing, float)
    centre = np.round(np.asarray(point, float)).astype(int) - [d.start for d in domain]
    half = 8.0
    while True:
        lo = np.clip(centre - np.ceil(half / sp).astype(int), 0, mask.shape)
        hi = np.clip(centre + np.ceil(half / sp).astype(int) + 1, 0, mask.shape)
        win = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
        whole = bool(np.all(lo == 0) and np.all(hi == mask.shape))
        idx = np.argwhere(win)
        if len(idx):
            d = float(_distances(idx + lo, domain, point, spacing).min())
            if d <= half or whole:
                return d
        elif whole:
            return float(np.sqrt(((np.asarray(mask.shape) * sp) ** 2).sum()))
        half *= 2


def _value_at(image, point) -> float:
    """Median of ``image`` in the 3 x 3 x 3 voxels around ``point``."""
    c = np.round(np.asarray(point, float)).astype(int)
    sl = tuple(slice(max(v - 1, 0), min(v + 2, n)) for v, n in zip(c, image.shape))
    return float(np.median(np.asarray(image[sl], np.float32)))


def _negative_step(new, old, point, prompts, spacing, domain, bounds: Bounds,
                   image=None, stable=None) -> np.ndarray:
    """Rule 3 on ``domain``: a negative click (at ``point``) removes near itself
    and adds nothing.

    ``stable``: the part of ``old`` the click before kept too; it is kept
    back on its side of the click whatever its intensity (a heterogeneous
    object), what the click before added only when its intensity is the
    object's.
    """
    out = new & old
    pos = _positive_points(prompts)
    if not len(pos) or not len(prompts.negative):
        return out
    held = [v for v in (_voxel(p, domain) for p in pos) if v is not None and old[v]]
    if out.any() and (not held or any(out[v] for v in held)) \
            and (out & old).sum() >= bounds.keep * old.sum():
        return out
    # emptied, most of it removed or every positive prompt lost: keep what
    # lies nearer the object's prompts than the negative ones
    nearer = _dist_to_points(domain, pos, spacing) < _dist_to_points(domain, [point],
                                                                     spacing)
    if image is not None:  # and nearer the object's intensity than the click's
        vals = np.asarray(image[domain], np.float32)
        obj = _value_at(image, prompts.positive[0] if len(prompts.positive) else pos[0])
        like = np.abs(vals - obj) <= np.abs(vals - _value_at(image, point))
        nearer &= like if stable is None else like | stable
    kept = out | (old & nearer)
    lab, _ = ndi.label(kept)
    keep = np.unique([lab[v] for v in held]) if held else np.unique(lab[kept])
    return np.isin(lab, keep[keep > 0])


def bound_result(mask, region, shape, spacing, prompts, bounds: Bounds = Bounds(),
                 previous: Previous | None = None, image=None) -> tuple[np.ndarray, tuple]:
    """An engine's result, bounded to what its prompts can mean.

    Parameters
    ----------
    mask : bool array
        The engine's mask on ``region``.
    region : tuple of 3 slice
        Where ``mask`` lies in the image.
    shape : tuple of 3 int
        The image's shape.
    spacing : sequence of 3 float
        Voxel size (mm).
    prompts : Prompts
        The prompts of this result (2D prompts already cut to their slice).
    bounds : Bounds
    previous : Previous, optional
        The previous bounded result of the same object and the click added since.
    image : (Z, Y, X) array, optional
        The image: a collapse undone by rule 3 keeps only voxels nearer the
        intensity at the first positive click (or box centre) than at the
        new negative click.

    Returns
    -------
    mask, region
        The bounded mask and the region it lies on: ``region``, widened to
        the previous mask where that lies outside it.
    """
    spacing = tuple(float(s) for s in spacing)
    flat_axis = prompts.axis if prompts.mode == "2d" else None
    prev = previous
    if prev is not None and flat_axis is not None and prev.region[flat_axis] != \
            region[flat_axis]:
        prev = None
    parts = [(np.asarray(mask, bool), region)]
    if prev is not None:
        parts.append((prev.mask, prev.region))
    domain = _domain(tuple(shape), parts, prompts, flat_axis)
    new = _paste(mask, region, domain)
    single = prev is None and len(prompts.positive) == 1 and not len(prompts.boxes) \
        and (prompts.scribbles is None or not np.any(np.asarray(prompts.scribbles) == 1))
    allowed = _reach(domain, spacing, prompts, bounds, flat_axis)
    new &= allowed
    if single:
        size = np.prod([1 if a == flat_axis else n for a, n in enumerate(shape)])
        new = _nearest(new, domain, prompts.positive[0], spacing,
                       int(bounds.max_share * size))
    if prev is not None:
        old = _paste(prev.mask, prev.region, domain)
        radius = None if bounds.local is None else _local_radius(
            old, domain, prev.point, prev.positive, spacing, bounds)
        if prev.positive:
            new = _positive_step(new, old, prev.point, spacing, domain, bounds,
                                 None if prev.removed is None else prev.removed[domain],
                                 radius)
            if bounds.like is not None and image is not None:
                new = _like_step(new, old, prev.point, image, domain, bounds.like)
        else:
            stable = None if prev.older is None else old & _paste(*prev.older, domain)
            new = _negative_step(new, old, prev.point, prompts, spacing, domain, bounds,
                                 image, stable)
            gone = old & ~_within(new, spacing, bounds.edge_mm)
            if gone.any():
                if prev.removed is None:
                    prev.removed = np.zeros(tuple(shape), bool)
                prev.removed[domain] |= gone
        new &= allowed | old
        if radius is not None:
            near = _near_click(old, new, domain, prev.point, spacing, radius)
            new = np.where(near, new, old)
    # on the engine's own region (widened to the domain where that reaches out)
    out = tuple(slice(min(r.start, d.start), max(r.stop, d.stop))
                for r, d in zip(region, domain))
    click = prev.point if prev is not None and prev.positive else \
        (prompts.positive[-1] if prev is None and len(prompts.positive) else None)
    if bounds.seed_mm and image is not None and click is not None:
        v = _voxel(click, domain)
        if v is not None and not new[v]:
            seed, s_region = like_around(image, click, spacing, bounds.seed_mm, flat_axis)
            out = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                        for a, b in zip(out, s_region))
            return _paste(new, domain, out) | _paste(seed, s_region, out), out
    return _paste(new, domain, out), out


def like_around(image, point, spacing, radius_mm: float, flat_axis=None
                ) -> tuple[np.ndarray, tuple]:
    """Rule 5: the voxels within ``radius_mm`` of ``point`` whose intensity
    is the point's (the median of its voxel and their face neighbours, within
    three times the noise measured there) and that connect to it;
    ``(mask, region)``. In 2D mode (``flat_axis``), on the point's slice only."""
    c = np.round(np.asarray(point, float)).astype(int)
    sp = np.asarray(spacing, float)
    r = np.maximum(np.ceil(radius_mm / sp).astype(int), 1)
    if flat_axis is not None:
        r[flat_axis] = 0
    lo = np.clip(c - r, 0, image.shape)
    hi = np.clip(c + r + 1, 0, image.shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    vals = np.asarray(image[region], np.float32)
    size = [1 if a == flat_axis else 3 for a in range(3)]
    noise = 1.4826 * float(np.median(np.abs(vals - ndi.median_filter(vals, size=size))))
    span = float(np.percentile(vals, 95) - np.percentile(vals, 5))
    tol = max(3.0 * noise, 0.05 * span, 1e-6)
    centre = tuple(c - lo)
    cross = [vals[centre]]  # the voxel and its face neighbours: a thin part's own value
    for a in range(3):
        for d in (-1, 1):
            n = list(centre)
            n[a] += d
            if 0 <= n[a] < vals.shape[a]:
                cross.append(vals[tuple(n)])
    like = np.abs(vals - float(np.median(cross))) <= tol
    like &= _dist_to_points(region, [point], spacing) <= radius_mm
    like[centre] = True
    lab, _ = ndi.label(like)
    return lab == lab[centre], region
