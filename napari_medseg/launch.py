"""Open napari with volumes or a sample and the napari-medseg docks.

One entry point for the ``napari-medseg view`` command, scripts and tests::

    from napari_medseg.launch import view
    view(sample="abdomen-ct")                               # interactive
    view(["ct.nii.gz"], screenshot="shot.png")              # headless picture
"""

from __future__ import annotations

import importlib.util
import os
import logging
from pathlib import Path

from .errors import MedSegError

__all__ = ["view", "available_widgets", "PLUGIN"]

log = logging.getLogger(__name__)

PLUGIN = "napari-medseg"


def _manifest():
    import npe2

    pm = npe2.PluginManager.instance()
    if PLUGIN not in pm:
        pm.discover()
    return pm.get_manifest(PLUGIN)


def available_widgets() -> dict[str, bool]:
    """Dock widgets named in the manifest, and whether their module is installed."""
    manifest = _manifest()
    commands = {c.id: c for c in manifest.contributions.commands or []}
    out = {}
    for w in manifest.contributions.widgets or []:
        python_name = commands[w.command].python_name or ""
        module = python_name.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        out[w.display_name] = found
    return out


def _dock_widgets(viewer, widgets) -> list[str]:
    available = available_widgets()
    docked = []
    for name in widgets or ():
        if name not in available:
            raise MedSegError(f"no dock widget called {name!r}; choose from "
                              f"{', '.join(sorted(available))}")
        if not available[name]:
            log.info("dock widget %r is not installed in this version; skipped", name)
            continue
        viewer.window.add_plugin_dock_widget(PLUGIN, name)
        docked.append(name)
    return docked


def _open(viewer, paths, sample) -> None:
    if sample:
        samples = {s.key for s in _manifest().contributions.sample_data or []}
        if sample not in samples:
            raise MedSegError(f"unknown sample {sample!r}; choose from "
                              f"{', '.join(sorted(samples))}")
        viewer.open_sample(PLUGIN, sample)
    for p in paths or ():
        if not Path(p).exists():
            raise MedSegError("no such file or folder; check the path", str(p))
        viewer.open(str(p), plugin=PLUGIN)


def save_screenshot(viewer, path) -> Path:
    """Render ``viewer`` (window with docks) and save it as a PNG at ``path``."""
    import imageio.v3 as iio
    from qtpy.QtWidgets import QApplication

    from .io.atomic import atomic_path

    for _ in range(3):
        QApplication.processEvents()
    rgba = viewer.screenshot(canvas_only=False, flash=False)
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        iio.imwrite(tmp, rgba, extension=".png")
        os.chmod(tmp, 0o644)
    log.info("screenshot saved to %s (%d x %d)", path, rgba.shape[1], rgba.shape[0])
    return path


def view(paths=(), sample: str | None = None, widgets=("Segment",),
         screenshot=None, ndisplay: int = 2, viewer=None, size=(1400, 860)):
    """Show volumes in napari with the napari-medseg dock widgets.

    Parameters
    ----------
    paths : sequence of str or Path
        Files or DICOM folders, opened with the napari-medseg reader.
    sample : str, optional
        A sample key (``"abdomen-ct"``, ``"head-mr"``) to open first.
    widgets : sequence of str
        Dock widgets to add, by display name; ones not installed are skipped
        with a log line.
    screenshot : str or Path, optional
        Save a PNG of the window there and close instead of running napari.
    ndisplay : {2, 3}
        Start in 2D slices or 3D rendering.
    viewer : napari.Viewer, optional
        Use this viewer instead of creating one (it is then not closed).
    size : tuple of 2 int
        Window width and height in pixels (for new viewers).

    Returns
    -------
    napari.Viewer or pathlib.Path
        The viewer once napari's event loop ends, or the screenshot path.

    Raises
    ------
    MedSegError
        For a missing path, an unknown sample or widget name.
    """
    import napari

    own = viewer is None
    if own:
        viewer = napari.Viewer(title="napari-medseg")
        viewer.window._qt_window.resize(*size)
    ok = False
    try:
        _open(viewer, paths, sample)
        _dock_widgets(viewer, widgets)
        viewer.dims.ndisplay = int(ndisplay)
        _center_slices(viewer)
        shot = save_screenshot(viewer, screenshot) if screenshot is not None else None
        ok = True
    finally:
        if own and (not ok or screenshot is not None):
            viewer.close()
    if shot is not None:
        return shot
    if own:
        napari.run()
    return viewer


def _center_slices(viewer) -> None:
    """Put the 2D slice through the middle of the volume and fit the view."""
    if not len(viewer.layers):
        return
    viewer.reset_view()
    viewer.dims.point = [(r.start + r.stop) / 2 for r in viewer.dims.range]
