"""Every napari-medseg dock open on a 1600 x 1000 screen: the window fits, tables show 8 rows."""

from __future__ import annotations

from qtpy.QtWidgets import QApplication, QDockWidget

from napari_medseg.launch import available_widgets


def _settle(qtbot):
    for _ in range(5):
        QApplication.processEvents()
        qtbot.wait(20)


def test_all_docks_fit_the_screen_and_tables_show_eight_rows(make_napari_viewer, qtbot,
                                                             tmp_path):
    screen = QApplication.primaryScreen().availableGeometry()
    assert (screen.width(), screen.height()) == (1600, 1000)  # pytest-xvfb settings
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-medseg", "abdomen-ct")
    names = [n for n, ok in available_widgets().items() if ok]
    assert len(names) >= 6
    widgets = {}
    for n in names:
        _, widgets[n] = viewer.window.add_plugin_dock_widget("napari-medseg", n)
        _settle(qtbot)
    main = viewer.window._qt_window
    frame = main.frameGeometry()
    assert frame.height() <= screen.height() and frame.width() <= screen.width()
    assert screen.contains(frame.topLeft()) and screen.contains(frame.bottomRight())
    ours = [d for d in main.findChildren(QDockWidget) if "(napari-medseg)" in d.windowTitle()]
    assert len(ours) == len(names)
    assert len(main.tabifiedDockWidgets(ours[0])) == len(names) - 1  # one tab group
    # each table, when its tab is shown, has room for at least 8 rows
    for dock_name, table in (("Segment", widgets["Segment"].class_panel.table),
                             ("Label QA", widgets["Label QA"].table)):
        dock = next(d for d in ours if d.windowTitle().startswith(dock_name))
        dock.raise_()
        _settle(qtbot)
        rows = ((table.viewport().height()) // table.verticalHeader().defaultSectionSize())
        assert rows >= 8, (dock_name, table.viewport().height())
    from napari_medseg.launch import save_screenshot

    save_screenshot(viewer, tmp_path / "docks.png")
