"""Model files cannot write to disk, reach the network or read outside their package."""

from __future__ import annotations

import socket

import pytest
import torch

from napari_medseg.errors import MedSegError
from napari_medseg.models import load_model

from test_models_formats import _bundle
from test_models_loaders import save_torchscript_package

pytest.importorskip("monai")


def _no_network(monkeypatch):
    """Make any connection attempt fail loudly (a download would be caught)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model file tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_save_state_exploit_writes_nothing(tmp_path):
    """The exploit from issue 17: a bundle whose network_def calls save_state."""
    victim = tmp_path / "victim.txt"
    root = _bundle(tmp_path, network_def={
        "_target_": "monai.networks.utils.save_state",
        "src": {"weights": [1, 2, 3]}, "path": str(victim)})
    torch.save({}, root / "models" / "model.pt")
    with pytest.raises(MedSegError, match=r"refused _target_ 'monai.networks.utils.save_state'"):
        load_model(root)
    assert not victim.exists()


@pytest.mark.parametrize("target", [
    "monai.networks.utils.save_state", "save_state", "monai.networks.nets.resnet18",
    "monai.networks.nets.Transchex", "monai.apps.download_url", "os.system",
    "monai.networks.nets.HoVerNet", "monai.networks.blocks.UNet",
])
def test_only_listed_network_classes_are_built(tmp_path, target):
    root = _bundle(tmp_path, network_def={"_target_": target, "spatial_dims": 3})
    torch.save({}, root / "models" / "model.pt")
    with pytest.raises(MedSegError, match="refused _target_"):
        load_model(root)


@pytest.mark.parametrize("net, kw", [
    ("DenseNet121", {"pretrained": True}),
    ("monai.networks.nets.FlexibleUNet", {"pretrained": True, "backbone": "efficientnet-b0"}),
    ("EfficientNetBN", {"pretrained": "yes", "model_name": "efficientnet-b0"}),
])
def test_pretrained_downloads_are_refused(tmp_path, monkeypatch, net, kw):
    _no_network(monkeypatch)
    root = _bundle(tmp_path, network_def={"_target_": net, "spatial_dims": 3,
                                          "in_channels": 1, "out_channels": 2, **kw})
    torch.save({}, root / "models" / "model.pt")
    with pytest.raises(MedSegError, match="never downloads weights"):
        load_model(root)


def test_pretrained_false_is_fine(tmp_path, monkeypatch):
    from monai.networks.nets import DenseNet121

    _no_network(monkeypatch)
    root = _bundle(tmp_path, network_def={"_target_": "DenseNet121", "spatial_dims": 3,
                                          "in_channels": 1, "out_channels": 2,
                                          "pretrained": False})
    torch.manual_seed(0)
    torch.save(DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).state_dict(),
               root / "models" / "model.pt")
    assert isinstance(load_model(root).network, DenseNet121)


def test_file_reference_and_mode_are_refused(tmp_path):
    root = _bundle(tmp_path, network_def="%configs/other.json#net")
    torch.save({}, root / "models" / "model.pt")
    with pytest.raises(MedSegError, match="refers to another file"):
        load_model(root)
    root = _bundle(tmp_path / "b", network_def={"_target_": "UNet", "_mode_": "callable"})
    torch.save({}, root / "models" / "model.pt")
    with pytest.raises(MedSegError, match="_mode_"):
        load_model(root)


def test_symlink_escaping_a_package_is_refused(tmp_path):
    outside = tmp_path / "outside"
    folder = save_torchscript_package(outside / "real")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "card.yaml").write_bytes((folder / "card.yaml").read_bytes())
    (pkg / "model.ts").symlink_to(folder / "model.ts")  # weights outside the package
    with pytest.raises(MedSegError, match="points outside the model package"):
        load_model(pkg)
    # a link inside the package is fine
    (pkg / "model.ts").unlink()
    (pkg / "weights").mkdir()
    (pkg / "weights" / "model.ts").write_bytes((folder / "model.ts").read_bytes())
    (pkg / "model.ts").symlink_to(pkg / "weights" / "model.ts")
    assert load_model(pkg).card.name == "threshold"


def test_bundle_weights_symlinked_outside_are_refused(tmp_path):
    from monai.networks.nets import UNet

    root = _bundle(tmp_path)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
               num_res_units=1)
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save(net.state_dict(), elsewhere)
    (root / "models" / "model.pt").symlink_to(elsewhere)
    with pytest.raises(MedSegError, match="points outside the model package"):
        load_model(root)
    cfg = root / "configs" / "inference.json"
    (tmp_path / "inference.json").write_bytes(cfg.read_bytes())
    cfg.unlink()
    cfg.symlink_to(tmp_path / "inference.json")
    with pytest.raises(MedSegError, match="points outside the model package"):
        load_model(root)
