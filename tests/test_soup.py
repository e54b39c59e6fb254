"""The weight average of model packages (napari_medseg.training.soup)."""

import numpy as np
import pytest
import torch

from napari_medseg.errors import MedSegError
from napari_medseg.models import load_model
from napari_medseg.models.card import ModelCard
from napari_medseg.models.networks import UNet3D
from napari_medseg.training.soup import main, make_soup


def _package(folder, seed, features=(4, 8), classes=3):
    torch.manual_seed(seed)
    net = UNet3D(1, classes, features)
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "model.pt")
    ModelCard(name="tiny", version="1.0.0", format="state_dict", weights="model.pt",
              network={"class": "UNet3D", "kwargs": {"in_channels": 1,
                                                     "out_channels": classes,
                                                     "features": list(features)}},
              patch_size=(16, 16, 16), classes={i: {"name": f"c{i}"} for i in range(1, classes)},
              metrics={"real": [{"scans": ["x"], "reference": "manual", "dice": {"c1": 0.5}}]},
              training="trained somehow.").save(folder / "card.yaml")
    return folder, net.state_dict()


def test_soup_is_the_mean_and_loads_and_runs(tmp_path):
    a, sa = _package(tmp_path / "a", 0)
    b, sb = _package(tmp_path / "b", 1)
    c, sc = _package(tmp_path / "c", 2)
    out = make_soup([a, b, c], tmp_path / "soup", version="1.1.0")
    model = load_model(out)
    got = torch.load(out / "model.pt", weights_only=True)
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(got[k], (sa[k] + sb[k] + sc[k]) / 3)
    assert not torch.equal(got["head.weight"], sa["head.weight"])
    card = model.card
    assert card.version == "1.1.0" and card.metrics == {}  # the first package's figures go
    assert "model soup" in card.training and "a (tiny 1.0.0)" in card.training
    from napari_medseg.core.volume import Volume, make_affine

    img = Volume(np.random.default_rng(0).normal(size=(16, 20, 20)).astype(np.float32),
                 make_affine((1.0, 1.0, 1.0)))
    assert model.predict(img, device="cpu").labels.data.shape == (16, 20, 20)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_soup_refuses_mismatched_or_unsafe_packages(tmp_path, capsys):
    a, _ = _package(tmp_path / "a", 0)
    wide, _ = _package(tmp_path / "wide", 1, features=(8, 16))
    with pytest.raises(MedSegError, match="one network"):
        make_soup([a, wide], tmp_path / "s1")
    with pytest.raises(MedSegError, match="at least two"):
        make_soup([a], tmp_path / "s2")
    # a pickle that would run code is refused by weights_only loading
    evil, _ = _package(tmp_path / "evil", 2)

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Boom()}, evil / "model.pt")
    with pytest.raises(MedSegError, match="refused to load: the weights file contains pickled"):
        make_soup([a, evil], tmp_path / "s3")
    assert "ran" not in capsys.readouterr().out
    # weights named outside the package folder are refused, as for any package
    out_pkg, _ = _package(tmp_path / "outside", 4)
    card = ModelCard.load(out_pkg / "card.yaml")
    card.weights = "../a/model.pt"
    card.save(out_pkg / "card.yaml")
    with pytest.raises(MedSegError, match="points outside the model package"):
        make_soup([a, out_pkg], tmp_path / "s4")
    assert not any((tmp_path / n).exists() for n in ("s1", "s3", "s4"))
    # an existing output is kept unless --overwrite
    b, _ = _package(tmp_path / "b", 3)
    (tmp_path / "taken").mkdir()
    assert main([str(a), str(b), "--out", str(tmp_path / "taken")]) == 1
    assert "exists" in capsys.readouterr().err
    assert main([str(a), str(b), "--out", str(tmp_path / "taken"), "--overwrite"]) == 0
    assert (tmp_path / "taken" / "card.yaml").is_file()
