"""Linked axial, coronal and sagittal views, through napari-orthogonal-views.

The ``planes`` extra installs `napari-orthogonal-views`_, which puts two more
canvases beside napari's own, synchronised in slice, cursor (crosshairs),
zoom and layers; its copies of a Labels layer share the layer's array, so
painting in any view edits the same segmentation, with one undo history.
:func:`show_linked_planes` opens them in radiological orientation: the main
canvas axial (anterior up, the patient's right on the left), the side one
sagittal (superior up, anterior on the left), the lower one coronal (superior
up, the patient's right on the left), for images opened with napari-medseg
(whose world axes are ``(S, P, L)``).

.. _napari-orthogonal-views: https://pypi.org/project/napari-orthogonal-views/
"""

from __future__ import annotations

import logging

from ..errors import MedSegError
from .display import show_plane

log = logging.getLogger(__name__)

__all__ = ["show_linked_planes", "hide_linked_planes", "linked_planes_available"]

#: napari-orthogonal-views view order for each side canvas (see its OrthoViewWidget):
#: from the main (S, P, L) order, the side canvas shows (S, P), the lower one (S, L).
_SAGITTAL, _CORONAL = (-1, -3, -2), (-2, -3, -1)


def linked_planes_available() -> bool:
    """True when napari-orthogonal-views is installed."""
    import importlib.util

    return importlib.util.find_spec("napari_orthogonal_views") is not None


def show_linked_planes(viewer):
    """Show axial, sagittal and coronal views side by side, linked, radiologically upright.

    Returns
    -------
    The napari-orthogonal-views manager of ``viewer``.

    Raises
    ------
    MedSegError
        When napari-orthogonal-views is not installed, or the viewer has no 3D data.
    """
    try:
        from napari_orthogonal_views.ortho_view_manager import _get_manager
    except ImportError as exc:
        raise MedSegError("linked views need napari-orthogonal-views: pip install "
                          "'napari-medseg[planes]'") from exc
    if viewer.dims.ndim < 3:
        raise MedSegError("linked views need a 3D image; open a volume first")
    show_plane(viewer, "axial")
    manager = _get_manager(viewer)
    manager.show()  # now, not on the next event-loop turn, so the views can be set up
    for widget, order in ((manager.right_widget, _SAGITTAL),
                          (manager.bottom_widget, _CORONAL)):
        widget.order = order
        widget._set_orth_views_dims_order()
        widget.vm_container.viewer_model.camera.orientation2d = ("up", "right")
    manager.set_cross_hairs(True)
    return manager


def hide_linked_planes(viewer) -> None:
    """Close the side views (no-op when napari-orthogonal-views is missing)."""
    if not linked_planes_available():
        return
    from napari_orthogonal_views.ortho_view_manager import _VIEWER_MANAGERS

    manager = _VIEWER_MANAGERS.get(viewer)
    if manager is not None and manager.is_shown():
        manager.hide()
