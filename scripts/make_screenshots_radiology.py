"""Screenshots of the Display widget (window presets, planes) and segment statistics.

Uses the shared real abdominal CT (DICOM series and its reference labels, see
../shared/realdata/README.md) when it is there, else the synthetic sample CT.
Headless, on a virtual screen of a laptop's size::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots_radiology.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import napari
from qtpy.QtCore import Qt

from make_screenshots import shot, wait

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def _open_ct(viewer):
    """Open the real CT with its labels (or the sample); return (image, labels) layers."""
    series = REAL / "ct_abdomen_dicom"
    if series.is_dir():
        [img] = viewer.open(str(series), plugin="napari-medseg")
        [lab] = viewer.open(str(REAL / "ct_abdomen_dicom_labels.nii.gz"),
                            plugin="napari-medseg")
        names = json.loads((REAL / "labels.json").read_text())
        ids = [0, *sorted(int(k) for k in names)]
        lab.features = {"index": ids,
                        "name": ["background" if i == 0 else names[str(i)] for i in ids]}
        return img, lab
    viewer.open_sample("napari-medseg", "abdomen-ct")
    return viewer.layers[0], viewer.layers[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. a CT opens as CT with the soft-tissue window; the Display dock
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    img, lab = _open_ct(viewer)
    lab.visible = False
    _, display = viewer.window.add_plugin_dock_widget("napari-medseg", "Display")
    display.layer_combo.setCurrentText(img.name)
    viewer.dims.set_point(0, viewer.dims.range[0].start + 0.5 *
                          (viewer.dims.range[0].stop - viewer.dims.range[0].start))
    viewer.reset_view()
    wait(1.0)
    shot(viewer, args.out / "display_soft_tissue.png")

    # 2. segment statistics of the reference labels in the Label QA table
    lab.visible = True
    lab.opacity = 0.4
    _, qa = viewer.window.add_plugin_dock_widget("napari-medseg", "Label QA")
    qa.layer_combo.setCurrentText(lab.name)
    qa.image_combo.setCurrentText(img.name)
    qa.shape_check.setChecked(True)
    for col in (0, 3, 4, 5, 6):  # the screenshot shows name, volume and shape columns
        qa.table.setColumnHidden(col, True)
    qa.table.resizeColumnsToContents()
    dock = viewer.window._dock_widgets["Label QA (napari-medseg)"]
    viewer.window._qt_window.resizeDocks([dock], [580], Qt.Orientation.Horizontal)
    wait(0.5)
    viewer.reset_view()
    wait(1.0)
    shot(viewer, args.out / "statistics_qa.png")
    viewer.close()

    # 3. the coronal plane of the sample CT, upright, with its labels
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    viewer.open_sample("napari-medseg", "abdomen-ct")
    viewer.layers[1].opacity = 0.45
    _, display = viewer.window.add_plugin_dock_widget("napari-medseg", "Display")
    display.plane_combo.setCurrentText("coronal")
    rng = viewer.dims.range[1]
    viewer.dims.set_point(1, rng.start + 0.55 * (rng.stop - rng.start))
    viewer.reset_view()
    wait(1.0)
    shot(viewer, args.out / "display_coronal.png")

    # 4. linked axial / sagittal / coronal views (napari-orthogonal-views)
    display.plane_combo.setCurrentText("axial")
    display.linked_button.setChecked(True)
    viewer.dims.point = [(r.start + r.stop) / 2 for r in viewer.dims.range]
    wait(1.5)
    shot(viewer, args.out / "linked_planes.png")
    viewer.close()


if __name__ == "__main__":
    main()
