"""Prompts and the engine interface shared by every interactive segmenter.

An engine turns *prompts* (clicks, boxes, scribbles) given on an image into a
binary mask of one object. All coordinates are **array indices** ``(z, y, x)``
of the image, as floats (napari's data coordinates); nothing here knows about
world space or layers.

Engines may keep features that do not change between clicks (a smoothed image,
an embedding) in a cache keyed by the image, so only the first update on a new
image pays for them.
"""

from __future__ import annotations

import functools
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import MedSegError

log = logging.getLogger(__name__)

__all__ = ["Prompts", "Engine", "check_image", "roi_around", "Region", "image_fingerprint",
           "scribble_clicks"]

Region = tuple  # tuple of 3 slices into the image (Z, Y, X)


def _points(a) -> np.ndarray:
    a = np.zeros((0, 3)) if a is None else np.asarray(a, dtype=float)
    if a.size == 0:
        return np.zeros((0, 3))
    if a.ndim != 2 or a.shape[1] != 3:
        raise MedSegError(f"points must be an (N, 3) array of (z, y, x) indices, got shape "
                          f"{a.shape}; add the points on a 3D layer", "prompts")
    return a


@dataclass
class Prompts:
    """What the user said about one object.

    Parameters
    ----------
    positive, negative : (N, 3) array_like
        Clicks on / off the object, array indices ``(z, y, x)``.
    boxes : (M, 2, 3) array_like
        Opposite corners ``(z, y, x)`` of boxes around the object (inclusive
        indices). A box drawn on one slice has equal ``z`` corners (along
        ``axis``).
    scribbles : (Z, Y, X) integer array, optional
        1 where the user painted the object, 2 where they painted background.
    mode : {"2d", "3d"}
        A mask on one slice or a mask of the whole object.
    axis, index : int
        For ``mode="2d"``: the slice ``image.take(index, axis)``.
    """

    positive: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 3)))
    scribbles: np.ndarray | None = None
    mode: str = "3d"
    axis: int = 0
    index: int | None = None

    def __post_init__(self):
        self.positive = _points(self.positive)
        self.negative = _points(self.negative)
        b = np.zeros((0, 2, 3)) if self.boxes is None else np.asarray(self.boxes, float)
        if b.size == 0:
            b = np.zeros((0, 2, 3))
        if b.ndim != 3 or b.shape[1:] != (2, 3):
            raise MedSegError(f"boxes must be (M, 2, 3) corner pairs, got shape {b.shape}",
                              "prompts")
        self.boxes = np.sort(b, axis=1)
        if self.mode not in ("2d", "3d"):
            raise MedSegError(f"mode must be '2d' or '3d', not {self.mode!r}", "prompts")
        if self.mode == "2d" and self.index is None:
            self.index = self._guess_index()

    # ----------------------------------------------------------------- views
    def _guess_index(self) -> int | None:
        pts = [self.positive, self.negative, self.boxes.reshape(-1, 3)]
        allp = np.concatenate(pts)
        if len(allp):
            return int(round(allp[0, self.axis]))
        return None

    def has_object_seed(self) -> bool:
        """True when some prompt says where the object is."""
        sc = self.scribbles is not None and bool(np.any(self.scribbles == 1))
        return bool(len(self.positive) or len(self.boxes) or sc)

    def is_empty(self) -> bool:
        sc = self.scribbles is not None and bool(np.any(self.scribbles))
        return not (len(self.positive) or len(self.negative) or len(self.boxes) or sc)

    def all_points(self) -> np.ndarray:
        """Every prompt coordinate (clicks and box corners), ``(N, 3)``."""
        return np.concatenate([self.positive, self.negative, self.boxes.reshape(-1, 3)])

    def validate(self, shape) -> None:
        """Raise :class:`MedSegError` when prompts do not fit an image of ``shape``."""
        shape = tuple(int(s) for s in shape)
        if self.is_empty():
            raise MedSegError("no prompts yet: click on the object (positive point), draw "
                              "a box or paint a scribble", "prompts")
        if not self.has_object_seed():
            raise MedSegError("only negative prompts: add a positive point, a box or an "
                              "object scribble on the object", "prompts")
        pts = self.all_points()
        if len(pts):
            lo = pts.min(axis=0)
            hi = pts.max(axis=0)
            if np.any(lo < -0.5) or np.any(hi > np.asarray(shape) - 0.5):
                raise MedSegError(
                    f"a prompt lies outside the image of shape {shape} (prompts span "
                    f"{np.round(lo, 1).tolist()} to {np.round(hi, 1).tolist()}); delete it "
                    "or draw it on the image's own grid", "prompts")
        if self.scribbles is not None and tuple(self.scribbles.shape) != shape:
            raise MedSegError(f"the scribble layer has shape {tuple(self.scribbles.shape)} "
                              f"but the image is {shape}; paint scribbles on a layer made "
                              "from this image", "scribbles")
        if self.mode == "2d":
            if self.axis not in (0, 1, 2):
                raise MedSegError(f"2D axis must be 0, 1 or 2, not {self.axis}", "prompts")
            if self.index is None or not 0 <= self.index < shape[self.axis]:
                raise MedSegError(f"slice {self.index} is outside axis {self.axis} of an "
                                  f"image of shape {shape}", "prompts")

    def paint_view(self) -> tuple[np.ndarray | None, np.ndarray]:
        """The scribble paint that counts and where it starts: the whole layer
        in 3D mode, the prompts' slice (a view, one voxel thick) in 2D mode;
        ``(None, zeros)`` without scribbles."""
        start = np.zeros(3, int)
        if self.scribbles is None:
            return None, start
        paint = np.asarray(self.scribbles)
        if self.mode == "2d":
            sl = [slice(None)] * 3
            sl[self.axis] = slice(self.index, self.index + 1)
            paint = paint[tuple(sl)]
            start[self.axis] = self.index
        return paint, start

    def on_slice(self) -> "Prompts":
        """The 2D-mode prompts restricted to the chosen slice (others dropped)."""
        ax, idx = self.axis, self.index

        def keep(p):
            return p[np.abs(p[:, ax] - idx) <= 0.5] if len(p) else p

        boxes = self.boxes
        if len(boxes):
            inside = (boxes[:, 0, ax] <= idx + 0.5) & (boxes[:, 1, ax] >= idx - 0.5)
            boxes = boxes[inside]
        return Prompts(keep(self.positive), keep(self.negative), boxes, self.scribbles,
                       mode="2d", axis=ax, index=idx)


def check_image(image, spacing=None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Check an image for interactive use; return it as an array and its spacing.

    Raises
    ------
    MedSegError
        For anything but a 3D ``(Z, Y, X)`` single-channel image, or a bad spacing.
    """
    ndim = getattr(image, "ndim", None)
    if ndim != 3:
        shape = getattr(image, "shape", None)
        raise MedSegError(f"interactive segmentation needs a 3D (Z, Y, X) image, got shape "
                          f"{shape}; for a 2D image add a singleton axis, for several "
                          "channels pick one", "image")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise MedSegError(f"spacing must be 3 positive numbers in mm, got {spacing}", "image")
    return image, spacing


def roi_around(points: np.ndarray, shape, size=(128, 128, 128), margin=16) -> Region:
    """A box of at least ``size`` voxels around ``points``, clipped to ``shape``.

    The box covers every point plus ``margin`` voxels, and is centred on them.
    """
    shape = np.asarray(shape, int)
    lo = np.floor(points.min(axis=0)).astype(int) - margin
    hi = np.ceil(points.max(axis=0)).astype(int) + margin + 1
    size = np.minimum(np.asarray(size, int), shape)
    extra = np.maximum(size - (hi - lo), 0)
    lo = lo - extra // 2
    hi = hi + extra - extra // 2
    shift = np.maximum(-lo, 0) - np.maximum(hi - shape, 0)
    lo = np.clip(lo + shift, 0, shape)
    hi = np.clip(hi + shift, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _stroke_points(idx: np.ndarray, spacing, step_mm: float, most: int) -> list:
    """Points of one stroke (voxel indices ``idx``): the voxel nearest its
    centre, then each time the voxel farthest from those taken, until every
    voxel lies within ``step_mm`` of one or ``most`` are taken."""
    pos = idx * np.asarray(spacing, float)
    first = int(np.argmin(((pos - pos.mean(0)) ** 2).sum(1)))
    taken = [first]
    near = np.sqrt(((pos - pos[first]) ** 2).sum(1))
    while len(taken) < most and near.max() > step_mm:
        k = int(np.argmax(near))
        taken.append(k)
        near = np.minimum(near, np.sqrt(((pos - pos[k]) ** 2).sum(1)))
    return [idx[k] for k in taken]


def scribble_clicks(prompts: Prompts, spacing, step_mm: float = 10.0,
                    per_stroke: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Clicks that stand for the scribble strokes of ``prompts``, for engines
    that take clicks: ``(positive, negative)`` ``(N, 3)`` arrays.

    Each stroke (a connected part of the object paint, 1, or of the background
    paint, 2; in 2D mode on the prompts' slice only) gives its voxel nearest
    its centre, then, along a long stroke, the voxels farthest from those
    taken until every voxel of it lies within ``step_mm`` of one (at most
    ``per_stroke``).
    """
    from scipy import ndimage as ndi

    empty = (np.zeros((0, 3)), np.zeros((0, 3)))
    sc, lo_fix = prompts.paint_view()
    if sc is None:
        return empty
    nz = np.nonzero(sc)
    if not len(nz[0]):
        return empty
    lo = np.array([a.min() for a in nz])
    hi = np.array([a.max() for a in nz]) + 1
    sub = sc[tuple(slice(a, b) for a, b in zip(lo, hi))]
    out = []
    for value in (1, 2):
        lab, n = ndi.label(sub == value, structure=np.ones((3, 3, 3), bool))
        pts = []
        if n:
            for k, part in enumerate(ndi.find_objects(lab), 1):
                idx = np.argwhere(lab[part] == k) + [s.start for s in part]
                pts += _stroke_points(idx, spacing, step_mm, per_stroke)
        out.append(np.asarray(pts, float).reshape(-1, 3) + lo + lo_fix)
    return out[0], out[1]


_calls = threading.local()  # per thread: predict_region calls under way


def _bounded(fn):
    """``predict_region`` of an engine class, its result passed through
    :meth:`Engine.bound` (once, however many subclasses call their parents)."""

    @functools.wraps(fn)
    def predict_region(self, image, spacing, prompts, cancel=None):
        depth = getattr(_calls, "depth", 0)
        _calls.depth = depth + 1
        try:
            mask, region = fn(self, image, spacing, prompts, cancel=cancel)
        finally:
            _calls.depth = depth
        if depth:
            return mask, region
        return self.bound(image, spacing, prompts, mask, region)

    predict_region._bounded = True
    return predict_region


def image_fingerprint(image, samples: int = 4096) -> tuple:
    """A cheap content key of an array: shape, dtype and a hash of a strided sample.

    About ``samples`` voxels on a regular grid (plus the first and last) are
    hashed, so two different images almost never share a key while a 512^3 CT
    costs well under a millisecond. An edit that changes no sampled voxel keeps
    the key: engines cache per-image features, which such an edit barely moves.
    """
    import hashlib

    arr = image if hasattr(image, "shape") else np.asarray(image)
    shape = tuple(int(s) for s in arr.shape)
    if not shape or min(shape) == 0:
        return (shape, str(getattr(arr, "dtype", "")), "")
    per_axis = max(1, int(round(samples ** (1.0 / len(shape)))))
    steps = tuple(max(1, n // per_axis) for n in shape)
    sample = np.ascontiguousarray(np.asarray(arr[tuple(slice(None, None, s) for s in steps)]))
    ends = np.asarray([np.asarray(arr[(0,) * len(shape)]), np.asarray(arr[(-1,) * len(shape)])])
    digest = hashlib.blake2b(sample.tobytes() + ends.tobytes(), digest_size=16).hexdigest()
    return (shape, str(sample.dtype), digest)


class Engine(ABC):
    """Prompts + image + spacing -> mask of one object.

    Subclasses implement :meth:`predict_region`; :meth:`predict` wraps it into
    a full-size mask. ``name`` is shown in the widget's engine picker.

    Every subclass's :meth:`predict_region` result passes through
    :meth:`bound` (see :mod:`~napari_medseg.interactive.bounds`): no click
    selects far beyond its prompts, a positive click adds near itself, a
    negative click removes near itself and never empties the mask. Set
    ``bounded = False`` on an engine for its raw results.
    """

    name: str = "engine"
    #: Whether results pass through :meth:`bound`.
    bounded: bool = True

    def __init__(self):
        self._cache_key = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("predict_region")
        if fn is not None and not getattr(fn, "_bounded", False) \
                and not getattr(fn, "__isabstractmethod__", False):
            cls.predict_region = _bounded(fn)

    def bound(self, image, spacing, prompts: Prompts, mask,
              region) -> tuple[np.ndarray, Region]:
        """``(mask, region)`` bounded by :func:`~.bounds.bound_result`.

        The previous bounded result is kept (and what negative clicks
        removed from the object): when ``prompts`` repeat the previous
        prompts on the same image plus one click, that click's change is
        bounded against it.
        """
        if not getattr(self, "bounded", True):
            return mask, region
        from .bounds import Bounds, Previous, added_click, bound_result

        spacing = tuple(float(s) for s in spacing)
        p = prompts.on_slice() if prompts.mode == "2d" else prompts
        key = self.image_key(image, spacing)
        last = getattr(self, "_bound_last", None)
        previous = None
        if last is not None and last[0] == key:
            click = added_click(last[1], p)
            if click is not None:
                previous = Previous(last[2], last[3], click[0], click[1], last[4], last[5])
        mask, region = bound_result(mask, region, tuple(image.shape), spacing, p,
                                    getattr(self, "bounds", None) or Bounds(), previous,
                                    image)
        self._bound_last = (key, p, mask, region,
                            None if previous is None else previous.removed,
                            None if previous is None else (previous.mask, previous.region))
        return mask, region

    @staticmethod
    def image_key(image, spacing) -> tuple:
        """A cache key for ``image``: its content fingerprint and spacing.

        Keyed by content (:func:`image_fingerprint`), not by ``id(image)``: a new
        array that reuses a freed one's address must not find its features.
        """
        return (image_fingerprint(image), tuple(float(s) for s in spacing))

    def set_image(self, image, spacing) -> None:
        """Compute per-image features once (default: none)."""
        self._cache_key = self.image_key(image, spacing)

    def ensure_image(self, image, spacing) -> None:
        """Call :meth:`set_image` unless ``image`` is the cached one."""
        if self._cache_key != self.image_key(image, spacing):
            self.set_image(image, spacing)

    @abstractmethod
    def predict_region(self, image, spacing, prompts: Prompts,
                       cancel: Callable[[], bool] | None = None
                       ) -> tuple[np.ndarray, Region]:
        """Segment one object; return ``(mask, region)``.

        ``mask`` is a bool array for ``image[region]``; outside ``region``
        the object is absent. In 2D mode ``region`` covers one slice.
        """

    def predict(self, image, spacing, prompts: Prompts,
                cancel: Callable[[], bool] | None = None) -> np.ndarray:
        """Segment one object as a bool ``(Z, Y, X)`` mask the size of ``image``.

        Parameters
        ----------
        image : (Z, Y, X) array_like
            Any modality (CT in HU, MR in arbitrary units).
        spacing : sequence of 3 float
            Voxel size in mm along ``(Z, Y, X)``.
        prompts : Prompts
            Clicks, boxes and scribbles in array indices.
        cancel : callable, optional
            Returns True when a newer prompt made this call stale; the engine
            then raises :class:`~napari_medseg.errors.Cancelled`.

        Raises
        ------
        MedSegError
            For a non-3D image, prompts outside the image or no object prompt.
        """
        mask, region = self.predict_region(image, spacing, prompts, cancel=cancel)
        out = np.zeros(tuple(image.shape), dtype=bool)
        out[region] = mask
        return out

    def prepare(self, image, spacing, prompts: Prompts) -> tuple[np.ndarray, tuple, Prompts]:
        """Shared checks: image, spacing and prompts; 2D prompts cut to their slice."""
        image, spacing = check_image(image, spacing)
        prompts.validate(image.shape)
        if prompts.mode == "2d":
            prompts = prompts.on_slice()
            if not prompts.has_object_seed():
                raise MedSegError(f"no positive point, box or object scribble on slice "
                                  f"{prompts.index}; add one there or switch to 3D mode",
                                  "prompts")
        return image, spacing, prompts
