"""The classical engine: prompts -> region -> seeds -> growth -> mask."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from ...errors import check_cancel
from ..base import Engine, Prompts, Region, roi_around
from ._arrays import dilate, ellipse, noise_level, robust_stats, union
from .cache import GrowthCache, mask_key
from .growing import accept, grow
from .negative import click_components, remove_negative, split
from .refine import fill_holes, refine_edge, trim_shell
from .seeds import (band_around, distance_to_object, locality, near_object, neighbourhood,
                    prompt_seeds)
from .statistics import (background_means, is_blend, is_homogeneous, negative_classes,
                         same_tissue)

log = logging.getLogger(__name__)

__all__ = ["ClassicalEngine"]


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
    detail_cnr : float
        Contrast between the object and its nearest surrounding intensity
        class, in units of the image's noise, above which the image smoothed
        by only ``smooth / 2`` is grown in (0: never).
    thin_spread : float
        A first click whose neighbourhood spreads more than this many noise
        units lies in a thin shell: once there are negative clicks, the mask
        is trimmed to the object's intensity in the raw image on a side no
        background class bounds (0: never).
    """

    name = "classical"

    def __init__(self, roi_size=(128, 128, 128), k: float = 2.5,
                 seed_radius_mm: float = 3.0, smooth: float = 1.0,
                 local_mm: float = 15.0, open_radius: int = 1, edge_passes: int = 3,
                 global_spread: float = 2.0, veto_k: float = 2.5, edge_mm: float = 8.0,
                 detail_cnr: float = 6.0, thin_spread: float = 3.0):
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
        self.detail_cnr = float(detail_cnr)
        self.thin_spread = float(thin_spread) if thin_spread > 0 else np.inf
        self._smoothed: dict = {}
        self._growths = GrowthCache()

    # ---------------------------------------------------------------- cache
    def set_image(self, image, spacing) -> None:
        super().set_image(image, spacing)
        self._smoothed = {}
        self._growths.clear()

    def _smooth_region(self, image, region: Region, pad: int) -> tuple:
        """``(smoothed, noise, lightly smoothed, its noise, raw noise, raw)`` of
        ``image[region]``; reuses a cached block."""
        # a slice (2D) is smoothed in-plane only: never reuse a block smoothed in 3D
        flat = tuple(s.stop - s.start == 1 for s in region)
        for (lo, hi, block_flat), blocks in self._smoothed.items():
            if block_flat == flat and all(s.start >= a and s.stop <= b
                                          for s, a, b in zip(region, lo, hi)):
                sub = tuple(slice(s.start - a, s.stop - a) for s, a in zip(region, lo))
                return (blocks[0][sub], blocks[1], blocks[2][sub], blocks[3], blocks[5],
                        blocks[4][sub])
        shape = image.shape
        big = tuple(slice(max(s.start - (pad if s.stop - s.start > 1 else 0), 0),
                          min(s.stop + (pad if s.stop - s.start > 1 else 0), n))
                    for s, n in zip(region, shape))
        raw = np.asarray(image[big], dtype=np.float32)
        blocks = []
        for sigma in (self.smooth, self.smooth / 2, 0.0):
            sig = [sigma if (b.stop - b.start) > 1 else 0 for b in big]
            arr = ndi.gaussian_filter(raw, sig, mode="nearest", truncate=2.0) \
                if sigma > 0 else raw
            blocks += [arr, noise_level(raw, sig)]
        if len(self._smoothed) >= 4:
            self._smoothed.pop(next(iter(self._smoothed)))
        key = (tuple(b.start for b in big), tuple(b.stop for b in big), flat)
        self._smoothed[key] = tuple(blocks)
        sub = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(region, big))
        return blocks[0][sub], blocks[1], blocks[2][sub], blocks[3], blocks[5], blocks[4][sub]

    # -------------------------------------------------------------- predict
    @staticmethod
    def _region(prompts: Prompts, shape, roi_size) -> tuple[Region, int]:
        """The part of the image worked on, and the smoothing pad around it."""
        if prompts.mode == "2d":
            return tuple(slice(prompts.index, prompts.index + 1) if a == prompts.axis
                         else slice(0, shape[a]) for a in range(3)), 0
        pts = prompts.all_points()
        if prompts.scribbles is not None:
            sc = np.argwhere(prompts.scribbles == 1)
            if len(sc):
                pts = np.concatenate([pts, sc.min(0)[None], sc.max(0)[None]])
        return roi_around(pts, shape, roi_size), 16

    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        image, spacing, prompts = self.prepare(image, spacing, prompts)
        self.ensure_image(image, spacing)
        region, pad = self._region(prompts, image.shape, self.roi_size)
        sm, noise, light, noise_light, raw_noise, raw = self._smooth_region(image, region,
                                                                            pad)
        check_cancel(cancel)
        offset = np.array([s.start for s in region])
        fg, bg, box = prompt_seeds(prompts, region, offset)
        key = (tuple((s.start, s.stop) for s in region), prompts.mode, prompts.axis)
        if prompts.mode == "2d":
            ax = prompts.axis
            sp = tuple(s for a, s in enumerate(spacing) if a != ax)
            mask = self._segment(np.take(sm, 0, ax), [np.take(g, 0, ax) for g in fg],
                                 np.take(bg, 0, ax),
                                 None if box is None else np.take(box, 0, ax), sp, noise,
                                 cancel, light=(np.take(light, 0, ax), noise_light, raw_noise,
                                        np.take(raw, 0, ax)),
                                 key=key)
            mask = np.expand_dims(mask, ax)
        else:
            mask = self._segment(sm, fg, bg, box, spacing, noise, cancel,
                                 light=(light, noise_light, raw_noise, raw), key=key)
        return mask, region

    # --------------------------------------------------------------- growth
    def _segment(self, sm, fg: list, bg, box, spacing, noise0, cancel,
                 light=None, key=None, raw=None) -> np.ndarray:
        """Grow the object in ``sm`` (2D or 3D) from seed groups ``fg``.

        The first seed (and scribbles, box centres) grow globally; each later
        click adds only what it reaches within ``local_mm`` of itself, so a
        click changes the mask near where it was put. ``light`` is
        ``(lightly smoothed image, its noise, the raw image's noise, the raw
        image)``: an object that stands out from its surroundings by
        ``detail_cnr`` raw noise units is grown there (thin structures keep
        their shape).
        ``key`` names the region and image ``sm`` comes from; growths are
        reused between updates under it (None: not kept). ``raw`` is ``(raw
        image, its noise)`` (taken from ``light`` when None).
        """
        if not fg:
            return np.zeros(sm.shape, bool)
        if raw is None and light is not None and len(light) > 3:
            raw = (light[3], light[2])
        local = locality(fg, spacing, self.local_mm)
        # the first click's statistics come from a wider neighbourhood (it is
        # deep inside); later clicks (often on an edge) use their own voxel
        stats = [robust_stats(sm[neighbourhood(g, spacing if loc is None else None,
                                               self.seed_radius_mm)])
                 for g, loc in zip(fg, local)]
        means = [m for m, _ in stats]
        noise = max(noise0, min(stats[0][1], 4 * noise0), 1e-3 * float(np.ptp(sm)), 1e-6)
        # seeds that grow everywhere: the first click, scribbles, box centres
        gl = [i for i, loc in enumerate(local) if loc is None]
        seeds = np.zeros(sm.shape, bool)
        for i in gl:
            seeds |= fg[i]
        seeds &= ~bg
        g_means = [means[i] for i in gl]
        nones = [None] * len(gl)
        clicks_bg = click_components(bg)
        if key is not None:
            key = key + (mask_key(seeds), mask_key(box), self.open_radius)

        def grow_global(caps, bg_means=None):
            k = None if key is None else key + (tuple(g_means), tuple(caps),
                                                tuple(bg_means or ()))
            out = self._growths.get(k)
            if out is None:
                near_bg = _distance_to_classes(sm, bg_means)
                out = grow(accept(sm, g_means, caps, nones, near_bg), seeds, box,
                           self.open_radius)
                self._growths.put(k, out)
            return out

        grown = grow_global([self.k * noise] * len(gl))
        vals = sm[grown]
        if vals.size > 50:  # confidence-connected: the object's own spread
            spread = float(np.median(np.abs(vals - means[0]))) * 1.4826
            noise = min(max(spread, noise), 4 * noise)
            grown = grow_global([self.k * noise] * len(gl))
        check_cancel(cancel)
        if light is not None and self.detail_cnr > 0:
            shell = background_means(sm, grown, bg & ~clicks_bg, box, g_means,
                                     self.k * noise)
            # a noise-free image (a constant background) has any contrast at
            # infinite CNR: the floor keeps that without a division by zero
            cnr = (min(abs(means[0] - b) for b in shell) / max(float(light[2]), 1e-12)
                   if shell else 0.0)
            log.debug("contrast %.3g noise units", cnr)
            if cnr >= self.detail_cnr:
                return self._segment(light[0], fg, bg, box, spacing, light[1], cancel,
                                     key=None if key is None else key[:3] + ("light",),
                                     raw=raw)

        touch = self._touching(sm, grown, fg, local, means, spacing, noise)
        veto = self._veto(sm, fg, local, means, spacing, noise, touch)
        vouched = [v for v, tol in veto if tol < 3 * self.k * noise]
        lab_neg, n_neg = ndi.label(clicks_bg)
        neg_means = [float(np.median(sm[lab_neg == i])) for i in range(1, n_neg + 1)]
        # with another intensity class vouched for by a later click, a second
        # pass takes the background from around the object grown with it
        for _ in range(2 if vouched else 1):
            bg_means = background_means(sm, grown, bg & ~clicks_bg, box,
                                        g_means + vouched, self.k * noise, veto=veto,
                                        rims=light is not None and sm.ndim == 3)
            bg_means += negative_classes(neg_means, means, bg_means, self.k * noise)
            log.debug("fg %s noise %.3g bg %s grown %d", means, noise, bg_means,
                      grown.sum())
            grown = self._grow_all(sm, fg, bg, box, spacing, noise, local, means,
                                   bg_means, grown, grow_global, gl, touch)
        check_cancel(cancel)
        # a first click whose neighbourhood spreads far more than the noise
        # sits in a layer thinner than that neighbourhood (a shell)
        thin = raw if stats[0][1] > self.thin_spread * noise0 else None
        log.debug("click spread %.3g noise %.3g thin %s", stats[0][1], noise0,
                  thin is not None)
        return self._finish(sm, grown, fg, seeds, bg, clicks_bg, box, means, spacing, noise,
                            bg_means, thin)

    def _touching(self, sm, grown, fg, local, means, spacing, noise) -> list:
        """Which later clicks sit at the object's edge and ask for it to move
        out there: those within about a voxel of the first growth, and those
        on a blend (their centre voxel unlike their neighbours) within the
        reach of edge refinement."""
        near = max(spacing)
        out = []
        for i, loc in enumerate(local):
            if loc is None:
                out.append(False)
                continue
            far = (self.edge_passes + 1) * near
            d = distance_to_object(grown, fg[i], spacing, far + near)
            blend = abs(self._centre_value(sm, fg[i]) - means[i]) > self.k * noise
            out.append(d <= 0.5 * (near + min(spacing)) or (blend and d <= far))
        return out

    @staticmethod
    def _centre_value(sm, seed) -> float:
        """The smoothed image at a click's centre voxel."""
        return float(sm[tuple(np.round(np.argwhere(seed).mean(axis=0)).astype(int))])

    def _veto(self, sm, fg, local, means, spacing, noise, touch) -> list:
        """``(intensity, tolerance)`` of later clicks inside a homogeneous region
        (not on an edge): they vouch for their intensity being object (a
        homogeneous neighbourhood for a wide range around it; a click whose
        own voxels agree only for its intensity). A click touching the object
        (``touch``) vouches for nothing."""
        veto = []
        for i, loc in enumerate(local):
            if loc is None or touch[i]:
                continue
            if robust_stats(sm[neighbourhood(fg[i], spacing, self.seed_radius_mm)])[1] \
                    <= 3 * noise:
                veto.append((means[i], 3 * self.k * noise))
            elif is_homogeneous(sm, fg[i], spacing, self.k * noise, self.global_spread,
                                self.seed_radius_mm):
                veto.append((means[i], self.veto_k * noise))
        return veto

    def _finish(self, sm, grown, fg, seeds, bg, clicks_bg, box, means, spacing, noise,
                bg_means, thin=None):
        """Negative clicks, watershed split, edge refinement, holes, box.

        A negative click of the object's own tissue (:func:`same_tissue`: a
        same-intensity neighbour) is a marker of the watershed split, with
        background scribbles and box edges; one of another intensity removes
        the region around it closer to its intensity
        (:func:`~.negative.remove_negative`). A split from a click part-way
        to a background class (a blend: on an edge) is kept only when it
        leaves more of the object than it takes. ``thin`` is ``(raw image,
        its noise)`` for a thin shell (see :func:`~.refine.trim_shell`).
        """
        same = np.zeros(bg.shape, bool)
        blend = False
        lab, _ = ndi.label(clicks_bg)
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            click = lab[sl] == i
            c = float(np.median(sm[sl][click]))
            if any(abs(c - m) <= same_tissue(m, bg_means, self.k * noise) for m in means):
                same[sl] |= click
                blend |= is_blend(c, means, bg_means)
        other = clicks_bg & ~same
        if other.any() and (grown & dilate(other)).any():
            grown = remove_negative(sm, grown, other, means, seeds | union(fg),
                                    spacing, self.local_mm)
        markers = (bg & ~clicks_bg) | same
        if (grown & markers).any():
            grown = split(sm, grown, seeds | union(fg), markers, spacing,
                          self.edge_mm / 2 if blend else None)
        for _ in range(self.edge_passes):
            grown = refine_edge(sm, grown, bg)
        if thin is not None and clicks_bg.any():
            grown = trim_shell(thin[0], grown, seeds | union(fg), means, bg_means,
                               self.k * thin[1])
        grown = fill_holes(grown, bg)
        if box is not None:
            grown &= box
        return grown

    def _extend_edge(self, sm, grown, seed, bg, box, spacing, noise, g_means) -> None:
        """Move the object's edge out to a click at it (in place).

        Voxels join that are at least as object-like as the click's centre
        (a blend of object and surroundings), lie within ``edge_mm`` of the
        click and no farther from the object than the click plus a voxel, and
        connect to it.
        """
        sl, ell = ellipse(seed, spacing, self.edge_mm)
        sub = sm[sl]
        c = self._centre_value(sm, seed)
        m = min(g_means, key=lambda v: abs(v - c))
        acc = np.abs(sub - m) <= abs(c - m)
        acc &= ell[tuple(slice(0, n) for n in acc.shape)]
        d = distance_to_object(grown, seed, spacing, self.edge_mm)
        if np.isfinite(d):
            acc &= band_around(grown[sl], spacing, d + min(spacing))
        s = seed[sl] & ~bg[sl]
        grown[sl] |= grow(acc, s, None if box is None else box[sl], 0)

    def _caps(self, means, bg_means, noise) -> list:
        """How far (intensity) each object class reaches.

        Equal spreads put the edge half-way to the nearest background
        intensity; a class never reaches past half-way to a distinct other
        class of the object (cortex and medulla): what lies beyond is that
        class's or, when it is neither, background the first shell could not
        see.
        """
        caps = [max(self.k * noise, 0.5 * min(abs(m - b) for b in bg_means)) for m in means]
        far = 4 * self.k * noise
        return [min([c] + [max(self.k * noise, 0.5 * abs(m - o)) for o in means
                           if abs(m - o) > far]) for m, c in zip(means, caps)]

    def _grow_all(self, sm, fg, bg, box, spacing, noise, local, means, bg_means, grown,
                  grow_global, gl, touch):
        """Grow the global seeds, then each later click near itself (or near
        the object, for a click inside a region of its own intensity).

        A click touching the object (``touch``) only adds voxels within one
        voxel more of the object than itself: a band along the edge.
        """
        caps = [self.k * noise] * len(means)
        if bg_means:
            caps = self._caps(means, bg_means, noise)
            grown = grow_global([caps[i] for i in gl], bg_means)
        grown = grown.copy()
        g_means = [means[i] for i in gl]
        for i, loc in enumerate(local):
            if loc is None:
                continue
            if touch[i]:
                self._extend_edge(sm, grown, fg[i], bg, box, spacing, noise, g_means)
                continue
            sl, ell = loc
            if not grown.any():
                pass
            elif is_homogeneous(sm, fg[i], spacing, self.k * noise, self.global_spread,
                                self.seed_radius_mm):
                sl = near_object(grown, fg[i], spacing, self.local_mm)
                ell = np.ones(tuple(x.stop - x.start for x in sl), bool)
            else:  # on a blurred edge: its intensity is object only close by
                sl, ell = ellipse(fg[i], spacing, self.edge_mm)
            sub_bg = _distance_to_classes(sm[sl], bg_means)
            acc = accept(sm[sl], [means[i]], [caps[i]], [None], sub_bg)
            acc &= ell[tuple(slice(0, n) for n in acc.shape)]
            seed = fg[i][sl] & ~bg[sl]
            grown[sl] |= grow(acc, seed, None if box is None else box[sl], self.open_radius)
        return grown


def _distance_to_classes(sm, bg_means) -> np.ndarray | None:
    """Per voxel, the intensity distance to the nearest of ``bg_means``
    (None without background classes)."""
    if not bg_means:
        return None
    return np.min([np.abs(sm - b) for b in bg_means], axis=0)
