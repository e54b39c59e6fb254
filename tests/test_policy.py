"""The inference policy: one function per decision, used by the widget, the CLI and models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_medseg.core import policy
from napari_medseg.core.convs import onednn_convolutions, plain_conv
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError
from napari_medseg.io import write_volume

from test_models_loaders import box_volume, threshold_card


class OutOfMemoryNet(torch.nn.Module):
    """A network that fails the way a too-large run fails on a GPU."""

    def forward(self, x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x


def _oom_package(folder):
    folder.mkdir(parents=True)
    torch.jit.script(OutOfMemoryNet()).save(str(folder / "model.ts"))
    threshold_card(name="oom").save(folder / "card.yaml")
    return folder


def test_cli_prints_the_out_of_memory_hint(tmp_path):
    vol, _ = box_volume()
    img = write_volume(tmp_path / "box.nii.gz", vol)
    pkg = _oom_package(tmp_path / "pkg")
    out = tmp_path / "seg.nii.gz"
    r = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "predict", str(img), "-m",
                        str(pkg), "-o", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr
    assert policy.OOM_HINT in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_run_model_maps_torch_out_of_memory():
    from napari_medseg.models.predictor import TorchModel
    from napari_medseg.models.run import run_model

    class TorchOOM(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory")

    vol, _ = box_volume()
    model = TorchModel(threshold_card(format="state_dict"), TorchOOM())
    with pytest.raises(MedSegError, match="out of memory; try a smaller region") as info:
        run_model(model, [vol], name="ct-layer", device="cpu")
    assert str(info.value).startswith("ct-layer: ")


def test_out_of_memory_detection():
    assert policy.is_out_of_memory(MemoryError())
    assert policy.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert policy.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not policy.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not policy.is_out_of_memory(ValueError("out of memory"))


def test_mirror_tta_averages_flips_back():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    calls = []

    def fn(t):
        calls.append(t.clone())
        return t * 2
    out = policy.mirror_tta(fn, x, (2, 3, 4))
    assert len(calls) == 8
    torch.testing.assert_close(out, x * 2)  # an equivariant fn: the flips cancel
    assert [c.shape[0] for c in calls] == [1] * 8  # one call a mirror, batch as given
    assert policy.mirror_combinations((3, 4)) == [(), (3,), (4,), (3, 4)]

    def biased(t):  # not equivariant: the mean over flips differs from one pass
        return t + torch.arange(4, dtype=torch.float32)
    got = policy.mirror_tta(biased, x, (4,))
    torch.testing.assert_close(got, x + 1.5)
    torch.testing.assert_close(policy.mirror_tta(biased, x, ()), biased(x))


def test_mirror_tta_on_a_network_and_a_subset_of_mirrors():
    from napari_medseg.models.networks import UNet3D

    torch.manual_seed(0)
    net = onednn_convolutions(
        UNet3D(in_channels=1, out_channels=3, features=(4, 8, 16)).eval())
    x = torch.randn(1, 1, 16, 32, 32)
    seen = []

    def fn(t):
        seen.append(t.shape[0])
        return net(t)
    with torch.inference_mode():
        both = policy.mirror_tta(fn, x, (2, 4))
        z_only = policy.mirror_tta(fn, x, (), combinations=[(), (2,)])
        want = (net(x) + torch.flip(net(torch.flip(x, (2,))), (2,))) / 2
    assert seen == [1, 1, 1, 1, 1, 1]  # one window a mirror
    torch.testing.assert_close(z_only, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z_only, both, atol=1e-3)  # another mean: the test can see it
    with torch.inference_mode():  # a list output (deep supervision): its first tensor
        out = list(policy.mirrored_outputs(lambda t: [net(t), None], x, [(), (2,)]))
    assert [d for d, _ in out] == [(), (2,)] and out[0][1].shape == (1, 3, 16, 32, 32)


def _conv_kernels(fn, x) -> set:
    """The aten convolution kernels ``fn(x)`` runs."""
    with torch.profiler.profile() as prof:
        fn(x)
    return {e.key for e in prof.key_averages()
            if e.key in ("aten::slow_conv3d_forward", "aten::mkldnn_convolution")}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_small_float32_convolutions_take_onednn_with_the_same_result():
    import copy

    from napari_medseg.models.networks import UNet3D

    torch.manual_seed(0)
    plain = UNet3D(in_channels=1, out_channels=3, features=(4, 8, 16)).eval()
    net = onednn_convolutions(copy.deepcopy(plain))
    assert net.state_dict().keys() == plain.state_dict().keys()
    assert all(type(m) is not torch.nn.Conv3d for m in net.modules())
    x = torch.randn(1, 1, 16, 32, 32)  # 1 x 4 x 16 x 32 = 2048: PyTorch's slow kernel
    with torch.inference_mode():
        assert "aten::slow_conv3d_forward" in _conv_kernels(plain, x)
        kernels = _conv_kernels(net, x)
        want, got = plain(x), net(x)
    # every 3 x 3 x 3 convolution takes oneDNN (the 1 x 1 x 1 head keeps PyTorch's choice)
    assert kernels == {"aten::mkldnn_convolution", "aten::slow_conv3d_forward"} or \
        kernels == {"aten::mkldnn_convolution"}
    with torch.inference_mode(), torch.profiler.profile() as prof:
        net(x)
    slow = [e for e in prof.key_averages() if e.key == "aten::slow_conv3d_forward"]
    assert not slow or slow[0].count == 1  # the head alone
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # training (autograd) and bf16 autocast keep PyTorch's own path and gradients
    out = net(x)
    out.sum().backward()
    assert net.head.weight.grad is not None
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16
    # still a plain convolution for code that looks for one (the head moved after blending)
    assert plain_conv(net.head) and plain_conv(net.ups[0]) is False

    class Custom(torch.nn.Conv3d):
        pass
    assert not plain_conv(Custom(1, 1, 1))
    # idempotent, and TorchScript is left alone
    assert onednn_convolutions(net) is net
    scripted = torch.jit.script(torch.nn.Conv3d(1, 1, 3))
    assert onednn_convolutions(scripted) is scripted


def test_device_and_precision_choice():
    assert policy.choose_device("auto").type in ("cuda", "mps", "cpu")
    assert policy.choose_device("cpu") == torch.device("cpu")
    with pytest.raises(MedSegError):
        policy.choose_device("tpu")
    assert isinstance(policy.bf16_supported("cpu"), bool)
    cpu = torch.device("cpu")
    assert policy.resolve_amp("off", cpu) is None
    assert policy.resolve_amp("bf16", cpu) is torch.bfloat16
    want = torch.bfloat16 if policy.bf16_supported(cpu) else None
    assert policy.resolve_amp("auto", cpu) is want
    assert policy.available_devices()["cpu"] is True


def test_input_checks_name_the_layers():
    aff = make_affine((2.0, 1.0, 1.0))
    a = Volume(np.zeros((4, 5, 6), np.float32), aff)
    b = Volume(np.zeros((4, 5, 7), np.float32), aff)
    flat = Volume(np.zeros((1, 5, 6), np.float32), aff)
    assert len(policy.check_inputs([a], 1, "m")) == 1
    with pytest.raises(MedSegError, match="channel mismatch: model m takes 2 channel"):
        policy.check_inputs([a], 2, "m", ["CT", "PET"], names=["ct"])
    with pytest.raises(MedSegError, match="layer 'pet' is not on the grid of layer 'ct'"):
        policy.check_inputs([a, b], 2, "m", names=["ct", "pet"])
    with pytest.raises(MedSegError, match="2D"):
        policy.check_inputs([flat], 1, "m")


def test_keep_largest_components():
    lab = np.zeros((3, 8, 8), np.uint8)
    lab[1, 1:4, 1:4] = 1
    lab[1, 6, 6] = 1
    lab[0, 0, 7] = 2
    lab[2, 7, 0] = 2
    out = policy.keep_largest_components(lab.copy(), [1])
    assert int((out == 1).sum()) == 9 and int((out == 2).sum()) == 2
    assert policy.largest_component(np.zeros((2, 2, 2), bool)).sum() == 0
    # two classes, each cleaned inside its own box; an absent class id is skipped
    many = np.zeros((6, 20, 20), np.int16)
    many[1:5, 2:8, 2:8] = 3
    many[5, 12, 12] = 3  # a stray piece of class 3 inside the box of class 4
    many[1:4, 10:18, 10:18] = 4
    many[5, 0, 19] = 4
    cleaned = policy.keep_largest_components(many.copy(), [3, 4, 9])
    expect = many.copy()
    expect[5, 12, 12] = 0
    expect[5, 0, 19] = 0
    np.testing.assert_array_equal(cleaned, expect)
    diag = np.zeros((2, 2, 2), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert policy.largest_component(diag, connectivity=3).sum() == 2
    assert policy.largest_component(diag, connectivity=1).sum() == 1
