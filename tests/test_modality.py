"""Modality detection: DICOM header, file metadata, intensities, user choice."""

from __future__ import annotations


import numpy as np
import pytest

from napari_medseg.core.modality import detect_modality, normalize_modality
from napari_medseg.core.phantom import make_abdomen_ct, make_head_mr
from napari_medseg.core.volume import Volume

from _realdata import REAL


def test_names_normalise():
    assert normalize_modality("PT") == "PET"
    assert normalize_modality("t1") == normalize_modality("FLAIR") == "MR"
    assert normalize_modality("CT") == "CT"
    assert normalize_modality("US") == normalize_modality(None) == "unknown"


def test_phantoms_by_intensity():
    for seed in range(4):
        ct, _ = make_abdomen_ct(seed=seed, vary=True, shape=(24, 64, 64), spacing=(5, 3, 3))
        mr, _ = make_head_mr(seed=seed, vary=True, shape=(32, 40, 32), spacing=(4.5, 3.6, 3.6))
        g_ct, g_mr = detect_modality(ct.data), detect_modality(mr.data)
        assert (g_ct.modality, g_ct.source) == ("CT", "intensities"), g_ct
        assert (g_mr.modality, g_mr.source) == ("MR", "intensities"), g_mr


def test_pet_like_uptake():
    rng = np.random.default_rng(0)
    pet = rng.gamma(2.0, 0.3, size=(20, 40, 40)).astype(np.float32)  # dim body, SUV ~0.6
    pet[:, :4] = 0.0  # air
    pet[6:14, 14:26, 14:26] += rng.uniform(4.0, 15.0, size=(8, 12, 12))  # hot spots
    g = detect_modality(pet)
    assert g.modality == "PET", g


def test_sources_in_order():
    ct, _ = make_abdomen_ct(shape=(16, 32, 32), spacing=(5, 6, 6))
    assert detect_modality(ct).source == "file"  # the generator says CT
    dicom = Volume(ct.data, ct.affine, modality="CT", meta={"format": "dicom"})
    assert detect_modality(dicom).source == "dicom"
    assert detect_modality(ct, user="MR").modality == "MR"
    unnamed = Volume(np.asarray(ct.data), ct.affine, meta={"nifti_description": "T1 MPRAGE"})
    g = detect_modality(unnamed)
    assert (g.modality, g.source) == ("MR", "file")
    assert detect_modality(np.zeros((4, 8, 8))).modality == "unknown"


def test_dicom_reader_records_modality(tmp_path):
    folder = REAL / "ct_abdomen_dicom"
    if not folder.is_dir():
        pytest.skip("shared real data not present")
    from napari_medseg.io import read_volume

    g = detect_modality(read_volume(folder))
    assert (g.modality, g.source) == ("CT", "dicom")


@pytest.mark.parametrize("rel, want", [
    ("spleen_ct/ct.nii.gz", "CT"),
    ("brain_t1_aseg/t1.nii.gz", "MR"),
    ("sarcoma/STS_001/CT_image.nii.gz", "CT"),
    ("sarcoma/STS_001/MR_T1_image.nii.gz", "MR"),
    ("sarcoma/STS_001/PET_image.nii.gz", "PET"),
    ("brats/brats_2013_pat0005_1/T1c_subtrMeanDivStd.nii.gz", "MR"),
])
def test_real_scans_by_intensity(rel, want):
    path = REAL / rel
    if not path.is_file():
        pytest.skip("shared real data not present")
    from napari_medseg.io import read_volume

    g = detect_modality(read_volume(path))
    assert (g.modality, g.source) == (want, "intensities"), g
