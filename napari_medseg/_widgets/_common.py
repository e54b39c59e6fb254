"""Small pieces every dock widget shares: background jobs, progress, errors.

A widget runs long work with :class:`Job`: the core function runs in a napari
worker thread, gets ``progress(done, total)`` and ``cancel()`` callables, and
its result comes back on the GUI thread. Progress shows in the widget's own bar
and in napari's activity dock; Cancel sets a flag that the core checks between
steps. Errors become napari notifications, never traceback dialogs.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLineEdit, QProgressBar, QPushButton, QWidget

from ..core.policy import is_out_of_memory
from ..errors import Cancelled, MedSegError

log = logging.getLogger(__name__)

__all__ = ["Job", "JobBar", "notify_exception", "row", "show_error", "show_info", "show_warning"]


def row(*widgets) -> QWidget:
    """Widgets side by side, without margins; combo boxes and line edits take the room."""
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        lay.addWidget(x, 1 if isinstance(x, (QComboBox, QLineEdit)) else 0)
    return w


def notify_exception(exc: BaseException, what: str = "") -> str:
    """Show ``exc`` as a napari notification and return the message shown.

    :class:`MedSegError` messages are shown as they are (they already say what
    to do); anything else is logged with its traceback and shown as one line.
    """
    if isinstance(exc, Cancelled):
        msg = f"{what} cancelled" if what else "cancelled"
        show_info(msg)
        return msg
    if isinstance(exc, MedSegError):
        msg = str(exc)
    elif is_out_of_memory(exc):
        msg = (f"{what}: out of memory. Try a smaller region, the fast mode, or the CPU "
               "device." if what else "out of memory")
    else:
        log.exception("unexpected error in %s", what or "napari-medseg", exc_info=exc)
        msg = f"{what} failed: {type(exc).__name__}: {exc}" if what else str(exc)
    show_error(msg)
    return msg


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int)


class JobBar(QWidget):
    """A progress bar with a Cancel button, hidden while idle."""

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.cancel_button = QPushButton("Cancel")
        lay.addWidget(self.bar)
        lay.addWidget(self.cancel_button)
        self.setVisible(False)


class Job:
    """Run ``func(*args, progress=..., cancel=..., **kwargs)`` off the GUI thread.

    Parameters
    ----------
    func : callable
        A core function taking ``progress`` and ``cancel`` keyword arguments.
    on_done : callable
        Called on the GUI thread with the return value.
    bar : JobBar, optional
        The widget's bar; its Cancel button cancels this job.
    what : str
        Short description for the activity dock and messages ("Segment", ...).
    on_finish : callable, optional
        Called on the GUI thread after success, error or cancel (re-enable buttons).
    """

    def __init__(self, func: Callable, *args, on_done: Callable[[Any], None],
                 bar: JobBar | None = None, what: str = "", on_finish=None,
                 on_error=None, **kwargs):
        self.cancel_event = threading.Event()
        self.what = what
        self._bar = bar
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._pbar = None
        self._on_done = on_done
        self._on_finish = on_finish
        self._on_error = on_error
        self.result = None
        self.error: BaseException | None = None

        def run():
            return func(*args, progress=self._relay.progressed.emit,
                        cancel=self.cancel_event.is_set, **kwargs)

        # errors go to _errored (a notification), never re-raised as a traceback
        self.worker = create_worker(run, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(self._returned)
        self.worker.errored.connect(self._errored)
        self.worker.finished.connect(self._finished)
        if bar is not None:
            bar.cancel_button.clicked.connect(self.cancel)

    # --------------------------------------------------------------- control
    def start(self) -> "Job":
        if self._bar is not None:
            self._bar.bar.setRange(0, 0)  # busy until the first progress report
            self._bar.setVisible(True)
            self._bar.cancel_button.setEnabled(True)
        self.worker.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()
        if self._bar is not None:
            self._bar.cancel_button.setEnabled(False)

    @property
    def running(self) -> bool:
        return bool(self.worker.is_running)

    # ---------------------------------------------------------------- slots
    def _on_progress(self, done: int, total: int) -> None:
        total = max(int(total), 1)
        if self._bar is not None:
            self._bar.bar.setRange(0, total)
            self._bar.bar.setValue(int(done))
        if self._pbar is None:
            self._pbar = napari_progress(total=total, desc=self.what or "napari-medseg")
        if self._pbar.total != total:
            self._pbar.total = total
        self._pbar.update(max(int(done) - self._pbar.n, 0))

    def _returned(self, value) -> None:
        self.result = value
        try:
            self._on_done(value)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.error = exc
            notify_exception(exc, self.what)

    def _errored(self, exc) -> None:
        self.error = exc
        notify_exception(exc, self.what)
        if self._on_error is not None:
            self._on_error(exc)

    def _finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._bar is not None:
            self._bar.setVisible(False)
        if self._on_finish is not None:
            self._on_finish()
