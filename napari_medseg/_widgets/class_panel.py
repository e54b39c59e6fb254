"""The class panel: one row per class of a Labels layer, click to paint with it.

Each row shows the class colour, its name, its voxel count and its volume in
mL, kept up to date while the user paints. Clicking a row selects that label
for painting (napari's paint mode); the number keys 1-9 do the same for the
first nine classes while the layer is active.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .._napari.boundary import volume_from_layer

from .._napari.layer_roles import locked_classes
from .._napari.locks import enforce_locks, lock_classes
from ..core.labelmap import label_counts
from ._layout import min_table_rows

log = logging.getLogger(__name__)

__all__ = ["ClassPanel", "class_counts"]

_KEYS = [str(i) for i in range(1, 10)]


def class_counts(labels: np.ndarray, ids, voxel_ml: float) -> dict[int, tuple[int, float]]:
    """Voxel count and volume (mL) per class id of a ``(Z, Y, X)`` label array."""
    arr = np.asarray(labels)
    top = max([int(i) for i in ids] + [0])
    counts = label_counts(arr, minlength=top + 1)
    return {int(i): (int(counts[i]) if i < counts.size else 0,
                     float(counts[i] * voxel_ml) if i < counts.size else 0.0)
            for i in ids}


class ClassPanel(QWidget):
    """Rows of ``colour | name | voxels | mL`` for the classes of a Labels layer.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Used for the layer geometry (voxel volume) only.
    """

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.layer = None
        self.classes: dict[int, tuple[str, tuple]] = {}
        self._voxel_ml = 1e-3
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel("Classes: run a model to list them")
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["", "class", "voxels", "mL", "lock"])
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Fixed)
        header.resizeSection(0, 22)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for col in (2, 3, 4):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.table.cellClicked.connect(lambda row, col: col != 4 and self.select_row(row))
        self.table.itemChanged.connect(self._lock_changed)
        lay.addWidget(self.title)
        min_table_rows(self.table, 8)
        lay.addWidget(self.table, 1)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self.refresh)

    # ------------------------------------------------------------ binding
    def set_layer(self, layer, classes: dict[int, tuple[str, tuple]] | None = None) -> None:
        """Show the classes of ``layer`` (a napari Labels layer, or None to clear).

        ``classes`` maps id to ``(name, rgba)``; by default it is read from the
        layer's features and colormap.
        """
        if self.layer is not None:
            self._disconnect(self.layer)
        self.layer = layer
        if layer is None:
            self.classes = {}
            self.table.setRowCount(0)
            self.title.setText("Classes: run a model to list them")
            return
        self.classes = classes if classes is not None else self._read_classes(layer)
        if locked_classes(layer):  # locks saved with the layer hold from the start
            enforce_locks(layer)
        try:
            self._voxel_ml = volume_from_layer(layer, viewer=self.viewer).voxel_volume_ml
        except Exception:  # noqa: BLE001 - fall back to the napari scale
            self._voxel_ml = float(np.prod(layer.scale[-3:])) / 1000.0
        layer.events.paint.connect(self._schedule)
        layer.events.data.connect(self._schedule)
        for i, key in enumerate(_KEYS[: len(self.classes)]):
            layer.bind_key(key, self._key_handler(list(self.classes)[i]), overwrite=True)
        self.title.setText(f"Classes of '{layer.name}' (click or press 1-"
                           f"{min(len(self.classes), 9)} to paint)")
        self._build_rows()
        self.refresh()

    def _disconnect(self, layer) -> None:
        for ev in (layer.events.paint, layer.events.data):
            try:
                ev.disconnect(self._schedule)
            except (TypeError, ValueError, RuntimeError):
                pass
        for key in _KEYS:
            if layer.keymap.get(key) is not None:
                layer.bind_key(key, None)

    @staticmethod
    def _read_classes(layer) -> dict[int, tuple[str, tuple]]:
        names: dict[int, str] = {}
        feats = layer.features
        if len(feats) and "index" in feats and "name" in feats:
            names = {int(i): str(n) for i, n in zip(feats["index"], feats["name"]) if int(i)}
        else:
            ids = np.unique(np.asarray(layer.data))
            names = {int(i): str(int(i)) for i in ids if i}
        return {i: (n, tuple(float(c) for c in layer.get_color(i))) for i, n in
                sorted(names.items())}

    def _key_handler(self, label: int):
        def select(layer):
            self.select_label(label)
        select.__name__ = f"medseg_select_class_{label}"
        return select

    # ------------------------------------------------------------ rows
    def _build_rows(self) -> None:
        locked = locked_classes(self.layer) if self.layer is not None else frozenset()
        self.table.blockSignals(True)
        self.table.setRowCount(len(self.classes))
        for row, (idx, (name, rgba)) in enumerate(self.classes.items()):
            swatch = QTableWidgetItem("")
            swatch.setBackground(QColor.fromRgbF(*[float(c) for c in rgba[:3]], 1.0))
            swatch.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
            label = QTableWidgetItem(f"{row + 1}  {name}" if row < 9 else f"   {name}")
            label.setToolTip(f"label {idx}")
            self.table.setItem(row, 0, swatch)
            self.table.setItem(row, 1, label)
            for col in (2, 3):
                item = QTableWidgetItem("")
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight |
                                      Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, col, item)
            lock = QTableWidgetItem("")
            lock.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
            lock.setCheckState(Qt.CheckState.Checked if idx in locked else
                               Qt.CheckState.Unchecked)
            lock.setToolTip(f"lock '{name}': no brush, fill, correction or interactive "
                            "commit changes its voxels")
            self.table.setItem(row, 4, lock)
        self.table.blockSignals(False)

    # ------------------------------------------------------------ locks
    def locked(self) -> list[int]:
        """Class ids whose lock box is ticked."""
        return [idx for row, idx in enumerate(self.classes)
                if self.table.item(row, 4) is not None
                and self.table.item(row, 4).checkState() == Qt.CheckState.Checked]

    def set_locked(self, label: int, locked: bool = True) -> None:
        """Tick (or clear) the lock of class ``label``; edits then leave it alone."""
        if label in self.classes:
            row = list(self.classes).index(label)
            self.table.item(row, 4).setCheckState(
                Qt.CheckState.Checked if locked else Qt.CheckState.Unchecked)

    def _lock_changed(self, item) -> None:
        if item.column() == 4 and self.layer is not None:
            lock_classes(self.layer, self.locked())

    def _schedule(self, event=None) -> None:
        self._timer.start()

    def refresh(self) -> None:
        """Recount voxels and volumes from the layer data."""
        if self.layer is None:
            return
        counts = class_counts(self.layer.data, list(self.classes), self._voxel_ml)
        for row, idx in enumerate(self.classes):
            n, ml = counts[idx]
            self.table.item(row, 2).setText(f"{n:,}")
            self.table.item(row, 3).setText(f"{ml:.1f}")

    def counts(self) -> dict[int, tuple[int, float]]:
        """``{label: (voxels, mL)}`` as shown in the table."""
        out = {}
        for row, idx in enumerate(self.classes):
            out[idx] = (int(self.table.item(row, 2).text().replace(",", "")),
                        float(self.table.item(row, 3).text()))
        return out

    # ------------------------------------------------------------ selection
    def select_row(self, row: int) -> None:
        """Paint with the class in ``row``."""
        if 0 <= row < len(self.classes):
            self.select_label(list(self.classes)[row])

    def select_label(self, label: int) -> None:
        """Make ``label`` the layer's paint label and switch to paint mode."""
        if self.layer is None:
            return
        self.layer.selected_label = int(label)
        self.layer.mode = "paint"
        row = list(self.classes).index(label) if label in self.classes else -1
        if row >= 0 and self.table.currentRow() != row:
            self.table.selectRow(row)
        if self.viewer is not None and self.layer in self.viewer.layers:
            self.viewer.layers.selection.active = self.layer
