"""Shipped sample files: present, small, exactly regenerable, loadable without napari."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.data import SAMPLES, generate_sample, load_sample, write_sample_files

ROOT = Path(__file__).resolve().parents[1]


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_shipped_files_small_and_mirrored(key):
    for shipped, copy in zip(SAMPLES[key].paths(), SAMPLES[key].paths(ROOT / "sample_data")):
        assert shipped.is_file(), f"missing {shipped}; run scripts/make_sample_data.py"
        assert shipped.stat().st_size < 2_000_000
        assert copy.is_file() and _md5(copy) == _md5(shipped)


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_regenerating_gives_identical_files(key, tmp_path):
    written = write_sample_files(tmp_path, keys=[key])
    for new, shipped in zip(written, SAMPLES[key].paths()):
        a = np.asarray(nib.load(new).dataobj)
        b = np.asarray(nib.load(shipped).dataobj)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(nib.load(new).affine, nib.load(shipped).affine)
        assert _md5(new) == _md5(shipped)  # gzip without time stamp: byte-identical


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_load_sample_matches_generator(key):
    img, lab = load_sample(key)
    gimg, glab = generate_sample(key)
    assert img.source and img.source.endswith(".nii.gz")
    np.testing.assert_array_equal(img.data, gimg.data)
    np.testing.assert_array_equal(lab.data, glab.data)
    np.testing.assert_array_equal(img.affine, gimg.affine)
    np.testing.assert_array_equal(lab.affine, gimg.affine)
    assert lab.is_label and lab.label_names == SAMPLES[key].names
    assert img.modality == SAMPLES[key].modality
    # the generated fallback carries the same names
    g2, l2 = load_sample(key, prefer_files=False)
    assert g2.source is None and l2.label_names == lab.label_names


def test_abdomen_file_geometry_is_dicom_like():
    img, _ = load_sample("abdomen-ct")
    assert img.orientation_code() == "LPS"
    np.testing.assert_allclose(img.spacing, (2.5, 1.5, 1.5))
    # the volume centre is at the world origin
    centre = img.affine @ np.array([63.5, 63.5, 31.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)


def test_unknown_sample():
    with pytest.raises(KeyError, match="abdomen-ct"):
        load_sample("knee-mr")
