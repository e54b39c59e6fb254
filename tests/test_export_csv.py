"""Per-class statistics CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_medseg.core.ledger import CorrectionLedger
from napari_medseg.errors import MedSegError
from napari_medseg.io.export import STAT_COLUMNS, write_statistics_csv
from napari_medseg.io.export.csvstats import SHAPE_COLUMNS


def _data():
    lab = np.zeros((5, 8, 9), np.uint8)
    lab[1:3, 2:5, 1:4] = 1          # 2*3*3 = 18 voxels
    lab[4, 7, 8] = 3                # one voxel, far corner
    img = np.arange(lab.size, dtype=np.float32).reshape(lab.shape)
    return lab, img


def test_csv_has_volumes_intensities_and_boxes(tmp_path):
    lab, img = _data()
    spacing = (2.0, 0.5, 1.5)  # 1.5 mm^3 per voxel
    out = write_statistics_csv(tmp_path / "stats.csv", lab, spacing, image=img,
                               names={1: "liver", 2: "spleen", 3: "lesion"})
    rows = list(csv.DictReader(out.open()))
    # the statistics, then the shape columns (tests/test_shape.py checks their values)
    assert list(rows[0].keys()) == list(STAT_COLUMNS) + list(SHAPE_COLUMNS)
    assert float(rows[0]["surface_mm2"]) > 0 and rows[0]["centroid_r"] != ""
    by = {int(r["label"]): r for r in rows}
    assert by[1]["name"] == "liver" and int(by[1]["voxels"]) == 18
    assert float(by[1]["volume_ml"]) == pytest.approx(18 * 1.5 / 1000)
    inside = img[lab == 1]
    assert float(by[1]["mean"]) == pytest.approx(inside.mean(), rel=1e-5)
    assert float(by[1]["std"]) == pytest.approx(inside.std(), rel=1e-5)
    assert [int(by[1][k]) for k in STAT_COLUMNS[7:]] == [1, 2, 1, 3, 5, 4]
    assert int(by[2]["voxels"]) == 0 and by[2]["mean"] == "" and by[2]["bbox_z0"] == ""
    assert [int(by[3][k]) for k in STAT_COLUMNS[7:]] == [4, 7, 8, 5, 8, 9]


def test_csv_with_ledger_columns(tmp_path):
    lab, img = _data()
    pred = lab.copy()
    pred[1, 2, 1] = 0
    led = CorrectionLedger(pred, (1, 1, 1), {1: "liver"})
    out = write_statistics_csv(tmp_path / "s.csv", lab, (1, 1, 1), ledger=led)
    row = next(r for r in csv.DictReader(out.open()) if r["label"] == "1")
    assert int(row["added_voxels"]) == 1 and int(row["removed_voxels"]) == 0
    assert float(row["dice"]) == pytest.approx(2 * 17 / 35, rel=1e-5)


def test_existing_csv_is_not_replaced_without_overwrite(tmp_path):
    lab, _ = _data()
    target = tmp_path / "s.csv"
    target.write_text("keep me")
    with pytest.raises(MedSegError, match="exists"):
        write_statistics_csv(target, lab, (1, 1, 1))
    assert target.read_text() == "keep me"
    write_statistics_csv(target, lab, (1, 1, 1), overwrite=True)
    assert target.read_text().startswith("label,name")


def test_shape_mismatch_leaves_no_file(tmp_path):
    lab, img = _data()
    with pytest.raises(MedSegError, match="does not match"):
        write_statistics_csv(tmp_path / "s.csv", lab, (1, 1, 1), image=img[:2])
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_a_clear_error(tmp_path):
    lab, _ = _data()
    with pytest.raises(MedSegError, match="does not exist"):
        write_statistics_csv(tmp_path / "nope" / "s.csv", lab, (1, 1, 1))
