"""The npe2 manifest, File > Open Sample in a real viewer, and the launcher."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_medseg.core.phantom import ABDOMEN_LABELS, HEAD_LABELS


def test_npe2_validate():
    res = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-medseg"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in (res.stdout + res.stderr).lower()


def test_manifest_contributions():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("napari-medseg")
    c = mf.contributions
    assert c.readers and c.readers[0].accepts_directories
    assert any(".nii.gz" in w.filename_extensions for w in c.writers)
    assert {s.key for s in c.sample_data} == {"abdomen-ct", "head-mr"}
    assert {"Segment", "Correct"} <= {w.display_name for w in c.widgets}
    # every command points at a real module path pattern
    assert all(cmd.python_name.startswith("napari_medseg.") for cmd in c.commands)


@pytest.mark.parametrize("key, names, spacing", [
    ("abdomen-ct", ABDOMEN_LABELS, (2.5, 1.5, 1.5)),
    ("head-mr", HEAD_LABELS, (1.5, 1.2, 1.2)),
])
def test_open_sample_in_viewer(make_napari_viewer, key, names, spacing):
    from napari.layers import Image, Labels

    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", key)
    assert [type(lyr) for lyr in viewer.layers] == [Image, Labels]
    img, lab = viewer.layers
    np.testing.assert_allclose(img.scale, spacing, rtol=1e-6)
    np.testing.assert_allclose(lab.scale, img.scale)
    np.testing.assert_allclose(lab.translate, img.translate)
    assert img.units[0] == "mm" or str(img.units[0]) in ("mm", "millimeter")
    feats = lab.features
    got = dict(zip(feats["index"], feats["name"]))
    assert {k: got[k] for k in names} == names
    assert set(np.unique(np.asarray(lab.data))) == {0, *names}
    # our label colours, not napari's random ones
    c1 = lab.colormap.map(np.array([1]))[0]
    assert c1[3] > 0.9 and not np.allclose(c1[:3], lab.colormap.map(np.array([2]))[0][:3])


def test_open_sample_patient_right_is_screen_left(make_napari_viewer):
    """Radiological display: the liver (patient's right) is on the left of the screen."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "abdomen-ct")
    lab = viewer.layers[1]
    zz, yy, xx = np.nonzero(np.asarray(lab.data) == 1)
    world = np.array([lab.data_to_world((z, y, x)) for z, y, x in
                      zip(zz[::500], yy[::500], xx[::500])])
    liver_w2 = world[:, 2].mean()  # napari's last world axis is the screen's x
    zz, yy, xx = np.nonzero(np.asarray(lab.data) == 2)
    spleen_w2 = np.mean([lab.data_to_world((z, y, x))[2] for z, y, x in
                         zip(zz[::100], yy[::100], xx[::100])])
    assert liver_w2 < spleen_w2


def test_launch_view_screenshot(make_napari_viewer, tmp_path):
    import imageio.v3 as iio

    from napari_medseg.launch import view

    viewer = make_napari_viewer()
    out = view(sample="head-mr", widgets=(), screenshot=tmp_path / "shot.png", viewer=viewer)
    assert out == tmp_path / "shot.png"
    rgba = iio.imread(out)
    assert rgba.ndim == 3 and rgba.shape[0] > 100 and rgba.shape[1] > 100
    assert rgba[..., :3].std() > 10  # not a blank window
    assert len(viewer.layers) == 2
    # the slider sits in the middle of the volume
    assert abs(viewer.dims.point[0] - np.mean(viewer.layers[0].extent.world[:, 0])) < 3


def test_launch_view_paths_and_docks(make_napari_viewer, tmp_path):
    from napari_medseg.data import SAMPLES
    from napari_medseg.launch import available_widgets, view

    viewer = make_napari_viewer()
    img_path, seg_path = SAMPLES["abdomen-ct"].paths()
    wanted = tuple(n for n, ok in available_widgets().items() if ok)[:1]
    view([img_path, seg_path], widgets=wanted, screenshot=tmp_path / "s.png", viewer=viewer)
    assert len(viewer.layers) == 2
    assert type(viewer.layers[1]).__name__ == "Labels"
    for name in wanted:
        assert any(name in key for key in viewer.window.dock_widgets)


def test_launch_view_errors(make_napari_viewer, tmp_path):
    from napari_medseg.errors import MedSegError
    from napari_medseg.launch import view

    viewer = make_napari_viewer()
    with pytest.raises(MedSegError, match="knee"):
        view(sample="knee", widgets=(), viewer=viewer, screenshot=tmp_path / "x.png")
    with pytest.raises(MedSegError, match="missing.nii.gz"):
        view([tmp_path / "missing.nii.gz"], widgets=(), viewer=viewer,
             screenshot=tmp_path / "x.png")
    with pytest.raises(MedSegError, match="Nonexistent"):
        view(widgets=("Nonexistent",), viewer=viewer, screenshot=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
