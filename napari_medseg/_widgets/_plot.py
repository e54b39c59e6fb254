"""A live training plot for the dock: loss and validation Dice against the iteration.

matplotlib's Qt canvas; points arrive from the training thread through a Qt
signal (:attr:`LivePlot.reported`, queued to the GUI thread) and the canvas is
redrawn at most every ``min_interval`` seconds.
"""

from __future__ import annotations

import math
import time

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QVBoxLayout, QWidget

__all__ = ["LivePlot"]

EMPTY_TEXT = "loss and validation Dice appear here during a run"


class _Relay(QObject):
    reported = Signal(object)


class LivePlot(QWidget):
    """Loss (left axis) and validation Dice (right axis) of a running fine-tune.

    Call :meth:`report` from any thread with ``{"step", "loss"}`` or
    ``{"step", "val_dice"}`` dicts (what
    :func:`napari_medseg.training.finetune.finetune` sends to ``report``).
    """

    def __init__(self, parent=None, min_interval: float = 0.5):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.min_interval = float(min_interval)
        self.steps, self.losses, self.val_steps, self.val_dice = [], [], [], []
        self.figure = Figure(figsize=(3.2, 1.8), dpi=90, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax = self.figure.add_subplot(111)
        self.ax2 = self.ax.twinx()
        self._relay = _Relay()
        self._relay.reported.connect(self._add)
        self._last_draw = 0.0
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.canvas.setMinimumHeight(140)
        self.clear()

    def report(self, event: dict) -> None:
        """Thread-safe: queue a point for the GUI thread."""
        self._relay.reported.emit(dict(event))

    def clear(self) -> None:
        self.steps.clear()
        self.losses.clear()
        self.val_steps.clear()
        self.val_dice.clear()
        self.redraw()

    def _add(self, event: dict) -> None:
        if "loss" in event:
            self.steps.append(int(event["step"]))
            self.losses.append(float(event["loss"]))
        if "val_dice" in event and not math.isnan(float(event["val_dice"])):
            self.val_steps.append(int(event["step"]))
            self.val_dice.append(float(event["val_dice"]))
        if time.monotonic() - self._last_draw >= self.min_interval or "val_dice" in event:
            self.redraw()

    def redraw(self) -> None:
        self._last_draw = time.monotonic()
        for ax in (self.ax, self.ax2):
            ax.clear()
        self.ax.plot(self.steps, self.losses, color="tab:orange", lw=1, label="loss")
        self.ax.set_xlabel("iteration", fontsize=7)
        self.ax.set_ylabel("loss", fontsize=7, color="tab:orange")
        self.ax2.plot(self.val_steps, self.val_dice, "o-", color="tab:blue", ms=3, lw=1)
        self.ax2.set_ylim(0, 1)
        self.ax2.yaxis.set_label_position("right")  # clear() moves a twin's label left
        self.ax2.set_ylabel("val Dice", fontsize=7, color="tab:blue")
        for ax in (self.ax, self.ax2):
            ax.tick_params(labelsize=6)
        if not self.steps and not self.val_steps:  # before a run: a frame, not -0.04..0.04
            self.ax.set_xlim(0, 100)
            self.ax.set_ylim(0, 1)
            self.ax.text(0.5, 0.5, EMPTY_TEXT, transform=self.ax.transAxes, ha="center",
                         va="center", fontsize=7, color="gray")
        self.canvas.draw_idle()
