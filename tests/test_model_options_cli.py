"""``--backend`` and ``--roi-subset`` from ``napari-medseg predict`` and ``batch``.

TotalSegmentator's weights-folder layout with tiny random-weight networks
(``_tiny_totalseg``); the command line is run in-process through ``main``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nnunetv2")

from napari_medseg.cli import main  # noqa: E402
from napari_medseg.core.volume import Volume, make_affine  # noqa: E402
from napari_medseg.io import read_volume, write_volume  # noqa: E402
from napari_medseg.models import load_model  # noqa: E402

from _tiny_totalseg import TOTALSEG_PARTS  # noqa: E402
from test_nnunet_native import _ct  # noqa: E402

ALL_NAMES = [n for _, _, names in TOTALSEG_PARTS.values() for n in names]


@pytest.fixture
def ct_file(tmp_path):
    vol = Volume(_ct((14, 24, 20), seed=3), make_affine((2.5, 1.8, 2.0), (-10, 5, 20)),
                 modality="CT")
    return write_volume(tmp_path / "ct.nii.gz", vol)


def test_predict_roi_subset_runs_only_those_classes(totalseg_env, ct_file, tmp_path, capsys):
    out = tmp_path / "roi.nii.gz"
    rc = main(["predict", str(ct_file), "-m", "total", "-o", str(out), "--device", "cpu",
               "--roi-subset", "liver", "aorta"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "native backend" in err
    got = np.asarray(read_volume(out).data)
    ids = {ALL_NAMES.index("liver") + 1, ALL_NAMES.index("aorta") + 1}
    assert set(np.unique(got).tolist()) <= ids | {0}
    # the same as the model's own roi run (the parts holding liver and aorta only)
    model = load_model("total")
    ref, info = model.run(read_volume(ct_file), device="cpu", roi_subset=["liver", "aorta"])
    assert info["parts_run"] == 2
    np.testing.assert_array_equal(got, ref)


def test_predict_reference_backend(totalseg_env, ct_file, tmp_path, capsys):
    out_ref, out_nat = tmp_path / "ref.nii.gz", tmp_path / "nat.nii.gz"
    assert main(["predict", str(ct_file), "-m", "total-fast", "-o", str(out_ref),
                 "--device", "cpu", "--backend", "nnunetv2"]) == 0
    assert "nnunetv2 backend" in capsys.readouterr().err
    assert main(["predict", str(ct_file), "-m", "total-fast", "-o", str(out_nat),
                 "--device", "cpu"]) == 0
    assert "native backend" in capsys.readouterr().err
    ref, nat = (np.asarray(read_volume(p).data) for p in (out_ref, out_nat))
    assert ref.shape == nat.shape and (ref == nat).mean() > 0.99


@pytest.mark.parametrize("args, expect", [
    (["-m", "total", "--roi-subset", "not_an_organ"], "no class(es) not_an_organ"),
    (["-m", "abdomen-ct-small", "--roi-subset", "liver"], "TotalSegmentator tasks only"),
    (["-m", "abdomen-ct-small", "--backend", "nnunetv2"], "drop --backend"),
])
def test_options_a_model_does_not_have_are_one_error_line(totalseg_env, ct_file, tmp_path, capsys,
                                                          args, expect):
    out = tmp_path / "x.nii.gz"
    rc = main(["predict", str(ct_file), "-o", str(out), "--device", "cpu", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expect in err[0], err
    assert not out.exists()


def test_batch_roi_subset(totalseg_env, ct_file, tmp_path, capsys):
    outdir = tmp_path / "out"
    rc = main(["batch", str(ct_file), "-m", "total", "-o", str(outdir), "--roi-subset",
               "liver"])
    assert rc == 0, capsys.readouterr().err
    got = np.asarray(read_volume(outdir / "ct.nii.gz").data)
    assert set(np.unique(got).tolist()) <= {0, ALL_NAMES.index("liver") + 1}
    ref, _ = load_model("total").run(read_volume(ct_file), device="cpu",
                                     roi_subset=["liver"])
    # the batch worker runs in another process with its own thread count: the random
    # weights leave near-ties whose argmax may flip with the order of float sums
    assert (got != ref).mean() < 1e-3, int((got != ref).sum())
