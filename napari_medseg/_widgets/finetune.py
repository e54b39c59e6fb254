"""The Fine-tune dock widget: retrain a model on the corrected cases you exported.

Thin over :func:`napari_medseg.training.finetune.finetune`: pick a model with
trainable weights and the nnU-Net dataset folder the Export widget appends
training cases to, then Run (with progress and Cancel). The new model is saved
in the user model folder; the Segment widget's model list is refreshed so it
can be used at once. A live plot (matplotlib) shows the loss and the Dice on
fixed held-out windows while it trains; Cancel keeps a checkpoint that *Resume*
continues with the same settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                            QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout,
                            QWidget)

from ..errors import MedSegError
from ._common import Job, JobBar, notify_exception, row, show_info
from ._layout import tabify_when_docked

log = logging.getLogger(__name__)

__all__ = ["FinetuneWidget"]


def _summary(path: Path) -> str:
    """One line about a new package: name, loss and held-out Dice before -> after."""
    from ..models.loaders import read_package_card

    card = read_package_card(path)
    ft = card.metrics.get("fine_tune", {})
    text = (f"{card.name}: loss {ft.get('loss_first', 0):.3f} → "
            f"{ft.get('loss_last', 0):.3f}")
    after, before = card.metrics.get("dice"), card.metrics.get("dice_before") or {}
    if after:
        text += "; held-out Dice " + ", ".join(
            f"{k} {before.get(k, 0):.2f}→{v:.2f}" for k, v in after.items())
    return text


class FinetuneWidget(QWidget):
    """Fine-tune a segmentation model on corrected training cases."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.last_path: Path | None = None
        self._cards: dict = {}  # the listed models' cards, by name

        self.model_box = QComboBox()
        self.model_box.setToolTip("Models with trainable weights (state_dict packages)")
        refresh = QPushButton("↻")
        refresh.setToolTip("Refresh the model list")
        refresh.clicked.connect(self.refresh_models)
        self.dataset_edit = QLineEdit()
        self.dataset_edit.setPlaceholderText("nnU-Net dataset folder (DatasetXXX_Name)")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100_000)
        self.iterations.setValue(200)
        self.iterations.setToolTip("Optimiser steps; each takes about a second on a CPU")
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(3e-4)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("automatic (<model>-ft-<date>)")
        self.add_classes_check = QCheckBox("Add the dataset's new classes")
        self.add_classes_check.setChecked(True)
        self.add_classes_check.setToolTip(
            "Classes in the dataset's dataset.json that the model does not have (a "
            "structure you labelled that it never predicted) become new outputs")
        self.classes_note = QLabel("")
        self.classes_note.setWordWrap(True)
        self.dataset_edit.textChanged.connect(self._show_new_classes)
        self.model_box.currentTextChanged.connect(self._show_new_classes)
        self.augment_check = QCheckBox("Augment (zoom, rotation, intensity)")
        self.augment_check.setChecked(True)
        self.augment_check.setToolTip(
            "Draw each training window with nnU-Net's random zoom, small rotation and "
            "intensity changes, so that a few corrected cases teach more than their own "
            "appearance")
        self.resume_check = QCheckBox("Resume a cancelled run (same settings)")
        self.resume_check.setToolTip("Continue from the checkpoint a cancelled run with the "
                                     "same model, dataset and settings left")
        from ._plot import LivePlot

        self.plot = LivePlot()  # loss and held-out window Dice while training
        self.run_button = QPushButton("Fine-tune")
        self.run_button.clicked.connect(self.run)
        self.bar = JobBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Model", row(self.model_box, refresh))
        form.addRow("Dataset", row(self.dataset_edit, browse))
        form.addRow("Iterations", self.iterations)
        form.addRow("Learning rate", self.lr)
        form.addRow("New name", self.name_edit)
        form.addRow("", self.add_classes_check)
        form.addRow("", self.classes_note)
        form.addRow("", self.augment_check)
        form.addRow("", self.resume_check)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.run_button)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        lay.addWidget(self.plot)
        lay.addStretch(1)
        self.refresh_models()

    # ------------------------------------------------------------ models
    def refresh_models(self) -> None:
        """List the registry's models that have trainable weights."""
        current = self.model_box.currentText()
        try:
            from ..models import list_models

            cards = {i.name: i.card for i in list_models()
                     if i.card.format == "state_dict" and i.card.network}
        except Exception as exc:  # noqa: BLE001 - a broken registry must not kill the widget
            notify_exception(exc, "Listing models")
            cards = {}
        self._cards = cards  # before the list changes: its signal reads them
        names = list(cards)
        self.model_box.clear()
        self.model_box.addItems(names)
        if current in names:
            self.model_box.setCurrentText(current)

    def set_dataset(self, folder) -> None:
        """Fill in the dataset folder (e.g. from the Export widget)."""
        self.dataset_edit.setText(str(folder))

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "nnU-Net dataset folder")
        if path:
            self.dataset_edit.setText(path)

    # --------------------------------------------------------------- run
    def run(self, **options) -> Job | None:
        """Start fine-tuning in the background; return the job (None if not started).

        ``options`` go to :func:`~napari_medseg.training.finetune.finetune`
        (e.g. ``patch_size``, ``val_fraction``).
        """
        if self.job is not None and self.job.running:
            show_info("fine-tuning is already running")
            return None
        try:
            model = self.model_box.currentText()
            if not model:
                raise MedSegError("no model with trainable weights is available; add a "
                                  "model package (card.yaml + state_dict) first")
            folder = self.dataset_edit.text().strip()
            if not folder:
                raise MedSegError("choose the nnU-Net dataset folder holding your "
                                  "corrected cases")
            new = self._new_classes(model, folder) if self.add_classes_check.isChecked() else {}
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, "Fine-tune"))
            return None
        from ..training.finetune import finetune

        kwargs = dict(iterations=self.iterations.value(), lr=self.lr.value(),
                      name=self.name_edit.text().strip() or None,
                      augment=self.augment_check.isChecked(),
                      resume=self.resume_check.isChecked(), report=self.plot.report)
        if new:
            kwargs["new_classes"] = new
        self.plot.clear()
        kwargs.update(options)
        self.run_button.setEnabled(False)
        added = ("; adding " + ", ".join(f"{k} {v}" for k, v in new.items())) if new else ""
        self.status.setText(f"fine-tuning {model}{added}…")
        self.job = Job(finetune, model, folder, on_done=self._done, bar=self.bar,
                       what="Fine-tune", on_finish=lambda: self.run_button.setEnabled(True),
                       on_error=lambda exc: self.status.setText(str(exc) or "cancelled"),
                       **kwargs)
        return self.job.start()

    def _new_classes(self, model: str, folder: str) -> dict:
        """The dataset's classes that ``model`` lacks ({} when the folder has no
        dataset.json yet: fine-tuning then says what is missing)."""
        from ..training.data import dataset_new_classes

        card = self._cards.get(model)
        if card is None or not (Path(folder).expanduser() / "dataset.json").is_file():
            return {}
        return dataset_new_classes(folder, card)

    def _show_new_classes(self, *_):
        """Name the dataset's classes the model lacks, with the settings they need."""
        try:
            new = self._new_classes(self.model_box.currentText(),
                                    self.dataset_edit.text().strip())
        except MedSegError as exc:
            self.classes_note.setText(str(exc))
            return
        except Exception:  # noqa: BLE001 - a half-typed path must not raise in the GUI
            new = {}
        self.classes_note.setText(
            ("New in this dataset: " + ", ".join(f"{k} {v}" for k, v in new.items())
             + ". A new class needs a longer run (the sarcoma benchmark: 2000 iterations "
             "at a learning rate of 0.001).") if new else "")

    def _done(self, path) -> None:
        self.last_path = Path(path)
        text = _summary(self.last_path)
        self.status.setText(f"{text}\nsaved to {path}")
        show_info(f"new model {text}")
        self.refresh_models()
        self._refresh_other_widgets()

    def _refresh_other_widgets(self) -> None:
        """Let the Segment widget (and any other model picker) list the new model."""
        window = getattr(self.viewer, "window", None)
        docks = getattr(window, "dock_widgets", {}) if window is not None else {}
        for widget in list(docks.values()):
            if widget is not self and callable(getattr(widget, "refresh_models", None)):
                try:
                    widget.refresh_models()
                except Exception as exc:  # noqa: BLE001 - another widget's problem
                    log.warning("could not refresh the models of %s: %s", widget, exc)
