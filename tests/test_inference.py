"""Sliding-window inference: blending, slab stitching, TTA, maps, progress and cancel."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from napari_medseg.core.inference import (
    _CellStitcher,
    gaussian_importance_map,
    pick_device,
    resolve_amp,
    sliding_window_inference,
    window_starts,
)
from napari_medseg.errors import Cancelled, MedSegError

SHAPE = (2, 13, 17, 11)  # (C, Z, Y, X), odd on purpose
PATCH = (5, 6, 7)


def _conv(k: int, in_ch: int = 2, kernel: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Conv3d(in_ch, k, kernel, padding=kernel // 2)
    return net.eval()


def _x(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _reference(x, net, patch, k, overlap):
    """Whole-volume accumulator: the plain (non-slab) algorithm, for comparison."""
    t = torch.from_numpy(x)
    shape = t.shape[1:]
    acc = torch.zeros((k,) + tuple(shape))
    wsum = torch.zeros(tuple(shape))
    g = gaussian_importance_map(patch)
    starts = [window_starts(s, p, overlap) for s, p in zip(shape, patch)]
    with torch.inference_mode():
        for z, y, xx in itertools.product(*starts):
            sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(xx, xx + patch[2]))
            out = net(t[(slice(None),) + sl][None])[0]
            acc[(slice(None),) + sl] += out * g
            wsum[sl] += g
    return (acc / wsum).numpy()


@pytest.mark.parametrize("overlap", [0.5, 0.25, 0.0])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_pointwise_model_matches_whole_volume_prediction(overlap, batch_size):
    x = _x()
    net = _conv(4)
    res = sliding_window_inference(x, net, PATCH, 4, overlap=overlap, batch_size=batch_size,
                                   device="cpu", amp="off")
    with torch.inference_mode():
        full = net(torch.from_numpy(x)[None])[0].argmax(0).numpy()
    assert res.labels.shape == SHAPE[1:] and res.labels.dtype == np.uint8
    np.testing.assert_array_equal(res.labels, full)
    assert res.n_windows == np.prod([len(window_starts(s, p, overlap))
                                     for s, p in zip(SHAPE[1:], PATCH)])


@pytest.mark.parametrize("patch", [(5, 6, 7), (4, 17, 3), (13, 5, 11)])
def test_slab_stitching_equals_whole_volume_blending(patch):
    x = _x()
    net = _conv(3, kernel=3, seed=2)  # output depends on the window's borders
    ref = _reference(x, net, patch, 3, 0.5)
    res = sliding_window_inference(x, net, patch, 3, overlap=0.5, device="cpu", amp="off",
                                   return_probability=True, uncertainty="entropy")
    np.testing.assert_array_equal(res.labels, ref.argmax(0))
    p = torch.softmax(torch.from_numpy(ref), 0).numpy()
    np.testing.assert_allclose(res.probability, 1 - p[0], atol=2e-3)
    ent = -(p * np.log(p)).sum(0) / np.log(3)
    np.testing.assert_allclose(res.uncertainty, ent, atol=2e-3)


def test_agrees_with_monai_sliding_window_inference():
    inferers = pytest.importorskip("monai.inferers")
    x = _x()
    net = _conv(3, kernel=3, seed=4)
    with torch.inference_mode():
        theirs = inferers.sliding_window_inference(
            torch.from_numpy(x)[None], PATCH, 1, net, overlap=0.5, mode="gaussian")[0]
    ours = sliding_window_inference(x, net, PATCH, 3, overlap=0.5, device="cpu", amp="off")
    agree = (ours.labels == theirs.argmax(0).numpy()).mean()
    assert agree > 0.99


def test_volume_smaller_than_patch_is_padded_and_cropped():
    x = _x((2, 3, 4, 5))
    net = _conv(2)
    res = sliding_window_inference(x, net, (8, 8, 8), 2, device="cpu", amp="off")
    with torch.inference_mode():
        full = net(torch.from_numpy(x)[None])[0].argmax(0).numpy()
    assert res.labels.shape == (3, 4, 5) and res.n_windows == 1
    np.testing.assert_array_equal(res.labels, full)


def test_progress_counts_every_window_once():
    calls = []
    res = sliding_window_inference(_x(), _conv(2), PATCH, 2, batch_size=2, device="cpu",
                                   amp="off", progress=lambda d, t: calls.append((d, t)))
    n = res.n_windows
    assert len(calls) == -(-n // 2)
    assert calls[-1] == (n, n)
    assert all(b[0] > a[0] for a, b in zip(calls, calls[1:]))


def test_cancel_between_batches_raises_and_stops():
    seen = []

    def net(b):
        seen.append(b.shape[0])
        return torch.cat([b[:, :1], -b[:, :1]], dim=1)

    with pytest.raises(Cancelled):
        sliding_window_inference(_x(), net, PATCH, 2, batch_size=1, device="cpu",
                                 cancel=lambda: len(seen) >= 3)
    assert len(seen) == 3


def test_mirror_tta_averages_all_eight_flips():
    x = _x()
    calls = []
    conv = _conv(3, kernel=3, seed=5)

    def net(b):
        calls.append(1)
        return conv(b)

    res = sliding_window_inference(x, net, PATCH, 3, batch_size=100, tta=True, device="cpu",
                                   amp="off", uncertainty="tta", return_probability=True)
    assert len(calls) == 8
    # reference: blend of the mean of the eight mirrored predictions
    flips = [a for r in range(4) for a in itertools.combinations((2, 3, 4), r)]

    def mirrored(b):
        return sum(torch.flip(conv(torch.flip(b, a) if a else b), a) if a else conv(b)
                   for a in flips) / 8

    ref = _reference(x, mirrored, PATCH, 3, 0.5)
    np.testing.assert_array_equal(res.labels, ref.argmax(0))
    assert res.uncertainty.dtype == np.float16 and res.uncertainty.shape == SHAPE[1:]
    assert float(res.uncertainty.max()) > 0  # a 3x3x3 conv is not flip-invariant
    # a pointwise model is: no spread across the mirrors
    flat = sliding_window_inference(x, _conv(3), PATCH, 3, device="cpu", amp="off",
                                    uncertainty="tta")
    assert float(flat.uncertainty.max()) < 1e-3


def test_one_class_sigmoid_and_many_classes():
    x = _x()
    res = sliding_window_inference(x, _conv(1), PATCH, 1, device="cpu", amp="off",
                                   return_probability=True)
    with torch.inference_mode():
        full = _conv(1)(torch.from_numpy(x)[None])[0, 0].numpy()
    np.testing.assert_array_equal(res.labels, (full > 0).astype(np.uint8))
    np.testing.assert_allclose(res.probability, 1 / (1 + np.exp(-full)), atol=2e-3)
    many = sliding_window_inference(x, _conv(300), PATCH, 300, device="cpu", amp="off")
    assert many.labels.dtype == np.uint16
    with torch.inference_mode():
        full = _conv(300)(torch.from_numpy(x)[None])[0].argmax(0).numpy()
    np.testing.assert_array_equal(many.labels, full)


def test_open_cells_stay_below_one_patch_deep_slab():
    shape, patch = (40, 48, 44), (8, 16, 12)
    starts = [window_starts(s, p, 0.5) for s, p in zip(shape, patch)]
    g = gaussian_importance_map(patch)
    st = _CellStitcher(3, shape, patch, starts, torch.device("cpu"), g, False, None)
    logits = torch.ones((3,) + patch)
    for w in itertools.product(*starts):
        st.add(logits, w)
    st.finish()
    assert not st.cells and st.open_voxels == 0
    slab = patch[0] * shape[1] * shape[2]
    assert 0 < st.peak_open_voxels < 0.8 * slab


def test_out_of_memory_retries_with_one_window_per_batch():
    conv = _conv(2)

    def net(b):
        if b.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated allocation failure")
        return conv(b)

    res = sliding_window_inference(_x(), net, PATCH, 2, batch_size=4, device="cpu", amp="off")
    assert res.batch_size == 1
    with torch.inference_mode():
        full = conv(torch.from_numpy(_x())[None])[0].argmax(0).numpy()
    np.testing.assert_array_equal(res.labels, full)


def test_bf16_autocast_agrees_with_fp32():
    x = _x((2, 16, 20, 20))
    net = _conv(4, kernel=3, seed=7)
    a = sliding_window_inference(x, net, (8, 8, 8), 4, device="cpu", amp="off")
    b = sliding_window_inference(x, net, (8, 8, 8), 4, device="cpu", amp="bf16")
    assert b.amp == "bf16" and a.amp == "off"
    assert (a.labels == b.labels).mean() > 0.95
    starts = [window_starts(s, 8, 0.5) for s in x.shape[1:]]
    g = gaussian_importance_map((8, 8, 8))
    args = (4, x.shape[1:], (8, 8, 8), starts, torch.device("cpu"), g, False, None)
    assert _CellStitcher(*args, low_precision=True).acc_dtype == torch.float16
    assert _CellStitcher(*args).acc_dtype == torch.float32


def test_devices_and_amp_resolution():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_amp("off", torch.device("cpu")) is None
    assert resolve_amp("auto", torch.device("cpu")) in (None, torch.bfloat16)
    with pytest.raises(MedSegError):
        resolve_amp("int4", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(MedSegError, match="CUDA"):
            pick_device("cuda")


def test_bad_inputs_raise_medseg_errors():
    x = _x()
    with pytest.raises(MedSegError, match="NaN"):
        bad = x.copy()
        bad[0, 1, 1, 1] = np.nan
        sliding_window_inference(bad, _conv(2), PATCH, 2, device="cpu")
    with pytest.raises(MedSegError, match="C, Z, Y, X"):
        sliding_window_inference(x[0], _conv(2), PATCH, 2, device="cpu")
    with pytest.raises(MedSegError, match="expected 5 classes"):
        sliding_window_inference(x, _conv(2), PATCH, 5, device="cpu")
    with pytest.raises(MedSegError, match="uncertainty"):
        sliding_window_inference(x, _conv(2), PATCH, 2, uncertainty="variance")


def test_gaussian_map_peaks_in_the_centre():
    g = gaussian_importance_map((9, 8, 7))
    assert g.shape == (9, 8, 7) and float(g.min()) > 0
    assert np.unravel_index(int(g.argmax()), g.shape)[0] == 4
    assert window_starts(13, 5, 0.5) == [0, 2, 4, 6, 8]


def test_many_classes_use_a_float16_buffer_and_smaller_batches(monkeypatch):
    from napari_medseg.core import inference

    x = _x()
    net = _conv(6, kernel=3, seed=8)
    ref = sliding_window_inference(x, net, PATCH, 6, device="cpu", amp="off",
                                   return_probability=True)
    monkeypatch.setattr(inference, "ACCUMULATOR_BUDGET_BYTES", 0)
    monkeypatch.setattr(inference, "OUTPUT_BUDGET_BYTES", 1)
    g = gaussian_importance_map(PATCH)
    starts = [window_starts(s, p, 0.5) for s, p in zip(SHAPE[1:], PATCH)]
    st = _CellStitcher(6, SHAPE[1:], PATCH, starts, torch.device("cpu"), g, False, None)
    assert st.acc_dtype == torch.float16
    half = sliding_window_inference(x, net, PATCH, 6, batch_size=4, device="cpu", amp="off",
                                    return_probability=True)
    assert half.batch_size == 1
    assert (half.labels == ref.labels).mean() > 0.99
    np.testing.assert_allclose(half.probability, ref.probability, atol=5e-3)


def test_default_batch_is_one_window_on_the_cpu():
    x = _x()
    net = _conv(3, kernel=3, seed=4)
    sizes = []

    def spy(b):
        sizes.append(b.shape[0])
        return net(b)

    res = sliding_window_inference(x, spy, PATCH, 3, device="cpu", amp="off")
    two = sliding_window_inference(x, net, PATCH, 3, batch_size=2, device="cpu", amp="off")
    assert res.batch_size == 1 and set(sizes) == {1} and two.batch_size == 2
    np.testing.assert_array_equal(res.labels, two.labels)


def test_bf16_run_leaves_the_module_contiguous_and_trainable():
    x = _x((2, 16, 20, 20))
    net = _conv(4, kernel=3, seed=9)
    before = [p.detach().clone() for p in net.parameters()]
    res = sliding_window_inference(x, net, (8, 8, 8), 4, device="cpu", amp="bf16")
    ref = sliding_window_inference(x, net, (8, 8, 8), 4, device="cpu", amp="off")
    assert (res.labels == ref.labels).mean() > 0.95
    for p, b in zip(net.parameters(), before):
        assert p.is_contiguous() and not p.is_inference()
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    net(torch.from_numpy(x[None, :, :8, :8, :8])).sum().backward()  # still trainable
