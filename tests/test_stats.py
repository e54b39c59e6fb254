"""Per-class statistics against values computed by hand."""

import numpy as np
import pytest

from napari_medseg.core.stats import STAT_FIELDS, label_statistics
from napari_medseg.errors import MedSegError


def _labels():
    lab = np.zeros((10, 12, 14), np.uint8)
    lab[2:5, 3:7, 4:9] = 1          # 3*4*5 = 60 voxels
    lab[7:9, 1:3, 1:3] = 3          # two islands of label 3
    lab[0, 10, 12] = 3
    return lab


def test_counts_volumes_bbox_islands():
    lab = _labels()
    spacing = (2.5, 0.8, 0.6)
    rows = label_statistics(lab, spacing, names={1: "liver", 2: "spleen", 3: "kidney"})
    assert [r["label"] for r in rows] == [1, 2, 3]
    assert all(tuple(r) == STAT_FIELDS for r in rows)
    liver, spleen, kidney = rows
    assert liver["name"] == "liver" and liver["voxels"] == 60
    assert liver["volume_ml"] == pytest.approx(60 * 2.5 * 0.8 * 0.6 / 1000)
    assert liver["bbox"] == (2, 3, 4, 5, 7, 9)
    assert liver["islands"] == 1
    assert spleen["voxels"] == 0 and spleen["bbox"] is None and spleen["islands"] == 0
    assert kidney["voxels"] == 9 and kidney["islands"] == 2
    assert kidney["bbox"] == (0, 1, 1, 9, 11, 13)
    assert liver["mean"] is None


def test_intensity_mean_std_match_numpy(rng):
    lab = _labels()
    img = rng.normal(1000.0, 25.0, lab.shape).astype(np.float32)
    rows = label_statistics(lab, (1, 1, 1), image=img)
    for r in rows:
        vals = img[lab == r["label"]].astype(np.float64)
        assert r["mean"] == pytest.approx(vals.mean(), rel=1e-9)
        assert r["std"] == pytest.approx(vals.std(), rel=1e-6)
    assert rows[0]["name"] == "label 1"


def test_diagonal_voxels_are_one_island_with_full_connectivity():
    lab = np.zeros((3, 3, 3), np.uint16)
    lab[0, 0, 0] = lab[1, 1, 1] = 5
    assert label_statistics(lab, (1, 1, 1))[0]["islands"] == 1
    assert label_statistics(lab, (1, 1, 1), connectivity=1)[0]["islands"] == 2


def test_empty_and_errors():
    assert label_statistics(np.zeros((2, 2, 2), np.uint8), (1, 1, 1)) == []
    with pytest.raises(MedSegError):
        label_statistics(np.zeros((2, 2), np.uint8), (1, 1, 1))
    with pytest.raises(MedSegError):
        label_statistics(np.zeros((2, 2, 2), np.uint8), (1, 1, 1), image=np.zeros((3, 2, 2)))


def test_body_mask_from_ct_keeps_lungs_inside():
    from napari_medseg.core.stats import body_mask

    img = np.full((6, 40, 40), -1000.0, np.float32)     # air
    img[:, 5:35, 5:35] = 40.0                            # body
    img[:, 12:20, 12:20] = -850.0                        # lung inside the body
    img[:, 1, 1] = 500.0                                 # the table, apart from the body
    body = body_mask(img, modality="CT")
    assert body[:, 5:35, 5:35].all() and body.sum() == 6 * 30 * 30
    lab = np.zeros(img.shape, np.uint8)
    lab[2:4, 10:30, 10:30] = 1
    lab[0, 0, 0] = 1
    assert body_mask(labels=lab).sum() == 2 * 20 * 20


def test_label_qa_flags_empty_outside_and_corrections():
    from napari_medseg.core.stats import label_qa

    pred = np.zeros((6, 20, 20), np.uint8)
    pred[1:5, 5:15, 5:15] = 1
    pred[2, 2:4, 2:4] = 2
    cur = pred.copy()
    cur[2, 2:4, 2:4] = 0                                 # class 2 erased by the user
    cur[1:5, 5:15, 14] = 0                               # 40 voxels removed from class 1
    cur[0, 0, 0:3] = 1                                   # a stray mark outside the body
    body = np.zeros(cur.shape, bool)
    body[:, 3:17, 3:17] = True
    rows = {r["label"]: r for r in label_qa(cur, (1, 1, 1), names={1: "a", 2: "b", 3: "c"},
                                            prediction=pred, body=body)}
    assert rows[1]["corrected_voxels"] == 43 and rows[1]["outside_voxels"] == 3
    assert rows[1]["flags"] == ["3 voxels outside the body"]
    assert rows[1]["dice"] == pytest.approx(2 * 360 / (400 + 363))
    assert rows[2]["flags"] == ["empty"] and rows[2]["dice"] == 0.0
    assert rows[3]["flags"] == ["empty"] and rows[3]["corrected_voxels"] == 0
    assert rows[3]["dice"] is None


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint64])
def test_label_counts_equal_bincount_in_slabs_and_on_views(dtype):
    from napari_medseg.core.labelmap import label_counts

    rng = np.random.default_rng(3)
    lab = rng.integers(0, 7, size=(9, 40, 33)).astype(dtype)
    view = lab[:, ::-1].transpose(0, 2, 1)  # counted in memory order, not copied
    for arr in (lab, view):
        for minlength in (0, 3, 12):
            want = np.bincount(arr.ravel().astype(np.int64), minlength=minlength)
            got = label_counts(arr, minlength=minlength, chunk=1000)  # many uneven slabs
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(label_counts(np.zeros((4, 4, 4), dtype)), [64])
    assert label_counts(np.zeros((0, 3, 3), dtype)).size == 0
    np.testing.assert_array_equal(label_counts(np.zeros((0, 3, 3), dtype), minlength=4),
                                  np.zeros(4))
