"""Property-based fuzzing of every reader (Hypothesis, fixed seed, short CI budget).

Valid files of every format are mutated (header edits, bit flips, truncation,
overwritten runs: the mutations of ``benchmarks/fuzz_readers.py``, which runs
the long version in guarded child processes). Whatever the mutation, reading
the file (voxels included) either fails with ONE :class:`MedSegError` line
naming it, or gives a volume with a finite, invertible affine and plausible
voxel sizes (and, for ``.nii.gz``, an intact gzip stream).
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from napari_medseg.errors import MedSegError  # noqa: E402
from napari_medseg.io import read_volume  # noqa: E402

_SPEC = importlib.util.spec_from_file_location(
    "fuzz_readers", Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_readers.py")
fuzz = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz)

FORMATS = ["nii", "nii.gz", "nrrd", "nrrd-raw", "seg.nrrd", "mha", "mha-raw", "mhd", "tif",
           "tif-zlib", "ome.tif", "dicom"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    return fuzz.make_seeds(folder), tmp_path_factory.mktemp("cases")


def _gzip_intact(path) -> bool:
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
        return True
    except (OSError, EOFError, zlib.error):
        return False


def _place(seeds, fmt, kind, seed, n):
    files, cases = seeds
    rng = np.random.default_rng(seed)
    case = cases / f"c{n}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    src = files[fmt]
    if fmt == "dicom":
        target = case / "dicom"
        shutil.copytree(src, target)
        slices = sorted(target.iterdir())
        victim = slices[int(rng.integers(0, len(slices)))]
        victim.write_bytes(fuzz.mutate(victim.read_bytes(), kind, fmt, rng)[0])
        return target
    if fmt == "mhd":
        shutil.copy(src.with_suffix(".raw"), case / "img.raw")
    target = case / src.name
    target.write_bytes(fuzz.mutate(src.read_bytes(), kind, fmt, rng)[0])
    return target


_count = iter(range(10**9))


@settings(max_examples=96, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), kind=st.sampled_from(fuzz.KINDS),
       seed=st.integers(0, 2**32 - 1))
def test_mutated_files_fail_cleanly_or_read_sanely(seeds, fmt, kind, seed):
    target = _place(seeds, fmt, kind, seed, next(_count) % 8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = read_volume(target, lazy=True)
            np.asarray(vol.data)
    except MedSegError as exc:
        text = str(exc)
        assert "\n" not in text.strip(), text
        assert str(target) in text or str(target.parent) in text, text
        assert not isinstance(exc.__cause__, MemoryError), text  # a size check missed
        return
    aff = np.asarray(vol.affine, float)
    assert np.all(np.isfinite(aff)), aff
    norms = np.linalg.norm(aff[:3, :3], axis=0)
    assert np.all((norms >= 1e-4) & (norms <= 1e3)), norms
    assert abs(np.linalg.det(aff[:3, :3] / norms)) > 1e-6, aff
    if fmt == "nii.gz":
        assert _gzip_intact(target), "a corrupt gzip stream was accepted"
