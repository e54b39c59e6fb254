"""Wrong input is caught: modality, channel count and body region against the card,
predicted volumes against plausible ranges; shown on the CLI and in the widget."""

from __future__ import annotations


import numpy as np
import pytest

from napari_medseg.core.body_region import detect_body_region
from napari_medseg.core.modality import detect_modality
from napari_medseg.core.phantom import make_abdomen_ct, make_head_mr
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.models.card import ModelCard, read_card
from napari_medseg.models.checks import check_input, check_prediction, model_fits_modality
from napari_medseg.models.registry import BUILTIN_DIR

from _realdata import REAL

MODEL = "abdomen-ct-small"


def make_head_ct(shape=(40, 176, 176), spacing=(4.0, 1.25, 1.25), seed=0) -> Volume:
    """A synthetic head CT in HU: scalp, a closed skull ring (+1000 HU cortex around
    diploe), brain at 30-40 HU with CSF ventricles, air outside; LPS-stored like DICOM."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(n, dtype=np.float32)[(...,) + (None,) * (2 - i)] * s -
               (n - 1) * s / 2 for i, (n, s) in enumerate(zip(shape, spacing)))
    semi = np.array([95.0, 95.0, 75.0], np.float32)  # head half-sizes (z, y, x) in mm
    r = np.sqrt((z / semi[0]) ** 2 + (y / semi[1]) ** 2 + (x / semi[2]) ** 2)
    depth = (1.0 - r) * np.float32(semi[1:].mean())  # mm below the skin
    img = np.full(shape, -1000.0, np.float32)
    img[depth > 0] = 40.0                                  # scalp
    img[(depth > 4) & (depth <= 11)] = 1000.0              # skull tables
    img[(depth > 6) & (depth <= 9)] = 550.0                # diploe
    img[depth > 11] = 30.0 + 6.0 * (r[depth > 11] < 0.6)   # grey / white matter
    vent = ((z / 25) ** 2 + (y / 30) ** 2 + (np.abs(x) - 10) ** 2 / 64) < 1
    img[vent & (depth > 11)] = 5.0                         # CSF
    img += rng.normal(0, 5, shape).astype(np.float32)
    aff = make_affine(spacing, (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0]))
    return Volume(np.rint(img).astype(np.int16), aff, source="synthetic head CT")


def make_thighs_ct(shape=(36, 220, 340), spacing=(5.0, 1.2, 1.2), seed=0,
                   marrow_hu: float = -60.0) -> Volume:
    """A synthetic CT of both thighs in HU: skin and fat around muscle, a femoral shaft
    in each (a +1400 HU cortex around fatty marrow), a curved scanner table below, air
    around; LPS-stored like DICOM."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(n, dtype=np.float32)[(...,) + (None,) * (2 - i)] * s -
               (n - 1) * s / 2 for i, (n, s) in enumerate(zip(shape, spacing)))
    img = np.full(shape, -1000.0, np.float32)
    taper = 1.0 - 0.15 * (z + 90.0) / 180.0  # thinner towards the knee
    for side in (-1.0, 1.0):
        cx = side * 95.0
        r = np.sqrt(((x - cx) / (75.0 * taper)) ** 2 + (y / (80.0 * taper)) ** 2)
        img = np.where(r < 1.0, -100.0, img)          # subcutaneous fat, skin
        img = np.where(r < 0.8, 50.0, img)            # muscle
        d = np.sqrt((x - cx + side * 15.0) ** 2 + (y - 10.0) ** 2)  # femur, medial
        img = np.where((d < 14.0) & (r < 1.0), 1400.0, img)
        img = np.where((d < 8.0) & (r < 1.0), marrow_hu, img)
    table = (np.abs(y - 110.0 - 0.002 * x ** 2) < 3.0) & (np.abs(x) < 160.0)
    img = np.where(table & (img < -500), 200.0, img)
    img = img + rng.normal(0, 10, shape).astype(np.float32)
    aff = make_affine(spacing, (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0]))
    return Volume(np.rint(img).astype(np.int16), aff, source="synthetic thighs CT")


def make_thigh_mr(shape=(30, 200, 200), spacing=(5.0, 1.0, 1.0), seed=0,
                  cortex_mm: float = 6.0) -> Volume:
    """A synthetic T1 MR of one thigh, whole in the field of view (as in an extremity
    coil): bright fat under the skin, muscle, a femur whose cortex gives no signal
    around bright fatty marrow (``cortex_mm`` thick), air around."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(n, dtype=np.float32)[(...,) + (None,) * (2 - i)] * s -
               (n - 1) * s / 2 for i, (n, s) in enumerate(zip(shape, spacing)))
    img = np.zeros(shape, np.float32)
    taper = 1.0 - 0.15 * (z + 75.0) / 150.0
    r = np.sqrt((x / (75.0 * taper)) ** 2 + (y / (80.0 * taper)) ** 2)
    img = np.where(r < 1.0, 900.0, img)  # subcutaneous fat
    img = np.where(r < 0.85, 350.0, img)  # muscle
    d = np.sqrt((x + 10.0) ** 2 + (y - 10.0) ** 2)
    img = np.where(d < 14.0, 30.0, img)  # cortex: no signal
    img = np.where(d < 14.0 - cortex_mm, 850.0, img)  # fatty marrow
    img = np.abs(img + rng.normal(0, 20, shape)).astype(np.float32)
    aff = make_affine(spacing, (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0]))
    return Volume(img, aff, source="synthetic thigh MR")


@pytest.fixture(scope="module")
def ct_card():
    return read_card(BUILTIN_DIR / MODEL / "card.yaml")


def brain_card(**kw) -> ModelCard:
    """A card like deepbet's: one T1 MR channel, for the brain."""
    return ModelCard(name="brain-like", channels=[{"name": "T1", "modality": "MR"}],
                     classes={1: {"name": "brain"}}, body_region="brain", **kw)


# ------------------------------------------------------------------ detection
def test_synthetic_head_ct_is_a_ct_head():
    head = make_head_ct()
    assert detect_modality(head).modality == "CT"
    g = detect_body_region(head)
    assert g.region == "head" and g.skull_fraction >= 0.5, g


def test_abdominal_ct_is_not_a_head():
    img, _ = make_abdomen_ct(seed=3, vary=True)
    assert detect_body_region(img).region != "head"


def test_thighs_ct_is_a_limb_even_cropped_to_one_thigh():
    legs = make_thighs_ct()
    g = detect_body_region(legs)
    assert g.region == "limb" and g.limb_fraction >= 0.9, g
    # a crop around one thigh (as a sarcoma study keeps it) is cut by the field of view
    one = Volume(np.asarray(legs.data)[:, 20:200, 170:330], legs.affine)
    assert detect_body_region(one).region == "limb"
    # bones filled with cancellous bone (as a vertebral body is) are no shafts
    assert detect_body_region(make_thighs_ct(marrow_hu=250.0)).region != "limb"


def test_scan_from_abdomen_to_thighs_is_not_a_limb(ct_card):
    belly, _ = make_abdomen_ct(seed=1, vary=True, shape=(60, 240, 240))
    legs = make_thighs_ct(shape=(90, 240, 240), spacing=belly.spacing)
    both = Volume(np.concatenate([np.asarray(belly.data, np.float32),
                                  np.asarray(legs.data, np.float32)]), belly.affine)
    assert detect_body_region(legs).region == "limb"
    assert detect_body_region(both).region != "limb"
    assert not any("limb" in w for w in check_input(ct_card, [both]))


@pytest.mark.parametrize("seed", [0, 3])
def test_adult_abdomen_with_arms_is_a_trunk_not_a_limb(seed):
    img, _ = make_abdomen_ct(seed=seed, vary=True, shape=(104, 240, 240))
    g = detect_body_region(img)
    assert g.region == "trunk" and g.limb_fraction < 0.1, g


# ------------------------------------------------------------- the CT model
def test_ct_model_on_head_ct_warns_about_the_region(ct_card):
    assert ct_card.body_region == "abdomen"
    warns = check_input(ct_card, [make_head_ct()])
    assert len(warns) == 1 and "head" in warns[0] and "abdomen" in warns[0], warns


def test_ct_model_on_thighs_ct_warns_about_the_region(ct_card):
    warns = check_input(ct_card, [make_thighs_ct()])
    assert len(warns) == 1 and "limb" in warns[0] and "abdomen" in warns[0], warns


@pytest.mark.parametrize("case", ["STS_006", "STS_009"])
def test_ct_model_on_real_thigh_sarcoma_ct_warns(ct_card, case):
    path = REAL / "sarcoma" / case / "CT_image.nii.gz"
    if not path.is_file():
        pytest.skip("shared real data not present")
    from napari_medseg.io import read_volume

    vol = read_volume(path)
    assert detect_body_region(vol).region == "limb"
    warns = check_input(ct_card, [vol])
    assert len(warns) == 1 and "limb" in warns[0], warns


def test_ct_model_on_brain_mr_warns_about_the_modality(ct_card):
    mr, _ = make_head_mr(seed=1, vary=True)
    bare = Volume(np.asarray(mr.data), mr.affine)  # no declared modality: intensities
    for vol in (mr, bare):
        warns = check_input(ct_card, [vol])
        assert warns and "looks like MR" in warns[0] and "expects CT" in warns[0], warns


def test_ct_model_on_real_brain_t1_warns(ct_card):
    path = REAL / "brain_t1_aseg" / "t1.nii.gz"
    if not path.is_file():
        pytest.skip("shared real data not present")
    from napari_medseg.io import read_volume

    warns = check_input(ct_card, [read_volume(path)])
    assert any("looks like MR" in w for w in warns), warns


def test_ct_model_on_abdominal_ct_phantom_is_quiet(ct_card):
    for seed, vary in ((0, False), (5, True)):
        img, truth = make_abdomen_ct(seed=seed, vary=vary)
        assert check_input(ct_card, [img]) == []
        assert check_input(ct_card, [Volume(np.asarray(img.data), img.affine)]) == []
        # the true organ volumes (a small abdomen) are plausible for the card
        assert check_prediction(ct_card, truth) == []


def test_ct_model_on_real_abdominal_dicom_is_quiet(ct_card):
    folder = REAL / "ct_abdomen_dicom"
    if not folder.is_dir():
        pytest.skip("shared real data not present")
    from napari_medseg.io import read_volume

    vol = read_volume(folder)
    assert detect_body_region(vol).region == "trunk"
    assert check_input(ct_card, [vol]) == []  # the right modality and region: no warning
    # A full run (benchmarks/bench_builtin.py) adds only output warnings about a class the
    # current model gets wrong here: a stray blob of "spleen" of about 1 mL (spleen Dice 0).


def test_channel_count_mismatch_warns(ct_card):
    img, _ = make_abdomen_ct(seed=0, shape=(16, 32, 32), spacing=(10, 6, 6))
    warns = check_input(ct_card, [img, img])
    assert any("takes 1 channel" in w for w in warns), warns


# ----------------------------------------------------------- a brain model
def test_brain_model_on_ct_warns():
    card = brain_card()
    img, _ = make_abdomen_ct(seed=2, vary=True)
    warns = check_input(card, [img])
    assert any("looks like CT" in w and "expects MR" in w for w in warns), warns
    assert any("looks like CT" in w for w in check_input(card, [make_head_ct()]))
    mr, _ = make_head_mr(seed=0)
    assert check_input(card, [mr]) == []  # a T1-like head MR fits
    assert not model_fits_modality(card, "CT") and model_fits_modality(card, "MR")


def test_mr_of_a_whole_thigh_is_a_limb_not_a_head():
    thigh = make_thigh_mr()
    assert detect_modality(thigh).modality == "MR"
    g = detect_body_region(thigh)
    assert g.region == "limb" and g.limb_fraction >= 0.8, g  # as wide as a head, uncut
    warns = check_input(brain_card(), [thigh])
    assert any("looks like a limb" in w and "brain" in w for w in warns), warns
    # a thin shell around marrow (a vertebral body) is not a long bone's cortex
    assert detect_body_region(make_thigh_mr(cortex_mm=1.0)).region == "head"
    for seed in range(4):  # heads stay heads
        mr, _ = make_head_mr(seed=seed, vary=True)
        assert detect_body_region(mr, "MR").region == "head"


@pytest.mark.parametrize("case", ["STS_009"])
def test_brain_model_on_real_thigh_mr_warns(case):
    path = REAL / "sarcoma" / case / "MR_T1_image.nii.gz"
    if not path.exists():
        pytest.skip("the shared real scans (../shared/realdata) are not here")
    from napari_medseg.io import read_volume

    mr = read_volume(path)
    assert detect_body_region(mr, "MR").region == "limb"
    warns = check_input(brain_card(), [mr])
    assert any("looks like a limb" in w for w in warns), warns
    t1 = REAL / "brain_t1_aseg" / "t1.nii.gz"
    if t1.exists():  # and the real brain stays a head
        assert check_input(brain_card(), [read_volume(t1)]) == []


def test_deepbet_card_warns_on_ct():
    from napari_medseg.models.deepbet import deepbet_card

    card = deepbet_card()  # the card needs no weights; the model itself is optional
    assert card.body_region == "brain"
    assert card.channels[0]["modality"] == "MR" and card.channels[0]["name"] == "T1"
    warns = check_input(card, [make_head_ct()])
    assert any("looks like CT" in w for w in warns), warns


def test_deepbet_on_ct_run_warns():
    pytest.importorskip("deepbet")
    from napari_medseg.models.run import run_model

    from napari_medseg.errors import Cancelled

    img, _ = make_abdomen_ct(seed=0)
    seen = []
    # the checks speak before the network runs; cancelling right after them keeps it short
    with pytest.raises(Cancelled):
        run_model("deepbet-brain", [img], device="cpu", warn=seen.append,
                  cancel=lambda: bool(seen))
    assert any("looks like CT" in w and "deepbet-brain" in w for w in seen), seen


# -------------------------------------------------------- predicted volumes
def test_predicted_volumes_against_plausible_ranges():
    card = ModelCard(name="m", classes={1: {"name": "liver"}, 2: {"name": "spleen"}},
                     plausible_ml={"liver": [500, 4000], "spleen": [20, 1500]})
    lab = np.zeros((40, 100, 100), np.uint8)  # 1 mL voxels
    vol = Volume(lab, make_affine((10.0, 10.0, 10.0)), is_label=True)
    lab[5:25, 10:60, 10:60] = 1  # 50 000 mL of liver: too much
    assert any("liver: 50000 mL" in w for w in check_prediction(card, vol))
    lab[:] = 0
    lab[10:12, 10:20, 10:20] = 1  # 200 mL whole liver: too little
    assert any("liver: 200.0 mL" in w for w in check_prediction(card, vol))
    assert check_prediction(card, vol, whole=False) == []  # a region may cut it
    lab[:] = 0
    lab[0:2, 10:20, 10:20] = 1  # 200 mL cut by the first slice: may be partial
    lab[20:21, 50:55, 50:56] = 2  # 30 mL spleen, fine
    assert check_prediction(card, vol) == []


# ---------------------------------------------------------------------- CLI
def _tiny_ct_model(name="tiny-abdomen-ct"):
    """A small real model (random 3D U-Net) with an abdominal CT card on a coarse grid."""
    import torch

    from napari_medseg.models.networks import UNet3D
    from napari_medseg.models.predictor import TorchModel

    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "out_channels": 2, "features": [4, 8]}
    card = ModelCard(name=name, channels=[{"name": "CT", "modality": "CT"}],
                     target_spacing=(8.0, 6.0, 6.0), patch_size=(16, 32, 32),
                     normalization=[{"kind": "ct", "window": [-200, 300]}],
                     classes={1: {"name": "liver"}}, body_region="abdomen",
                     network={"class": "UNet3D", "kwargs": kwargs}, weights="model.pt")
    return TorchModel(card, UNet3D(**kwargs))


def test_cli_prints_a_warning_line_for_a_head_ct(tmp_path, capsys):
    import torch

    from napari_medseg.cli import main
    from napari_medseg.io import write_volume

    model = _tiny_ct_model()
    pkg = tmp_path / "tiny"
    pkg.mkdir()
    model.card.save(pkg / "card.yaml")
    torch.save(model.network.state_dict(), pkg / "model.pt")
    src = tmp_path / "head_ct.nii.gz"
    write_volume(src, make_head_ct(), overwrite=True)
    out = tmp_path / "seg.nii.gz"
    rc = main(["predict", str(src), "-m", str(pkg), "-o", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0 and out.is_file()
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert lines and "looks like a head" in lines[0] and "tiny-abdomen-ct" in lines[0], err


# -------------------------------------------------------------------- widget
def _dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    return widget


def _add(viewer, vol, name):
    from napari_medseg._napari.layers import volume_to_layer_data

    data, kwargs, _ = volume_to_layer_data(vol, name=name)
    return viewer.add_image(data, **kwargs)


def _tiny_mr_model():
    import torch

    from napari_medseg.models.networks import UNet3D
    from napari_medseg.models.predictor import TorchModel

    torch.manual_seed(0)
    card = ModelCard(name="tiny-mr", channels=[{"name": "T1", "modality": "MR"}],
                     patch_size=(16, 32, 32), normalization=[{"kind": "zscore"}],
                     classes={1: {"name": "brain"}}, body_region="brain")
    return TorchModel(card, UNet3D(in_channels=1, out_channels=2))


def test_widget_preselects_a_model_that_fits_the_modality(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.add_model(_tiny_mr_model())
    widget.model_box.setCurrentText(MODEL)
    mr, _ = make_head_mr(seed=0)
    bare = Volume(np.asarray(mr.data), mr.affine)  # modality from the intensities
    layer = _add(viewer, bare, "t1")
    assert model_fits_modality(widget.card, "MR"), widget.model_box.currentText()
    assert widget.card.channels[0]["modality"] == "MR"
    assert [lyr.name for lyr in widget.selected_layers()] == ["t1"]
    assert widget.preselect_model(layer) == widget.model_box.currentText()
    _add(viewer, make_head_ct(), "head ct")  # back to a CT model
    assert widget.card.channels[0]["modality"] == "CT"
    assert [lyr.name for lyr in widget.selected_layers()] == ["head ct"]


def test_widget_shows_the_warnings_of_a_run(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    _add(viewer, make_head_ct(), "head ct")
    widget.add_model(_tiny_ct_model())  # the built-in's card checks, on a quick network
    widget.set_images(["head ct"])
    widget.device_box.setCurrentText("cpu")
    widget.fast.setChecked(True)
    assert widget.run() is not None, widget.last_error
    qtbot.waitUntil(lambda: not widget.running, timeout=600_000)
    assert widget.last_error is None
    assert any("looks like a head" in w for w in widget.last_warnings), widget.last_warnings
    assert "warning:" in widget.status.text() and "head" in widget.status.text()
