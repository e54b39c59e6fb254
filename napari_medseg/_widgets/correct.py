"""The "Correct" dock widget: Segment-Editor-style effects on a Labels layer.

Thin over :mod:`napari_medseg.core.corrections`: it gathers the parameters
(sizes in mm / mm^3), runs the operation (in a worker thread for big regions)
and applies the result as one undo step (:func:`napari_medseg._napari.history.apply_edit`).

Keyboard shortcuts (viewer-wide, act on the selected Labels layer and label):
Shift+R remove small islands, Shift+K keep largest component, Shift+F fill
holes, Shift+G grow by the margin, Shift+H shrink by the margin, Shift+I fill
between slices, Shift+M median smoothing. Ctrl+Z / Ctrl+Shift+Z undo / redo.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox,
                            QHBoxLayout, QLabel, QLineEdit, QPushButton, QSizePolicy,
                            QSpinBox, QStackedWidget, QVBoxLayout, QWidget)

from ..core import corrections as C
from ..errors import MedSegError
from .._napari.history import apply_edit
from .._napari.layer_roles import is_segmentation_layer
from .._napari.boundary import volume_from_layer
from .._napari.prediction import view_region
from ._common import Job, JobBar, notify_exception, show_info
from ._layout import tabify_when_docked

log = logging.getLogger(__name__)

__all__ = ["CorrectWidget", "SHORTCUTS"]

#: Work on more voxels than this runs in a worker thread.
BACKGROUND_VOXELS = 4_000_000

#: The regions an operation can be limited to, in the order of the Region box.
REGIONS = ("Whole volume", "Current slice", "Slice range", "Current view")
WHOLE, SLICE, RANGE, VIEW = range(len(REGIONS))

#: key -> (operation, extra settings) for the viewer shortcuts.
SHORTCUTS = {
    "Shift-R": ("islands", {}), "Shift-K": ("largest", {}), "Shift-F": ("holes", {}),
    "Shift-G": ("margin", {"sign": 1}), "Shift-H": ("margin", {"sign": -1}),
    "Shift-I": ("between", {}), "Shift-M": ("smooth", {"method": "median"}),
}

OPERATIONS = [  # key, title
    ("islands", "Remove small islands"), ("largest", "Keep largest component"),
    ("split", "Split into components"), ("holes", "Fill holes"), ("smooth", "Smooth"),
    ("margin", "Margin (grow / shrink)"), ("between", "Fill between slices"),
    ("logical", "Logical operation"), ("relabel", "Relabel / merge"),
    ("threshold", "Threshold-limited paint"),
]


def _dspin(value, lo, hi, step, suffix, decimals=1):
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setDecimals(decimals)
    w.setSingleStep(step)
    w.setValue(value)
    w.setSuffix(suffix)
    return w


class CorrectWidget(QWidget):
    """Correction effects on the selected Labels layer, each one undo step."""

    def __init__(self, napari_viewer):
        super().__init__()
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.last_changed = 0
        lay = QVBoxLayout(self)

        target = QGroupBox("Target")
        form = QFormLayout(target)
        self.layer_combo = QComboBox()
        self.label_spin = QSpinBox()
        self.label_spin.setRange(0, 65535)
        self.label_spin.setValue(1)
        self.all_check = QCheckBox("all classes")
        row = QHBoxLayout()
        row.addWidget(self.label_spin, 1)
        row.addWidget(self.all_check)
        self.region_combo = QComboBox()
        self.region_combo.addItems(list(REGIONS))
        self.region_combo.setToolTip(
            "Current slice: the slice shown in the 2D view. Slice range: the slices "
            "below. Current view: the voxels visible in the 2D canvas (current slice "
            "x the zoomed-in rectangle).")
        self.from_spin, self.to_spin = QSpinBox(), QSpinBox()
        rng = QHBoxLayout()
        rng.addWidget(self.from_spin)
        rng.addWidget(QLabel("to"))
        rng.addWidget(self.to_spin)
        self.range_row = QWidget()
        self.range_row.setLayout(rng)
        rng.setContentsMargins(0, 0, 0, 0)
        form.addRow("Labels layer", self.layer_combo)
        form.addRow("Label", row)
        form.addRow("Region", self.region_combo)
        self.range_label = QLabel("Slices")
        form.addRow(self.range_label, self.range_row)
        lay.addWidget(target)

        op_box = QGroupBox("Operation")
        op_lay = QVBoxLayout(op_box)
        self.op_combo = QComboBox()
        for key, title in OPERATIONS:
            self.op_combo.addItem(title, key)
        self.stack = QStackedWidget()
        self.params: dict[str, dict] = {}
        for key, _title in OPERATIONS:
            self.stack.addWidget(self._param_page(key))
        self.op_combo.currentIndexChanged.connect(self._show_page)
        self._show_page(0)
        op_lay.addWidget(self.op_combo)
        op_lay.addWidget(self.stack)
        self.apply_button = QPushButton("Apply")
        self.undo_button, self.redo_button = QPushButton("Undo"), QPushButton("Redo")
        buttons = QHBoxLayout()
        for b in (self.apply_button, self.undo_button, self.redo_button):
            buttons.addWidget(b)
        op_lay.addLayout(buttons)
        lay.addWidget(op_box)
        self.bar = JobBar()
        lay.addWidget(self.bar)
        keys = ", ".join(f"{k.replace('-', '+')}: {dict(OPERATIONS)[v[0]].split(' (')[0]}"
                         + ("" if "sign" not in v[1] else (" +" if v[1]["sign"] > 0 else " -"))
                         for k, v in SHORTCUTS.items())
        hint = QLabel(f"Shortcuts: {keys}")
        hint.setWordWrap(True)
        hint.setStyleSheet("color: gray; font-size: 10px")
        lay.addWidget(hint)
        lay.addStretch(1)

        self.apply_button.clicked.connect(lambda: self.run())
        self.undo_button.clicked.connect(lambda: self._history("undo"))
        self.redo_button.clicked.connect(lambda: self._history("redo"))
        self.region_combo.currentIndexChanged.connect(self._sync_region)
        self.layer_combo.currentIndexChanged.connect(self._on_layer)
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_active)
        self._bind_keys()
        self._refresh_layers()
        self._sync_region()

    # -------------------------------------------------------------- building
    def _param_page(self, key: str) -> QWidget:
        page = QWidget()
        form = QFormLayout(page)
        form.setContentsMargins(0, 0, 0, 0)
        p: dict = {}
        if key == "islands":
            p["volume"] = _dspin(100.0, 0.0, 1e7, 10.0, " mm³")
            form.addRow("Smaller than", p["volume"])
        elif key == "holes":
            p["mode"] = QComboBox()
            p["mode"].addItems(["3D", "per slice"])
            form.addRow("Holes", p["mode"])
        elif key == "smooth":
            p["method"] = QComboBox()
            p["method"].addItems(["median", "opening", "closing"])
            p["radius"] = _dspin(2.0, 0.1, 100.0, 0.5, " mm")
            form.addRow("Filter", p["method"])
            form.addRow("Radius", p["radius"])
        elif key == "margin":
            p["mm"] = _dspin(2.0, -100.0, 100.0, 0.5, " mm")
            form.addRow("Margin (+ grow, - shrink)", p["mm"])
        elif key == "logical":
            p["op"] = QComboBox()
            p["op"].addItems(["union", "intersect", "subtract", "invert"])
            p["other"] = QSpinBox()
            p["other"].setRange(0, 65535)
            p["other"].setValue(2)
            p["other_layer"] = QComboBox()
            form.addRow("Operation", p["op"])
            form.addRow("With label", p["other"])
            form.addRow("or layer", p["other_layer"])
        elif key == "relabel":
            p["sources"] = QLineEdit("2")
            p["sources"].setPlaceholderText("e.g. 2, 3")
            p["target"] = QSpinBox()
            p["target"].setRange(0, 65535)
            p["target"].setValue(1)
            form.addRow("Labels", p["sources"])
            form.addRow("Become", p["target"])
        elif key == "threshold":
            p["image"] = QComboBox()
            p["lo"] = _dspin(-100.0, -1e6, 1e6, 10.0, "")
            p["hi"] = _dspin(300.0, -1e6, 1e6, 10.0, "")
            p["mask"] = QComboBox()
            form.addRow("Image", p["image"])
            form.addRow("From", p["lo"])
            form.addRow("To", p["hi"])
            form.addRow("Where", p["mask"])
        elif key in ("split", "between", "largest"):
            text = {"split": "Each island gets its own label (largest keeps it).",
                    "between": "Interpolates the label between the slices it is drawn "
                               "on, along the current slicing axis.",
                    "largest": "Removes all but the largest island."}[key]
            info = QLabel(text)
            info.setWordWrap(True)
            form.addRow(info)
        self.params[key] = p
        return page

    def _show_page(self, index: int) -> None:
        """Show one parameter page; the stack takes only that page's height."""
        for i in range(self.stack.count()):
            policy = QSizePolicy.Policy.Preferred if i == index else QSizePolicy.Policy.Ignored
            self.stack.widget(i).setSizePolicy(policy, policy)
        self.stack.setCurrentIndex(index)
        self.stack.adjustSize()

    def _bind_keys(self) -> None:
        for key, (op, extra) in SHORTCUTS.items():
            self.viewer.bind_key(key, functools.partial(self._shortcut, op, extra),
                                 overwrite=True)

    def _shortcut(self, op, extra, _viewer=None):
        self.run(op, **extra)

    # ---------------------------------------------------------------- layers
    def _labels_layers(self):
        return [lyr for lyr in self.viewer.layers if is_segmentation_layer(lyr)]

    def _refresh_layers(self, event=None) -> None:
        current = self.layer_combo.currentText()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems([lyr.name for lyr in self._labels_layers()])
        if current:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        images = [lyr.name for lyr in self.viewer.layers if lyr.__class__.__name__ == "Image"]
        for combo, first, names in (
                (self.params["threshold"]["image"], None, images),
                (self.params["threshold"]["mask"], "(region)",
                 [lyr.name for lyr in self._labels_layers()]),
                (self.params["logical"]["other_layer"], "(same layer)",
                 [lyr.name for lyr in self._labels_layers()])):
            keep = combo.currentText()
            combo.clear()
            combo.addItems(([first] if first else []) + names)
            if keep:
                combo.setCurrentText(keep)
        self._on_layer()

    def _follow_active(self, event=None) -> None:
        active = self.viewer.layers.selection.active
        if active is not None and is_segmentation_layer(active):
            self.layer_combo.setCurrentText(active.name)

    def _on_layer(self, index=None) -> None:
        layer = self.layer()
        if layer is not None:
            self.label_spin.setValue(max(int(layer.selected_label), 0))
        self._sync_region()

    def layer(self):
        """The target Labels layer, or None."""
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    # --------------------------------------------------------------- regions
    def slicing_axis(self) -> int:
        """The data axis the 2D view slices along (0 = axial in the default view)."""
        not_shown = list(self.viewer.dims.not_displayed)
        return int(not_shown[-1]) - (self.viewer.dims.ndim - 3) if not_shown else 0

    def current_slice(self, layer) -> int:
        axis = self.slicing_axis()
        pos = layer.world_to_data(self.viewer.dims.point)[-3:]
        return int(np.clip(round(float(pos[axis])), 0, layer.data.shape[axis] - 1))

    def _sync_region(self, index=None) -> None:
        layer = self.layer()
        show = self.region_combo.currentIndex() == RANGE
        self.range_row.setVisible(show)
        self.range_label.setVisible(show)
        if layer is not None:
            n = int(layer.data.shape[self.slicing_axis()])
            for s in (self.from_spin, self.to_spin):
                s.setRange(0, n - 1)

    def region(self, layer):
        """The region the operation works on (tuple of 3 slices or None).

        Raises
        ------
        MedSegError
            "Current view" in a 3D view (the visible part is not a box), or when
            the layer is out of view.
        """
        mode = self.region_combo.currentIndex()
        if mode == WHOLE:
            return None
        if mode == VIEW:
            return self.view_region(layer)
        axis = self.slicing_axis()
        if mode == SLICE:
            z = self.current_slice(layer)
            return C.slice_range(z, z + 1, axis)
        a, b = sorted((self.from_spin.value(), self.to_spin.value()))
        return C.slice_range(a, b + 1, axis)

    def view_region(self, layer):
        """The voxels of ``layer`` visible in the 2D canvas: the current slice x the
        visible in-plane rectangle, as 3 array slices ``(Z, Y, X)``.

        Raises
        ------
        MedSegError
            In a 3D view, or when the layer is out of view.
        """
        if self.viewer.dims.ndisplay != 2:
            raise MedSegError("'Current view' needs the 2D view (in 3D what is visible "
                              "is not a box of voxels); switch to 2D and zoom in on the "
                              "part to correct, or choose 'Whole volume'", layer.name)
        try:
            return view_region(layer, self.viewer, margin_slices=0)
        except MedSegError:
            raise MedSegError("the layer is not in view; pan to the part to correct or "
                              "choose 'Whole volume'", layer.name) from None

    # -------------------------------------------------------------- running
    def operation(self, op: str, layer, **extra):
        """A callable ``f(progress=, cancel=) -> Edit`` for ``op`` with the current settings."""
        p = self.params.get(op, {})
        label = None if self.all_check.isChecked() else self.label_spin.value()
        spacing = volume_from_layer(layer, viewer=self.viewer).spacing
        data = np.asarray(layer.data)
        kw = {"region": self.region(layer)}
        if op == "islands":
            return functools.partial(C.remove_islands, data, label, spacing=spacing,
                                     min_volume_mm3=p["volume"].value(), **kw)
        if op == "largest":
            return functools.partial(C.keep_largest, data, label, **kw)
        if op == "split":
            return functools.partial(C.split_components, data, self.label_spin.value(), **kw)
        if op == "holes":
            mode = "3d" if p["mode"].currentIndex() == 0 else "slice"
            return functools.partial(C.fill_holes, data, label, mode=mode,
                                     axis=self.slicing_axis(), **kw)
        if op == "smooth":
            return functools.partial(C.smooth, data, label, spacing=spacing,
                                     method=extra.get("method", p["method"].currentText()),
                                     radius_mm=p["radius"].value(), **kw)
        if op == "margin":
            mm = p["mm"].value()
            if "sign" in extra:
                mm = abs(mm) * extra["sign"]
            return functools.partial(C.margin, data, label, margin_mm=mm, spacing=spacing,
                                     **kw)
        if op == "between":
            return functools.partial(C.fill_between_slices, data, label, spacing=spacing,
                                     axis=self.slicing_axis(), **kw)
        if op == "logical":
            other = p["other"].value()
            if p["other_layer"].currentIndex() > 0:
                other = self._mask_of(p["other_layer"].currentText(), layer)
            return functools.partial(C.logical_op, data, p["op"].currentText(),
                                     self.label_spin.value(), other, **kw)
        if op == "relabel":
            try:
                sources = [int(s) for s in p["sources"].text().replace(",", " ").split()]
            except ValueError as exc:
                raise MedSegError("list the labels to relabel as numbers, e.g. '2, 3'") \
                    from exc
            return functools.partial(C.merge, data, sources, p["target"].value(), **kw)
        if op == "threshold":
            name = p["image"].currentText()
            if name not in self.viewer.layers:
                raise MedSegError("open the image to threshold first", layer.name)
            image = np.asarray(self.viewer.layers[name].data)
            mask = None
            if p["mask"].currentIndex() > 0:
                mask = self._mask_of(p["mask"].currentText(), layer)
            return functools.partial(C.threshold_paint, data, mask, self.label_spin.value(),
                                     image=image, lo=p["lo"].value(), hi=p["hi"].value(), **kw)
        raise MedSegError(f"unknown operation {op!r}")

    def _mask_of(self, name, layer):
        other = np.asarray(self.viewer.layers[name].data)
        if other.shape != layer.data.shape:
            raise MedSegError(f"layer {name!r} has shape {other.shape}, not "
                              f"{layer.data.shape}; choose a layer on the same grid")
        return other != 0

    def run(self, op: str | None = None, background: bool | None = None, **extra):
        """Run ``op`` (default: the selected operation) on the target layer."""
        op = op or self.op_combo.currentData()
        layer = self.layer()
        if layer is None:
            show_info("add or select a Labels layer to correct")
            return None
        if self.job is not None and self.job.running:
            show_info("a correction is still running")
            return None
        title = dict(OPERATIONS)[op]
        try:
            func = self.operation(op, layer, **extra)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_exception(exc, title)
            return None
        if background is None:
            background = int(np.prod(layer.data.shape)) > BACKGROUND_VOXELS
        done = functools.partial(self._apply, layer, title)
        if not background:
            try:
                return done(func())
            except Exception as exc:  # noqa: BLE001 - shown to the user
                notify_exception(exc, title)
                return None
        self.apply_button.setEnabled(False)
        self.job = Job(func, on_done=done, bar=self.bar, what=title,
                       on_finish=lambda: self.apply_button.setEnabled(True)).start()
        return self.job

    def _apply(self, layer, title, edit):
        self.last_changed = apply_edit(layer, edit)
        if edit.info.get("new_labels"):
            title += f" (new labels {edit.info['new_labels']})"
        show_info(f"{title}: {self.last_changed} voxels changed")
        return edit

    def _history(self, which: str) -> None:
        layer = self.layer()
        if layer is not None:
            getattr(layer, which)()
