"""The Export dock widget: save labels, statistics and training cases; autosave.

Thin over :mod:`napari_medseg.io` and :mod:`napari_medseg.io.export`: the
widget gathers choices, copies the layer data on the GUI thread and runs the
write in a :class:`~napari_medseg._widgets._common.Job`. A failed export leaves
no file behind and the layers untouched. A timer autosaves edited Labels layers
to the recovery folder; when an image with autosaved labels is opened, the
widget offers to restore them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout,
                            QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from .._napari.boundary import ledger_of, volume_from_layer, volume_to_layer_data, watch_viewer
from .._napari.layer_roles import is_prompt_layer
from ..core.volume import Volume, same_grid
from ..errors import MedSegError
from ..io.autosave import AutoSaver, Snapshot, find_recovery, image_key
from ._common import Job, JobBar, notify_exception, row, show_info
from ._layout import tabify_when_docked

log = logging.getLogger(__name__)

__all__ = ["ExportWidget", "FORMATS"]

#: Format name -> file extension.
FORMATS = {"NIfTI (.nii.gz)": ".nii.gz", "NRRD (.nrrd)": ".nrrd",
           "Slicer segmentation (.seg.nrrd)": ".seg.nrrd", "TIFF (.tif)": ".tif",
           "DICOM SEG (.dcm)": ".dcm", "DICOM RTSTRUCT (.dcm)": ".dcm"}


def _write_labels_job(path, vol, image, overwrite, rtstruct=False, progress=None,
                      cancel=None):
    if str(path).lower().endswith(".dcm") and rtstruct:
        from ..io.export.rtstruct import export_rtstruct

        return export_rtstruct(path, vol, source=image, overwrite=overwrite,
                               progress=progress, cancel=cancel)
    if str(path).lower().endswith(".dcm"):
        from ..io.export import export_dicom_seg

        return export_dicom_seg(path, vol, source=image, overwrite=overwrite,
                                progress=progress, cancel=cancel)
    from ..io import write_labels

    return write_labels(path, vol, overwrite=overwrite)


def _surface_job(path, vol, frame, smooth, overwrite, progress=None, cancel=None):
    from ..io.export.surface import export_surfaces

    files = export_surfaces(path, vol, frame=frame, smooth=10 if smooth else 0,
                            overwrite=overwrite, progress=progress, cancel=cancel)
    return files[0].parent if files else path


def _csv_job(path, vol, image, ledger, overwrite, progress=None, cancel=None):
    from ..io.export import write_statistics_csv

    img = None if image is None else np.asarray(image.data)
    return write_statistics_csv(path, vol.data, vol.spacing, image=img, affine=vol.affine,
                                names=vol.label_names, ledger=ledger, overwrite=overwrite)


def _case_job(folder, image, vol, ledger, progress=None, cancel=None):
    from ..io.export import export_training_case

    case = export_training_case([image], vol, folder, ledger=ledger, progress=progress,
                                cancel=cancel)
    return Path(folder) / "labelsTr" / f"{case}.nii.gz"


class ExportWidget(QWidget):
    """Export the labels of the viewer, and autosave them while they are edited."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        tabify_when_docked(self)
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.last_path: Path | None = None
        self._dirty: set[int] = set()
        self._recovery = None
        self._saver = AutoSaver(lambda: None)
        watch_viewer(self.viewer)
        self._autosave_worker = None

        self.labels_combo, self.image_combo = QComboBox(), QComboBox()
        self.format_combo = QComboBox()
        self.format_combo.addItems(list(FORMATS))
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("file to write")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        self.overwrite = QCheckBox("overwrite existing files")
        self.export_button = QPushButton("Export labels")
        self.export_button.clicked.connect(self.export_labels)
        self.csv_button = QPushButton("Statistics CSV")
        self.csv_button.clicked.connect(self.export_csv)
        self.surface_button = QPushButton("Surfaces")
        self.surface_button.setToolTip("one mesh per class beside the labels file, in "
                                       "patient mm")
        self.surface_button.clicked.connect(self.export_surfaces)
        self.mesh_combo = QComboBox()
        self.mesh_combo.addItems([".stl", ".obj", ".ply"])
        self.frame_combo = QComboBox()
        self.frame_combo.addItems(["RAS", "LPS"])
        self.frame_combo.setToolTip("RAS: NIfTI / 3D Slicer world; LPS: DICOM / ITK")
        self.smooth_check = QCheckBox("smooth")
        self.dataset_edit = QLineEdit()
        self.dataset_edit.setPlaceholderText("nnU-Net dataset folder (DatasetXXX_Name)")
        self.case_button = QPushButton("Add as training case")
        self.case_button.clicked.connect(self.add_training_case)
        self.finetune_button = QPushButton("Fine-tune a model…")
        self.finetune_button.setToolTip("Retrain a model on the cases of this dataset")
        self.finetune_button.clicked.connect(self.open_finetune)
        self.autosave_spin = QSpinBox()
        self.autosave_spin.setRange(0, 3600)
        self.autosave_spin.setSuffix(" s")
        self.autosave_spin.setSpecialValueText("off")
        self.autosave_spin.setValue(60)
        self.autosave_spin.valueChanged.connect(self._set_interval)
        self.restore_button = QPushButton("Restore autosaved labels")
        self.restore_button.clicked.connect(self.restore)
        self.restore_button.setVisible(False)
        self.bar = JobBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)
        form.addRow("Image", self.image_combo)
        form.addRow("Format", self.format_combo)
        form.addRow("File", row(self.path_edit, browse))
        form.addRow("", self.overwrite)
        form.addRow("", row(self.export_button, self.csv_button))
        form.addRow("", row(self.surface_button, self.mesh_combo, self.frame_combo,
                             self.smooth_check))
        form.addRow("Dataset", self.dataset_edit)
        form.addRow("", row(self.case_button, self.finetune_button))
        form.addRow("Autosave every", self.autosave_spin)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.restore_button)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.timer = QTimer(self)
        self.timer.timeout.connect(self.autosave_now)
        self._set_interval(self.autosave_spin.value())
        self.format_combo.currentTextChanged.connect(self._fix_suffix)
        self.viewer.layers.events.inserted.connect(self._on_inserted)
        self.viewer.layers.events.removed.connect(self._refresh)
        for layer in self.viewer.layers:
            self._watch(layer)
        self._refresh()
        self.check_recovery()

    # ------------------------------------------------------------ layers
    def _refresh(self, event=None) -> None:
        for combo, kind in ((self.labels_combo, Labels), (self.image_combo, Image)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            if kind is Image:
                combo.addItem("(none)")
            combo.addItems([lyr.name for lyr in self.viewer.layers if isinstance(lyr, kind)
                            and not is_prompt_layer(lyr)])
            idx = combo.findText(current)
            if idx >= 0:
                combo.setCurrentIndex(idx)
            elif kind is Image and combo.count() > 1:
                combo.setCurrentIndex(1)
            combo.blockSignals(False)

    def _on_inserted(self, event) -> None:
        self._watch(event.value)
        self._refresh()
        if isinstance(event.value, Image):
            self.check_recovery()

    def _watch(self, layer) -> None:
        if not isinstance(layer, Labels):
            return
        mark = lambda *a, _id=id(layer): self._dirty.add(_id)  # noqa: E731
        for name in ("paint", "data", "labels_update"):
            ev = getattr(layer.events, name, None)
            if ev is not None:
                ev.connect(mark)

    def _layer(self, combo, kind):
        name = combo.currentText()
        for lyr in self.viewer.layers:
            if isinstance(lyr, kind) and lyr.name == name:
                return lyr
        return None

    def _volumes(self):
        """``(labels Volume copy, image Volume or None, ledger or None)`` from the choices."""
        lab_layer = self._layer(self.labels_combo, Labels)
        if lab_layer is None:
            raise MedSegError("no Labels layer to export; add or select one")
        vol = volume_from_layer(lab_layer, viewer=self.viewer)
        vol = vol.with_data(np.array(vol.data))  # a copy: painting may go on meanwhile
        img_layer = self._layer(self.image_combo, Image)
        image = None
        if img_layer is not None:
            image = volume_from_layer(img_layer, is_label=False, viewer=self.viewer)
            if not same_grid(image, vol):
                raise MedSegError(f"'{lab_layer.name}' is not on the grid of "
                                  f"'{img_layer.name}'; choose the image it was drawn on")
            vol.meta.update({k: v for k, v in image.meta.items() if k.startswith("dicom_")})
        ledger = ledger_of(lab_layer, vol.spacing, vol.label_names)
        return vol, image, ledger

    # ------------------------------------------------------------ export
    def _browse(self) -> None:
        ext = FORMATS[self.format_combo.currentText()]
        path, _ = QFileDialog.getSaveFileName(self, "Export labels", "", f"*{ext}")
        if path:
            self.path_edit.setText(path)
            self._fix_suffix()

    def _fix_suffix(self, *_) -> None:
        text = self.path_edit.text().strip()
        if not text:
            return
        ext = FORMATS[self.format_combo.currentText()]
        low = text.lower()
        for e in sorted(FORMATS.values(), key=len, reverse=True):
            if low.endswith(e):
                text = text[: -len(e)]
                break
        self.path_edit.setText(text + ext)

    def _run(self, func, *args, what: str) -> Job | None:
        if self.job is not None and self.job.running:
            show_info("an export is still running; wait for it to finish")
            return None
        self._set_busy(True)

        def done(path):
            self.last_path = Path(path)
            self.status.setText(f"{what}: wrote {path}")
            show_info(f"{what}: wrote {path}")

        def failed(exc):
            self.status.setText(str(exc))

        self.job = Job(func, *args, on_done=done, bar=self.bar, what=what,
                       on_finish=lambda: self._set_busy(False), on_error=failed)
        return self.job.start()

    def _set_busy(self, busy: bool) -> None:
        for b in (self.export_button, self.csv_button, self.case_button,
                  self.surface_button):
            b.setEnabled(not busy)

    def _guarded(self, what, make):
        try:
            return make()
        except MedSegError as exc:
            self.status.setText(notify_exception(exc, what))
            return None

    def export_labels(self) -> Job | None:
        """Write the labels in the chosen format to the chosen file."""
        def make():
            self._fix_suffix()
            path = self.path_edit.text().strip()
            if not path:
                raise MedSegError("choose a file to export to")
            vol, image, _ = self._volumes()
            return self._run(_write_labels_job, path, vol, image, self.overwrite.isChecked(),
                             "RTSTRUCT" in self.format_combo.currentText(),
                             what="Export labels")
        return self._guarded("Export labels", make)

    def export_csv(self) -> Job | None:
        """Write per-class statistics next to the labels file (``*_stats.csv``)."""
        def make():
            path = self.path_edit.text().strip()
            if not path:
                raise MedSegError("choose a file name first; the CSV is written beside it")
            low = path.lower()
            for e in sorted(FORMATS.values(), key=len, reverse=True):
                if low.endswith(e):
                    path = path[: -len(e)]
                    break
            vol, image, ledger = self._volumes()
            return self._run(_csv_job, path + "_stats.csv", vol, image, ledger,
                             self.overwrite.isChecked(), what="Statistics CSV")
        return self._guarded("Statistics CSV", make)

    def export_surfaces(self) -> Job | None:
        """Write each class's surface beside the labels file (``*_<class>.stl``)."""
        def make():
            path = self.path_edit.text().strip()
            if not path:
                raise MedSegError("choose a file name first; the surfaces are written "
                                  "beside it")
            low = path.lower()
            for e in sorted(FORMATS.values(), key=len, reverse=True):
                if low.endswith(e):
                    path = path[: -len(e)]
                    break
            vol, _, _ = self._volumes()
            return self._run(_surface_job, path + self.mesh_combo.currentText(), vol,
                             self.frame_combo.currentText(), self.smooth_check.isChecked(),
                             self.overwrite.isChecked(), what="Surfaces")
        return self._guarded("Surfaces", make)

    def add_training_case(self) -> Job | None:
        """Append image + labels (+ ledger) to the nnU-Net dataset folder."""
        def make():
            folder = self.dataset_edit.text().strip()
            if not folder:
                raise MedSegError("choose an nnU-Net dataset folder (DatasetXXX_Name)")
            vol, image, ledger = self._volumes()
            if image is None:
                raise MedSegError("a training case needs its image; choose the Image layer")
            image = image.with_data(np.array(image.data))
            return self._run(_case_job, folder, image, vol, ledger, what="Training case")
        return self._guarded("Training case", make)

    def open_finetune(self):
        """Open the Fine-tune dock widget with this dataset folder filled in; return it."""
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-medseg", "Fine-tune")
        folder = self.dataset_edit.text().strip()
        if folder and hasattr(widget, "set_dataset"):
            widget.set_dataset(folder)
        return widget

    # ---------------------------------------------------------- autosave
    def _set_interval(self, seconds: int) -> None:
        self.timer.stop()
        if seconds > 0:
            self.timer.start(int(seconds) * 1000)

    def _key_for(self, vol: Volume) -> tuple[str, str | None]:
        for lyr in self.viewer.layers:
            if isinstance(lyr, Image):
                img = volume_from_layer(lyr, is_label=False, viewer=self.viewer)
                if same_grid(img, vol):
                    return image_key(img.source, img.shape3, img.affine), img.source
        return image_key(vol.source, vol.shape3, vol.affine), vol.source

    def autosave_now(self):
        """Save every Labels layer edited since the last autosave (write in a worker)."""
        if self._autosave_worker is not None and self._autosave_worker.is_running:
            return None
        snaps = []
        for lyr in self.viewer.layers:
            if isinstance(lyr, Labels) and id(lyr) in self._dirty and lyr.data.ndim == 3:
                vol = volume_from_layer(lyr, viewer=self.viewer)
                key, source = self._key_for(vol)
                snaps.append(Snapshot(np.array(lyr.data), vol.affine, key, lyr.name,
                                      vol.label_names, source))
        self._dirty.clear()
        if not snaps:
            return None
        worker = create_worker(self._saver.save_if_changed, snaps, _start_thread=False)
        worker.errored.connect(lambda exc: notify_exception(exc, "Autosave"))
        worker.returned.connect(lambda entries: entries and self.status.setText(
            f"autosaved {', '.join(e.name for e in entries)} at {time.strftime('%H:%M:%S')}"))
        self._autosave_worker = worker
        worker.start()
        return worker

    def check_recovery(self):
        """Offer to restore autosaved labels of an open image; return the entry or None."""
        self._recovery = None
        for lyr in self.viewer.layers:
            if not isinstance(lyr, Image):
                continue
            img = volume_from_layer(lyr, is_label=False, viewer=self.viewer)
            if img.data.ndim != 3:
                continue
            entry = find_recovery(img)
            if entry is not None and not any(
                    isinstance(o, Labels) and o.name == entry.name for o in self.viewer.layers):
                self._recovery = (entry, lyr.name)
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.saved_at))
                self.restore_button.setText(f"Restore autosaved '{entry.name}' ({when})")
                self.restore_button.setVisible(True)
                show_info(f"'{lyr.name}' has autosaved labels '{entry.name}' from {when}; "
                          "restore them from the Export panel")
                return entry
        self.restore_button.setVisible(False)
        return None

    def restore(self):
        """Add the autosaved labels as a Labels layer and drop the recovery copy."""
        if self._recovery is None:
            return None
        entry, image_name = self._recovery
        try:
            vol = entry.load()
        except MedSegError as exc:
            notify_exception(exc, "Restore")
            return None
        data, kwargs, _ = volume_to_layer_data(vol, name=entry.name)
        layer = self.viewer.add_labels(data, **kwargs)
        entry.discard()
        self._recovery = None
        self.restore_button.setVisible(False)
        self.status.setText(f"restored '{entry.name}' on '{image_name}'")
        return layer
