"""The engine's fast paths: a 1x1x1 head applied after blending, instance norms as group
norms under CPU mixed precision, freed heap pages handed back."""

from __future__ import annotations

import logging
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medseg.core.inference import _head_candidates, sliding_window_inference
from napari_medseg.core.policy import bf16_supported
from napari_medseg.models.networks import UNet3D
from napari_medseg.models.predictor import _ZyxNetwork

PATCH = (8, 16, 16)


def _net(classes=12, seed=0):
    torch.manual_seed(seed)
    return UNet3D(1, classes, features=(4, 8, 16)).eval()


def _x(shape=(1, 21, 37, 29), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _run(net, x, split, caplog=None, **kw):
    kw = {"device": "cpu", "amp": "off", "return_probability": True,
          "uncertainty": "entropy", **kw}
    return sliding_window_inference(x, net, PATCH, 12, split_head=split, **kw)


@pytest.mark.parametrize("onednn", [False, True])
def test_split_head_gives_the_same_result_and_says_so(caplog, onednn):
    from napari_medseg.core.convs import onednn_convolutions

    net, x = _net(), _x()
    if onednn:  # as every loaded model runs: its convolutions changed, its head still found
        net = onednn_convolutions(net)
    ref = _run(net, x, split=False)
    with caplog.at_level(logging.INFO, logger="napari_medseg.core.inference"):
        res = _run(net, x, split=True)
    assert "blending 4 features before the 1x1x1 head instead of 12 logits" in caplog.text
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_allclose(res.probability.astype(np.float32),
                               ref.probability.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(res.uncertainty.astype(np.float32),
                               ref.uncertainty.astype(np.float32), atol=2e-3)
    assert isinstance(net.head, torch.nn.Conv3d)  # the network is given back whole


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_split_head_labels_only_equal_the_whole_network(amp):
    """Labels alone (no probability or uncertainty maps) through the head: the same argmax."""
    net, x = _net(seed=3), _x(seed=3)
    kw = dict(return_probability=False, uncertainty=None, amp=amp)
    ref = _run(net, x, split=False, **kw)
    res = _run(net, x, split=True, **kw)
    with_maps = _run(net, x, split=True, amp=amp)
    np.testing.assert_array_equal(res.labels, with_maps.labels)
    assert (res.labels == ref.labels).mean() >= (1.0 if amp == "off" else 0.97)
    assert len(np.unique(res.labels)) > 3


@pytest.mark.parametrize("tta", [False, True])
def test_split_head_with_mirrors_batches_and_bf16(tta):
    net, x = _net(seed=1), _x(seed=1)
    for amp, agree in (("off", 1.0), ("bf16", 0.97)):
        ref = _run(net, x, False, amp=amp, tta=tta, batch_size=3)
        res = _run(net, x, True, amp=amp, tta=tta, batch_size=3)
        assert (res.labels == ref.labels).mean() >= agree


def test_transposing_wrapper_keeps_the_head_on_the_right_axes(caplog):
    net, x = _net(seed=2), _x(seed=2)
    wrapped = _ZyxNetwork(net, "xyz")
    ref = _run(wrapped, x, split=False)
    with caplog.at_level(logging.INFO, logger="napari_medseg.core.inference"):
        res = _run(wrapped, x, split=True)
    assert "before the 1x1x1 head" in caplog.text
    np.testing.assert_array_equal(res.labels, ref.labels)


class _Scaled(torch.nn.Module):
    """A 1x1x1 convolution followed by one more operation: not a movable head."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.tanh(self.net(x)) * 3.0


def test_a_convolution_that_is_not_last_is_left_in_place(caplog):
    net, x = _Scaled(_net(seed=3)), _x(seed=3)
    assert _head_candidates(net, 12)  # a candidate by its shape...
    with caplog.at_level(logging.INFO, logger="napari_medseg.core.inference"):
        res = _run(net, x, split=True)
    assert "before the 1x1x1 head" not in caplog.text  # ...but not by what runs after it
    ref = _run(net, x, split=False)
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_array_equal(res.probability, ref.probability)


def test_no_candidates_for_few_classes_functions_and_torchscript():
    assert not _head_candidates(_net(classes=3), 3)  # 4 features > 3 classes: no gain
    assert not _head_candidates(lambda b: b, 12)
    scripted = torch.jit.script(_net())
    assert not _head_candidates(scripted, 12)
    assert not _head_candidates(_ZyxNetwork(scripted), 12)


def test_cancel_during_a_split_run_gives_the_head_back():
    from napari_medseg.errors import Cancelled

    net, x = _net(seed=4), _x(seed=4)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        _run(net, x, split=True, cancel=cancel)
    assert isinstance(net.head, torch.nn.Conv3d)


def test_free_heap_pages_are_handed_back_on_glibc():
    from napari_medseg.core import inference

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert inference._TRIM is not None
        assert inference._TRIM(0) in (0, 1)  # 1: memory was released, 0: none to release
    inference._release_free_memory()  # a no-op elsewhere, never an error


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 8), (1, 5, 6, 7, 8), (1, 8, 8, 12, 12),
                                   (1, 5, 3, 5, 7), (1, 3, 9, 10)])
def test_group_norm_stand_in_equals_instance_norm(affine, shape):
    from napari_medseg.core.inference import _GroupNormAsInstanceNorm

    cls = torch.nn.InstanceNorm3d if len(shape) == 5 else torch.nn.InstanceNorm2d
    norm = cls(shape[1], affine=affine, eps=1e-4)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(shape) * 4 + 3
    torch.testing.assert_close(_GroupNormAsInstanceNorm(norm)(x), norm(x), rtol=1e-4, atol=1e-4)
    if len(shape) == 5:  # bf16 channels-last, as the CPU fast path runs it
        xc = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            got = _GroupNormAsInstanceNorm(norm)(xc)
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(got.float(), norm(xc.float()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_norm_pools_folds_that_differ_into_one_channel_statistic(dtype):
    # folds of k = 2 are the even and odd x columns: give them far apart statistics,
    # so that a norm per fold (instead of per channel) would be far off
    from napari_medseg.core.inference import _folded_instance_norm

    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 10, 12)
    x[..., ::2] = x[..., ::2] * 5 + 20
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    want = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    xc = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        got = _folded_instance_norm(xc, w, b, 1e-5)
        assert got is not None and got.dtype == dtype
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
        tol = 1e-4 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        assert _folded_instance_norm(xc.contiguous(), w, b, 1e-5) is None  # not channels-last
        assert _folded_instance_norm(torch.randn(1, 16, 4, 4, 4).contiguous(
            memory_format=torch.channels_last_3d), w, b, 1e-5) is None  # wide enough already


class _Recorder(torch.nn.Module):
    """Conv, a norm without and one with running statistics; records what it ran."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.norm = torch.nn.InstanceNorm3d(4, affine=True)
        self.tracked = torch.nn.InstanceNorm3d(4, track_running_stats=True)
        self.head = torch.nn.Conv3d(4, 3, 3, padding=1)
        self.seen = set()

    def forward(self, x):
        h = self.conv(x)
        self.seen.add((type(self.norm).__name__, type(self.tracked).__name__,
                       not h.is_contiguous()))  # channels-last activations
        return self.head(torch.relu(self.tracked(self.norm(h))))


def test_cpu_bf16_runs_norms_as_group_norms_and_gives_the_modules_back():
    torch.manual_seed(5)
    net, x = _Recorder().eval(), _x(seed=5)
    ref = sliding_window_inference(x, net, PATCH, 3, device="cpu", amp="off")
    assert net.seen == {("InstanceNorm3d", "InstanceNorm3d", False)}  # fp32: untouched
    net.seen.clear()
    res = sliding_window_inference(x, net, PATCH, 3, device="cpu", amp="bf16")
    # only the norm without running statistics is swapped
    assert {seen[:2] for seen in net.seen} == {("_GroupNormAsInstanceNorm", "InstanceNorm3d")}
    if bf16_supported("cpu"):  # oneDNN keeps activations channels-last only with native bf16;
        # CPUs without it (AVX2 only) emulate bf16 convolutions in the default layout
        assert {seen[2] for seen in net.seen} == {True}
    assert type(net.norm) is torch.nn.InstanceNorm3d and net.conv.weight.is_contiguous()
    assert (res.labels == ref.labels).mean() > 0.97


_KEEP = r"""
import json
from napari_medseg.core import inference
too_big = inference.keep_freed_memory(10 ** 15)  # a run that would not fit: left alone
left_alone = inference._KEEP_FREED
ok = inference.keep_freed_memory(10 ** 6)
print(json.dumps([too_big, left_alone, ok, inference._KEEP_FREED]))
"""


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"),
                    reason="glibc's mallopt")
def test_one_shot_runs_keep_freed_memory_only_where_it_fits():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _KEEP], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False, True, True]
