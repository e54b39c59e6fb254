"""The command line writes DICOM SEG and RTSTRUCT for a DICOM series input."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("highdicom")

from napari_medseg.io import read_volume  # noqa: E402
from napari_medseg.io.dicom_objects import read_dicom_seg, read_rtstruct  # noqa: E402
from test_cli import run_cli  # noqa: E402
from test_export_dicomseg import _write_series  # noqa: E402
from test_models_loaders import save_torchscript_package  # noqa: E402


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    _write_series(folder, (1, 0, 0, 0, 1, 0), 2.5)
    return folder


def test_predict_writes_seg_and_rtstruct_of_a_dicom_series(tmp_path, series):
    pkg = save_torchscript_package(tmp_path / "pkg")
    ref = tmp_path / "ref.nii.gz"
    assert run_cli("predict", series, "-m", pkg, "-o", ref, "--device", "cpu").returncode == 0
    expect = np.asarray(read_volume(ref).data)
    assert expect.any()
    img = read_volume(series)

    r = run_cli("predict", series, "-m", pkg, "-o", tmp_path / "seg.dcm", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    [seg] = read_dicom_seg(tmp_path / "seg.dcm", reference=img)
    np.testing.assert_array_equal(seg.data > 0, expect > 0)
    assert seg.label_names == {1: "bright"}

    r = run_cli("predict", series, "-m", pkg, "-o", tmp_path / "rt.dcm", "--dicom-kind",
                "rtstruct", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    [rt] = read_rtstruct(tmp_path / "rt.dcm", reference=img)
    np.testing.assert_array_equal(rt.data, expect)


def test_dcm_output_of_a_nifti_input_is_refused_before_the_model_loads(tmp_path):
    from test_models_loaders import box_volume

    from napari_medseg.io import write_volume

    path = write_volume(tmp_path / "box.nii.gz", box_volume()[0])
    # the model does not exist: the output check must come first
    r = run_cli("predict", path, "-m", "no-such-model", "-o", tmp_path / "x.dcm")
    assert r.returncode == 2
    assert "x.dcm" in r.stderr and "DICOM series" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
