"""The napari-medseg command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_medseg.io import read_volume, write_volume

from test_models_loaders import box_volume, save_torchscript_package, threshold_card


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture
def image(tmp_path):
    vol, truth = box_volume()
    path = write_volume(tmp_path / "box.nii.gz", vol)
    return path, vol, truth


def test_predict_end_to_end(tmp_path, image):
    path, vol, truth = image
    pkg = save_torchscript_package(tmp_path / "pkg")
    out = tmp_path / "seg.nrrd"
    unc = tmp_path / "unc.nii.gz"
    r = run_cli("predict", path, "-m", pkg, "-o", out, "--uncertainty", unc, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "windows" not in r.stdout and "[" in r.stderr and "wrote" in r.stderr
    lab = read_volume(out)
    assert lab.shape3 == vol.shape3
    np.testing.assert_allclose(lab.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(lab.data), truth.astype(np.uint8))
    u = read_volume(unc)
    assert u.shape3 == vol.shape3 and float(np.asarray(u.data).max()) <= 1.0

    # an existing output is not replaced without --overwrite
    r = run_cli("predict", path, "-m", pkg, "-o", out)
    assert r.returncode == 2 and "exists" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("case", ["unknown-model", "missing-file", "unreadable", "channels",
                                  "nans"])
def test_bad_inputs_exit_2_with_one_line(tmp_path, image, case):
    path, vol, _ = image
    pkg = save_torchscript_package(tmp_path / "pkg")
    model, inputs = str(pkg), [path]
    if case == "unknown-model":
        model = "no-such-model"
    elif case == "missing-file":
        inputs = [tmp_path / "nothing.nii.gz"]
    elif case == "unreadable":
        bad = tmp_path / "broken.nii.gz"
        bad.write_bytes(b"not a nifti file at all")
        inputs = [bad]
    elif case == "channels":
        inputs = [path, path]
    elif case == "nans":
        data = np.asarray(vol.data).copy()
        data[1, 1, 1] = np.nan
        inputs = [write_volume(tmp_path / "nan.nii.gz", vol.with_data(data))]
    out = tmp_path / "out.nii.gz"
    r = run_cli("predict", *inputs, "-m", model, "-o", out)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("napari-medseg: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not (tmp_path / ".napari-medseg-tmp").exists()  # no temporary left behind


def test_models_listing(tmp_path):
    user = tmp_path / "models"
    save_torchscript_package(user / "thr", threshold_card(name="cli-threshold"))
    import os

    env = dict(os.environ, NAPARI_MEDSEG_MODELS=str(user))
    r = run_cli("models", "--json", env=env)
    assert r.returncode == 0, r.stderr
    listed = {m["name"]: m for m in json.loads(r.stdout)}
    assert listed["cli-threshold"]["source"] == "user"
    assert listed["cli-threshold"]["card"]["classes"]["1"]["name"] == "bright"
    r = run_cli("models", env=env)
    assert r.returncode == 0 and "cli-threshold" in r.stdout


def test_cli_module_imports_no_gui():
    code = ("import sys, napari_medseg.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('napari', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6', 'magicgui', 'torch')]; "
            "print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_predict_precision(tmp_path, image):
    """``--precision`` sets the network's autocast and says what ran; a model whose
    run it does not steer refuses it in one line."""
    from napari_medseg.errors import MedSegError
    from napari_medseg.models.predictor import Model
    from napari_medseg.models.run import set_model_options

    path, vol, truth = image
    pkg = save_torchscript_package(tmp_path / "pkg")
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"seg_{precision}.nii.gz"
        r = run_cli("predict", path, "-m", pkg, "-o", out, "--device", "cpu",
                    "--precision", precision)
        assert r.returncode == 0, r.stderr
        assert f" in {precision} (" in r.stderr
        np.testing.assert_array_equal(np.asarray(read_volume(out).data), truth.astype(np.uint8))
    r = run_cli("predict", path, "-m", pkg, "-o", tmp_path / "x.nii.gz", "--precision", "fp8")
    assert r.returncode == 2 and "fp8" in r.stderr
    with pytest.raises(MedSegError, match="drop --precision"):
        set_model_options(Model(threshold_card()), precision="fp32")
