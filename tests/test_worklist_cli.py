"""``napari-medseg worklist DIR``: the status table, with predictions made ahead."""

from __future__ import annotations

import json

import numpy as np

from napari_medseg.cli import main
from napari_medseg.worklist import Worklist


def _phantoms(folder, n=2):
    from napari_medseg.core.phantom import make_abdomen_ct
    from napari_medseg.io import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, _ = make_abdomen_ct(seed=i, shape=(20, 56, 56), spacing=(2.5, 1.5, 1.5))
        write_volume(folder / f"p{i}.nii.gz", img.with_data(np.asarray(img.data, np.int16)))
    return folder


def test_worklist_table_and_json(tmp_path, capsys):
    root = _phantoms(tmp_path / "cases")
    with Worklist(root, annotator="ana") as wl:
        wl.claim("p1")
        wl.add_work("p1", seconds=120, edits=7)
    assert main(["worklist", str(root)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["case", "status", "annotator", "minutes", "edits",
                                "uncertainty", "training_case"]
    assert lines[1].split() == ["p0", "new", "0.0", "0"]
    assert lines[2].split() == ["p1", "in", "progress", "ana", "2.0", "7"]
    assert "2 cases: 1 new, 1 in progress" in err and "journal" in err
    assert main(["worklist", str(root), "--json", "--training-dir", str(tmp_path / "T")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["in progress"] == 1
    assert data["training_dir"] == str((tmp_path / "T").resolve())
    assert [r["case"] for r in data["cases"]] == ["p0", "p1"]


def test_worklist_predict_ahead_and_uncertainty_order(tmp_path, capsys):
    root = _phantoms(tmp_path / "cases")
    assert main(["worklist", str(root), "--predict", "abdomen-ct-small", "--device", "cpu",
                 "--order", "uncertainty", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["cases"]
    assert all(r["status"] == "predicted" for r in rows)
    unc = [r["uncertainty"] for r in rows]
    assert all(0 < u < 1 for u in unc) and unc == sorted(unc, reverse=True)
    with Worklist(root) as wl:
        case = wl.load_case("p0")
        assert case["prediction"].shape3 == case["images"][0].shape3
        assert np.asarray(case["prediction"].data).max() >= 1  # organs found
        assert case["uncertainty"] is not None
        assert case["record"].model == "abdomen-ct-small"


def test_worklist_predict_ahead_with_the_batch_runner(tmp_path, capsys):
    root = _phantoms(tmp_path / "cases")
    assert main(["worklist", str(root), "--predict", "abdomen-ct-small", "--workers", "1",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(r["status"] == "predicted" and 0 < r["uncertainty"] < 1 for r in data["cases"])
    with Worklist(root) as wl:
        batch = wl.work_dir / "batch"
        assert (batch / "p0.nii.gz").is_file() and (batch / "p0_uncertainty.nii.gz").is_file()
        assert (batch / "batch_summary.csv").is_file()
        case = wl.load_case("p1")
        assert case["uncertainty"].shape3 == case["images"][0].shape3
        assert case["record"].model == "abdomen-ct-small"
