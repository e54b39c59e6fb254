"""The Worklist dock widget: go through a folder of cases, correct, approve, review.

Thin over :class:`napari_medseg.worklist.Worklist` (state in one SQLite file)
and :mod:`napari_medseg.core.review` (uncertainty ranking):

* **Open** a folder (images, DICOM series or an nnU-Net raw dataset); the table
  shows each case's status, annotator, minutes, edits and mean uncertainty.
* **Next / Previous** (``Alt-N`` / ``Alt-P`` on the case's layers) open a case
  with its prediction: the cached one, or one made in the background; the next
  case is predicted ahead while the user works.
* **Next uncertain region** (``Alt-U``) moves the view and the cursor to the
  connected uncertain regions, most uncertainty first; the uncertainty is an
  image layer toggled with *Show uncertainty*.
* **Approve** exports the corrected labels with their correction ledger as a
  training case (nnU-Net raw + MONAI datalist) into the worklist's training
  folder, or, with *Send to review*, leaves them for a reviewer. **Reviewer
  mode** shows the original prediction and the correction side by side.
* Time spent and edits (paint strokes and corrections) are added to the case
  when the user leaves it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFileDialog, QFormLayout,
                            QLabel, QLineEdit, QPushButton, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget)

from ..errors import MedSegError
from ._common import Job, JobBar, notify_exception, row, show_info
from ._layout import tabify_when_docked

log = logging.getLogger(__name__)

__all__ = ["WorklistWidget", "KEYS"]

#: Shortcuts bound on the open case's layers.
KEYS = {"Alt-N": "next_case", "Alt-P": "previous_case", "Alt-U": "next_region"}
_COLUMNS = ("case", "status", "annotator", "min", "edits", "uncertainty")


def _grid(viewer):
    """The viewer's grid: ``viewer.canvas.grid`` where napari has it, else ``viewer.grid``."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


class WorklistWidget(QWidget):
    """Work through the cases of a folder: predict, correct, approve, review."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self.worklist = None
        self.current: str | None = None
        self.layers: dict = {}
        self.regions: list = []
        self.region_index = -1
        self.job: Job | None = None
        self.ahead: Job | None = None
        self._model = None
        self._opened_at = 0.0
        self._edits = 0

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder of images / DICOM series, or nnU-Net raw")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(lambda: self.open_folder(self.folder_edit.text()))
        self.annotator_edit = QLineEdit()
        self.annotator_edit.setPlaceholderText("your name")
        self.model_box = QComboBox()
        self.model_box.setToolTip("Model that predicts the cases")
        self.training_edit = QLineEdit()
        self.training_edit.setPlaceholderText("training dataset (DatasetXXX_Name), set once")
        self.order_box = QComboBox()
        self.order_box.addItems(["list", "uncertainty"])
        self.order_box.setToolTip("Folder order, or most uncertain cases first")
        self.order_box.currentTextChanged.connect(lambda _: self.refresh())
        self.table = QTableWidget(0, len(_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(_COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.cellDoubleClicked.connect(
            lambda r, _: self.open_case(self.table.item(r, 0).text()))
        self.prev_button = QPushButton("◀ Previous")
        self.prev_button.clicked.connect(self.previous_case)
        self.next_button = QPushButton("Next ▶")
        self.next_button.clicked.connect(self.next_case)
        self.region_button = QPushButton("Next uncertain region")
        self.region_button.clicked.connect(self.next_region)
        self.show_uncertainty = QCheckBox("Show uncertainty")
        self.show_uncertainty.toggled.connect(self._toggle_uncertainty)
        self.review_check = QCheckBox("Send to review")
        self.review_check.setToolTip("Approve leaves the case for a reviewer")
        self.reviewer_mode = QCheckBox("Reviewer mode")
        self.reviewer_mode.setToolTip("Show the original prediction and the correction side "
                                      "by side; Approve exports the reviewed case")
        self.reviewer_mode.toggled.connect(self._reviewer_toggled)
        self.approve_button = QPushButton("Approve")
        self.approve_button.clicked.connect(lambda: self.approve())
        self.send_back_button = QPushButton("Send back")
        self.send_back_button.setToolTip("Reviewer: return the case to its annotator")
        self.send_back_button.clicked.connect(self.send_back)
        self.finetune_button = QPushButton("Fine-tune on approved cases…")
        self.finetune_button.clicked.connect(self.open_finetune)
        self.bar = JobBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Folder", row(self.folder_edit, browse, self.open_button))
        form.addRow("Annotator", self.annotator_edit)
        form.addRow("Model", self.model_box)
        form.addRow("Training set", self.training_edit)
        form.addRow("Order", self.order_box)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.table, 1)
        lay.addWidget(row(self.prev_button, self.next_button))
        lay.addWidget(row(self.region_button, self.show_uncertainty))
        lay.addWidget(row(self.approve_button, self.review_check))
        lay.addWidget(row(self.reviewer_mode, self.send_back_button))
        lay.addWidget(self.finetune_button)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        self.refresh_models()

    # ------------------------------------------------------------ models
    def refresh_models(self) -> None:
        """List the registry's models (called too when Fine-tune adds one)."""
        current = self.model_box.currentText()
        try:
            from ..models import list_models

            names = [i.name for i in list_models()]
        except Exception as exc:  # noqa: BLE001 - a broken registry must not kill the widget
            notify_exception(exc, "Listing models")
            names = []
        self.model_box.clear()
        self.model_box.addItems(names)
        if current in names:
            self.model_box.setCurrentText(current)

    def _model_for_run(self):
        name = self.model_box.currentText()
        if not name:
            raise MedSegError("no segmentation model is available; add one first")
        if self._model is None or self._model.card.name != name:
            from ..models import load_model

            self._model = load_model(name)
        return self._model

    # ------------------------------------------------------------ folder
    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Worklist folder")
        if path:
            self.folder_edit.setText(path)
            self.open_folder(path)

    def open_folder(self, folder) -> bool:
        """Open a worklist folder; return True when it opened."""
        from ..worklist import Worklist

        self._leave()
        try:
            wl = Worklist(str(folder).strip(), annotator=self.annotator_edit.text().strip()
                          or None)
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, "Worklist"))
            return False
        if self.worklist is not None:
            self.worklist.close()
        self.worklist = wl
        self.folder_edit.setText(str(wl.root))
        if not self.annotator_edit.text().strip():
            self.annotator_edit.setText(wl.annotator)
        if wl.training_dir is not None:
            self.training_edit.setText(str(wl.training_dir))
        self.current = None
        self.refresh()
        where = "in the folder" if wl.location == "folder" else "in your user folder " \
            "(the folder is read-only)"
        self.status.setText(f"{len(wl.cases())} cases; state {where}, {wl.journal_mode} "
                            "journal")
        return True

    def refresh(self) -> None:
        """Reload the table from the database (other viewers may have changed it)."""
        if self.worklist is None:
            return
        rows = self.worklist.ordered(self.order_box.currentText())
        self.table.setRowCount(len(rows))
        for r, c in enumerate(rows):
            vals = (c.case_id, c.status, c.annotator or "", f"{c.seconds / 60:.1f}",
                    str(c.edits), "" if c.uncertainty is None else f"{c.uncertainty:.3f}")
            for col, v in enumerate(vals):
                self.table.setItem(r, col, QTableWidgetItem(v))
            if c.case_id == self.current:
                self.table.selectRow(r)
        self.table.resizeColumnsToContents()

    def _need(self):
        if self.worklist is None:
            raise MedSegError("open a worklist folder first")
        return self.worklist

    # -------------------------------------------------------------- cases
    def next_case(self, *_):
        return self._step(1)

    def previous_case(self, *_):
        return self._step(-1)

    def _step(self, step: int):
        try:
            wl = self._need()
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, "Worklist"))
            return None
        statuses = ("needs review",) if self.reviewer_mode.isChecked() else \
            ("new", "predicted", "in progress")
        rec = wl.next_case(self.current, order=self.order_box.currentText(),
                           statuses=statuses, step=step)
        if rec is None:
            self.status.setText("no further case to " + ("review" if
                                self.reviewer_mode.isChecked() else "work on"))
            return None
        return self.open_case(rec.case_id)

    def open_case(self, case_id: str):
        """Open a case (predicting it first in the background when needed).

        Returns the prediction job when one was started, else None.
        """
        try:
            wl = self._need()
            rec = wl.case(case_id)
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, "Worklist"))
            return None
        self._leave()
        self.current = case_id
        have = wl.prediction_path(case_id).is_file() or wl.draft_path(case_id).is_file()
        if have or self.reviewer_mode.isChecked():
            self._show(case_id)
            self._predict_ahead()
            return None
        if self.ahead is not None and self.ahead.running and \
                getattr(self.ahead, "case_id", None) == case_id:
            self._remove_layers()  # _ahead_done shows the case when its prediction lands
            self.status.setText(f"{case_id}: waiting for the prediction made ahead…")
            return self.ahead
        return self._predict(rec.case_id, show=True)

    def _predict(self, case_id: str, show: bool):
        try:
            model = self._model_for_run()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.status.setText(notify_exception(exc, "Worklist"))
            return None
        wl = self.worklist
        self.status.setText(f"{case_id}: predicting with {model.card.name}…")

        def done(_paths, cid=case_id):
            self.refresh()
            if self.current == cid:
                self._show(cid)
                self._predict_ahead()

        job = Job(wl.predict_case, case_id, model, on_done=done if show else
                  (lambda _p: self._ahead_done(case_id)), bar=self.bar if show else None,
                  what=f"Predict {case_id}")
        job.case_id = case_id
        if show:
            self.job = job
        else:
            self.ahead = job
        return job.start()

    def _predict_ahead(self) -> None:
        """Predict the next case in the background while the user works on this one."""
        wl = self.worklist
        if wl is None or (self.ahead is not None and self.ahead.running) or \
                self.reviewer_mode.isChecked():
            return
        if self.job is not None and self.job.running:
            return
        rec = wl.next_case(self.current, order=self.order_box.currentText(),
                           statuses=("new", "predicted", "in progress"))
        if rec is None or wl.prediction_path(rec.case_id).is_file():
            return
        self._predict(rec.case_id, show=False)

    def _ahead_done(self, case_id: str) -> None:
        self.refresh()
        if self.current == case_id and not self.layers:
            self._show(case_id)

    def _show(self, case_id: str) -> None:
        """Replace the viewer's case layers with those of ``case_id``."""
        from .._napari.boundary import store_prediction, volume_to_layer_data, watch_viewer

        wl = self.worklist
        self._remove_layers()
        try:
            data = wl.load_case(case_id)
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, "Worklist"))
            return
        rec = data["record"]
        if not self.reviewer_mode.isChecked():
            rec = wl.claim(case_id, self.annotator_edit.text().strip() or None)
        watch_viewer(self.viewer)
        for i, img in enumerate(data["images"]):
            d, kw, _ = volume_to_layer_data(img, name=f"{case_id} image {i}" if i else
                                            f"{case_id} image")
            self.layers.setdefault("images", []).append(self.viewer.add_image(d, **kw))
        pred, draft = data["prediction"], data["draft"]
        card = self._card(rec.model)
        if self.reviewer_mode.isChecked() and pred is not None:
            # side by side (napari's grid, two layers a cell): image + original prediction,
            # image + correction
            d, kw, _ = volume_to_layer_data(data["images"][0], name=f"{case_id} image (review)")
            self.layers["images"].append(self.viewer.add_image(d, **kw))
            d, kw, _ = volume_to_layer_data(pred, name=f"{case_id} original prediction")
            self.layers["original"] = self.viewer.add_labels(np.asarray(d), **kw)
            self.layers["original"].editable = False
        shown = draft if draft is not None else pred
        if shown is not None:
            d, kw, _ = volume_to_layer_data(shown, name=f"{case_id} labels")
            kw["metadata"] = dict(kw.get("metadata") or {})
            original = None
            if data["ledger"] is not None:
                original = np.asarray(data["ledger"].prediction)
            elif pred is not None:
                original = np.asarray(pred.data)
            if original is not None:
                store_prediction(kw["metadata"], original.copy(), card)
            layer = self.viewer.add_labels(np.asarray(d).copy(), **kw)
            self.layers["labels"] = layer
            layer.events.paint.connect(self._count_edit)
            layer.events.data.connect(self._count_edit)
        unc = data["uncertainty"]
        if unc is not None:
            from ..core.review import uncertain_regions

            u = np.asarray(unc.data, dtype=np.float32)
            d, kw, _ = volume_to_layer_data(unc.with_data(u, is_label=False),
                                            name=f"{case_id} uncertainty")
            kw.update(colormap="magma", blending="additive",
                      visible=self.show_uncertainty.isChecked())
            self.layers["uncertainty"] = self.viewer.add_image(d, **kw)
            self.regions = uncertain_regions(u, spacing=unc.spacing, threshold=0.3,
                                             max_regions=50)
        self.region_index = -1
        self._bind_keys()
        if self.reviewer_mode.isChecked() and "original" in self.layers:
            self._arrange_grid()
        if "labels" in self.layers:
            self.viewer.layers.selection.active = self.layers["labels"]
        self._opened_at = time.monotonic()
        self._edits = 0
        self.refresh()
        self.status.setText(f"{case_id}: {rec.status}"
                            + (f"; {len(self.regions)} uncertain regions" if self.regions
                               else ""))

    def _arrange_grid(self) -> None:
        """Reviewer mode: image + original prediction beside image + correction."""
        images = self.layers.get("images", [])
        order = [images[0], self.layers["labels"], images[-1], self.layers["original"]]
        for i, layer in enumerate(order):
            self.viewer.layers.move(self.viewer.layers.index(layer), i)
        grid = _grid(self.viewer)
        grid.stride = 2
        grid.shape = (1, 2)
        grid.enabled = True

    def _card(self, model_name):
        if not model_name:
            return None
        try:
            from ..models import list_models

            for info in list_models():
                if info.name == model_name:
                    return info.card
        except Exception:  # noqa: BLE001 - no card: the ledger just lacks the model name
            pass
        return None

    def _count_edit(self, event=None) -> None:
        self._edits += 1

    def _bind_keys(self) -> None:
        for layer in self._all_layers():
            for key, meth in KEYS.items():
                layer.bind_key(key, getattr(self, meth), overwrite=True)

    def _all_layers(self) -> list:
        out = list(self.layers.get("images", []))
        out += [self.layers[k] for k in ("original", "labels", "uncertainty") if k in self.layers]
        return out

    def _remove_layers(self) -> None:
        for layer in self._all_layers():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.layers = {}
        self.regions = []
        _grid(self.viewer).enabled = False

    def _leave(self) -> None:
        """Add the time and edits of the open case; keep its labels as a draft."""
        wl, case = self.worklist, self.current
        if wl is None or case is None or not self.layers:
            return
        seconds = time.monotonic() - self._opened_at if self._opened_at else 0.0
        try:
            wl.add_work(case, seconds=seconds, edits=self._edits,
                        who=self.annotator_edit.text().strip() or None)
            if self._edits and "labels" in self.layers and not self.reviewer_mode.isChecked():
                from .._napari.boundary import ledger_of, volume_from_layer

                layer = self.layers["labels"]
                vol = volume_from_layer(layer, viewer=self.viewer)
                wl.save_draft(case, vol, ledger_of(layer, vol.spacing, vol.label_names))
        except Exception as exc:  # noqa: BLE001 - leaving a case must not fail loudly
            notify_exception(exc, "Worklist")
        self._opened_at, self._edits = 0.0, 0

    # ------------------------------------------------------------ regions
    def next_region(self, *_):
        """Move the view and cursor to the next uncertain region; return it (or None)."""
        if not self.regions or "uncertainty" not in self.layers:
            self.status.setText("no uncertain region in this case")
            return None
        self.region_index = (self.region_index + 1) % len(self.regions)
        region = self.regions[self.region_index]
        layer = self.layers["uncertainty"]
        world = np.asarray(layer.data_to_world(np.asarray(region.peak, float)))[-3:]
        self.viewer.dims.point = tuple(world) if self.viewer.dims.ndim == 3 else \
            tuple(self.viewer.dims.point[:-3]) + tuple(world)
        self.viewer.camera.center = tuple(world)
        self.viewer.cursor.position = tuple(world)
        self.status.setText(f"uncertain region {self.region_index + 1}/{len(self.regions)}: "
                            f"{region.volume_ml:.2f} mL, mean {region.mean:.2f}")
        return region

    def _toggle_uncertainty(self, on: bool) -> None:
        layer = self.layers.get("uncertainty")
        if layer is not None:
            layer.visible = bool(on)

    # ------------------------------------------------------------ approve
    def approve(self, review: bool | None = None):
        """Approve the open case (export, or send to review); return the job or None."""
        from .._napari.boundary import ledger_of, volume_from_layer

        try:
            wl = self._need()
            if self.current is None or "labels" not in self.layers:
                raise MedSegError("open a case with labels first")
            review = self.review_check.isChecked() if review is None else bool(review)
            if self.reviewer_mode.isChecked():
                review = False
            if not review:
                text = self.training_edit.text().strip()
                if not text and wl.training_dir is None:
                    raise MedSegError("choose the training dataset folder (DatasetXXX_Name) "
                                      "approved cases go to")
                if text:
                    chosen = wl.set_training_dir(text)
                    self.training_edit.setText(str(chosen))
            layer = self.layers["labels"]
            labels = volume_from_layer(layer, viewer=self.viewer)
            ledger = ledger_of(layer, labels.spacing, labels.label_names)
            if ledger is None and wl.ledger_dir(self.current).is_dir():
                from ..core.ledger import CorrectionLedger

                ledger = CorrectionLedger.load(wl.ledger_dir(self.current))
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, "Approve"))
            return None
        case = self.current
        self._leave()
        who = self.annotator_edit.text().strip() or None

        def done(rec):
            what = "sent to review" if rec.status == "needs review" else \
                f"approved: training case {rec.training_case}"
            show_info(f"{case} {what}")
            self.refresh()
            self.next_case()
            self.status.setText(f"{case} {what}. " + self.status.text())

        self.approve_button.setEnabled(False)
        self.job = Job(wl.approve, case, None, labels, ledger=ledger, review=review,
                       who=who, on_done=done, bar=self.bar, what="Approve",
                       on_finish=lambda: self.approve_button.setEnabled(True))
        return self.job.start()

    def send_back(self) -> None:
        """Reviewer: return the open case to ``in progress``."""
        try:
            wl = self._need()
            if self.current is None:
                raise MedSegError("open a case first")
            wl.set_status(self.current, "in progress",
                          who=self.annotator_edit.text().strip() or None,
                          expect="needs review")
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, "Send back"))
            return
        self.refresh()
        self.status.setText(f"{self.current} sent back to its annotator")

    def _reviewer_toggled(self, on: bool) -> None:
        if self.current is not None and self.worklist is not None:
            self.open_case(self.current)

    # ---------------------------------------------------------- fine-tune
    def open_finetune(self):
        """Open the Fine-tune dock with the training dataset folder filled in; return it."""
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-medseg", "Fine-tune")
        folder = self.training_edit.text().strip() or (
            str(self.worklist.training_dir) if self.worklist is not None
            and self.worklist.training_dir else "")
        if folder and hasattr(widget, "set_dataset"):
            widget.set_dataset(folder)
        if self.model_box.currentText() and hasattr(widget, "model_box"):
            widget.model_box.setCurrentText(self.model_box.currentText())
        return widget

    def closeEvent(self, event):  # pragma: no cover - Qt close
        self._leave()
        if self.worklist is not None:
            self.worklist.close()
        super().closeEvent(event)

