"""Apply correction edits to napari Labels layers as single, compact undo steps.

A correction (:class:`napari_medseg.core.corrections.Edit`) changes one box
of the label array. :func:`apply_edit` writes only the voxels that really
change and records them in napari's own Labels history as ONE undo step, so
Ctrl+Z restores the exact previous array and Ctrl+Shift+Z re-applies it.

The history entry holds only the changed voxels: either their indices (the
smallest unsigned dtype for the shape) with old and new values, through the
public ``Labels.data_setitem``; or, for dense changes, napari's masked paint
atom (a bool mask of the changed box plus old and new values of the changed
voxels), whichever is smaller. No Qt here.
"""

from __future__ import annotations

import logging

import numpy as np

from .layer_roles import locked_classes
from .locks import protect_locked

log = logging.getLogger(__name__)

__all__ = ["apply_edit", "history_nbytes", "undo_entry_nbytes", "history_signature"]

try:  # napari >= 0.9: compact mask-based history atoms
    from napari.layers.labels.labels import _MaskedPaintAtom
except ImportError:  # pragma: no cover - older napari
    _MaskedPaintAtom = None


def _unwrap(layer):
    """The layer itself behind napari's public-only proxy given to plugin widgets.

    The undo glue needs the Labels history internals (compact masked atoms,
    history lengths); it is pinned to the napari versions it is tested with.
    """
    return getattr(layer, "__wrapped__", layer)


def history_signature(layer) -> tuple:
    """A cheap value that changes whenever the layer's undo/redo history moves."""
    layer = _unwrap(layer)
    undo, redo = layer._undo_history, layer._redo_history
    return (id(layer.data), len(undo), len(redo), id(undo[-1]) if undo else None)


def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if _MaskedPaintAtom is not None and isinstance(obj, _MaskedPaintAtom):
        return _nbytes(obj.mask) + _nbytes(obj.old_values) + _nbytes(obj.new_value)
    if isinstance(obj, np.generic):
        return int(obj.nbytes)
    return 0


def undo_entry_nbytes(entry) -> int:
    """Bytes of numpy data held by one undo step (a list of history atoms)."""
    return _nbytes(list(entry))


def history_nbytes(layer) -> int:
    """Bytes of numpy data held by a Labels layer's undo and redo history."""
    layer = _unwrap(layer)
    return sum(undo_entry_nbytes(e) for e in (*layer._undo_history, *layer._redo_history))


def apply_edit(layer, edit, refresh: bool = True) -> int:
    """Apply ``edit`` to a napari Labels ``layer`` as one undo step.

    Parameters
    ----------
    layer : napari.layers.Labels
        The target layer (its ``data`` is modified in place).
    edit : napari_medseg.core.corrections.Edit
        New values for a box of ``layer.data``.
    refresh : bool
        Redraw the layer afterwards.

    Returns
    -------
    int
        Number of voxels changed (0: nothing changed, no undo step added).
    """
    if edit.empty:
        return 0
    layer = _unwrap(layer)
    data = layer.data
    old = np.asarray(data[edit.region])
    changed = old != edit.values
    locked = locked_classes(layer)
    if locked:  # locked classes: their voxels stay, and none joins them
        changed &= ~protect_locked(old, edit.values, locked)
    n = int(changed.sum())
    if n == 0:
        return 0
    new_values = edit.values[changed].astype(old.dtype, copy=False)
    index_bytes = 2 if max(data.shape) < 2 ** 16 else 4
    sparse_cost = n * 3 * index_bytes
    dense_cost = changed.size  # one bool per voxel of the box
    with layer.block_history():
        if _MaskedPaintAtom is not None and dense_cost < sparse_cost:
            atom = _MaskedPaintAtom(slice_key=tuple(edit.region), mask=changed,
                                    old_values=old[changed], new_value=new_values)
            layer._save_history(atom)
            data[edit.region] = np.where(changed, edit.values, old)
            if refresh:
                layer.refresh()
        else:
            if locked:
                local = np.nonzero(changed)
                idx = tuple(ix + (s.start or 0) for ix, s in zip(local, edit.region))
                layer.data_setitem(idx, new_values, refresh=refresh)
            else:
                idx, vals = edit.changes(data)
                layer.data_setitem(idx, vals, refresh=refresh)
    log.debug("applied edit of %d voxels in %s to %s", n, edit.region, layer.name)
    return n
