"""The "Label QA" dock widget: a per-class table of volumes, islands and corrections.

Thin over :func:`napari_medseg.core.stats.label_qa`. For a Labels layer made
by a model (``metadata["medseg_prediction"]``) it also shows the voxels the
user corrected and the Dice overlap with the prediction. Empty classes and
labels outside the body (from the image, or the largest labelled region) are
flagged. The table refreshes by itself, shortly after the labels change.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout,
                            QHeaderView, QLabel, QPushButton, QTableWidget, QTableWidgetItem,
                            QVBoxLayout, QWidget)

from ..core.stats import body_mask, label_qa
from .._napari.history import history_signature
from .._napari.layer_roles import is_segmentation_layer
from .._napari.boundary import modality_of, prediction_of, volume_from_layer
from ._common import notify_exception
from ._layout import min_table_rows, tabify_when_docked

log = logging.getLogger(__name__)

__all__ = ["QAWidget", "COLUMNS"]

COLUMNS = ("Label", "Name", "Volume (mL)", "Islands", "Corrected", "Dice", "Flags",
           "Surface (cm²)", "Max diam. (mm)", "Sphericity")
#: Delay (ms) between the last edit and the automatic refresh.
DEBOUNCE_MS = 600


class QAWidget(QWidget):
    """Per-class quality table of a Labels layer."""

    def __init__(self, napari_viewer):
        super().__init__()
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self.rows: list[dict] = []
        self._watched = None
        self._signature = None
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.layer_combo = QComboBox()
        self.image_combo = QComboBox()
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(-1e6, 1e6)
        self.threshold.setDecimals(1)
        self.threshold.setSpecialValueText("auto")
        self.threshold.setMinimum(-1e6)
        self.threshold.setValue(-1e6)  # "auto": -300 HU for CT, Otsu otherwise
        form.addRow("Labels layer", self.layer_combo)
        form.addRow("Body from", self.image_combo)
        form.addRow("Body threshold", self.threshold)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.refresh_button = QPushButton("Refresh")
        self.auto_check = QCheckBox("auto refresh")
        self.auto_check.setChecked(True)
        row.addWidget(self.refresh_button)
        row.addWidget(self.auto_check)
        self.shape_check = QCheckBox("shape")
        self.shape_check.setToolTip("surface, maximum diameter and sphericity per class "
                                    "(marching cubes; slower on large labels)")
        self.shape_check.toggled.connect(lambda _on: self.refresh())
        row.addWidget(self.shape_check)
        row.addStretch(1)
        lay.addLayout(row)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        min_table_rows(self.table, 8)
        lay.addWidget(self.table, 1)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        lay.addWidget(self.summary)

        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(DEBOUNCE_MS)
        self.timer.timeout.connect(self.refresh)
        self.refresh_button.clicked.connect(self.refresh)
        self.layer_combo.currentIndexChanged.connect(self._on_layer)
        self.image_combo.currentIndexChanged.connect(lambda _i: self.schedule())
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._refresh_layers)
        self._refresh_layers()

    # ---------------------------------------------------------------- layers
    def _refresh_layers(self, event=None) -> None:
        keep_l, keep_i = self.layer_combo.currentText(), self.image_combo.currentText()
        for combo in (self.layer_combo, self.image_combo):
            combo.blockSignals(True)
            combo.clear()
        self.layer_combo.addItems([lyr.name for lyr in self.viewer.layers
                                   if is_segmentation_layer(lyr)])
        self.image_combo.addItems(["(largest labelled region)"] + [
            lyr.name for lyr in self.viewer.layers if lyr.__class__.__name__ == "Image"])
        if keep_l:
            self.layer_combo.setCurrentText(keep_l)
        if keep_i:
            self.image_combo.setCurrentText(keep_i)
        elif self.image_combo.count() > 1:
            self.image_combo.setCurrentIndex(1)
        for combo in (self.layer_combo, self.image_combo):
            combo.blockSignals(False)
        self._on_layer()

    def layer(self):
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _on_layer(self, index=None) -> None:
        layer = self.layer()
        if self._watched is not None:
            for ev in (self._watched.events.paint, self._watched.events.data,
                       self._watched.events.thumbnail):
                ev.disconnect(self._on_change)
            self._watched = None
        if layer is not None:
            for ev in (layer.events.paint, layer.events.data, layer.events.thumbnail):
                ev.connect(self._on_change)
            self._watched = layer
        self.schedule()

    def _on_change(self, event=None) -> None:
        layer = self._watched
        if layer is None or not self.auto_check.isChecked():
            return
        # thumbnails also update when the user scrolls; only react to real edits
        if getattr(event, "type", "") == "thumbnail":
            if history_signature(layer) == self._signature:
                return
        self.schedule()

    def schedule(self) -> None:
        """Refresh after a short quiet period (restarts on every call)."""
        self.timer.start()

    # --------------------------------------------------------------- refresh
    def refresh(self) -> list[dict]:
        """Recompute and show the table; returns the rows."""
        self.timer.stop()
        layer = self.layer()
        if layer is None:
            self.rows = []
            self._fill()
            return self.rows
        try:
            self.rows = self._compute(layer)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_exception(exc, "Label QA")
            return self.rows
        self._signature = history_signature(layer)
        self._fill()
        return self.rows

    def _compute(self, layer) -> list[dict]:
        vol = volume_from_layer(layer, viewer=self.viewer)
        labels = np.asarray(layer.data)
        image = body = None
        name = self.image_combo.currentText()
        if self.image_combo.currentIndex() > 0 and name in self.viewer.layers:
            img_layer = self.viewer.layers[name]
            if tuple(img_layer.data.shape[-3:]) == labels.shape:
                image = np.asarray(img_layer.data)
                modality = modality_of(img_layer)
                thr = None if self.threshold.value() <= self.threshold.minimum() \
                    else self.threshold.value()
                body = body_mask(image, threshold=thr, modality=modality)
        if body is None and labels.any():
            body = body_mask(labels=labels)
        pred = prediction_of(layer)
        if pred is not None and np.shape(pred) != labels.shape:
            pred = None
        rows = label_qa(labels, vol.spacing, names=vol.label_names, image=image,
                        prediction=pred, body=body)
        if self.shape_check.isChecked():
            from ..core.shape import shape_statistics

            shapes = shape_statistics(labels, vol.affine, image=image,
                                      ids=[r["label"] for r in rows if r["voxels"]])
            for r in rows:
                r.update(shapes.get(r["label"]) or {})
        return rows

    def _fill(self) -> None:
        self.table.setRowCount(len(self.rows))
        flagged = 0
        for i, r in enumerate(self.rows):
            dice = "" if r.get("dice") is None else f"{r['dice']:.3f}"
            corrected = "" if r.get("corrected_voxels") is None else str(r["corrected_voxels"])
            shape = ("" if r.get("surface_mm2") is None else f"{r['surface_mm2'] / 100:.1f}",
                     "" if r.get("max_diameter_mm") is None else f"{r['max_diameter_mm']:.1f}",
                     "" if r.get("sphericity") is None else f"{r['sphericity']:.2f}")
            cells = (str(r["label"]), r["name"], f"{r['volume_ml']:.2f}", str(r["islands"]),
                     corrected, dice, "; ".join(r["flags"]), *shape)
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if j in (0, 2, 3, 4, 5, 7, 8, 9):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight
                                          | Qt.AlignmentFlag.AlignVCenter)
                if r["flags"]:
                    item.setForeground(QColor(230, 150, 40))
                self.table.setItem(i, j, item)
            flagged += bool(r["flags"])
        total = sum(r["volume_ml"] for r in self.rows)
        self.summary.setText(f"{len(self.rows)} classes, {total:.1f} mL labelled, "
                             f"{flagged} flagged" if self.rows else "no labels")
