"""The corrections a user can pick: each declared once, with its parameters and shortcuts.

A :class:`Correction` says what it is called, which parameters it takes
(:class:`Param`: kind, default, range, unit), which keyboard shortcuts run it
and how to call the operation from a :class:`Context` (the labels, the chosen
class, spacing, slicing axis, region and the parameter values). The Correct
dock widget builds its form, its shortcut list and its calls from
:data:`CORRECTIONS`; adding a correction is one :func:`register` call here.

>>> sorted(CORRECTIONS)[:3]
['between', 'holes', 'islands']
>>> CORRECTIONS["margin"].shortcuts[0].key
'Shift-G'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import MedSegError
from . import interpolate, logic, morphology

__all__ = ["Param", "Shortcut", "Correction", "Context", "CORRECTIONS", "register",
           "shortcuts"]

#: Parameter kinds a form can show.
KINDS = ("float", "int", "choice", "text", "image", "labels")


@dataclass(frozen=True)
class Param:
    """One parameter of a correction.

    Attributes
    ----------
    name : str
        Key in :attr:`Context.values`.
    label : str
        What the form calls it.
    kind : {"float", "int", "choice", "text", "image", "labels"}
        A number, one of ``choices``, free text, or the name of an Image /
        Labels layer on the same grid (``first``, when given, is an extra
        entry before the layer names that stands for None).
    default : any
        Start value (a choice's text for ``"choice"``).
    lo, hi, step : float
        Range and step of numbers.
    suffix : str
        Unit shown after a number (``" mm"``).
    decimals : int
        Decimals of a float.
    choices : tuple of str
    first : str or None
    hint : str
        Placeholder or tooltip text.
    """

    name: str
    label: str
    kind: str = "float"
    default: Any = None
    lo: float = 0.0
    hi: float = 1.0
    step: float = 1.0
    suffix: str = ""
    decimals: int = 1
    choices: tuple = ()
    first: str | None = None
    hint: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name!r}: kind must be one of {KINDS}")


@dataclass(frozen=True)
class Shortcut:
    """A key that runs a correction with some settings overridden.

    ``key`` is napari's form (``"Shift-G"``); ``extra`` goes to
    :attr:`Context.extra`; ``note`` is appended to the title in the shortcut list.
    """

    key: str
    extra: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Context:
    """What a correction runs on, gathered by the widget (or a script).

    Attributes
    ----------
    data : (Z, Y, X) integer array
        The labels.
    label : int or None
        The class to work on (None: all classes).
    value : int
        The class value chosen in the form (split, logical, relabel, paint).
    spacing : tuple of 3 float
        Voxel size in mm ``(Z, Y, X)``.
    axis : int
        The data axis the 2D view slices along.
    region : tuple of 3 slices or None
    values : dict
        Parameter name -> value (numbers, choice text, text, layer name or None).
    extra : dict
        Settings of the shortcut that started the run.
    mask_of, image_of : callable
        Layer name -> bool mask / image array on the labels' grid.
    """

    data: np.ndarray
    label: int | None
    value: int
    spacing: tuple
    axis: int = 0
    region: tuple | None = None
    values: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    mask_of: Callable[[str], np.ndarray] | None = None
    image_of: Callable[[str], np.ndarray] | None = None


@dataclass(frozen=True)
class Correction:
    """A correction the user can pick.

    ``make(ctx)`` returns ``f(progress=None, cancel=None) -> Edit``.
    """

    key: str
    title: str
    make: Callable[[Context], Callable]
    params: tuple = ()
    info: str = ""
    shortcuts: tuple = ()


#: key -> Correction, in the order the widget offers them.
CORRECTIONS: dict[str, Correction] = {}


def register(correction: Correction) -> Correction:
    """Add ``correction`` to :data:`CORRECTIONS` (its key must be new)."""
    if correction.key in CORRECTIONS:
        raise ValueError(f"a correction {correction.key!r} is already registered")
    keys = {s.key for c in CORRECTIONS.values() for s in c.shortcuts}
    taken = keys & {s.key for s in correction.shortcuts}
    if taken:
        raise ValueError(f"shortcut(s) {sorted(taken)} already used")
    CORRECTIONS[correction.key] = correction
    return correction


def shortcuts() -> dict[str, tuple[str, dict]]:
    """``{key: (correction key, extra settings)}`` for every declared shortcut."""
    return {s.key: (c.key, dict(s.extra)) for c in CORRECTIONS.values() for s in c.shortcuts}


# ------------------------------------------------------------- declarations
def _kw(ctx: Context) -> dict:
    return {"region": ctx.region}


def _islands(ctx):
    return functools.partial(morphology.remove_islands, ctx.data, ctx.label,
                             spacing=ctx.spacing, min_volume_mm3=ctx.values["volume"],
                             **_kw(ctx))


def _largest(ctx):
    return functools.partial(morphology.keep_largest, ctx.data, ctx.label, **_kw(ctx))


def _split(ctx):
    return functools.partial(morphology.split_components, ctx.data, ctx.value, **_kw(ctx))


def _holes(ctx):
    mode = "3d" if ctx.values["mode"] == "3D" else "slice"
    return functools.partial(morphology.fill_holes, ctx.data, ctx.label, mode=mode,
                             axis=ctx.axis, **_kw(ctx))


def _smooth(ctx):
    return functools.partial(morphology.smooth, ctx.data, ctx.label, spacing=ctx.spacing,
                             method=ctx.extra.get("method", ctx.values["method"]),
                             radius_mm=ctx.values["radius"], **_kw(ctx))


def _margin(ctx):
    mm = ctx.values["mm"]
    if "sign" in ctx.extra:
        mm = abs(mm) * ctx.extra["sign"]
    return functools.partial(morphology.margin, ctx.data, ctx.label, margin_mm=mm,
                             spacing=ctx.spacing, **_kw(ctx))


def _between(ctx):
    return functools.partial(interpolate.fill_between_slices, ctx.data, ctx.label,
                             spacing=ctx.spacing, axis=ctx.axis, **_kw(ctx))


def _logical(ctx):
    other = ctx.values["other"]
    if ctx.values.get("other_layer"):
        other = ctx.mask_of(ctx.values["other_layer"])
    return functools.partial(logic.logical_op, ctx.data, ctx.values["op"], ctx.value, other,
                             **_kw(ctx))


def _relabel(ctx):
    try:
        sources = [int(s) for s in str(ctx.values["sources"]).replace(",", " ").split()]
    except ValueError as exc:
        raise MedSegError("list the labels to relabel as numbers, e.g. '2, 3'") from exc
    return functools.partial(logic.merge, ctx.data, sources, ctx.values["target"],
                             **_kw(ctx))


def _threshold(ctx):
    name = ctx.values.get("image")
    if not name:
        raise MedSegError("open the image to threshold first")
    image = ctx.image_of(name)
    mask = ctx.mask_of(ctx.values["mask"]) if ctx.values.get("mask") else None
    return functools.partial(logic.threshold_paint, ctx.data, mask, ctx.value, image=image,
                             lo=ctx.values["lo"], hi=ctx.values["hi"], **_kw(ctx))


for _c in (
    Correction("islands", "Remove small islands", _islands,
               (Param("volume", "Smaller than", "float", 100.0, 0.0, 1e7, 10.0, " mm³"),),
               shortcuts=(Shortcut("Shift-R"),)),
    Correction("largest", "Keep largest component", _largest,
               info="Removes all but the largest island.", shortcuts=(Shortcut("Shift-K"),)),
    Correction("split", "Split into components", _split,
               info="Each island gets its own label (largest keeps it)."),
    Correction("holes", "Fill holes", _holes,
               (Param("mode", "Holes", "choice", "3D", choices=("3D", "per slice")),),
               shortcuts=(Shortcut("Shift-F"),)),
    Correction("smooth", "Smooth", _smooth,
               (Param("method", "Filter", "choice", "median",
                      choices=("median", "opening", "closing")),
                Param("radius", "Radius", "float", 2.0, 0.1, 100.0, 0.5, " mm")),
               shortcuts=(Shortcut("Shift-M", {"method": "median"}),)),
    Correction("margin", "Margin (grow / shrink)", _margin,
               (Param("mm", "Margin (+ grow, - shrink)", "float", 2.0, -100.0, 100.0, 0.5,
                      " mm"),),
               shortcuts=(Shortcut("Shift-G", {"sign": 1}, " +"),
                          Shortcut("Shift-H", {"sign": -1}, " -"))),
    Correction("between", "Fill between slices", _between,
               info="Interpolates the label between the slices it is drawn on, along the "
                    "current slicing axis.", shortcuts=(Shortcut("Shift-I"),)),
    Correction("logical", "Logical operation", _logical,
               (Param("op", "Operation", "choice", "union",
                      choices=("union", "intersect", "subtract", "invert")),
                Param("other", "With label", "int", 2, 0, 65535),
                Param("other_layer", "or layer", "labels", first="(same layer)"))),
    Correction("relabel", "Relabel / merge", _relabel,
               (Param("sources", "Labels", "text", "2", hint="e.g. 2, 3"),
                Param("target", "Become", "int", 1, 0, 65535))),
    Correction("threshold", "Threshold-limited paint", _threshold,
               (Param("image", "Image", "image"),
                Param("lo", "From", "float", -100.0, -1e6, 1e6, 10.0),
                Param("hi", "To", "float", 300.0, -1e6, 1e6, 10.0),
                Param("mask", "Where", "labels", first="(region)"))),
):
    register(_c)
del _c
