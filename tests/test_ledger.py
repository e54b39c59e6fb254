"""Correction ledger: added/removed voxels, Dice, changed region, save/load."""

import json

import numpy as np
import pytest

from napari_medseg.core.ledger import CorrectionLedger
from napari_medseg.errors import MedSegError
from napari_medseg.io.ledger import save_ledger


def _case():
    pred = np.zeros((8, 10, 12), np.uint8)
    pred[1:5, 2:6, 2:6] = 1      # 64 voxels
    pred[5:7, 7:9, 8:11] = 2     # 12 voxels
    cur = pred.copy()
    cur[1, 2:6, 2:6] = 0         # user erases 16 voxels of class 1
    cur[5:7, 7:9, 11] = 2        # grows class 2 by 4 voxels
    cur[0, 0, 0] = 3             # paints a new class
    return pred, cur


def test_summary_matches_brute_force():
    pred, cur = _case()
    spacing = (3.0, 0.5, 0.5)
    led = CorrectionLedger(pred, spacing, {1: "liver", 2: "spleen", 4: "lesion"})
    rows = {r["label"]: r for r in led.summary(cur)}
    assert sorted(rows) == [1, 2, 3, 4]
    for k, r in rows.items():
        p, c = pred == k, cur == k
        assert r["predicted_voxels"] == p.sum() and r["current_voxels"] == c.sum()
        assert r["added_voxels"] == (c & ~p).sum()
        assert r["removed_voxels"] == (p & ~c).sum()
        assert r["corrected_voxels"] == r["added_voxels"] + r["removed_voxels"]
        denom = p.sum() + c.sum()
        if denom:
            assert r["dice"] == pytest.approx(2 * (p & c).sum() / denom)
        else:
            assert r["dice"] is None
    assert rows[1]["removed_ml"] == pytest.approx(16 * 3.0 * 0.25 / 1000)
    assert rows[1]["changed_bbox"] == (1, 2, 2, 2, 6, 6)
    assert rows[2]["changed_bbox"] == (5, 7, 11, 7, 9, 12)
    assert rows[4]["name"] == "lesion" and rows[4]["dice"] is None
    tot = led.totals(cur)
    assert tot["changed_voxels"] == int((pred != cur).sum()) == 21
    assert tot["changed_bbox"] == led.changed_region(cur) == (0, 0, 0, 7, 9, 12)


def test_unchanged_labels_have_dice_one_and_no_region():
    pred, _ = _case()
    led = CorrectionLedger(pred, (1, 1, 1))
    assert all(r["dice"] == 1.0 and r["corrected_voxels"] == 0 for r in led.summary(pred))
    assert led.changed_region(pred) is None


def test_prediction_is_protected_and_shape_checked():
    pred, cur = _case()
    led = CorrectionLedger(pred, (1, 1, 1))
    with pytest.raises(ValueError):
        led.prediction[0, 0, 0] = 9
    with pytest.raises(MedSegError):
        led.summary(cur[:-1])


def test_ledger_of_a_model_output_layer(make_napari_viewer):
    """The boundary builds the ledger from the prediction and card kept on a layer."""
    from napari_medseg._napari.boundary import ledger_of, store_prediction
    from napari_medseg.models.card import ModelCard

    pred, cur = _case()
    viewer = make_napari_viewer()
    layer = viewer.add_labels(cur.copy())
    assert ledger_of(layer, (1, 1, 1)) is None
    store_prediction(layer, pred.copy(), ModelCard(name="abdomen-ct-small", version="1.2"))
    led = ledger_of(layer, (1, 1, 1))
    assert led.meta == {"model": "abdomen-ct-small", "model_version": "1.2"}
    assert led.totals(layer.data)["changed_voxels"] == 21


def test_save_load_roundtrip(tmp_path):
    pred, cur = _case()
    led = CorrectionLedger(pred, (3.0, 0.5, 0.5), {1: "liver"}, meta={"model": "m"})
    folder = save_ledger(led, tmp_path / "case_000", current=cur)
    info = json.loads((folder / "ledger.json").read_text())
    assert info["totals"]["changed_voxels"] == 21
    assert {r["label"] for r in info["summary"]} == {1, 2, 3}
    back = CorrectionLedger.load(folder)
    np.testing.assert_array_equal(back.prediction, pred)
    assert back.prediction.dtype == pred.dtype
    assert back.spacing == (3.0, 0.5, 0.5) and back.names == {1: "liver"}
    assert back.meta == {"model": "m"}
    np.testing.assert_array_equal(CorrectionLedger.load_current(folder), cur)
    assert not list(folder.glob(".*part*"))


def test_load_bad_folder(tmp_path):
    with pytest.raises(MedSegError):
        CorrectionLedger.load(tmp_path)
