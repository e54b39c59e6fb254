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
4. Where the grown object still touches a background seed (two structures of
   the same intensity), a marker watershed on the gradient magnitude splits
   them at the strongest edge between the seeds (edge-aware propagation).
5. Holes are filled and everything outside a box is dropped.
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
    """

    name = "classical"

    def __init__(self, roi_size=(128, 128, 128), k: float = 2.5,
                 seed_radius_mm: float = 3.0, smooth: float = 1.0,
                 local_mm: float = 25.0):
        super().__init__()
        self.roi_size = tuple(int(v) for v in roi_size)
        self.k = float(k)
        self.seed_radius_mm = float(seed_radius_mm)
        self.smooth = float(smooth)
        self.local_mm = float(local_mm)
        self._smoothed: dict = {}

    # ---------------------------------------------------------------- cache
    def set_image(self, image, spacing) -> None:
        super().set_image(image, spacing)
        self._smoothed = {}

    def _smooth_region(self, image, region: Region, pad: int) -> tuple[np.ndarray, Region]:
        """Smoothed ``image[region]``; reuses a cached block that contains it."""
        for (lo, hi), block in self._smoothed.items():
            if all(s.start >= a and s.stop <= b for s, a, b in zip(region, lo, hi)):
                sub = tuple(slice(s.start - a, s.stop - a) for s, a in zip(region, lo))
                return block[sub], region
        shape = image.shape
        big = tuple(slice(max(s.start - (pad if s.stop - s.start > 1 else 0), 0),
                          min(s.stop + (pad if s.stop - s.start > 1 else 0), n))
                    for s, n in zip(region, shape))
        arr = np.asarray(image[big], dtype=np.float32)
        if self.smooth > 0:
            sig = [self.smooth if (b.stop - b.start) > 1 else 0 for b in big]
            arr = ndi.gaussian_filter(arr, sig, mode="nearest", truncate=2.0)
        if len(self._smoothed) >= 4:
            self._smoothed.pop(next(iter(self._smoothed)))
        key = (tuple(b.start for b in big), tuple(b.stop for b in big))
        self._smoothed[key] = arr
        sub = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(region, big))
        return arr[sub], region

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
        sm, region = self._smooth_region(image, region, pad)
        check_cancel(cancel)
        offset = np.array([s.start for s in region])
        fg, bg, box = self._seeds(prompts, region, offset, spacing)
        if prompts.mode == "2d":
            ax = prompts.axis
            sp = tuple(s for a, s in enumerate(spacing) if a != ax)
            mask = self._segment(np.take(sm, 0, ax), [np.take(g, 0, ax) for g in fg],
                                 np.take(bg, 0, ax),
                                 None if box is None else np.take(box, 0, ax), sp, cancel)
            mask = np.expand_dims(mask, ax)
        else:
            mask = self._segment(sm, fg, bg, box, spacing, cancel)
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
    def _segment(self, sm, fg: list, bg, box, spacing, cancel) -> np.ndarray:
        """Grow the object in ``sm`` (2D or 3D) from seed groups ``fg``."""
        if not fg:
            return np.zeros(sm.shape, bool)
        stats = [_robust_stats(sm[self._neighbourhood(g, spacing)]) for g in fg]
        # the cleanest neighbourhood tells the noise; a click near an edge (wide
        # spread) keeps its own intensity but not its spread, so it cannot leak
        noise = max(min(s for _, s in stats), 1e-3 * float(np.ptp(sm)), 1e-6)
        stats = [(m, min(max(s, noise), 2.0 * noise)) for m, s in stats]
        seeds = np.zeros(sm.shape, bool)
        for g in fg:
            seeds |= g
        seeds &= ~bg

        local = self._locality(fg, spacing)
        d_fg = self._distance(sm, stats, local)
        grown = self._grow(d_fg <= self.k, seeds, box)
        # confidence-connected refinement: the spread of the grown voxels around
        # the first seed's intensity is the noise level, shared by all seeds
        # (a later click on a blurred edge adds its intensity, not a wide spread)
        ref = 0
        for _ in range(2):
            vals = sm[grown]
            near = np.argmin([np.abs(vals - m) for m, _ in stats], axis=0) == ref
            if near.sum() <= 50:
                break
            noise = max(float(np.median(np.abs(vals[near] - stats[ref][0]))) * 1.4826,
                        noise)
            stats = [(m, noise) for m, _ in stats]
            d_fg = self._distance(sm, stats, local)
            grown = self._grow(d_fg <= self.k, seeds, box)
        check_cancel(cancel)

        bg_stats = self._background_stats(sm, grown, bg, box, stats, noise)
        log.debug("fg %s bg %s grown %d", stats, bg_stats, grown.sum())
        if bg_stats:
            d_bg = np.min([np.abs(sm - m) * (1.0 / s) for m, s in bg_stats], axis=0)
            grown = self._grow((d_fg < d_bg) & (d_fg <= self.k * 1.6), seeds, box)
            check_cancel(cancel)

        if bg.any() and (grown & bg).any():
            grown = self._split(sm, grown, seeds, bg)
        grown = self._fill_holes(grown, bg)
        if box is not None:
            grown &= box
        return grown

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
            c = np.argwhere(g).mean(axis=0)
            r = np.array([self.local_mm / s for s in spacing])
            sl = tuple(slice(max(int(np.floor(ci - ri)), 0), int(np.ceil(ci + ri)) + 1)
                       for ci, ri in zip(c, r))
            grids = np.ogrid[sl]
            ell = sum(((gr - ci) / ri) ** 2 for gr, ci, ri in zip(grids, c, r)) <= 1.0
            out.append((sl, ell))
        return out

    @staticmethod
    def _distance(sm, stats, local) -> np.ndarray:
        """Per voxel, the smallest ``|I - m| / s`` over the seed classes that apply."""
        d = np.abs(sm - stats[0][0]) * (1.0 / stats[0][1])
        for (m, s), loc in zip(stats[1:], local[1:]):
            if loc is None:
                np.minimum(d, np.abs(sm - m) * (1.0 / s), out=d)
            else:
                sl, ell = loc
                sub = d[sl]
                e = ell[tuple(slice(0, n) for n in sub.shape)]
                di = np.abs(sm[sl] - m) * (1.0 / s)
                sub[e] = np.minimum(sub[e], di[e])
        return d

    def _background_stats(self, sm, grown, bg, box, stats, noise) -> list:
        """Intensity classes around the object that are clearly not object.

        The shell 2-4 voxels outside the first growth, and each negative seed,
        give a class when their intensity differs from every object seed.
        """
        def separable(m):
            return all(abs(m - fm) > self.k * fs for fm, fs in stats)

        out = []
        shell = ndi.binary_dilation(grown, iterations=4) & ~ndi.binary_dilation(grown)
        if box is not None:
            shell &= ndi.binary_dilation(box, iterations=2)
        vals = sm[shell]
        if vals.size:
            d = np.min([np.abs(vals - m) / s for m, s in stats], axis=0)
            vals = vals[d > self.k]
        if vals.size >= 8:
            m, s = _robust_stats(vals)
            if separable(m):
                out.append((m, max(s, noise)))
        if bg.any():
            lab, n = ndi.label(bg)
            for i, sl in enumerate(ndi.find_objects(lab), start=1):
                m, s = _robust_stats(sm[sl][lab[sl] == i])
                if separable(m):
                    out.append((m, min(max(s, noise), 2.0 * noise)))
        return out

    def _neighbourhood(self, seed, spacing) -> np.ndarray:
        """Seed voxels widened to ``seed_radius_mm`` (statistics sample)."""
        if seed.sum() > 200:  # a scribble or box centre: large enough
            return seed
        r = np.array([self.seed_radius_mm / s for s in spacing])
        r = np.where(np.asarray(seed.shape) > 1, r, 0)
        st = np.zeros(tuple(2 * int(np.ceil(v)) + 1 for v in r), bool)
        st[tuple((_ball_offsets(r) + np.ceil(r).astype(int)).T)] = True
        return ndi.binary_dilation(seed, st)

    def _grow(self, cand, seeds, box) -> np.ndarray:
        if box is not None:
            cand = cand & box
        return self._connected(cand, seeds)

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

        box = ndi.find_objects(grown.astype(np.uint8))[0]
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
        box = ndi.find_objects(mask.astype(np.uint8))[0]
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
