"""Seeded region growing of the classical engine."""

from __future__ import annotations

import numpy as np

from ._arrays import bbox, connected, dilate, erode

__all__ = ["accept", "grow"]


def accept(sm, means, caps, local, near_bg=None) -> np.ndarray:
    """Voxels that may join the object.

    A voxel is accepted for seed ``i`` when it lies within ``caps[i]`` of
    ``means[i]``, inside ``local[i]`` (``(slices, ellipsoid)``, or None for
    everywhere) and closer to ``means[i]`` than ``near_bg`` (the distance to the
    nearest background intensity, per voxel) when that is given.
    """
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


def grow(cand, seeds, box, open_radius: int = 1) -> np.ndarray:
    """The part of ``cand`` connected to ``seeds``, without thin bridges.

    An opening cuts bridges up to ``open_radius`` voxels thin (where region
    growing leaks into a neighbouring structure of similar intensity); what
    it trims off the object's own edge is grown back within ``cand``. A
    structure thinner than the opening (a ribbon, a sheet) is kept whole.

    Parameters
    ----------
    cand, seeds : bool arrays, (Z, Y, X) or (Y, X)
        Candidate voxels and seed voxels.
    box : bool array like ``cand`` or None
        Growth stays inside it.
    open_radius : int
        Bridge thickness cut (voxels); 0 disables the opening.
    """
    if box is not None:
        cand = cand & box
    plain = connected(cand, seeds)
    if open_radius <= 0 or not plain.any():
        return plain
    # work in the bounding box of what plain growth reaches
    sl = bbox(plain)
    sl = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in sl)
    c, sd = plain[sl], seeds[sl]
    core = dilate(erode(c, open_radius), open_radius)
    if not (core & sd).any():  # a thin structure: the opening would erase it
        return plain
    # thick parts of the opening not joined to the seeds' core are another
    # structure reached through a thin bridge: drop them (and the edge the
    # opening trimmed off them); thin parts (a ribbon, a sheet) stay
    own = connected(core, sd)
    own = dilate(own, open_radius + 1, within=c)
    other = dilate(core & ~own, open_radius + 1, within=c & ~own)
    out = np.zeros(cand.shape, bool)
    out[sl] = connected(c & ~other, sd & c)
    return out
