"""Keep the napari-medseg docks usable on a laptop screen.

napari stacks every dock widget added to the right-hand area on top of the
others, so with five or six of ours open the window grows past the screen and
each table shrinks to a row. :func:`tabify_when_docked` puts each of our docks
into one tab group with the ones already open, raises it, and keeps the
window inside the available screen area. :func:`min_table_rows` gives a table
a minimum height of ``n`` rows.
"""

from __future__ import annotations

import logging

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication, QDockWidget, QMainWindow

log = logging.getLogger(__name__)

__all__ = ["tabify_when_docked", "tabify_docks", "fit_window_to_screen", "min_table_rows"]


def _dock_of(widget):
    w = widget.parentWidget() if widget is not None else None
    while w is not None and not isinstance(w, QDockWidget):
        w = w.parentWidget()
    return w


def _ours(dock) -> bool:
    return type(dock.widget()).__module__.startswith("napari_medseg._widgets")


def tabify_docks(dock) -> bool:
    """Tab ``dock`` together with the other napari-medseg docks of its area.

    Returns True when it joined a tab group.
    """
    main = dock.parentWidget()
    if not isinstance(main, QMainWindow) or dock.isFloating():
        return False
    area = main.dockWidgetArea(dock)
    others = [d for d in main.findChildren(QDockWidget)
              if d is not dock and not d.isFloating() and d.isVisible()
              and main.dockWidgetArea(d) == area and _ours(d)]
    if not others:
        return False
    main.tabifyDockWidget(others[0], dock)
    dock.show()
    dock.raise_()
    return True


def fit_window_to_screen(main) -> None:
    """Shrink (and move) a top-level window so it lies inside its screen's free area."""
    screen = main.screen() if hasattr(main, "screen") else None
    screen = screen or QApplication.primaryScreen()
    if screen is None:
        return
    avail = screen.availableGeometry()
    frame = main.frameGeometry()
    extra_w = frame.width() - main.width()
    extra_h = frame.height() - main.height()
    w = min(main.width(), avail.width() - extra_w)
    h = min(main.height(), avail.height() - extra_h)
    if (w, h) != (main.width(), main.height()):
        main.resize(w, h)
    frame = main.frameGeometry()
    x = min(max(frame.x(), avail.x()), avail.x() + avail.width() - frame.width())
    y = min(max(frame.y(), avail.y()), avail.y() + avail.height() - frame.height())
    if (x, y) != (frame.x(), frame.y()):
        main.move(x, y)


def _arrange(widget) -> None:
    try:
        dock = _dock_of(widget)
        if dock is None:
            return
        tabify_docks(dock)
        main = dock.parentWidget()
        if isinstance(main, QMainWindow):
            QApplication.processEvents()
            fit_window_to_screen(main)
    except RuntimeError:  # the widget was deleted before the timer fired
        log.debug("dock gone before it could be arranged", exc_info=True)


def tabify_when_docked(widget) -> None:
    """Once ``widget`` sits in a dock, tab it with our other docks and fit the window.

    Call at the end of a dock widget's ``__init__``; the work happens on the
    next turn of the event loop, after napari has docked the widget.
    """
    QTimer.singleShot(0, lambda: _arrange(widget))


def min_table_rows(table, rows: int = 8) -> None:
    """Give a ``QTableView`` room for at least ``rows`` rows and its header."""
    row_h = table.verticalHeader().defaultSectionSize()
    head_h = table.horizontalHeader().sizeHint().height()
    table.setMinimumHeight(rows * row_h + head_h + 2 * table.frameWidth() + 4)
