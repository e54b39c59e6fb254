"""The Display dock widget: an image's modality and its window (contrast) presets.

One place to say what an image is (CT, MR, PET, ...): the choice is stored on
the layer (see :mod:`napari_medseg._napari.layer_roles`) and travels into the
exports (nnU-Net ``channel_names``, the MONAI datalist). CT window presets
(soft tissue, liver, lung, bone, brain) and a percentile window ("auto", the
default for MR and PET) are buttons and keys (Alt-1 .. Alt-5, Alt-0) that act
on the selected image layer.
"""

from __future__ import annotations

import logging

from napari.layers import Image
from qtpy.QtWidgets import (QComboBox, QFormLayout, QGridLayout, QLabel, QPushButton,
                            QVBoxLayout, QWidget)

from .._napari.layer_roles import layer_modality, set_layer_modality
from ..core.display import (AUTO, PLANES, PRESET_KEYS, WINDOW_PRESETS,
                            contrast_for_preset, default_preset, plane_view)
from ..core.modality import MODALITIES, normalize_modality
from ._common import notify_exception
from ._layout import tabify_when_docked

log = logging.getLogger(__name__)

__all__ = ["DisplayWidget", "apply_preset", "set_modality", "show_plane"]


def show_plane(viewer, plane: str) -> None:
    """Slice ``viewer`` in ``plane`` (axial / coronal / sagittal), radiologically upright."""
    if viewer.dims.ndim < 3:
        return
    order, orientation = plane_view(plane, viewer.dims.ndim)
    viewer.dims.order = order
    viewer.camera.orientation2d = orientation


def apply_preset(layer, preset: str) -> tuple[float, float]:
    """Set ``layer.contrast_limits`` to a window preset (``"auto"``: percentiles)."""
    data = layer.data[-1] if getattr(layer, "multiscale", False) else layer.data
    limits = contrast_for_preset(preset, data if preset == AUTO else None)
    lo, hi = layer.contrast_limits_range
    if limits[0] < lo or limits[1] > hi:  # let the slider reach the window
        layer.contrast_limits_range = (min(lo, limits[0]), max(hi, limits[1]))
    layer.contrast_limits = limits
    return limits


def set_modality(layer, modality: str, window: bool = True) -> None:
    """Record ``modality`` on an image layer and, with ``window``, apply its default window."""
    set_layer_modality(layer, modality)
    if window:
        apply_preset(layer, default_preset(modality))


class DisplayWidget(QWidget):
    """Modality of the selected image and its window presets."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self._updating = False
        self.layer_combo = QComboBox()
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(MODALITIES)
        self.modality_combo.setToolTip("What the image is; exports (nnU-Net channel names, "
                                       "MONAI datalist) use it")
        form = QFormLayout()
        form.addRow("Image", self.layer_combo)
        form.addRow("Modality", self.modality_combo)
        self.plane_combo = QComboBox()
        self.plane_combo.addItems(PLANES)
        self.plane_combo.setToolTip("slice plane, upright as radiologists read it "
                                    "(images opened with napari-medseg)")
        self.plane_combo.currentTextChanged.connect(
            lambda p: show_plane(self.viewer, p))
        form.addRow("Plane", self.plane_combo)
        self.linked_button = QPushButton("Linked 3-plane views")
        self.linked_button.setCheckable(True)
        self.linked_button.setToolTip("axial, sagittal and coronal side by side, linked "
                                      "(needs pip install 'napari-medseg[planes]')")
        self.linked_button.toggled.connect(self._linked)
        form.addRow("", self.linked_button)
        grid = QGridLayout()
        self.buttons: dict[str, QPushButton] = {}
        for n, name in enumerate([*WINDOW_PRESETS, AUTO]):
            label = name.capitalize()
            if name in WINDOW_PRESETS:
                w, lvl = WINDOW_PRESETS[name]
                tip = f"CT window W{w:g} / L{lvl:g} HU ({PRESET_KEYS[name]})"
            else:
                tip = f"0.5-99.5 percentile window of the image ({PRESET_KEYS[name]})"
            b = QPushButton(label)
            b.setToolTip(tip)
            b.clicked.connect(lambda _=False, p=name: self.apply(p))
            grid.addWidget(b, n // 3, n % 3)
            self.buttons[name] = b
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(grid)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.modality_combo.currentTextChanged.connect(self._modality_chosen)
        self.layer_combo.currentTextChanged.connect(self._layer_chosen)
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed):
            e.connect(self._refresh)
        self.viewer.layers.selection.events.active.connect(self._follow_active)
        for name, key in PRESET_KEYS.items():
            self.viewer.bind_key(key, lambda _v, p=name: self.apply(p), overwrite=True)
        self._refresh()

    # ----------------------------------------------------------------- layers
    def _images(self):
        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def layer(self):
        """The chosen image layer, or None."""
        name = self.layer_combo.currentText()
        return next((lyr for lyr in self._images() if lyr.name == name), None)

    def _refresh(self, *_):
        current = self.layer_combo.currentText()
        names = [lyr.name for lyr in self._images()]
        self._updating = True
        try:
            self.layer_combo.clear()
            self.layer_combo.addItems(names)
            if current in names:
                self.layer_combo.setCurrentText(current)
        finally:
            self._updating = False
        self._layer_chosen()

    def _follow_active(self, event=None):
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and active.name != self.layer_combo.currentText():
            self.layer_combo.setCurrentText(active.name)

    def _layer_chosen(self, *_):
        layer = self.layer()
        self._updating = True
        try:
            self.modality_combo.setCurrentText(
                normalize_modality(layer_modality(layer)) if layer else "unknown")
        finally:
            self._updating = False
        self.modality_combo.setEnabled(layer is not None)
        for b in self.buttons.values():
            b.setEnabled(layer is not None)

    def _modality_chosen(self, modality: str):
        layer = self.layer()
        if self._updating or layer is None:
            return
        set_modality(layer, modality)
        self.status.setText(f"'{layer.name}' is {modality}; "
                            f"window: {default_preset(modality)}")

    def _linked(self, on: bool) -> None:
        from .planes import hide_linked_planes, show_linked_planes

        try:
            if on:
                show_linked_planes(self.viewer)
            else:
                hide_linked_planes(self.viewer)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_exception(exc, "linked views")
            self.linked_button.blockSignals(True)
            self.linked_button.setChecked(False)
            self.linked_button.blockSignals(False)

    # ---------------------------------------------------------------- presets
    def apply(self, preset: str):
        """Apply ``preset`` to the chosen image layer (no-op without one)."""
        layer = self.layer()
        if layer is None:
            return None
        try:
            lo, hi = apply_preset(layer, preset)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_exception(exc, "window")
            return None
        self.status.setText(f"{preset}: {lo:g} .. {hi:g}")
        return lo, hi
