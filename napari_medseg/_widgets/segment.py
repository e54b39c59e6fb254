"""The Segment dock widget: run a segmentation model on the images in the viewer.

The widget only gathers choices and shows results. The work is
:func:`napari_medseg.models.run.run_model` (load the model, predict on the
input grid, out of memory as a clear error; the command line runs the same),
run in a napari worker thread by :class:`~napari_medseg._widgets._common.Job`;
input checks are :func:`napari_medseg.core.policy.check_inputs`; turning the
prediction into layers is :mod:`napari_medseg._napari.prediction`. At most
:data:`LOADED_MODELS` loaded models are kept (least recently used dropped).
"""

from __future__ import annotations

import html
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from napari.layers import Image, Labels, Layer, Shapes
from napari.utils.notifications import show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QCompleter,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .._napari.boundary import (
    modality_of,
    prediction_of,
    store_prediction,
    volume_from_layer,
    watch_viewer,
)
from .._napari.prediction import (
    apply_labels,
    is_corrected,
    merge_prediction,
    prediction_layer_data,
    result_layer_name,
    shapes_region,
    view_region,
)
from ..core.policy import available_devices, check_inputs
from ..errors import MedSegError
from ..models.card import DEFAULT_OVERLAP
from ..models.run import (PRECISION_HELP, PRECISIONS, precision_choosable, precision_name,
                          run_model)
from ._common import Job, JobBar, notify_exception, row as side_by_side
from ._layout import tabify_when_docked
from .class_panel import ClassPanel
from .segment_run import card_html, segment_volumes

log = logging.getLogger(__name__)

__all__ = ["SegmentWidget", "segment_volumes"]

REGIONS = ("whole volume", "current view", "box from Shapes layer")
#: Loaded models the widget keeps for quick re-runs (least recently used dropped).
LOADED_MODELS = 2


class SegmentWidget(QWidget):
    """Dock widget: pick images and a model, run it, get an editable Labels layer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer

    Attributes
    ----------
    on_corrected : callable
        ``f(layer) -> "replace" | "untouched" | "cancel"``: what to do when the
        result layer already holds the user's corrections. Asks with a message
        box by default.
    """

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self.on_corrected: Callable[[Layer], str] = self._ask_corrected
        self.job: Job | None = None
        #: ``perf_counter`` times of the last run: started, returned, shown
        self.last_run: dict[str, float] = {}
        self._busy = False
        self.last_error: str | None = None
        #: Input and output check warnings of the last run (see models/checks.py)
        self.last_warnings: list[str] = []
        self._models: dict[str, object] = {}  # name -> ModelInfo or loaded model
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._channel_boxes: list[QComboBox] = []
        watch_viewer(self.viewer)
        self._build()
        self.refresh_models()
        self._connect_layers()
        self._refresh_layers()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        outer = QVBoxLayout(self)
        form = QFormLayout()
        self.model_box = QComboBox()
        self.model_box.currentTextChanged.connect(self._on_model_changed)
        add = QPushButton("Add...")
        add.setToolTip("Use a model package, TorchScript file or bundle from disk")
        add.clicked.connect(self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.model_box, 1)
        row.addWidget(add)
        form.addRow("Model", row)
        self.card_label = QLabel()
        self.card_label.setWordWrap(True)
        self.card_label.setTextFormat(Qt.TextFormat.RichText)
        form.addRow(self.card_label)
        self.channels_form = QFormLayout()
        form.addRow(self.channels_form)
        # nnU-Net result folders and TotalSegmentator tasks: pipeline and class subset
        self.backend_box = QComboBox()
        self.backend_box.addItems(["native", "nnunetv2"])
        self.backend_box.setToolTip("native: this plugin's engine; nnunetv2: nnU-Net's own "
                                    "predictor (the reference path, needs nnunetv2)")
        self.backend_row = side_by_side(QLabel("Pipeline"), self.backend_box)
        form.addRow(self.backend_row)
        self.subset_edit = QLineEdit()
        self.subset_edit.setPlaceholderText("all classes (or e.g. liver, spleen, aorta)")
        self.subset_edit.setToolTip("Run only the part models that hold these classes and "
                                    "keep only them (names separated by commas or spaces)")
        self.subset_row = side_by_side(QLabel("Classes"), self.subset_edit)
        form.addRow(self.subset_row)
        self.device_box = QComboBox()
        for dev, ok in available_devices().items():
            self.device_box.addItem(dev)
            self.device_box.model().item(self.device_box.count() - 1).setEnabled(ok)
        form.addRow("Device", self.device_box)
        self.precision_box = QComboBox()
        self.precision_box.addItems(PRECISIONS)
        self.precision_box.setToolTip(PRECISION_HELP[:1].upper() + PRECISION_HELP[1:])
        self.precision_row = side_by_side(QLabel("Precision"), self.precision_box)
        form.addRow(self.precision_row)
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.9)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(0.5)
        self.overlap.setToolTip("Overlap of neighbouring windows (more is smoother, slower)")
        form.addRow("Overlap", self.overlap)
        opts = QHBoxLayout()
        self.tta = QCheckBox("test-time aug.")
        self.fast = QCheckBox("fast")
        self.fast.setToolTip("Coarser, quicker inference (less overlap, no TTA)")
        self.uncertainty = QCheckBox("uncertainty")
        self.uncertainty.setToolTip("Also add an uncertainty map (hidden Image layer)")
        for w in (self.tta, self.fast, self.uncertainty):
            opts.addWidget(w)
        form.addRow("Options", opts)
        self.region_box = QComboBox()
        self.region_box.addItems(REGIONS)
        self.region_box.currentIndexChanged.connect(self._update_region_controls)
        form.addRow("Region", self.region_box)
        rrow = QHBoxLayout()
        self.shapes_box = QComboBox()
        self.margin = QSpinBox()
        self.margin.setRange(0, 256)
        self.margin.setValue(8)
        self.margin.setPrefix("± ")
        self.margin.setSuffix(" slices")
        self.margin.setToolTip("Slices added around a single-slice view or box")
        rrow.addWidget(self.shapes_box, 1)
        rrow.addWidget(self.margin)
        form.addRow("", rrow)
        outer.addLayout(form)
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        outer.addWidget(self.run_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        outer.addWidget(self.status)
        self.job_bar = JobBar()
        outer.addWidget(self.job_bar)
        self.class_panel = ClassPanel(self.viewer)
        outer.addWidget(self.class_panel, 1)
        self._update_region_controls()

    def _update_region_controls(self) -> None:
        idx = self.region_box.currentIndex()
        self.shapes_box.setVisible(idx == 2)
        self.margin.setVisible(idx > 0)

    # --------------------------------------------------------------- models
    def refresh_models(self) -> None:
        """Fill the model picker from the registry."""
        current = self.model_box.currentText()
        try:
            from ..models import list_models

            infos = list(list_models())
        except Exception as exc:  # noqa: BLE001 - a broken registry must not kill the widget
            notify_exception(exc, "Listing models")
            infos = []
        for info in infos:
            self._models[info.name] = info
        self.model_box.blockSignals(True)
        self.model_box.clear()
        self.model_box.addItems(list(self._models))
        self.model_box.blockSignals(False)
        if current in self._models:
            self.model_box.setCurrentText(current)
        self._on_model_changed(self.model_box.currentText())

    def add_model(self, model) -> str:
        """Offer a model besides the registry's and select it; return its name.

        ``model`` is a path (package folder, .zip, TorchScript file, bundle) or an
        already loaded model (anything with ``card`` and ``predict``).
        """
        if not (hasattr(model, "card") and hasattr(model, "predict")):
            from ..models import load_model

            model = load_model(str(model))
        name = model.card.name
        self._models[name] = model
        self._remember(name, model)
        if self.model_box.findText(name) < 0:
            self.model_box.addItem(name)
        if self.model_box.currentText() == name:
            self._on_model_changed(name)  # same name, new card
        else:
            self.model_box.setCurrentText(name)
        return name

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Model: a package's card, a .zip, TorchScript or ONNX file", "",
            "Models (card.yaml card.yml card.json *.zip *.pt *.ts *.onnx);;All files (*)")
        if path and Path(path).name.startswith("card."):
            path = str(Path(path).parent)  # the package folder
        if path:
            try:
                self.add_model(path)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                self.last_error = notify_exception(exc, "Loading model")

    @property
    def card(self):
        """The card of the selected model (None when there is none)."""
        entry = self._models.get(self.model_box.currentText())
        return getattr(entry, "card", None)

    def _on_model_changed(self, name: str) -> None:
        self.card_label.setText(card_html(self.card) if self.card else
                                "<i>No model available.</i>")
        self.card_label.setToolTip(self.card.training if self.card is not None else "")
        self._set_tta_from_card()
        self._set_overlap_from_card()
        self._build_channel_boxes()
        backend, subset = self.model_features()
        self.backend_row.setVisible(backend)
        self.subset_row.setVisible(subset)
        self.precision_row.setVisible(self.precision_supported())
        names = sorted(self.card.label_names.values()) if subset else []
        completer = QCompleter(names, self.subset_edit)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.subset_edit.setCompleter(completer)

    def _set_tta_from_card(self) -> None:
        """Tick test-time augmentation as the card advises; off where it cannot mirror."""
        card, box = self.card, getattr(self, "tta", None)
        if box is None:
            return
        axes = tuple(card.mirror_axes) if card is not None else ()
        box.setChecked(bool(card is not None and card.default_tta))
        box.setEnabled(bool(axes))
        box.setToolTip(
            "Mirror test-time augmentation: average the model over mirrored inputs "
            f"(axes {', '.join('zyx'[a] for a in axes)}; about {2 ** len(axes)} x the time)"
            + ("; on by default for this model, whose real-scan figures were measured "
               "with it" if card is not None and card.default_tta else "")
            if axes else "This model's card allows no mirroring")

    def _set_overlap_from_card(self) -> None:
        """Set the window overlap the card advises (0.5 where it names none)."""
        box = getattr(self, "overlap", None)
        if box is None:
            return
        card = self.card
        box.setValue(card.overlap() if card is not None else DEFAULT_OVERLAP)
        box.setToolTip("Overlap of neighbouring windows (more is smoother, slower)"
                       + ("; this model's figures were measured at "
                          f"{card.overlap():g}" if card is not None
                          and card.default_overlap is not None else ""))

    def model_features(self) -> tuple[bool, bool]:
        """Whether the selected model has a choice of pipeline (nnU-Net result
        folders, TotalSegmentator tasks) and a class subset (TotalSegmentator)."""
        entry = self._models.get(self.model_box.currentText())
        if entry is None:
            return False, False
        if hasattr(entry, "predict"):  # a loaded model
            return hasattr(entry, "backend"), hasattr(entry, "parts_for")
        card = getattr(entry, "card", None)
        totalseg = getattr(entry, "source", "") == "totalseg"
        return totalseg or getattr(card, "format", "") == "nnunet", totalseg

    def precision_supported(self) -> bool:
        """Whether the selected model's precision can be chosen
        (:func:`~napari_medseg.models.run.precision_choosable`)."""
        return precision_choosable(self._models.get(self.model_box.currentText()))

    def roi_subset(self) -> list[str] | None:
        """The class names typed in "Classes" (None: all), checked against the card."""
        if self.card is None:
            return None
        names = [n for n in self.subset_edit.text().replace(",", " ").split() if n]
        if not names:
            return None
        known = set(self.card.label_names.values())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise MedSegError(f"model '{self.card.name}' has no class "
                              f"{', '.join(map(repr, unknown))}; type class names as the "
                              "model card lists them (e.g. liver, kidney_left)")
        return names

    # ---------------------------------------------------------------- images
    def _card_channels(self) -> list[dict]:
        return list(self.card.channels) if self.card is not None else [{"name": "image"}]

    def _build_channel_boxes(self) -> None:
        while self.channels_form.rowCount():
            self.channels_form.removeRow(0)
        self._channel_boxes = []
        for ch in self._card_channels():
            box = QComboBox()
            box.setToolTip("Image layer for this model input channel")
            mod = ch.get("modality")
            label = ch.get("name", "image") + (f" ({mod})" if mod and mod != ch.get("name")
                                              else "")
            self.channels_form.addRow(f"Image: {label}", box)
            self._channel_boxes.append(box)
        self._refresh_layers()

    def _image_layers(self) -> list[Image]:
        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def _connect_layers(self) -> None:
        ev = self.viewer.layers.events
        ev.inserted.connect(self._on_inserted)
        ev.removed.connect(self._refresh_layers)
        ev.reordered.connect(self._refresh_layers)
        for lyr in self.viewer.layers:
            lyr.events.name.connect(self._refresh_layers)

    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(self._refresh_layers)
        self._refresh_layers()
        if isinstance(event.value, Image) and not self.running:
            self.preselect_model(event.value)

    # ------------------------------------------------------ modality fit
    def layer_modality(self, layer):
        """The :class:`~napari_medseg.core.modality.ModalityGuess` of an image layer, or None."""
        from ..core.modality import detect_modality

        try:
            return detect_modality(volume_from_layer(layer, viewer=self.viewer))
        except Exception as exc:  # noqa: BLE001 - 2D / RGB layers have no modality to fit
            log.debug("no modality for layer %s: %s", getattr(layer, "name", "?"), exc)
            return None

    def preselect_model(self, layer) -> str | None:
        """Select a model whose channels fit the modality of ``layer``; return its name.

        Keeps the current model when it fits (or nothing fits better); puts the
        layer in the first channel slot of the model chosen. Says in the status
        line when no available model takes the layer's modality.
        """
        from ..models.checks import model_fits_modality

        guess = self.layer_modality(layer)
        if guess is None or guess.modality == "unknown":
            return None
        current = self.model_box.currentText()
        if self.card is not None and model_fits_modality(self.card, guess.modality):
            return current
        for name, entry in self._models.items():
            card = getattr(entry, "card", None)
            if card is not None and card.channels and model_fits_modality(
                    card, guess.modality) and card.channels[0].get("modality") != "unknown":
                self.model_box.setCurrentText(name)
                if self._channel_boxes:
                    self._channel_boxes[0].setCurrentText(layer.name)
                return name
        self.status.setText(f"'{layer.name}' looks like {guess.modality} ({guess.source}); "
                            f"no available model takes {guess.modality}")
        return None

    def _refresh_layers(self, event=None) -> None:
        images = [lyr.name for lyr in self._image_layers()]
        chans = self._card_channels()
        for i, box in enumerate(self._channel_boxes):
            keep = box.currentText()
            box.blockSignals(True)
            box.clear()
            box.addItems(images)
            if keep in images:
                box.setCurrentText(keep)
            else:
                box.setCurrentIndex(self._default_image(i, chans, images))
            box.blockSignals(False)
        shapes = [lyr.name for lyr in self.viewer.layers if isinstance(lyr, Shapes)]
        keep = self.shapes_box.currentText()
        self.shapes_box.clear()
        self.shapes_box.addItems(shapes)
        if keep in shapes:
            self.shapes_box.setCurrentText(keep)

    def _default_image(self, i: int, chans, images) -> int:
        if not images:
            return -1
        mod = str(chans[i].get("modality", "")).upper() if i < len(chans) else ""
        for k, lyr in enumerate(self._image_layers()):
            if mod and modality_of(lyr, "").upper() == mod:
                return k
        return min(i, len(images) - 1)

    def set_images(self, layers) -> None:
        """Choose the image layers (or names), one per model input channel, in card order."""
        names = [getattr(lyr, "name", lyr) for lyr in layers]
        if len(names) != len(self._channel_boxes):
            raise MedSegError(
                f"model '{self.model_box.currentText()}' takes {len(self._channel_boxes)} "
                f"image channel(s) ({', '.join(c.get('name', '?') for c in self._card_channels())})"
                f", {len(names)} layer(s) given ({', '.join(names)})")
        for box, name in zip(self._channel_boxes, names):
            box.setCurrentText(name)

    def selected_layers(self) -> list[Layer]:
        """The chosen image layers, in the model's channel order."""
        out = []
        for box in self._channel_boxes:
            name = box.currentText()
            if name and name in self.viewer.layers:
                out.append(self.viewer.layers[name])
        return out

    # ------------------------------------------------------------------ run
    @property
    def running(self) -> bool:
        """True while a model runs."""
        return self._busy

    def run(self) -> Job | None:
        """Start segmenting with the current choices; returns the job (None if not started)."""
        if self.running:
            return self.job
        self.last_error = None
        self.last_run = {"started": time.perf_counter()}
        try:
            request = self._request()
        except Exception as exc:  # noqa: BLE001 - every problem becomes a notification
            self.last_error = notify_exception(exc, "Segment")
            return None
        if request is None:
            return None
        entry = self._loaded.get(request["model_name"])
        if entry is None:  # not loaded yet, or unloaded: a model added by hand stays known
            known = self._models.get(request["model_name"])
            entry = known if hasattr(known, "predict") else request["model_name"]
        self.run_button.setEnabled(False)
        self._busy = True
        self.job = Job(run_model, entry, request["volumes"], name=request["image"],
                       on_done=lambda res: self._on_result(res, request),
                       on_error=self._on_error, bar=self.job_bar, what="Segment",
                       on_finish=self._on_finish,
                       **request["options"])
        return self.job.start()

    def cancel(self) -> None:
        """Ask the running model to stop (it stops between windows)."""
        if self.job is not None:
            self.job.cancel()

    def _request(self) -> dict | None:
        """Validate the choices; gather volumes, options and what to do with the result."""
        name = self.model_box.currentText()
        if not name or self.card is None:
            raise MedSegError("no segmentation model is available; add one with 'Add...' "
                              "or install a model package")
        if not self._image_layers():
            raise MedSegError("no image layer in the viewer; open a volume first (File > "
                              "Open, or File > Open Sample > napari-medseg)")
        layers = self.selected_layers()
        if len(layers) != len(self._channel_boxes):
            raise MedSegError(f"choose an image layer for each input of model '{name}'")
        volumes = [self._volume(lyr, name) for lyr in layers]
        self._check_channels(volumes, layers, name)
        image = layers[0]
        region = self._region(image)
        target = result_layer_name(image.name, name)
        mode = "replace"
        existing = self.viewer.layers[target] if target in self.viewer.layers else None
        if isinstance(existing, Labels) and is_corrected(existing):
            mode = self.on_corrected(existing)
            if mode not in ("replace", "untouched"):
                return None
        options = dict(device=self.device_box.currentText(), overlap=self.overlap.value(),
                       tta=self.tta.isChecked(), fast=self.fast.isChecked(), region=region,
                       uncertainty="entropy" if self.uncertainty.isChecked() else None,
                       crop_to_body=region is None)  # CT models skip the air around
        backend, subset = self.model_features()
        precision = self.precision_supported()
        if backend or subset or precision:
            # always given where supported: a loaded model keeps what the last run set
            options["model_options"] = {
                "backend": self.backend_box.currentText() if backend else None,
                "roi_subset": self.roi_subset() if subset else None,
                "precision": self.precision_box.currentText() if precision else None}
        return {"model_name": name, "image": image.name, "volumes": volumes,
                "options": options, "region": region, "mode": mode, "target": target}

    def _volume(self, layer, model_name):
        if getattr(layer, "rgb", False) or layer.ndim < 3:
            raise MedSegError(
                f"layer '{layer.name}' is a 2D image (shape {tuple(layer.data.shape)}); "
                f"model '{model_name}' segments 3D volumes (Z, Y, X): open a 3D image")
        if layer.multiscale:
            raise MedSegError(f"layer '{layer.name}' is multiscale; open it at full "
                              "resolution to segment it")
        return volume_from_layer(layer, viewer=self.viewer)

    def _check_channels(self, volumes, layers, name) -> None:
        chans = self._card_channels()
        check_inputs(volumes, len(chans), repr(name), [c.get("name", "?") for c in chans],
                     names=[lyr.name for lyr in layers])

    def _remember(self, name: str, model) -> None:
        """Keep ``model`` loaded; drop the least recently used beyond :data:`LOADED_MODELS`."""
        self._loaded[name] = model
        self._loaded.move_to_end(name)
        while len(self._loaded) > LOADED_MODELS:
            dropped, _ = self._loaded.popitem(last=False)
            log.info("unloaded model %s (keeping the %d most recent)", dropped, LOADED_MODELS)

    def _region(self, image):
        idx = self.region_box.currentIndex()
        if idx == 1:
            return view_region(image, self.viewer, self.margin.value())
        if idx == 2:
            name = self.shapes_box.currentText()
            if not name or name not in self.viewer.layers:
                raise MedSegError("no Shapes layer chosen for the region; add a Shapes layer "
                                  "and draw a rectangle around the region to segment")
            return shapes_region(image, self.viewer.layers[name], self.margin.value())
        return None

    def _ask_corrected(self, layer) -> str:
        box = QMessageBox(self)
        box.setWindowTitle("Segment")
        box.setText(f"Layer '{layer.name}' has corrections. Run the model again?")
        replace = box.addButton("Replace everything", QMessageBox.ButtonRole.DestructiveRole)
        keep = box.addButton("Fill only untouched voxels", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        clicked = box.clickedButton()
        return "replace" if clicked is replace else "untouched" if clicked is keep else "cancel"

    # --------------------------------------------------------------- result
    def _on_finish(self) -> None:
        self._busy = False
        self.run_button.setEnabled(True)

    def _on_error(self, exc) -> None:
        self.last_error = str(exc) if isinstance(exc, MedSegError) else \
            f"{type(exc).__name__}: {exc}"

    def _on_result(self, result, request) -> None:
        self.last_run["returned"] = time.perf_counter()
        model, pred = result
        self._remember(request["model_name"], model)
        request["card"] = model.card
        tuples = prediction_layer_data(pred, request["image"], request["model_name"],
                                       model.card)
        labels = self._put_labels(tuples[0], request)
        # one napari layer per event-loop turn keeps each pause of the GUI short
        for extra in tuples[1:]:
            QTimer.singleShot(0, lambda t=extra: self._put_image(t))
        names, colors = model.card.label_names, model.card.label_colors
        classes = {i: (n, colors.get(i, tuple(labels.get_color(i)))) for i, n in
                   names.items()}
        self.class_panel.set_layer(labels, classes or None)
        self.viewer.layers.selection.active = labels
        info = getattr(pred, "info", None) or {}
        self.last_warnings = list(info.get("warnings") or [])
        for text in self.last_warnings:  # wrong input or implausible output: never silent
            show_warning(f"Segment: {text}")
        self.status.setText(
            f"'{request['image']}': {request['model_name']} in "
            f"{getattr(pred, 'seconds', 0.0):.1f} s on {info.get('device', '?')}"
            + (f" in {precision_name(info['amp'])}" if "amp" in info else "")
            + ("" if request["region"] is None else " (region)")
            + "".join(f"<br><b>warning:</b> {html.escape(t)}" for t in self.last_warnings))
        self.last_run["shown"] = time.perf_counter()

    def _put_image(self, layer_tuple) -> None:
        data, kwargs, kind = layer_tuple
        name = kwargs["name"]
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
        else:
            self.viewer.add_layer(Layer.create(data, kwargs, kind))

    def _put_labels(self, layer_tuple, request) -> Labels:
        data, kwargs, kind = layer_tuple
        target = request["target"]
        layer = self.viewer.layers[target] if target in self.viewer.layers else None
        if not isinstance(layer, Labels) or layer.data.shape != data.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            layer = Layer.create(data, kwargs, kind)
            self.viewer.add_layer(layer)
            return layer
        original = prediction_of(layer)
        if original is None or original.shape != data.shape:
            original = layer.data
        merged, new_pred = merge_prediction(layer.data, original, data, request["mode"],
                                            request["region"])
        changed = apply_labels(layer, merged)
        store_prediction(layer, new_pred, request["card"])
        log.info("re-ran %s: %d voxels changed (%s)", target, changed, request["mode"])
        return layer
