"""The "Correct" dock widget: Segment-Editor-style effects on a Labels layer.

Thin over :mod:`napari_medseg.core.corrections`: it gathers the parameters
(sizes in mm / mm^3), runs the operation (in a worker thread for big regions)
and applies the result as one undo step (:func:`napari_medseg._napari.history.apply_edit`).

The operations, their parameters and shortcuts are declared once in
:mod:`napari_medseg.core.corrections.registry`; the form, the shortcut list and
the calls are built from it.

Keyboard shortcuts (bound on each segmentation Labels layer, so they act when
that layer is selected and never replace another plugin's viewer keys; unbound
when the widget closes): Shift+R remove small islands, Shift+K keep largest
component, Shift+F fill holes, Shift+G grow by the margin, Shift+H shrink by the
margin, Shift+I fill between slices, Shift+M median smoothing. Ctrl+Z /
Ctrl+Shift+Z undo / redo.

Multiscale labels of a big label store (``.ome.zarr`` from the lazy path) cannot
be painted in napari: the "Big label store" box loads the region shown in the
2D view as an ordinary Labels layer and writes it back
(:mod:`napari_medseg._napari.bigvolume`).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox,
                            QHBoxLayout, QLabel, QLineEdit, QPushButton, QSizePolicy,
                            QSpinBox, QStackedWidget, QVBoxLayout, QWidget)

from ..core import corrections as C
from ..core.corrections.registry import CORRECTIONS, Context, Param, shortcuts
from ..errors import MedSegError
from .._napari.history import apply_edit
from .._napari.layer_roles import is_segmentation_layer
from .._napari.bigvolume import STORE_KEY, edit_view_region, write_back_region
from .._napari.boundary import current_slice, slicing_axis, volume_from_layer
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

#: key -> (operation, extra settings) for the layer shortcuts (from the registry).
SHORTCUTS = shortcuts()

#: (key, title) of the operations, in the order of the registry.
OPERATIONS = [(c.key, c.title) for c in CORRECTIONS.values()]


def _unbind(bound: list, *_signal_args) -> None:
    """Unbind the ``(layer, key, function)`` shortcuts still bound to those functions."""
    from napari.utils.key_bindings import coerce_keybinding

    while bound:
        layer, key, func = bound.pop()
        if layer.keymap.get(coerce_keybinding(key)) is func:
            layer.bind_key(key, None)


def _control(param: Param) -> QWidget:
    """The form control for a declared correction parameter."""
    if param.kind == "float":
        w = _dspin(param.default, param.lo, param.hi, param.step, param.suffix,
                   param.decimals)
    elif param.kind == "int":
        w = QSpinBox()
        w.setRange(int(param.lo), int(param.hi))
        w.setValue(int(param.default))
    elif param.kind == "text":
        w = QLineEdit(str(param.default or ""))
        w.setPlaceholderText(param.hint)
    else:  # choice, or a layer name filled in by _refresh_layers
        w = QComboBox()
        w.addItems(list(param.choices))
        if param.kind == "choice" and param.default is not None:
            w.setCurrentText(str(param.default))
    if param.hint:
        w.setToolTip(param.hint)
    w.setProperty("medseg_param_kind", param.kind)
    w.setProperty("medseg_param_first", param.first or "")
    return w


def _value(w):
    """A control's value: a number, text, or a layer name (None for the ``first`` entry)."""
    kind = w.property("medseg_param_kind")
    if kind in ("float", "int"):
        return w.value()
    if kind == "text":
        return w.text()
    if kind in ("image", "labels"):
        first = w.property("medseg_param_first")
        text = w.currentText()
        return None if not text or (first and w.currentIndex() == 0) else text
    return w.currentText()


def _store_meta(layer) -> dict:
    """The label-store entry of a layer's metadata (``{}`` when it is not from a store)."""
    return dict((getattr(layer, "metadata", None) or {}).get(STORE_KEY) or {})


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
        for c in CORRECTIONS.values():  # as registered now (see core.corrections.registry)
            self.op_combo.addItem(c.title, c.key)
        self.stack = QStackedWidget()
        self.params: dict[str, dict] = {}
        for key in CORRECTIONS:
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
        lay.addWidget(self._store_box())
        self.bar = JobBar()
        lay.addWidget(self.bar)
        keys = ", ".join(f"{s.key.replace('-', '+')}: {c.title.split(' (')[0]}{s.note}"
                         for c in CORRECTIONS.values() for s in c.shortcuts)
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
        self._bound: list = []  # (layer, key, function) bound by this widget
        self.viewer.layers.events.inserted.connect(self._bind_keys)
        self.destroyed.connect(functools.partial(_unbind, self._bound))
        self._bind_keys()
        self._refresh_layers()
        self._sync_region()

    # -------------------------------------------------------------- building
    def _store_box(self) -> QGroupBox:
        """Buttons for multiscale labels of a big label store (shown only for those)."""
        self.store_box = QGroupBox("Big label store")
        form = QFormLayout(self.store_box)
        note = QLabel("napari cannot paint on multiscale labels: load the part shown in the "
                      "2D view as ordinary labels, correct it here, then write it back.")
        note.setWordWrap(True)
        self.store_slices_spin = QSpinBox()
        self.store_slices_spin.setRange(0, 256)
        self.store_slices_spin.setToolTip("slices loaded on each side of the current one")
        self.edit_region_button = QPushButton("Edit region in view")
        self.write_back_button = QPushButton("Write region back")
        form.addRow(note)
        form.addRow("Slices around", self.store_slices_spin)
        row = QHBoxLayout()
        row.addWidget(self.edit_region_button)
        row.addWidget(self.write_back_button)
        form.addRow(row)
        self.edit_region_button.clicked.connect(lambda: self.edit_store_region())
        self.write_back_button.clicked.connect(lambda: self.write_store_region())
        self.store_box.setVisible(False)
        return self.store_box

    def _param_page(self, key: str) -> QWidget:
        """The form of one correction, built from its declared parameters."""
        page = QWidget()
        form = QFormLayout(page)
        form.setContentsMargins(0, 0, 0, 0)
        correction = CORRECTIONS[key]
        p: dict = {}
        for param in correction.params:
            p[param.name] = _control(param)
            form.addRow(param.label, p[param.name])
        if correction.info:
            info = QLabel(correction.info)
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

    def _bind_keys(self, event=None) -> None:
        """Bind the shortcuts on each segmentation layer that does not use those keys yet."""
        from napari.utils.key_bindings import coerce_keybinding

        layers = [event.value] if event is not None else list(self.viewer.layers)
        for layer in layers:
            if not is_segmentation_layer(layer):
                continue
            for key, (op, extra) in shortcuts().items():
                if coerce_keybinding(key) in layer.keymap:
                    continue  # someone else's binding on this layer: leave it
                func = functools.partial(self._shortcut, op, extra)
                layer.bind_key(key, func)
                self._bound.append((layer, key, func))

    def unbind_keys(self) -> None:
        """Remove the shortcuts this widget bound (also done when it is destroyed)."""
        _unbind(self._bound)

    def _shortcut(self, op, extra, layer=None):
        if layer is not None and layer.name in self.viewer.layers:
            self.layer_combo.setCurrentText(layer.name)
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
        names = {"image": [lyr.name for lyr in self.viewer.layers
                           if lyr.__class__.__name__ == "Image"],
                 "labels": [lyr.name for lyr in self._labels_layers()]}
        for c in CORRECTIONS.values():
            for param in c.params:
                if param.kind not in names:
                    continue
                combo = self.params[c.key][param.name]
                keep = combo.currentText()
                combo.clear()
                combo.addItems(([param.first] if param.first else []) + names[param.kind])
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
        store = _store_meta(layer)
        self.store_box.setVisible(bool(store))
        self.edit_region_button.setEnabled(bool(store) and not store.get("region"))
        self.write_back_button.setEnabled(bool(store.get("region")))
        self._sync_region()

    def layer(self):
        """The target Labels layer, or None."""
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    # --------------------------------------------------------------- regions
    def slicing_axis(self) -> int:
        """The data axis the 2D view slices along (:func:`.boundary.slicing_axis`)."""
        return slicing_axis(self.viewer)

    def current_slice(self, layer) -> int:
        """The index of the slice shown in the 2D view (:func:`.boundary.current_slice`)."""
        return current_slice(self.viewer, layer)[1]

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

    # ----------------------------------------------------------- big stores
    def edit_store_region(self):
        """Load the region of the target label store shown in the 2D view as a Labels layer.

        The new layer becomes the target; returns it (None when refused).
        """
        layer = self.layer()
        try:
            if not _store_meta(layer) or _store_meta(layer).get("region"):
                raise MedSegError("choose the multiscale labels of a label store (.ome.zarr) "
                                  "as the target", layer.name if layer else None)
            edit = edit_view_region(self.viewer, layer,
                                    margin_slices=self.store_slices_spin.value())
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_exception(exc, "Edit region in view")
            return None
        self.layer_combo.setCurrentText(edit.name)
        show_info(f"loaded {' x '.join(map(str, edit.data.shape))} voxels of "
                  f"{layer.name} for editing; 'Write region back' saves them")
        return edit

    def write_store_region(self):
        """Write the target region layer into its label store; return the voxels changed."""
        layer = self.layer()
        try:
            if layer is None:
                raise MedSegError("choose the region layer loaded with 'Edit region in view'")
            store = layer.name
            changed = write_back_region(self.viewer, layer)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_exception(exc, "Write region back")
            return None
        show_info(f"{store}: {changed} voxels written back to the label store")
        return changed

    # -------------------------------------------------------------- running
    def operation(self, op: str, layer, **extra):
        """A callable ``f(progress=, cancel=) -> Edit`` for ``op`` with the current settings."""
        if op not in CORRECTIONS:
            raise MedSegError(f"unknown operation {op!r}")
        ctx = Context(
            data=np.asarray(layer.data),
            label=None if self.all_check.isChecked() else self.label_spin.value(),
            value=self.label_spin.value(),
            spacing=volume_from_layer(layer, viewer=self.viewer).spacing,
            axis=self.slicing_axis(), region=self.region(layer),
            values={name: _value(ctl) for name, ctl in self.params.get(op, {}).items()},
            extra=dict(extra), mask_of=lambda name: self._mask_of(name, layer),
            image_of=lambda name: self._image_of(name, layer))
        return CORRECTIONS[op].make(ctx)

    def _image_of(self, name, layer):
        if name not in self.viewer.layers:
            raise MedSegError("open the image to threshold first", layer.name)
        return np.asarray(self.viewer.layers[name].data)

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
        if getattr(layer, "multiscale", False):
            show_info(f"{layer.name} is multiscale and cannot be edited as a whole; use "
                      "'Edit region in view' and correct the region layer")
            return None
        if self.job is not None and self.job.running:
            show_info("a correction is still running")
            return None
        title = CORRECTIONS[op].title
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
