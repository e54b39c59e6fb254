"""Fine-tuning a model on corrected cases exported as an nnU-Net raw dataset.

The cases are synthetic abdomen CT phantoms written by the real exporter, with a
systematic correction a user might make: the right kidney relabelled as
``kidney_left`` (one "kidney" class). The model must move toward it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_medseg.core.ledger import CorrectionLedger
from napari_medseg.core.phantom import ABDOMEN_LABELS, make_abdomen_ct
from napari_medseg.errors import Cancelled, MedSegError
from napari_medseg.io.export import export_training_case
from napari_medseg.models import list_models, load_model
from napari_medseg.models.card import ModelCard
from napari_medseg.models.networks import UNet3D
from napari_medseg.training.finetune import finetune

SHAPE, SPACING = (32, 64, 64), (5.0, 3.0, 3.0)
SEEDS = (11, 12, 13)
PATCH = (16, 32, 32)
MERGED = 3  # kidney_left; kidney_right (4) is relabelled to it


def _case(seed):
    img, lab = make_abdomen_ct(seed=seed, shape=SHAPE, spacing=SPACING, vary=True)
    y = np.asarray(lab.data).copy()
    y[y == 4] = MERGED
    return img, lab.with_data(y)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw") / "Dataset501_Corrected"
    for s in SEEDS:
        img, lab = _case(s)
        # the ledger's "prediction" stands in for the model output before correction
        original = make_abdomen_ct(seed=s, shape=SHAPE, spacing=SPACING, vary=True)[1]
        ledger = CorrectionLedger(np.asarray(original.data), lab.spacing, lab.label_names)
        export_training_case([img], lab, folder, ledger=ledger)
    return folder


def _builtin_path():
    for info in list_models(include_user=False):
        if info.name == "abdomen-ct-small" and info.source == "builtin":
            return info.path
    return None


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The built-in model, or (before its weights exist) a small U-Net package like it."""
    path = _builtin_path()
    if path is not None:
        return path
    from conftest import write_tiny_abdomen_model

    return str(write_tiny_abdomen_model(tmp_path_factory.mktemp("base") / "tiny-abdomen",
                                        SPACING, PATCH))


def test_finetune_moves_toward_corrections(dataset, base_model, tmp_path):
    base = load_model(base_model)
    calls = []
    builtin = _builtin_path() is not None
    # the trained base keeps a wide window in-plane (its instance norms saw 64 x 64)
    path = finetune(base_model, dataset, iterations=20 if builtin else 40, lr=1e-3,
                    patch_size=(16, 64, 64) if builtin else PATCH, val_fraction=0.34,
                    seed=0, progress=lambda d, t: calls.append((d, t)))
    # the package lands in the user model folder and the registry lists it
    infos = {i.name: i for i in list_models()}
    card_name = path.name
    assert card_name.startswith(f"{base.card.name}-ft-")
    assert infos[card_name].source == "user"
    model = load_model(card_name)
    assert model.card.format == "state_dict"
    assert model.card.version != base.card.version
    assert calls[-1][0] == calls[-1][1]
    # provenance
    text = model.card.training
    assert base.card.name in text and str(dataset) in text and "0 AdamW" in text
    ft = model.card.metrics["fine_tune"]
    assert sorted(ft["train_cases"] + ft["held_out_cases"]) == ["case_000", "case_001",
                                                                 "case_002"]
    assert len(ft["held_out_cases"]) == 1
    assert ft["loss_last"] < ft["loss_first"]
    # the right kidneys of the two training cases were corrected (ledger diff)
    assert ft["corrected_voxels"] > 0 and "corrected in 2 case(s)" in text
    # Dice on the held-out corrected case before/after
    before, after = model.card.metrics["dice_before"], model.card.metrics["dice"]
    assert "kidney_left" in before and "kidney_left" in after
    # the merged class has two parts now: no largest-component clean-up for it
    post = model.card.postprocessing.get("largest_component")
    if base.card.postprocessing.get("largest_component"):
        assert MERGED not in post and ft["largest_component_dropped"] == [MERGED]
    # on the held-out case, the right kidney moves to the corrected class
    held_out = SEEDS[int(ft["held_out_cases"][0].rsplit("_", 1)[1])]
    img, lab = make_abdomen_ct(seed=held_out, shape=SHAPE, spacing=SPACING, vary=True)
    right = np.asarray(lab.data) == 4
    pred = model.predict(img, overlap=0.25)
    assert pred.labels.shape3 == img.shape3  # on the input grid
    np.testing.assert_allclose(pred.labels.affine, img.affine)
    moved_after = float((np.asarray(pred.labels.data)[right] == MERGED).mean())
    moved_before = float((np.asarray(base.predict(img, overlap=0.25).labels.data)[right]
                          == MERGED).mean())
    print(f"right kidney as {MERGED}: {moved_before:.3f} -> {moved_after:.3f}; "
          f"Dice {before} -> {after}")
    if builtin:  # a random stand-in base has nothing to move from
        assert moved_after > moved_before + 0.1
    # the base model was not changed in place
    again = load_model(base_model)
    for (k, a), b in zip(again.network.state_dict().items(),
                         base.network.state_dict().values()):
        assert torch.equal(a, b), k


def test_cancel_leaves_nothing(dataset, base_model, tmp_path):
    out = tmp_path / "models"
    seen = []

    def cancel():
        return len(seen) >= 6

    with pytest.raises(Cancelled):
        finetune(base_model, dataset, out_dir=out, iterations=50, patch_size=PATCH,
                 val_fraction=0, progress=lambda d, t: seen.append(d), cancel=cancel)
    assert not out.exists() or not any(out.iterdir())


def test_explicit_name_and_no_validation(dataset, base_model, tmp_path):
    path = finetune(base_model, dataset, out_dir=tmp_path, name="my-kidneys", iterations=2,
                    patch_size=PATCH, val_fraction=0)
    assert path == tmp_path / "my-kidneys"
    card = load_model(path).card
    assert card.name == "my-kidneys"
    assert card.metrics["fine_tune"]["held_out_cases"] == []
    assert "dice" not in card.metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-kidneys"]
    for bad in ("../escape", "a/b", ".hidden"):
        with pytest.raises(MedSegError, match="must be letters"):
            finetune(base_model, dataset, out_dir=tmp_path, name=bad, iterations=1)
    with pytest.raises(MedSegError, match="already"):
        finetune(base_model, dataset, out_dir=tmp_path, name="my-kidneys", iterations=1,
                 patch_size=PATCH, val_fraction=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-kidneys"]


def test_default_window_is_the_cards_training_window(dataset, base_model, tmp_path):
    src = tmp_path / "base"
    shutil.copytree(base_model, src)
    card = load_model(src).card
    card.patch_size = tuple(2 * p for p in PATCH)  # runs a larger window than it trains on
    card.train_patch_size = PATCH
    card.save(src / "card.yaml")
    path = finetune(str(src), dataset, out_dir=tmp_path / "out", iterations=2,
                    val_fraction=0)
    tuned = load_model(path).card
    assert tuple(tuned.metrics["fine_tune"]["patch_size"]) == PATCH
    assert f"random {list(PATCH)} windows" in tuned.training
    assert tuned.train_patch_size == PATCH and tuned.patch_size == card.patch_size
    card.train_patch_size = None  # without one, the inference window
    card.save(src / "card.yaml")
    path = finetune(str(src), dataset, out_dir=tmp_path / "out2", iterations=1,
                    val_fraction=0)
    assert tuple(load_model(path).card.metrics["fine_tune"]["patch_size"]) == card.patch_size


def _copy(dataset, tmp_path):
    dst = tmp_path / "Dataset502_Copy"
    shutil.copytree(dataset, dst)
    return dst


def test_bad_dataset_folders(dataset, base_model, tmp_path):
    with pytest.raises(MedSegError, match="does not exist"):
        finetune(base_model, tmp_path / "nope", iterations=1)
    d = _copy(dataset, tmp_path)
    (d / "dataset.json").unlink()
    with pytest.raises(MedSegError, match="dataset.json"):
        finetune(base_model, d, iterations=1)

    d = _copy(dataset, tmp_path / "b")
    (d / "imagesTr" / "case_001_0000.nii.gz").unlink()
    with pytest.raises(MedSegError, match="case_001"):
        finetune(base_model, d, iterations=1)

    d = _copy(dataset, tmp_path / "c")
    from napari_medseg.io import write_labels

    img, lab = make_abdomen_ct(seed=1, shape=(16, 32, 32), spacing=SPACING)
    (d / "labelsTr" / "case_000.nii.gz").unlink()
    write_labels(d / "labelsTr" / "case_000.nii.gz", lab)
    with pytest.raises(MedSegError, match="does not match the label shape"):
        finetune(base_model, d, iterations=1, val_fraction=0)

    d = _copy(dataset, tmp_path / "e")
    meta = json.loads((d / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (d / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedSegError, match="2 image channel"):
        finetune(base_model, d, iterations=1)
    meta["channel_names"] = {"0": "CT"}
    meta["labels"]["vessel"] = 9
    (d / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedSegError, match="cannot add classes"):
        finetune(base_model, d, iterations=1)


def test_models_without_trainable_weights_are_refused(dataset, tmp_path):
    net = torch.jit.script(UNet3D(1, 6, (4, 8)))
    folder = tmp_path / "scripted"
    folder.mkdir()
    net.save(str(folder / "model.ts"))
    ModelCard(name="scripted", channels=[{"name": "CT", "modality": "CT"}],
              classes={k: {"name": v} for k, v in ABDOMEN_LABELS.items()},
              format="torchscript", weights="model.ts",
              patch_size=PATCH).save(folder / "card.yaml")
    with pytest.raises(MedSegError, match="cannot be fine-tuned"):
        finetune(folder, dataset, out_dir=tmp_path / "out", iterations=1)
    assert not (tmp_path / "out").exists()


def _wait(qtbot, job, timeout=120_000):
    assert job is not None
    qtbot.waitUntil(lambda: not job.running and (job.result is not None
                                                  or job.error is not None), timeout=timeout)


def test_widget_from_export_to_segment(make_napari_viewer, qtbot, dataset, base_model,
                                       tmp_path):
    from napari_medseg.paths import user_models_dir

    base = load_model(base_model)
    if _builtin_path() is None:  # the stand-in base must be in the registry to be picked
        user_models_dir().mkdir(parents=True)
        shutil.copytree(base_model, user_models_dir() / base.card.name)
    viewer = make_napari_viewer()
    _, export = viewer.window.add_plugin_dock_widget("napari-medseg", "Export")
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    export.dataset_edit.setText(str(dataset))
    widget = export.open_finetune()
    assert widget.dataset_edit.text() == str(dataset)
    names = [widget.model_box.itemText(i) for i in range(widget.model_box.count())]
    assert base.card.name in names
    widget.model_box.setCurrentText(base.card.name)
    widget.iterations.setValue(3)
    widget.name_edit.setText("kidneys-merged")

    # cancel at once: nothing is written, the button comes back
    job = widget.run(patch_size=PATCH)
    job.cancel()
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    qtbot.waitUntil(widget.run_button.isEnabled, timeout=10_000)
    assert job.result is None and "cancelled" in widget.status.text()
    assert not (user_models_dir() / "kidneys-merged").exists()

    job = widget.run(patch_size=PATCH, val_fraction=0)
    _wait(qtbot, job)
    assert job.error is None, job.error
    assert widget.last_path == user_models_dir() / "kidneys-merged"
    assert "kidneys-merged" in widget.status.text()
    seg_names = [segment.model_box.itemText(i) for i in range(segment.model_box.count())]
    assert "kidneys-merged" in seg_names


def test_widget_reports_missing_dataset(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Fine-tune")
    widget.dataset_edit.setText("")
    assert widget.run() is None
    assert "dataset folder" in widget.status.text() or "no model" in widget.status.text()


def test_cli_finetune(dataset, base_model, tmp_path, capsys):
    from napari_medseg.cli import main

    out = tmp_path / "models"
    code = main(["finetune", str(base_model), str(dataset), "--iterations", "2",
                 "--patch-size", *map(str, PATCH), "--val-fraction", "0", "--out", str(out),
                 "--name", "cli-ft"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"wrote {out / 'cli-ft'}" in err
    assert load_model(out / "cli-ft").card.name == "cli-ft"
    code = main(["finetune", str(base_model), str(tmp_path / "missing"), "--out", str(out)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
