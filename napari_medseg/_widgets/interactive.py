"""The Interactive dock widget: clicks, boxes and scribbles to a mask, live.

Prompt layers (positive / negative Points, a Shapes layer of boxes, a Labels
layer of scribbles: 1 object, 2 background) sit on the chosen image. Every
change re-runs the chosen engine off the GUI thread (a newer prompt cancels a
running update) and shows the result in a preview Labels layer. Commit (key
``C``) writes the preview into the target Labels layer as one undo step;
Reset clears the prompts. All the segmentation is in
:mod:`napari_medseg.interactive`.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from qtpy.QtCore import QSignalBlocker, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout,
                            QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from .._napari.boundary import current_slice, volume_from_layer
from .._napari.layer_roles import prompt_metadata
from ..errors import Cancelled, MedSegError
from ..interactive import DEFAULT_ENGINE, Prompts, engine_info, engine_names, make_engine
from ._common import notify_exception, show_info
from ._layout import tabify_when_docked

log = logging.getLogger(__name__)

__all__ = ["InteractiveWidget", "commit_mask"]

#: Engines kept ready (least recently used dropped first): each may hold image features.
KEEP_ENGINES = 2
#: Mode picker text -> engine mode (offered as the engine supports them).
MODE_TEXT = (("3D object", "3d"), ("2D slice", "2d"))

NAMES = {"positive": "positive", "negative": "negative", "boxes": "boxes",
         "scribbles": "scribbles", "preview": "interactive preview"}


def commit_mask(target: Labels, mask: np.ndarray, region, value: int,
                overwrite: bool = False) -> int:
    """Write ``mask`` (a bool array for ``target.data[region]``) as ``value``.

    One undo step; voxels of other labels are kept unless ``overwrite``.
    Returns the number of voxels changed.
    """
    cur = np.asarray(target.data[region])
    change = mask & (cur != value)
    if not overwrite:
        change &= cur == 0
    idx = np.nonzero(change)
    if not len(idx[0]):
        return 0
    full = tuple(i + s.start for i, s in zip(idx, region))
    with target.block_history():
        target.data_setitem(full, value)
    return int(len(idx[0]))


def _size_text(mm: float, i: int, n: int) -> str:
    """The size picker's entry for a first-click region of ``mm``."""
    hint = " (small objects)" if i == 0 else " (large organs)" if i == n - 1 else ""
    return f"{mm:g} mm around it{hint}"


class InteractiveWidget(QWidget):
    """Dock widget for prompt-based segmentation of one object at a time."""

    def __init__(self, napari_viewer):
        super().__init__()
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self._engines: OrderedDict = OrderedDict()  # (name, path) -> engine, LRU
        self._generation = itertools.count()
        self._current = 0
        self._cancel = threading.Event()
        self._worker = None
        self._result = None  # (mask, region, prompts) of the newest finished update
        self._busy = False
        self._connected: list = []
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(60)
        self._timer.timeout.connect(self.update_preview)
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._forget_layer)
        self._refresh_choices()

    # ------------------------------------------------------------------ UI
    def _build(self):
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.target_combo = QComboBox()
        self.engine_combo = QComboBox()
        self.engine_combo.addItems(engine_names())
        if DEFAULT_ENGINE in engine_names():
            self.engine_combo.setCurrentText(DEFAULT_ENGINE)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("checkpoint file or model folder")
        browse = self.browse_button = QPushButton("…")
        browse.clicked.connect(self._browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit)
        path_row.addWidget(browse)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems([text for text, _ in MODE_TEXT])
        self.size_combo = QComboBox()
        self.size_combo.setToolTip(
            "How much of the image a first click looks at. One click does not say how "
            "big the object is: a small region keeps small objects whole, a wide one "
            "takes a large organ whole. W steps to the next size.")
        self.label_spin = QSpinBox()
        self.label_spin.setRange(1, 65535)
        self.new_id_check = QCheckBox("new object id")
        self.overwrite_check = QCheckBox("overwrite other labels")
        self.live_check = QCheckBox("live preview")
        self.live_check.setChecked(True)
        form.addRow("image", self.image_combo)
        form.addRow("target labels", self.target_combo)
        form.addRow("engine", self.engine_combo)
        form.addRow("weights", path_row)
        form.addRow("mode", self.mode_combo)
        form.addRow("first click sees", self.size_combo)
        form.addRow("label value", self.label_spin)
        form.addRow("", self.new_id_check)
        form.addRow("", self.overwrite_check)
        form.addRow("", self.live_check)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.start_button = QPushButton("Add prompt layers")
        self.commit_button = QPushButton("Commit (C)")
        self.reset_button = QPushButton("Reset")
        for b in (self.start_button, self.commit_button, self.reset_button):
            row.addWidget(b)
        lay.addLayout(row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        lay.addStretch()
        self.start_button.clicked.connect(self.add_prompt_layers)
        self.commit_button.clicked.connect(self.commit)
        self.reset_button.clicked.connect(self.reset)
        self.engine_combo.currentTextChanged.connect(self._on_engine)
        self.mode_combo.currentTextChanged.connect(lambda _: self.schedule())
        self.size_combo.currentIndexChanged.connect(lambda _: self.schedule())
        self._on_engine()
        self.path_edit.editingFinished.connect(self.schedule)

    def engine_info(self):
        """The registry entry of the chosen engine: its card and capabilities."""
        return engine_info(self.engine_combo.currentText())

    def _on_engine(self, name=None):
        """Show what the chosen engine supports: modes, path, prompts, card."""
        info = self.engine_info()
        self.path_edit.setEnabled(info.path is not None)
        self.browse_button.setEnabled(info.path is not None)
        what = {"file": "checkpoint file", "folder": "model folder"}.get(info.path, "")
        self.path_edit.setPlaceholderText(
            "no weights needed" if info.path is None
            else f"{what} (optional: the shipped weights)" if info.path_optional else what)
        modes = [text for text, mode in MODE_TEXT if mode in info.modes]
        keep = self.mode_combo.currentText()
        self.mode_combo.blockSignals(True)
        self.mode_combo.clear()
        self.mode_combo.addItems(modes)
        if keep in modes:
            self.mode_combo.setCurrentText(keep)
        self.mode_combo.blockSignals(False)
        sizes = info.first_sizes_mm
        self.size_combo.blockSignals(True)
        self.size_combo.clear()
        self.size_combo.addItems([_size_text(mm, i, len(sizes)) for i, mm in enumerate(sizes)]
                                 or ["the engine decides"])
        self.size_combo.setEnabled(bool(sizes))
        self.size_combo.blockSignals(False)
        self.engine_combo.setToolTip(
            f"{info.name}: uses {', '.join(info.prompts)}; "
            f"{' and '.join(m.upper() for m in info.modes)}\n"
            f"Trained on: {info.card.trained_on}\nFigures: {info.card.measured_on}")
        self.schedule()

    def _browse(self):
        if self.engine_info().path == "folder":
            path = QFileDialog.getExistingDirectory(self, f"{self.engine_info().name} "
                                                    "model folder")
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "",
                                                  "Weights (*.pth *.pt)")
        if path:
            self.path_edit.setText(path)
            self.schedule()

    def _refresh_choices(self, event=None):
        own = set(NAMES.values())
        for combo, kind in ((self.image_combo, Image), (self.target_combo, Labels)):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            names = [lyr.name for lyr in self.viewer.layers
                     if isinstance(lyr, kind) and lyr.name not in own]
            combo.addItems(names)
            if cur in names:
                combo.setCurrentText(cur)
            combo.blockSignals(False)

    # -------------------------------------------------------------- layers
    def _layer(self, key):
        name = NAMES[key]
        return self.viewer.layers[name] if name in self.viewer.layers else None

    @property
    def image_layer(self) -> Image:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise MedSegError("open an image first and choose it in the Interactive panel",
                              "image")
        return self.viewer.layers[name]

    def add_prompt_layers(self):
        """Create the prompt and preview layers on the chosen image's grid."""
        try:
            img = self.image_layer
        except MedSegError as exc:
            notify_exception(exc, "Interactive")
            return
        geo = {"scale": img.scale, "translate": img.translate, "rotate": img.rotate,
               "shear": img.shear, "affine": img.affine.affine_matrix, "units": img.units}
        shape = img.data.shape
        layers = self.viewer.layers
        if self._layer("preview") is None:
            layers.append(Labels(np.zeros(shape, np.uint8), name=NAMES["preview"],
                                 opacity=0.5, metadata=prompt_metadata(), **geo))
        if self._layer("scribbles") is None:
            from napari.utils.colormaps import DirectLabelColormap

            # object paint lime and background paint red, as the positive and
            # negative points, so a stroke stays visible over the preview
            paint = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0),
                                                    1: (0.0, 1.0, 0.0, 1.0),
                                                    2: (1.0, 0.0, 0.0, 1.0)})
            layers.append(Labels(np.zeros(shape, np.uint8), name=NAMES["scribbles"],
                                 colormap=paint, metadata=prompt_metadata(), **geo))
        if self._layer("boxes") is None:
            self.viewer.add_shapes(name=NAMES["boxes"], ndim=img.ndim, edge_color="yellow",
                                   face_color="transparent", edge_width=1,
                                   metadata=prompt_metadata(), **geo)
        for key, colour in (("negative", "red"), ("positive", "lime")):
            if self._layer(key) is None:
                self.viewer.add_points(np.zeros((0, img.ndim)), name=NAMES[key], ndim=img.ndim,
                                       face_color=colour, size=max(img.data.shape) / 25,
                                       metadata=prompt_metadata(), **geo)
        for key in ("positive", "negative", "boxes", "scribbles", "preview"):
            lyr = self._layer(key)
            lyr.bind_key("c", lambda _layer: self.commit(), overwrite=True)
            lyr.bind_key("Control-z", lambda _layer: self.undo_prompt(), overwrite=True)
            lyr.bind_key("w", lambda _layer: self.next_size(), overwrite=True)
            self._watch_prompt(key, lyr)
            if key in ("positive", "negative", "boxes") and lyr not in self._connected:
                lyr.events.data.connect(self.schedule)
                self._connected.append(lyr)
            if key == "scribbles" and lyr not in self._connected:
                lyr.events.paint.connect(self.schedule)
                self._connected.append(lyr)
        self._refresh_choices()
        pos = self._layer("positive")
        pos.mode = "add"
        self.viewer.layers.selection.active = pos

    # ------------------------------------------------------------- prompts
    def _to_image(self, layer, coords) -> np.ndarray:
        """Layer data coordinates -> the image's array indices (via world space)."""
        coords = np.asarray(coords, float).reshape(-1, layer.ndim)
        if not len(coords):
            return np.zeros((0, 3))
        img = self.image_layer
        world = np.array([layer.data_to_world(c) for c in coords])
        return np.array([img.world_to_data(w) for w in world])[:, -3:]

    def current_prompts(self) -> Prompts:
        """The prompts from the prompt layers, in the image's array indices."""
        img = self.image_layer
        pos = self._layer("positive")
        neg = self._layer("negative")
        boxes = self._layer("boxes")
        sc = self._layer("scribbles")
        box_arr = []
        if boxes is not None:
            for verts in boxes.data:
                v = self._to_image(boxes, verts)
                box_arr.append([v.min(0), v.max(0)])
        scribbles = None
        if sc is not None and np.any(sc.data):
            scribbles = np.asarray(sc.data)
        mode = dict(MODE_TEXT).get(self.mode_combo.currentText(), "3d")
        axis, index = 0, None
        if mode == "2d":
            axis, index = current_slice(self.viewer, img)
        uses = self.engine_info().prompts  # prompts the engine does not use are left out
        clicks = "clicks" in uses
        return Prompts(
            positive=self._to_image(pos, pos.data) if pos is not None and clicks else None,
            negative=self._to_image(neg, neg.data) if neg is not None and clicks else None,
            boxes=np.array(box_arr if "boxes" in uses else []).reshape(-1, 2, 3),
            scribbles=scribbles if "scribbles" in uses else None,
            mode=mode, axis=axis, index=index)

    def _image_array(self, img) -> np.ndarray:
        """The image as one in-memory array, loaded once per layer (lazy and
        multiscale data are read once, so engines can cache their features)."""
        data = img.data[0] if getattr(img, "multiscale", False) else img.data
        if isinstance(data, np.ndarray):
            return data
        held = getattr(self, "_loaded", None)  # (layer, its data, the array): by identity
        if held is None or held[0] is not img or held[1] is not data:
            self._loaded = (img, data, np.asarray(data))
        return self._loaded[2]

    def _forget_layer(self, event=None):
        """Drop the in-memory copy of a layer that left the viewer."""
        held = getattr(self, "_loaded", None)
        if held is not None and held[0] not in self.viewer.layers:
            self._loaded = None

    def _engine(self):
        name = self.engine_combo.currentText()
        path = self.path_edit.text().strip() or None
        key = (name, path)
        if key not in self._engines:
            self._engines[key] = make_engine(name, path)
        self._engines.move_to_end(key)
        while len(self._engines) > KEEP_ENGINES:  # each may hold image features
            self._engines.popitem(last=False)
        return self._engines[key]

    def next_size(self) -> None:
        """Look at a first click in the next wider region (after the widest: the
        finest again); the preview updates."""
        n = self.size_combo.count()
        if self.size_combo.isEnabled() and n > 1:
            self.size_combo.setCurrentIndex((self.size_combo.currentIndex() + 1) % n)

    # -------------------------------------------------------------- update
    def schedule(self, event=None):
        """Re-run the engine soon (prompt changes arrive in bursts)."""
        if self.live_check.isChecked():
            self._timer.start()

    def update_preview(self):
        """Start an update for the current prompts; a running one is cancelled."""
        self._cancel.set()  # whatever runs now is stale
        try:
            img = self.image_layer
            prompts = self.current_prompts()
            if prompts.is_empty():
                self._show(None)
                return
            engine = self._engine()
            if self.engine_info().first_sizes_mm:
                engine.first_size = max(self.size_combo.currentIndex(), 0)
            vol = volume_from_layer(img, viewer=self.viewer)
        except MedSegError as exc:
            self.status.setText(str(exc))
            return
        gen = next(self._generation)
        self._current = gen
        cancel = threading.Event()
        self._cancel = cancel
        image = self._image_array(img)

        def run():
            try:
                return engine.predict_region(image, vol.spacing, prompts,
                                             cancel=cancel.is_set)
            except (MedSegError, Cancelled) as exc:  # expected: shown, not raised
                return (exc,)

        worker = create_worker(run, _start_thread=False)
        worker.returned.connect(lambda res, g=gen, p=prompts: self._done(g, res, p))
        worker.errored.connect(lambda exc, g=gen: self._failed(g, exc))
        worker.finished.connect(lambda g=gen: self._finished(g))
        self._worker = worker
        self._busy = True
        self.status.setText("updating…")
        worker.start()

    def _done(self, gen, res, prompts):
        if gen != self._current:
            return  # a newer prompt arrived meanwhile
        if len(res) == 1:
            self._failed(gen, res[0])
            return
        mask, region = res
        self._show((mask, region, prompts))
        text = f"{int(mask.sum())} voxels; C commits, Reset clears"
        if self.size_combo.isEnabled() and len(prompts.positive) == 1 \
                and not len(prompts.negative) and not len(prompts.boxes):
            last = self.size_combo.currentIndex() == self.size_combo.count() - 1
            text += ("; W: back to the smallest region" if last
                     else "; W: look at the first click in a wider region")
        self.status.setText(text)

    def _finished(self, gen):
        if gen == self._current:
            self._busy = False

    def _failed(self, gen, exc):
        if gen != self._current or isinstance(exc, Cancelled):
            return
        if isinstance(exc, MedSegError):
            self.status.setText(str(exc))
        else:
            self.status.setText(notify_exception(exc, "Interactive"))

    def _show(self, result):
        prev = self._layer("preview")
        self._result = result
        if prev is None:
            return
        prev.data[:] = 0
        if result is not None:
            mask, region, _ = result
            prev.data[region][mask] = 1
        prev.refresh()

    def wait(self, timeout_ms: int = 10000) -> None:
        """Block until the newest update finished (scripts and tests)."""
        from qtpy.QtCore import QCoreApplication, QElapsedTimer

        clock = QElapsedTimer()
        clock.start()
        while self._timer.isActive() or self._busy:
            QCoreApplication.processEvents()
            if clock.elapsed() > timeout_ms:
                raise TimeoutError("interactive update did not finish")
        QCoreApplication.processEvents()

    # -------------------------------------------------------------- commit
    def _target(self) -> Labels:
        name = self.target_combo.currentText()
        if name and name in self.viewer.layers:
            target = self.viewer.layers[name]
        else:
            img = self.image_layer
            target = self.viewer.add_labels(
                np.zeros(img.data.shape, np.uint16), name=f"{img.name} labels",
                scale=img.scale, translate=img.translate, rotate=img.rotate,
                shear=img.shear, affine=img.affine.affine_matrix)
            self._refresh_choices()
            self.target_combo.setCurrentText(target.name)
        if tuple(target.data.shape) != tuple(self.image_layer.data.shape):
            raise MedSegError(f"target has shape {tuple(target.data.shape)} but the image "
                              f"is {tuple(self.image_layer.data.shape)}; choose labels on "
                              "the image's grid", target.name)
        return target

    def commit(self):
        """Write the preview into the target labels (one undo step), then reset."""
        if self._result is None:
            show_info("nothing to commit: add a prompt and wait for the preview")
            return 0
        try:
            target = self._target()
        except MedSegError as exc:
            notify_exception(exc, "Commit")
            return 0
        mask, region, _ = self._result
        value = int(self.label_spin.value())
        if self.new_id_check.isChecked():
            value = int(np.max(target.data)) + 1
        n = commit_mask(target, mask, region, value, self.overwrite_check.isChecked())
        self.status.setText(f"committed {n} voxels as label {value}")
        self.reset()
        return n

    # -------------------------------------------------------- per-prompt undo
    def _watch_prompt(self, key: str, layer) -> None:
        """Record each new click, box or scribble stroke, newest last, for undo_prompt."""
        watched = self.__dict__.setdefault("_prompt_watched", set())
        if id(layer) in watched or key == "preview":
            return
        watched.add(id(layer))
        stack = self.__dict__.setdefault("_prompt_stack", [])
        if key == "scribbles":
            layer.events.paint.connect(lambda _e: stack.append(key))
        else:
            def added(event, key=key):
                if str(getattr(event, "action", "")) == "added":
                    stack.append(key)
            layer.events.data.connect(added)

    def undo_prompt(self) -> bool:
        """Take back the newest prompt (click, box or scribble stroke) before a commit.

        Bound to Ctrl+Z on the prompt layers; several levels, newest first. After
        a commit the prompts are cleared and Ctrl+Z on the segmentation is
        napari's own undo. Returns False when there is no prompt left to undo.
        """
        stack = self.__dict__.setdefault("_prompt_stack", [])
        while stack:
            key = stack.pop()
            layer = self._layer(key)
            if layer is None:
                continue
            if key == "scribbles":
                layer.undo()
            elif len(layer.data):
                layer.data = list(layer.data)[:-1] if key == "boxes" else layer.data[:-1]
            else:
                continue
            self.schedule()
            return True
        show_info("no prompt to undo")
        return False

    def reset(self):
        """Clear all prompts and the preview; the next first click is seen in the
        smallest region again."""
        self.__dict__.setdefault("_prompt_stack", []).clear()
        self._cancel.set()
        self._current = next(self._generation)
        self._busy = False
        for key in ("positive", "negative", "boxes"):
            lyr = self._layer(key)
            if lyr is not None and len(lyr.data):
                with lyr.events.data.blocker():
                    lyr.data = np.zeros((0, lyr.ndim)) if key != "boxes" else []
                if key == "boxes":
                    lyr.refresh()
        sc = self._layer("scribbles")
        if sc is not None:
            sc.data[:] = 0
            sc.refresh()
        with QSignalBlocker(self.size_combo):  # each object starts at the finest size
            self.size_combo.setCurrentIndex(0)
        self._show(None)
