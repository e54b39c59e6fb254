"""The Fine-tune dock: live loss / validation-Dice plot, cancel, then resume."""

from __future__ import annotations

import numpy as np
import torch

from napari_medseg.core.phantom import ABDOMEN_LABELS, make_abdomen_ct
from napari_medseg.io.export import export_training_case
from napari_medseg.models import load_model
from napari_medseg.models.card import ModelCard
from napari_medseg.models.networks import UNet3D

SPACING, PATCH = (5.0, 3.0, 3.0), (16, 32, 32)


def _setup(tmp_path):
    from napari_medseg.paths import user_models_dir

    torch.manual_seed(0)
    folder = user_models_dir() / "tiny-live"
    folder.mkdir(parents=True)
    ModelCard(name="tiny-live", version="1.0.0", channels=[{"name": "CT", "modality": "CT"}],
              target_spacing=SPACING, orientation="LPS",
              normalization=[{"kind": "ct", "window": [-200, 300]}], patch_size=PATCH,
              classes={k: {"name": v} for k, v in ABDOMEN_LABELS.items()}, weights="model.pt",
              network={"class": "UNet3D", "kwargs": {"in_channels": 1, "out_channels": 6,
                                                     "features": [4, 8, 16]}},
              mirror_axes=(0, 1)).save(folder / "card.yaml")
    torch.save(UNet3D(1, 6, (4, 8, 16)).state_dict(), folder / "model.pt")
    ds = tmp_path / "Dataset510_Live"
    for s in (1, 2):
        img, lab = make_abdomen_ct(seed=s, shape=(24, 48, 48), spacing=SPACING, vary=True)
        export_training_case([img], lab, ds)
    return ds


def test_live_plot_cancel_and_resume(make_napari_viewer, qtbot, tmp_path):
    from napari_medseg.paths import user_dir, user_models_dir

    ds = _setup(tmp_path)
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-medseg", "Fine-tune")
    w.refresh_models()
    w.model_box.setCurrentText("tiny-live")
    w.dataset_edit.setText(str(ds))
    w.iterations.setValue(40)
    w.name_edit.setText("tiny-live-ft")
    from napari_medseg._widgets._plot import EMPTY_TEXT

    # before a run: a readable empty frame, not matplotlib's -0.04..0.04 default
    assert w.plot.ax.get_xlim() == (0, 100) and w.plot.ax.get_ylim() == (0, 1)
    assert [t.get_text() for t in w.plot.ax.texts] == [EMPTY_TEXT]
    assert w.augment_check.isChecked()  # on by default, as in finetune()
    w.augment_check.setChecked(False)  # the box reaches finetune(): the card says so below
    opts = dict(patch_size=PATCH, val_fraction=0.5, forgetting_cases=0, checkpoint_every=5)

    job = w.run(**opts)
    qtbot.waitUntil(lambda: len(w.plot.steps) >= 8, timeout=120_000)
    job.cancel()
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    qtbot.waitUntil(w.run_button.isEnabled, timeout=10_000)
    assert job.result is None
    assert not (user_models_dir() / "tiny-live-ft").exists()
    ckpts = list((user_dir() / "finetune-checkpoints").glob("*/state.json"))
    assert len(ckpts) == 1
    stopped = len(w.plot.losses)
    assert stopped >= 8 and w.plot.ax.lines  # the loss is drawn
    assert not w.plot.ax.texts  # and the empty-frame hint is gone

    w.resume_check.setChecked(True)
    job = w.run(**opts)
    qtbot.waitUntil(lambda: not job.running and (job.result is not None
                                                  or job.error is not None), timeout=180_000)
    assert job.error is None, job.error
    card = load_model(user_models_dir() / "tiny-live-ft").card
    resumed = card.metrics["fine_tune"]["resumed_from"]
    assert 8 <= resumed < 40
    # the second run plotted only the iterations after the checkpoint, up to the end
    assert w.plot.steps[0] == resumed + 1 and w.plot.steps[-1] == 40
    assert w.plot.val_steps and w.plot.val_steps[-1] == 40
    assert all(0.0 <= d <= 1.0 for d in w.plot.val_dice)
    assert not list((user_dir() / "finetune-checkpoints").glob("*/state.json"))
    assert np.isfinite(card.metrics["fine_tune"]["loss_last"])
    assert card.metrics["fine_tune"]["augment"] is False
