"""Pieces of the synthetic-abdomen training pipeline (no training run)."""

from __future__ import annotations

import numpy as np
import torch

from napari_medseg.core.phantom.abdomen_synth import SYNTH_LABELS, make_abdomen_tissues
from napari_medseg.training import train_builtin_synth as T


def test_windows_are_painted_normalised_and_aligned():
    tis, lab, _ = make_abdomen_tissues(3, (40, 80, 100), (6.0, 4.0, 4.0))
    case = T._Case(tis, lab, np.random.default_rng(0))
    assert set(case.points) <= set(SYNTH_LABELS) and 1 in case.points
    seen = set()
    for k in range(12):
        x, y = T.sample_window(case, np.random.default_rng(k))
        assert x.shape == y.shape == T.PATCH and x.dtype == np.float32 and y.dtype == np.int64
        assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
        seen |= set(np.unique(y).tolist())
        # the same window painted twice differs (appearance is drawn anew), labels do not
        x2, y2 = T.sample_window(case, np.random.default_rng(k))
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert len(seen - {0}) >= 3  # windows centred on classes find them


def test_merged_logits_are_the_marginal_of_unlabelled_classes():
    logits = torch.randn(2, len(SYNTH_LABELS) + 1, 3, 4, 5)
    merged = T._merged_logits(logits)
    assert merged.shape[1] == T.LEGACY_CLASSES
    p, q = logits.softmax(1), merged.softmax(1)
    torch.testing.assert_close(q[:, 0], p[:, 0] + p[:, T.LEGACY_CLASSES:].sum(1))
    torch.testing.assert_close(q[:, 1:], p[:, 1:T.LEGACY_CLASSES])


def test_init_copies_matching_tensors_and_head_rows(tmp_path):
    from napari_medseg.models.networks import UNet3D

    old = UNet3D(1, 6, T.FEATURES)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    new = UNet3D(1, len(SYNTH_LABELS) + 1, T.FEATURES)
    T._init_from(new, tmp_path / "old.pt")
    torch.testing.assert_close(new.encoders[0].body[0].weight, old.encoders[0].body[0].weight)
    torch.testing.assert_close(new.head.weight[:6], old.head.weight)
    torch.testing.assert_close(new.head.bias[:6], old.head.bias)
