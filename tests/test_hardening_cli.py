"""The command line checks its outputs before inference and fails with one line, never a
traceback or a crash, on hostile inputs; a run with several outputs writes all or none."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from napari_medseg.io import read_volume, write_volume

from test_cli import run_cli
from test_models_loaders import box_volume, save_torchscript_package


@pytest.fixture
def setup(tmp_path):
    vol, truth = box_volume()
    image = write_volume(tmp_path / "box.nii.gz", vol)
    pkg = save_torchscript_package(tmp_path / "pkg")
    return tmp_path, image, pkg, vol


def _one_line_error(r, *words):
    # one error line (warnings about the input and a progress bar may come before it)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("napari-medseg: error:")]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and r.stderr.rstrip().endswith(lines[0]), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["suffix", "folder", "is-a-folder", "same-as-uncertainty"])
def test_outputs_are_checked_before_the_model_loads(setup, case):
    tmp, image, _, _ = setup
    out, unc, words = tmp / "seg.nii.gz", None, ()
    if case == "suffix":
        out, words = tmp / "seg.png", ("seg.png", "must end with")
    elif case == "folder":
        out, words = tmp / "missing" / "seg.nii.gz", ("does not exist",)
    elif case == "is-a-folder":
        out, words = tmp / "dir.nii.gz", ("is a folder",)
        out.mkdir()
    else:
        unc, words = out, ("two outputs",)
    extra = ["--uncertainty", unc] if unc else []
    # the model does not exist: the output error must come first
    r = run_cli("predict", image, "-m", "no-such-model", "-o", out, *extra)
    _one_line_error(r, *words)


def test_output_never_replaces_an_input(setup):
    tmp, image, pkg, _ = setup
    before = image.read_bytes()
    r = run_cli("predict", image, "-m", pkg, "-o", image, "--overwrite")
    _one_line_error(r, "is also an input")
    link = tmp / "link.nii.gz"
    link.symlink_to(image)
    r = run_cli("predict", image, "-m", pkg, "-o", link, "--overwrite")
    _one_line_error(r, "is also an input")
    r = run_cli("predict", image, "-m", pkg, "-o", tmp / "." / "box.nii.gz", "--overwrite")
    _one_line_error(r, "is also an input")
    assert image.read_bytes() == before


@pytest.mark.parametrize("value, words", [(0.0, ("all zero",)), (7.0, ("constant",)),
                                          (3e38, ("beyond any real CT or MR",))])
def test_images_with_nothing_to_segment_are_refused(setup, value, words):
    tmp, _, pkg, vol = setup
    data = np.full(vol.shape3, value, np.float32)
    if value == 3e38:
        data[0, 0, 0] = 0.0  # not constant: absurd
    path = write_volume(tmp / "odd.nii.gz", vol.with_data(data))
    out = tmp / "seg.nii.gz"
    r = run_cli("predict", path, "-m", pkg, "-o", out)
    _one_line_error(r, "odd.nii.gz", *words)
    assert not out.exists()


def test_broken_files_give_one_line_never_a_traceback_or_crash(setup):
    tmp, _, pkg, _ = setup
    # a .nii whose header promises more voxels than the file holds
    nii = tmp / "wrong_size.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(nii))
    raw = bytearray(nii.read_bytes())
    raw[42:48] = struct.pack("<hhh", 800, 800, 800)  # dim[1..3]
    nii.write_bytes(bytes(raw))
    # a TIFF with a compression tag nothing can decode
    tif = tmp / "bad_compression.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint16), compression="zlib",
                     photometric="minisblack")
    raw = bytearray(tif.read_bytes())
    with tifffile.TiffFile(tif) as t:
        offsets = [p.tags["Compression"].offset for p in t.pages]
    for off in offsets:
        raw[off + 8:off + 10] = struct.pack("<H", 54321)
    tif.write_bytes(bytes(raw))
    # a MetaImage with NDims = -1 (SimpleITK segfaults on it)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6), np.int16)), str(tmp / "ok.mha"))
    mha = tmp / "ndims.mha"
    mha.write_bytes((tmp / "ok.mha").read_bytes().replace(b"NDims = 3", b"NDims = -1"))
    for path, word in ((nii, "claims"), (tif, "compression 54321"), (mha, "NDims = -1")):
        r = run_cli("predict", path, "-m", pkg, "-o", tmp / "out.nii.gz")
        _one_line_error(r, path.name, word)


_CHILD_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from napari_medseg.cli import main
    limit = int(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(main(sys.argv[2:]))
""")


def test_labels_and_uncertainty_are_written_all_or_none(setup):
    """The disk "fills up" (a file-size limit) while writing the uncertainty map, the
    second output: the labels written just before are taken back, the old ones restored."""
    tmp, image, pkg, vol = setup
    out, unc = tmp / "seg.nii.gz", tmp / "unc.nii"  # .nii: the uncertainty is large
    old = vol.like_labels(np.full(vol.shape3, 3, np.uint8))
    from napari_medseg.io import write_labels

    write_labels(out, old)
    before = sorted(p.name for p in tmp.iterdir())
    limit = 20_000  # the labels (~1 KB) fit, the float32 map (~37 KB) does not
    r = subprocess.run([sys.executable, "-c", _CHILD_FULL_DISK, str(limit), "predict",
                        str(image), "-m", str(pkg), "-o", str(out), "--uncertainty", str(unc),
                        "--overwrite", "--device", "cpu"],
                       capture_output=True, text=True, timeout=240)
    _one_line_error(r, "unc.nii")
    assert sorted(p.name for p in tmp.iterdir()) == before  # nothing new, nothing left
    np.testing.assert_array_equal(np.asarray(read_volume(out).data), 3)
    # without the limit both are written
    r = run_cli("predict", image, "-m", pkg, "-o", out, "--uncertainty", unc, "--overwrite",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert unc.exists() and int(np.asarray(read_volume(out).data).max()) == 1
