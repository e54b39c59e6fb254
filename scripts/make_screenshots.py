"""Regenerate the README screenshots from a real napari session on the sample CT.

Runs the built-in model through the Segment widget, applies a correction through
the Correct widget, and captures the Segment, Correct + Label QA and Export docks.
Needs a display; headless, run it on a virtual screen::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/make_screenshots.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import imageio.v3 as iio
import napari
import numpy as np
from qtpy.QtWidgets import QApplication


def wait(seconds: float = 0.3, until=None, timeout: float = 600.0) -> None:
    """Process Qt events for ``seconds``, or until ``until()`` is true."""
    app = QApplication.instance()
    t0 = time.monotonic()
    while True:
        app.processEvents()
        if until is None and time.monotonic() - t0 >= seconds:
            return
        if until is not None and until():
            return
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("timed out waiting for the viewer")
        time.sleep(0.02)


def shot(viewer, path: Path) -> None:
    wait(0.5)
    iio.imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("napari-medseg", "abdomen-ct")
    truth = [layer for layer in viewer.layers if isinstance(layer, napari.layers.Labels)][0]
    truth.visible = False

    _, seg = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    seg.model_box.setCurrentText("abdomen-ct-small")
    seg.device_box.setCurrentText("cpu")
    wait()
    seg.run()
    wait(until=lambda: not seg.running)
    wait(1.0)
    result = [layer for layer in viewer.layers if layer.name.endswith("abdomen-ct-small")][0]
    z = int(np.argmax((np.asarray(result.data) == 1).sum(axis=(1, 2))))
    viewer.dims.set_point(0, result.data_to_world((z, 0, 0))[0])
    viewer.layers.selection.active = result
    shot(viewer, args.out / "segment_widget.png")

    # Correct the result: grow the spleen by 2 mm, then look at the QA table.
    viewer.window.remove_dock_widget("all")
    _, correct = viewer.window.add_plugin_dock_widget("napari-medseg", "Correct")
    _, qa = viewer.window.add_plugin_dock_widget("napari-medseg", "Label QA")
    correct.layer_combo.setCurrentText(result.name)
    correct.label_spin.setValue(2)
    correct.op_combo.setCurrentIndex(correct.op_combo.findData("margin"))
    correct.params["margin"]["mm"].setValue(2.0)
    correct.run("margin", background=False)
    wait(1.5)
    qa.layer_combo.setCurrentText(result.name)
    qa.refresh()
    shot(viewer, args.out / "correct_qa.png")

    viewer.window.remove_dock_widget("all")
    _, export = viewer.window.add_plugin_dock_widget("napari-medseg", "Export")
    export.labels_combo.setCurrentText(result.name)
    export.path_edit.setText(str(Path.home() / "abdomen_ct_seg.nii.gz"))
    shot(viewer, args.out / "export_widget.png")
    viewer.close()


if __name__ == "__main__":
    main()
