"""A classical prompt engine: no weights, any modality, fast on a CPU.

How it works (3D mode; 2D mode is the same on one slice):

1. A region of interest (at least ``roi_size`` voxels) is cut around the
   prompts and lightly smoothed (cached between clicks).
2. Intensity statistics of the object come from the prompts: a small
   neighbourhood of each positive click, the object scribble, the centre of a
   box (median and a robust spread, per seed, so an object of several
   intensities can be built from several clicks).
3. Seeded region growing: voxels within ``k`` spreads of a seed's statistics
   that are connected to that seed. The surroundings of the grown object (and
   any negative click, background scribble or box edge) give background
   statistics, and the object is re-grown with a likelihood test, which puts
   its edge half-way between object and background intensities.
   A later positive click inside a region of its own intensity (a kidney's
   cortex after a click on its medulla) adds that class to the whole object
   (a second pass then takes the background from around the grown object);
   a later click on a blurred edge (its intensity a blend of its
   neighbours') only adds voxels within ``edge_mm``.
4. A negative click removes only the connected region around it that is
   closer to its intensity than to the object's; its intensity is background
   everywhere only when it is no blend of object and background. Where the
   grown object still touches a background seed (two structures of the same
   intensity), a marker watershed on the gradient magnitude splits them at
   the strongest edge between the seeds (edge-aware propagation).
5. Holes are filled and everything outside a box is dropped. Thin bridges are
   cut only towards thick structures beyond them, so thin objects (a cortical
   ribbon) survive.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from ..errors import check_cancel
from .base import Engine, Prompts, Region, roi_around

log = logging.getLogger(__name__)

__all__ = ["ClassicalEngine"]


def _ball_offsets(radius_vox) -> np.ndarray:
    """Integer offsets inside an ellipsoid of per-axis radii ``radius_vox``."""
    r = np.maximum(np.asarray(radius_vox, float), 0.5)
    rng = [np.arange(-int(np.floor(v)), int(np.floor(v)) + 1) for v in r]
    grid = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, len(r))
    keep = ((grid / r) ** 2).sum(1) <= 1.0 + 1e-9
    return grid[keep]


def _noise_level(arr: np.ndarray, sigma) -> float:
    """Noise standard deviation of ``arr`` after Gaussian smoothing by ``sigma``.

    The raw noise comes from the robust spread of each voxel's difference to
    the mean of its axis neighbours (edges are a minority and do not count);
    smoothing divides it by the root of the kernel's sum of squares.
    """
    sub = arr[tuple(slice(None, None, 2) if n > 8 else slice(None) for n in arr.shape)]
    axes = [a for a in range(sub.ndim) if sub.shape[a] > 2]
    if not axes:
        return 0.0
    core = tuple(slice(1, -1) if a in axes else slice(None) for a in range(sub.ndim))
    diff = sub[core] * 1.0
    for a in axes:
        lo = tuple(slice(0, -2) if b == a else c for b, c in enumerate(core))
        hi = tuple(slice(2, None) if b == a else c for b, c in enumerate(core))
        diff = diff - (sub[lo] + sub[hi]) / (2 * len(axes))
    raw = 1.4826 * float(np.median(np.abs(diff - np.median(diff))))
    raw /= np.sqrt(1 + 1 / (2 * len(axes)))
    delta = np.zeros([9 if s > 0 else 1 for s in sigma], np.float32)
    delta[tuple(n // 2 for n in delta.shape)] = 1
    kern = ndi.gaussian_filter(delta, sigma, mode="constant", truncate=2.0)
    return raw * float(np.sqrt((kern ** 2).sum()))


def _bbox(mask: np.ndarray) -> tuple:
    """Slices of the bounding box of a non-empty bool array (faster than
    ``ndi.find_objects`` on a large array)."""
    out = []
    for a in range(mask.ndim):
        idx = np.flatnonzero(np.any(mask, axis=tuple(b for b in range(mask.ndim) if b != a)))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def _kmeans_1d(values: np.ndarray, k: int, iters: int = 12) -> list:
    """``[(centre, count)]`` of a 1D k-means (quantile start)."""
    v = values if values.size <= 20000 else values[:: values.size // 20000 + 1]
    c = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        idx = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        c = np.array([v[idx == i].mean() if np.any(idx == i) else c[i] for i in range(k)])
    counts = np.bincount(idx, minlength=k) * (values.size / v.size)
    return [(float(ci), float(ni)) for ci, ni in zip(c, counts)]


def _robust_stats(values: np.ndarray) -> tuple[float, float]:
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    return med, mad


class ClassicalEngine(Engine):
    """Seeded, edge-aware region growing from clicks, boxes and scribbles.

    Parameters
    ----------
    roi_size : tuple of 3 int
        Smallest 3D region (voxels) grown in around the prompts.
    k : float
        Spreads (robust standard deviations) a voxel may differ from a seed's
        intensity and still join the object in the first growth.
    seed_radius_mm : float
        Radius of the neighbourhood of a click that gives its statistics (mm).
    smooth : float
        Gaussian smoothing (voxels) before growing; 0 disables it.
    local_mm : float
        Radius (mm) around a later click within which its intensity counts as
        object.
    open_radius : int
        Bridges this many voxels thin are cut before growing (0: off).
    edge_passes : int
        Passes of local half-way edge refinement (each moves the edge by at
        most one voxel).
    global_spread : float
        How clearly (in ``k`` noise units, scaled) a later click's intensity
        must stand apart from the blend of its neighbours to count as an
        intensity class of the whole object (0: later clicks stay local).
    veto_k : float
        Noise units around such a click's intensity that no longer count as
        background.
    edge_mm : float
        Radius (mm) within which a later click on a blurred edge adds voxels.
    """

    name = "classical"

    def __init__(self, roi_size=(128, 128, 128), k: float = 2.5,
                 seed_radius_mm: float = 3.0, smooth: float = 1.0,
                 local_mm: float = 15.0, open_radius: int = 1, edge_passes: int = 3,
                 global_spread: float = 2.0, veto_k: float = 2.5, edge_mm: float = 8.0):
        super().__init__()
        self.roi_size = tuple(int(v) for v in roi_size)
        self.k = float(k)
        self.seed_radius_mm = float(seed_radius_mm)
        self.smooth = float(smooth)
        self.local_mm = float(local_mm)
        self.open_radius = int(open_radius)
        self.edge_passes = int(edge_passes)
        self.global_spread = float(global_spread)
        self.veto_k = float(veto_k)
        self.edge_mm = float(edge_mm)
        self._smoothed: dict = {}

    # ---------------------------------------------------------------- cache
    def set_image(self, image, spacing) -> None:
        super().set_image(image, spacing)
        self._smoothed = {}

    def _smooth_region(self, image, region: Region, pad: int):
        """Smoothed ``image[region]`` and its noise level; reuses a cached block."""
        for (lo, hi), (block, noise) in self._smoothed.items():
            if all(s.start >= a and s.stop <= b for s, a, b in zip(region, lo, hi)):
                sub = tuple(slice(s.start - a, s.stop - a) for s, a in zip(region, lo))
                return block[sub], noise
        shape = image.shape
        big = tuple(slice(max(s.start - (pad if s.stop - s.start > 1 else 0), 0),
                          min(s.stop + (pad if s.stop - s.start > 1 else 0), n))
                    for s, n in zip(region, shape))
        arr = np.asarray(image[big], dtype=np.float32)
        sig = [self.smooth if (b.stop - b.start) > 1 else 0 for b in big]
        noise = _noise_level(arr, sig)
        if self.smooth > 0:
            arr = ndi.gaussian_filter(arr, sig, mode="nearest", truncate=2.0)
        if len(self._smoothed) >= 4:
            self._smoothed.pop(next(iter(self._smoothed)))
        key = (tuple(b.start for b in big), tuple(b.stop for b in big))
        self._smoothed[key] = (arr, noise)
        sub = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(region, big))
        return arr[sub], noise

    # -------------------------------------------------------------- predict
    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        self.ensure_image(image, spacing)
        shape = image.shape
        if prompts.mode == "2d":
            region = tuple(slice(prompts.index, prompts.index + 1) if a == prompts.axis
                           else slice(0, shape[a]) for a in range(3))
            pad = 0
        else:
            pts = prompts.all_points()
            if prompts.scribbles is not None:
                sc = np.argwhere(prompts.scribbles == 1)
                if len(sc):
                    pts = np.concatenate([pts, sc.min(0)[None], sc.max(0)[None]])
            region = roi_around(pts, shape, self.roi_size)
            pad = 16
        sm, noise = self._smooth_region(image, region, pad)
        check_cancel(cancel)
        offset = np.array([s.start for s in region])
        fg, bg, box = self._seeds(prompts, region, offset, spacing)
        if prompts.mode == "2d":
            ax = prompts.axis
            sp = tuple(s for a, s in enumerate(spacing) if a != ax)
            mask = self._segment(np.take(sm, 0, ax), [np.take(g, 0, ax) for g in fg],
                                 np.take(bg, 0, ax),
                                 None if box is None else np.take(box, 0, ax), sp, noise,
                                 cancel)
            mask = np.expand_dims(mask, ax)
        else:
            mask = self._segment(sm, fg, bg, box, spacing, noise, cancel)
        return mask, region

    # ---------------------------------------------------------------- seeds
    def _seeds(self, prompts: Prompts, region: Region, offset, spacing):
        """Object seed groups, background seeds and the box mask in ``region``."""
        shape = tuple(s.stop - s.start for s in region)
        two_d = prompts.mode == "2d"
        rad = np.array([1.0 if two_d and a == prompts.axis else 1.5 for a in range(3)])
        rad = np.where(np.array([two_d and a == prompts.axis for a in range(3)]), 0.0, rad)
        small = _ball_offsets(rad)

        def stamp(points) -> list[np.ndarray]:
            out = []
            for p in points:
                q = np.round(p - offset).astype(int)
                idx = q[None, :] + small
                ok = np.all((idx >= 0) & (idx < shape), axis=1)
                m = np.zeros(shape, bool)
                m[tuple(idx[ok].T)] = True
                if m.any():
                    out.append(m)
            return out

        fg = stamp(prompts.positive)
        bg = np.zeros(shape, bool)
        for m in stamp(prompts.negative):
            bg |= m
        if prompts.scribbles is not None:
            sc = np.asarray(prompts.scribbles[region])
            if np.any(sc == 1):
                fg.append(sc == 1)
            bg |= sc == 2
        box = None
        if len(prompts.boxes):
            box = np.zeros(shape, bool)
            for lo, hi in prompts.boxes:
                lo_i = np.floor(lo - offset + 0.5).astype(int)
                hi_i = np.floor(hi - offset + 0.5).astype(int) + 1
                if two_d:
                    lo_i[prompts.axis], hi_i[prompts.axis] = 0, 1
                elif hi_i[0] - lo_i[0] <= 1:  # a 2D box used in 3D mode: any depth
                    lo_i[0], hi_i[0] = 0, shape[0]
                sl = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo_i, hi_i, shape))
                inner = np.zeros(shape, bool)
                inner[sl] = True
                box |= inner
                if not len(prompts.positive):
                    c = tuple(slice(s.start + (s.stop - s.start) * 2 // 5,
                                    max(s.stop - (s.stop - s.start) * 2 // 5,
                                        s.start + (s.stop - s.start) * 2 // 5 + 1))
                              for s in sl)
                    seed = np.zeros(shape, bool)
                    seed[c] = True
                    fg.append(seed)
            ring = ndi.binary_dilation(box, iterations=2) & ~box
            bg |= ring
        return fg, bg, box

    # --------------------------------------------------------------- growth
    def _segment(self, sm, fg: list, bg, box, spacing, noise0, cancel) -> np.ndarray:
        """Grow the object in ``sm`` (2D or 3D) from seed groups ``fg``.

        The first seed (and scribbles, box centres) grow globally; each later
        click adds only what it reaches within ``local_mm`` of itself, so a
        click changes the mask near where it was put.
        """
        if not fg:
            return np.zeros(sm.shape, bool)
        local = self._locality(fg, spacing)
        # the first click's statistics come from a wider neighbourhood (it is
        # deep inside); later clicks (often on an edge) use their own voxel
        stats = [_robust_stats(sm[self._neighbourhood(g, spacing if loc is None else None)])
                 for g, loc in zip(fg, local)]
        means = [m for m, _ in stats]
        noise = max(noise0, min(stats[0][1], 4 * noise0), 1e-3 * float(np.ptp(sm)), 1e-6)
        # a later click deep inside a homogeneous part (a kidney's cortex after a
        # click on its medulla) adds that intensity class to the whole object
        gl = [i for i, loc in enumerate(local) if loc is None]
        seeds = np.zeros(sm.shape, bool)
        for i in gl:
            seeds |= fg[i]
        seeds &= ~bg
        g_means = [means[i] for i in gl]
        nones = [None] * len(gl)

        def grow_global(caps, near_bg=None):
            return self._grow(self._accept(sm, g_means, caps, nones, near_bg), seeds, box)

        grown = grow_global([self.k * noise] * len(gl))
        vals = sm[grown]
        if vals.size > 50:  # confidence-connected: the object's own spread
            spread = float(np.median(np.abs(vals - means[0]))) * 1.4826
            noise = min(max(spread, noise), 4 * noise)
            grown = grow_global([self.k * noise] * len(gl))
        check_cancel(cancel)

        # later clicks inside a homogeneous region (not on an edge) vouch for
        # their intensity being object
        # (a homogeneous neighbourhood vouches for a wide range around it; a
        # click whose own voxels agree only for its intensity)
        veto = []
        for i, loc in enumerate(local):
            if loc is None:
                continue
            if _robust_stats(sm[self._neighbourhood(fg[i], spacing)])[1] <= 3 * noise:
                veto.append((means[i], 3 * self.k * noise))
            elif self._homogeneous(sm, fg[i], spacing, noise):
                veto.append((means[i], self.veto_k * noise))
        clicks_bg = self._click_components(bg)
        vouched = [v for v, tol in veto if tol < 3 * self.k * noise]
        lab_neg, n_neg = ndi.label(clicks_bg)
        neg_means = [float(np.median(sm[lab_neg == i])) for i in range(1, n_neg + 1)]
        # with another intensity class vouched for by a later click, a second
        # pass takes the background from around the object grown with it
        for _ in range(2 if vouched else 1):
            bg_means = self._background_means(sm, grown, bg & ~clicks_bg, box,
                                              g_means + vouched, noise, veto=veto)
            bg_means += self._negative_classes(neg_means, means, bg_means, noise)
            log.debug("fg %s noise %.3g bg %s grown %d", means, noise, bg_means,
                      grown.sum())
            grown, caps = self._grow_all(sm, fg, bg, box, spacing, noise, local, means,
                                         bg_means, grown, grow_global, gl)
        check_cancel(cancel)

        if clicks_bg.any() and (grown & ndi.binary_dilation(clicks_bg)).any():
            grown = self._remove_negative(sm, grown, clicks_bg, means, seeds | self._union(fg),
                                          spacing, self.local_mm)
        if bg.any() and (grown & bg).any():
            grown = self._split(sm, grown, seeds | self._union(fg), bg)
        for _ in range(self.edge_passes):
            grown = self._refine_edge(sm, grown, bg)
        grown = self._fill_holes(grown, bg)
        if box is not None:
            grown &= box
        return grown

    def _grow_all(self, sm, fg, bg, box, spacing, noise, local, means, bg_means, grown,
                  grow_global, gl):
        """Grow the global seeds, then each later click near itself (or near
        the object, for a click inside a region of its own intensity)."""
        near_bg = None
        caps = [self.k * noise] * len(means)
        if bg_means:
            # equal spreads put the edge half-way to the nearest background
            # intensity; the other side is capped as far from the seed
            caps = [max(self.k * noise, 0.5 * min(abs(m - b) for b in bg_means))
                    for m in means]
            # a class never reaches past half-way to a distinct other class of
            # the object (cortex and medulla): what lies beyond is that class's
            # or, when it is neither, background the first shell could not see
            far = 4 * self.k * noise
            caps = [min([c] + [max(self.k * noise, 0.5 * abs(m - o)) for o in means
                               if abs(m - o) > far]) for m, c in zip(means, caps)]
            near_bg = np.min([np.abs(sm - b) for b in bg_means], axis=0)
            grown = grow_global([caps[i] for i in gl], near_bg)
        grown = grown.copy()
        for i, loc in enumerate(local):
            if loc is None:
                continue
            sl, ell = loc
            if not grown.any():
                pass
            elif self._homogeneous(sm, fg[i], spacing, noise):
                sl = self._near_object(grown, fg[i], spacing)
                ell = np.ones(tuple(x.stop - x.start for x in sl), bool)
            else:  # on a blurred edge: its intensity is object only close by
                sl, ell = self._ellipse(fg[i], spacing, self.edge_mm)
            sub_bg = None if near_bg is None else near_bg[sl]
            acc = self._accept(sm[sl], [means[i]], [caps[i]], [None], sub_bg)
            acc &= ell[tuple(slice(0, n) for n in acc.shape)]
            seed = fg[i][sl] & ~bg[sl]
            grown[sl] |= self._grow(acc, seed, None if box is None else box[sl])
        return grown, caps

    def _homogeneous(self, sm, seed, spacing, noise) -> bool:
        """True when a click's intensity is a class of its own, not a blend of
        its neighbours (a click on a blurred edge lies strictly between the
        darker and the brighter side around it; a click on a thin layer, like
        a kidney's cortex between medulla and fat, does not)."""
        if self.global_spread <= 0:
            return False
        c = float(np.median(sm[seed]))
        lo, hi = np.percentile(sm[self._neighbourhood(seed, spacing)], [5, 95])
        margin = max(self.k * noise, 0.15 * float(hi - lo)) * self.global_spread / 2
        return not (lo + margin < c < hi - margin)

    def _near_object(self, grown, seed, spacing) -> tuple:
        """The bounding box of the object and of a click, widened by
        ``local_mm``; where a homogeneous later click's intensity counts."""
        r = [int(np.ceil(self.local_mm / s)) for s in spacing]
        boxes = [_bbox(m) for m in (grown, seed) if m.any()]
        return tuple(slice(max(min(b[a].start for b in boxes) - r[a], 0),
                           max(b[a].stop for b in boxes) + r[a]) for a in range(len(r)))

    def _negative_classes(self, neg_means, means, bg_means, noise) -> list:
        """Intensities of negative clicks that are background everywhere.

        A negative click whose intensity lies in the middle between the
        object's and a background class (a click on a blurred edge, or on a
        thin layer of partial volume) is no intensity class of its own: it only
        acts around itself (:meth:`_remove_negative`).
        """
        tol = self.k * noise
        out = []
        for c in neg_means:
            if any(abs(c - m) <= tol for m in means):
                continue
            if any(0.25 < (c - m) / (b - m) < 0.75 for m in means for b in bg_means
                   if abs(b - m) > 2 * tol):
                continue
            out.append(c)
        return out

    @staticmethod
    def _click_components(bg, max_voxels: int = 30) -> np.ndarray:
        """The small parts of ``bg``: negative clicks (not scribbles or box edges)."""
        if not bg.any():
            return bg
        lab, n = ndi.label(bg)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        small = sizes <= max_voxels
        small[0] = False
        return small[lab]

    @staticmethod
    def _remove_negative(sm, grown, clicks, means, seeds, spacing, reach_mm
                         ) -> np.ndarray:
        """Take out what each negative click says is not object.

        Only the connected region around a negative click whose intensity is
        closer to the click's own intensity than to every object intensity is
        removed; a negative click never acts elsewhere, so the object's far
        side stays whatever the click's intensity. The region is looked for
        within ``2 * reach_mm`` of the click.
        """
        box = _bbox(grown)
        box = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
        g, c, sd, img = grown[box].copy(), clicks[box], seeds[box], sm[box]
        reach = [int(np.ceil(2 * reach_mm / s)) for s in spacing]
        lab, n = ndi.label(c)
        d_obj = np.min([np.abs(img - np.float32(m)) for m in means], axis=0)
        removed = False
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            click = lab[sl] == i
            neg = np.float32(np.median(img[sl][click]))
            if not np.any(click & g[sl] & (np.abs(img[sl] - neg) < d_obj[sl])):
                continue
            # within a window around the click (its neighbourhood, and fast)
            win = tuple(slice(max(a.start - r, 0), a.stop + r) for a, r in zip(sl, reach))
            closer = g[win] & (np.abs(img[win] - neg) < d_obj[win])
            region = ClassicalEngine._connected(closer, (lab[win] == i) & closer)
            if region.any() and not (region & sd[win]).any():
                g[win] &= ~region
                removed = True
        out = np.zeros(grown.shape, bool)
        out[box] = ClassicalEngine._connected(g, sd & g) if removed else g
        return out

    @staticmethod
    def _refine_edge(sm, mask, bg, size: int = 5) -> np.ndarray:
        """Move the edge to where the intensity is half-way between the object
        and its *local* surroundings (a spleen against fat and against muscle
        has two different half-way levels): a voxel just outside joins when it
        is closer to the mean of the object nearby than to the mean of the
        background nearby."""
        if not mask.any():
            return mask
        sl = _bbox(mask)
        sl = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in sl)
        m = mask[sl]
        img = sm[sl]
        st = ndi.generate_binary_structure(m.ndim, 1)
        inner = ndi.binary_erosion(m, st, iterations=1)
        outer = ndi.binary_dilation(m, st, iterations=3) & ~ndi.binary_dilation(m, st)
        shell = ndi.binary_dilation(m, st) & ~m & ~bg[sl]

        def local_mean(sel):
            w = ndi.uniform_filter(sel.astype(np.float32), size)
            v = ndi.uniform_filter(np.where(sel, img, 0).astype(np.float32), size)
            return v / np.maximum(w, 1e-6), w > 1e-6

        fg_mean, fg_ok = local_mean(inner)
        bg_mean, bg_ok = local_mean(outer)
        add = shell & fg_ok & bg_ok & (np.abs(img - fg_mean) < np.abs(img - bg_mean))
        out = mask.copy()
        out[sl] |= add
        return out

    @staticmethod
    def _union(masks) -> np.ndarray:
        out = np.zeros(masks[0].shape, bool)
        for m in masks:
            out |= m
        return out

    @staticmethod
    def _accept(sm, means, caps, local, near_bg=None) -> np.ndarray:
        """Voxels within ``caps[i]`` of a seed mean (where it applies) and closer
        to it than to any background intensity."""
        out = np.zeros(sm.shape, bool)
        for m, cap, loc in zip(means, caps, local):
            sl = Ellipsis if loc is None else loc[0]
            d = np.abs(sm[sl] - m)
            ok = d <= cap
            if near_bg is not None:
                ok &= d < near_bg[sl]
            if loc is not None:
                ok &= loc[1][tuple(slice(0, n) for n in ok.shape)]
            out[sl] |= ok
        return out

    def _locality(self, fg: list, spacing) -> list:
        """Where each seed's intensity class applies: everywhere for the first
        seed, scribbles and boxes; within ``local_mm`` of a later click (a click
        on the object's blurred edge must not pull in every voxel of that
        intensity)."""
        out = [None]
        for g in fg[1:]:
            if g.sum() > 200:
                out.append(None)
                continue
            out.append(self._ellipse(g, spacing, self.local_mm))
        return out

    @staticmethod
    def _ellipse(seed, spacing, radius_mm) -> tuple:
        """``(slices, bool ellipsoid)`` of radius ``radius_mm`` around a click."""
        c = np.argwhere(seed).mean(axis=0)
        r = np.array([radius_mm / s for s in spacing])
        sl = tuple(slice(max(int(np.floor(ci - ri)), 0), int(np.ceil(ci + ri)) + 1)
                   for ci, ri in zip(c, r))
        grids = np.ogrid[sl]
        ell = sum(((gr - ci) / ri) ** 2 for gr, ci, ri in zip(grids, c, r)) <= 1.0
        return sl, ell

    def _background_means(self, sm, grown, bg, box, means, noise, veto=()) -> list:
        """Intensities around the object that are clearly not object.

        The shell 3-5 voxels outside the first growth is clustered (1D
        k-means, 3 classes: it often holds several tissues); each negative seed
        adds its own median. Classes within ``k`` noise of a seed are dropped,
        and shell classes near the intensity of a later positive click (``veto``:
        the user said that intensity is object, e.g. a kidney's cortex around
        its medulla), or between two such intensities.
        """
        def separable(b):
            return all(abs(b - m) > self.k * noise for m in means)

        # a shell class between two intensities the user said are object is
        # the blur between those two parts (medulla and cortex), not background
        vouched = sorted(list(means) + [v for v, _ in veto])

        def blend(c):
            return any(a < c < b for a, b in zip(vouched[:-1], vouched[1:]))

        vals = np.zeros(0, sm.dtype)
        if grown.any():
            sl = _bbox(grown)
            sl = tuple(slice(max(s.start - 6, 0), s.stop + 6) for s in sl)
            g = grown[sl]
            shell = ndi.binary_dilation(g, iterations=5) & ~ndi.binary_dilation(g, iterations=2)
            if box is not None:
                shell &= ndi.binary_dilation(box[sl], iterations=2)
            vals = sm[sl][shell]
        out = []
        if vals.size >= 8:
            vals = vals[np.min([np.abs(vals - m) for m in means], axis=0) > self.k * noise]
        if vals.size >= 8:
            out += [c for c, n in _kmeans_1d(vals, 3) if n >= 0.1 * vals.size and separable(c)
                    and all(abs(c - v) > tol for v, tol in veto) and not blend(c)]
        if bg.any():
            lab, n = ndi.label(bg)
            for i, sl in enumerate(ndi.find_objects(lab), start=1):
                b = float(np.median(sm[sl][lab[sl] == i]))
                if separable(b):
                    out.append(b)
        return out

    def _neighbourhood(self, seed, spacing) -> np.ndarray:
        """Seed voxels widened to ``seed_radius_mm`` (statistics sample);
        the seed itself when ``spacing`` is None or it is large already."""
        if spacing is None or seed.sum() > 200:  # a scribble or box centre
            return seed
        r = np.array([self.seed_radius_mm / s for s in spacing])
        r = np.where(np.asarray(seed.shape) > 1, r, 0)
        pad = np.ceil(r).astype(int)
        st = np.zeros(tuple(2 * v + 1 for v in pad), bool)
        st[tuple((_ball_offsets(r) + pad).T)] = True
        box = _bbox(seed)
        box = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
        out = np.zeros(seed.shape, bool)
        out[box] = ndi.binary_dilation(seed[box], st)
        return out

    def _grow(self, cand, seeds, box) -> np.ndarray:
        """The part of ``cand`` connected to ``seeds``, without thin bridges.

        An opening cuts bridges up to ``open_radius`` voxels thin (where
        region growing leaks into a neighbouring structure of similar
        intensity); what it trims off the object's own edge is grown back
        within ``cand``.
        """
        if box is not None:
            cand = cand & box
        plain = self._connected(cand, seeds)
        if self.open_radius <= 0 or not plain.any():
            return plain
        # work in the bounding box of what plain growth reaches
        sl = _bbox(plain)
        sl = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in sl)
        c, sd = plain[sl], seeds[sl]
        st = ndi.generate_binary_structure(cand.ndim, 1)
        core = ndi.binary_opening(c, st, iterations=self.open_radius)
        if not (core & sd).any():  # a thin structure: the opening would erase it
            return plain
        # thick parts of the opening not joined to the seeds' core are another
        # structure reached through a thin bridge: drop them (and the edge the
        # opening trimmed off them); thin parts (a ribbon, a sheet) stay
        own = self._connected(core, sd)
        own = ndi.binary_dilation(own, st, iterations=self.open_radius + 1, mask=c)
        other = ndi.binary_dilation(core & ~own, st, iterations=self.open_radius + 1,
                                    mask=c & ~own)
        out = np.zeros(cand.shape, bool)
        out[sl] = self._connected(c & ~other, sd & c)
        return out

    @staticmethod
    def _connected(cand, seeds) -> np.ndarray:
        lab, n = ndi.label(cand | seeds)
        if n == 0:
            return np.zeros(cand.shape, bool)
        ids = np.unique(lab[seeds])
        ids = ids[ids > 0]
        keep = np.zeros(n + 1, bool)
        keep[ids] = True
        return keep[lab]

    @staticmethod
    def _split(sm, grown, seeds, bg) -> np.ndarray:
        """Marker watershed inside ``grown`` between object and background seeds."""
        from skimage.segmentation import watershed

        box = _bbox(grown)
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        g = grown[box]
        markers = np.zeros(g.shape, np.int32)
        markers[bg[box] & g] = 2
        markers[seeds[box] & g] = 1
        grad = ndi.gaussian_gradient_magnitude(sm[box], 1.0)
        lab = watershed(grad, markers, mask=g)
        out = np.zeros(grown.shape, bool)
        out[box] = lab == 1
        return ClassicalEngine._connected(out, seeds & out)

    @staticmethod
    def _fill_holes(mask, bg, max_fraction: float = 0.002, min_voxels: int = 64
                    ) -> np.ndarray:
        """Fill small holes (noise), never one holding a background seed.

        Large holes (a lesion inside an organ) are kept: they are another
        structure, and a positive click there adds them when wanted.
        """
        if not mask.any():
            return mask
        box = _bbox(mask)
        sub = mask[box]
        holes = ndi.binary_fill_holes(sub) & ~sub
        if not holes.any():
            return mask
        lab, n = ndi.label(holes)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes <= max(min_voxels, max_fraction * int(sub.sum()))
        keep[np.unique(lab[bg[box]])] = False
        keep[0] = False
        out = mask.copy()
        out[box] = sub | keep[lab]
        return out
