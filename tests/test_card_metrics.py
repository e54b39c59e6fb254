"""Model cards keep real-scan figures apart from phantom scores; old cards keep loading."""

from __future__ import annotations

import json

import pytest

from napari_medseg.errors import MedSegError
from napari_medseg.models.card import ModelCard, card_from_text, metric_lines
from napari_medseg.models.registry import BUILTIN_DIR


def test_legacy_dice_is_read_as_synthetic():
    card = card_from_text("name: old\nmetrics: {dice: {liver: 0.97}, held_out: {cases: 8}}\n",
                          "old.yaml")
    assert card.synthetic_metrics == {"dice": {"liver": 0.97}, "held_out": {"cases": 8}}
    assert card.real_metrics == []
    assert metric_lines(card.metrics) == ["synthetic (phantom) dice: liver 0.97"]


def test_fine_tuned_legacy_card_is_real_on_corrected_labels():
    card = ModelCard(name="ft", metrics={
        "fine_tune": {"loss_first": 1.0}, "dice": {"liver": 0.9}, "dice_before": {"liver": 0.8},
        "held_out": {"cases": ["case_001"], "reference": "corrected labels"}})
    assert card.synthetic_metrics == {}
    [entry] = card.real_metrics
    assert entry["scans"] == ["case_001"] and entry["reference"] == "corrected labels"
    assert metric_lines(card.metrics)[0].startswith("real dice (case_001; reference: "
                                                    "corrected labels)")


def test_new_layout_lists_real_first_and_round_trips(tmp_path):
    card = ModelCard(name="new", body_region="Abdomen", plausible_ml={"liver": [100, 5000]},
                     metrics={"synthetic": {"dice": {"liver": 0.97}},
                              "real": [{"scans": "ct_1", "reference": "manual",
                                        "dice": {"liver": 0.9}}]})
    assert card.body_region == "abdomen"
    assert card.real_metrics[0]["scans"] == ["ct_1"]
    lines = metric_lines(card.metrics)
    assert lines[0] == "real dice (ct_1; reference: manual): liver 0.90"
    assert lines[1] == "synthetic (phantom) dice: liver 0.97"
    back = ModelCard.load(card.save(tmp_path / "card.yaml"))
    assert back.plausible_ml == {"liver": (100.0, 5000.0)}
    assert back.real_metrics == card.real_metrics and back.body_region == "abdomen"
    json.loads(card.to_json())


@pytest.mark.parametrize("bad", [
    {"body_region": "elbow"},
    {"plausible_ml": {"liver": [500, 100]}},
    {"plausible_ml": {"liver": "big"}},
    {"metrics": {"real": [{"scans": ["a"], "dice": {"liver": 0.9}}]}},  # no reference
    {"metrics": {"real": [{"scans": ["a"], "reference": "manual", "dice": {"liver": "x"}}]}},
    {"metrics": {"synthetic": [0.9]}},
    {"train_patch_size": [32, 0, 64]},
    {"train_patch_size": [32, 64]},
    {"default_overlap": 0.95},
    {"default_overlap": -0.1},
    {"default_overlap": "half"},
    {"default_overlap": True},
])
def test_bad_new_fields_are_one_line_errors(bad):
    with pytest.raises(MedSegError) as err:
        ModelCard(name="bad", **bad)
    assert "\n" not in str(err.value)


def test_builtin_card_separates_real_from_synthetic():
    from napari_medseg.models.card import read_card

    card = read_card(BUILTIN_DIR / "abdomen-ct-small" / "card.yaml")
    assert card.body_region == "abdomen" and card.plausible_ml
    cases = {s for e in card.real_metrics for s in e["scans"]}
    assert {"ct_abdomen_dicom", "spleen_ct"} <= cases
    assert card.synthetic_metrics["dice"]["liver"] >= 0.9
    lines = metric_lines(card.metrics)
    first_synthetic = next(i for i, t in enumerate(lines) if t.startswith("synthetic"))
    assert all(t.startswith("real") for t in lines[:first_synthetic])


def test_cli_models_shows_real_first(capsys):
    from napari_medseg.cli import main

    assert main(["models"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("abdomen-ct-small"):]
    assert block.index("real dice") < block.index("synthetic (phantom) dice")
    assert main(["models", "--json"]) == 0
    entry = next(e for e in json.loads(capsys.readouterr().out)
                 if e["name"] == "abdomen-ct-small")
    keys = list(entry)
    assert keys.index("metrics_real") < keys.index("metrics_synthetic")
    assert entry["metrics_real"][0]["reference"].startswith("TotalSegmentator output")
    assert entry["body_region"] == "abdomen"
