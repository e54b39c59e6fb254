"""Locked classes: no edit of a Labels layer changes their voxels.

A class the user has finished is *locked* (its ids are kept in the layer's
metadata, see :mod:`.layer_roles`). Every edit of a napari Labels layer,
napari's own brush, fill and polygon, our corrections
(:func:`~napari_medseg._napari.history.apply_edit`) and interactive commits
(``data_setitem``), ends in one undo step that napari announces with its
``paint`` event. :func:`enforce_locks` listens to that event and, in the same
undo step, puts back every voxel that was of a locked class, or was turned
into one, and drops those voxels from the step, so Ctrl+Z and Ctrl+Shift+Z
never touch them either. No Qt here.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from .layer_roles import locked_classes, set_locked_classes

log = logging.getLogger(__name__)

__all__ = ["enforce_locks", "lock_classes", "protect_locked"]

try:  # napari >= 0.9: compact mask-based history atoms
    from napari.layers.labels.labels import _MaskedPaintAtom
except ImportError:  # pragma: no cover - older napari
    _MaskedPaintAtom = None

_ENFORCED: "weakref.WeakSet" = weakref.WeakSet()


def protect_locked(old, new, locked) -> np.ndarray:
    """Boolean mask of the voxels an edit ``old -> new`` may not change.

    Parameters
    ----------
    old, new : numpy.ndarray
        Values before and after the edit (same shape; ``new`` may be a scalar).
    locked : collection of int
        Locked class ids.

    Returns
    -------
    numpy.ndarray
        True where ``old`` is a locked class or ``new`` would make it one
        (and the value really changes).

    Examples
    --------
    >>> protect_locked(np.array([0, 1, 2]), np.array([2, 2, 0]), {2}).tolist()
    [True, True, True]
    >>> protect_locked(np.array([0, 1, 3]), np.array([1, 3, 3]), {2}).tolist()
    [False, False, False]
    """
    old = np.asarray(old)
    new = np.broadcast_to(np.asarray(new), old.shape)
    ids = np.fromiter((int(v) for v in locked), dtype=np.int64)
    if ids.size == 0:
        return np.zeros(old.shape, bool)
    return (np.isin(old, ids) | np.isin(new, ids)) & (old != new)


def _atom_indices(atom):
    """``(indices, old, new)`` of a history atom, indices as a tuple of int arrays."""
    if _MaskedPaintAtom is not None and isinstance(atom, _MaskedPaintAtom):
        starts = [s.start or 0 if isinstance(s, slice) else int(s) for s in atom.slice_key]
        if atom.mask is None:
            old = np.asarray(atom.old_values)
            local = np.indices(old.shape).reshape(old.ndim, -1)
            old = old.ravel()
        else:
            local = np.nonzero(atom.mask)
            old = np.asarray(atom.old_values).ravel()
        idx = tuple(np.asarray(ix) + st for ix, st in zip(local, starts))
        new = np.broadcast_to(np.asarray(atom.new_value).ravel()
                              if np.ndim(atom.new_value) else atom.new_value, old.shape)
        return idx, old, new
    indices, old, new = atom
    if not all(isinstance(ix, np.ndarray) or np.isscalar(ix) for ix in indices):
        return None
    idx = tuple(np.atleast_1d(np.asarray(ix)) for ix in indices)
    idx = tuple(np.broadcast_arrays(*idx))
    old = np.broadcast_to(np.asarray(old), idx[0].shape)
    new = np.broadcast_to(np.asarray(new), idx[0].shape)
    return tuple(ix.ravel() for ix in idx), old.ravel(), new.ravel()


def _on_paint(event) -> None:
    layer = event.source
    locked = locked_classes(layer)
    item = event.value
    if not locked or not isinstance(item, list):
        return
    data = layer.data
    reverted = 0
    for n, atom in enumerate(item):
        parts = _atom_indices(atom)
        if parts is None:
            log.warning("%s: an edit of an unknown kind was not checked against the "
                        "locked classes", layer.name)
            continue
        idx, old, new = parts
        bad = protect_locked(old, new, locked)
        if not bad.any():
            continue
        data[tuple(ix[bad] for ix in idx)] = old[bad]
        keep = ~bad
        item[n] = (tuple(ix[keep] for ix in idx), np.array(old[keep]), np.array(new[keep]))
        reverted += int(bad.sum())
    if reverted:
        layer.refresh()
        log.info("%s: %d voxels of locked classes %s kept", layer.name, reverted,
                 sorted(locked))


def _grouped(layer, method):
    """``method`` run inside a history block when called outside one.

    napari announces an edit made outside a block *before* writing it; inside
    a block the announcement comes after the write, when it can be undone.
    Calls already inside a block (a brush stroke) are left as they are, so a
    stroke stays one undo step.
    """
    def run(*args, **kwargs):
        if layer._block_history:
            return method(*args, **kwargs)
        with layer.block_history():
            return method(*args, **kwargs)

    run.__name__ = getattr(method, "__name__", "edit")
    run.__doc__ = getattr(method, "__doc__", None)
    return run


def enforce_locks(layer) -> None:
    """Make every future edit of ``layer`` leave its locked classes alone (idempotent)."""
    layer = getattr(layer, "__wrapped__", layer)
    if layer in _ENFORCED:
        return
    for name in ("paint", "fill", "paint_polygon", "data_setitem"):
        method = getattr(layer, name, None)
        if method is not None:
            setattr(layer, name, _grouped(layer, method))
    layer.events.paint.connect(_on_paint)
    _ENFORCED.add(layer)


def lock_classes(layer, classes) -> None:
    """Lock exactly ``classes`` (ids) of a Labels layer and enforce it."""
    layer = getattr(layer, "__wrapped__", layer)
    set_locked_classes(layer, classes)
    enforce_locks(layer)
