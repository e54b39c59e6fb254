"""Model cards: round trips through YAML and JSON, validation messages."""

from __future__ import annotations

import pytest

from napari_medseg.errors import MedSegError
from napari_medseg.models.card import ModelCard, read_card


def _card(**kw):
    base = dict(
        name="demo", version="1.2.0", task="organs", license="MIT",
        channels=[{"name": "CT", "modality": "CT"}], target_spacing=[3, 1.5, 1.5],
        orientation="lps", normalization=[{"kind": "ct", "window": [-200, 300]}],
        patch_size=[32, 64, 64], classes={1: {"name": "liver", "color": [1, 0, 0]}, "2": "spleen"},
        training="synthetic", metrics={"dice": {"liver": 0.95}}, weights="model.pt",
        network={"class": "UNet3D", "kwargs": {"in_channels": 1, "out_channels": 3}},
    )
    base.update(kw)
    return ModelCard(**base)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    card = _card()
    path = card.save(tmp_path / f"card{suffix}")
    back = read_card(path)
    assert back == card
    assert back.to_dict() == card.to_dict()
    assert back.orientation == "LPS"
    assert back.target_spacing == (3.0, 1.5, 1.5)
    assert back.n_classes == 3 and back.label_names == {1: "liver", 2: "spleen"}
    assert len(back.label_colors[2]) == 3  # default colour filled in


def test_unknown_keys_kept_in_extra(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\nauthor: someone\n")
    card = read_card(tmp_path / "c.yaml")
    assert card.extra == {"author": "someone"}
    assert read_card(card.save(tmp_path / "d.yaml")).extra == {"author": "someone"}


@pytest.mark.parametrize("change, words", [
    ({"target_spacing": [1, 2]}, "target_spacing"),
    ({"target_spacing": [1, -2, 1]}, "positive"),
    ({"orientation": "LLS"}, "orientation"),
    ({"normalization": [{"kind": "ct"}]}, "window"),
    ({"normalization": [{"kind": "magic"}]}, "normalization"),
    ({"classes": {0: "background"}}, "class id 0"),
    ({"classes": {1: {"name": "a", "color": [2, 0, 0]}}}, "colour"),
    ({"format": "pickle"}, "format"),
    ({"channels": []}, "channels"),
])
def test_invalid_cards_are_explained(change, words):
    with pytest.raises(MedSegError, match=words):
        _card(**change)


def test_bad_files(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(MedSegError, match="broken.yaml.*not valid YAML"):
        read_card(tmp_path / "broken.yaml")
    (tmp_path / "noname.json").write_text('{"version": "1"}')
    with pytest.raises(MedSegError, match="no 'name'"):
        read_card(tmp_path / "noname.json")
    with pytest.raises(MedSegError, match="cannot read"):
        read_card(tmp_path / "missing.yaml")
