"""Finding the cases of a worklist folder.

A worklist folder is either

* an nnU-Net v2 raw dataset (``dataset.json`` with ``imagesTr/`` and / or
  ``imagesTs/``): one case per ``{case}_{channel:04d}{file_ending}`` group, with
  ``labelsTr/{case}{file_ending}`` as its reference when present; or
* any folder of volumes napari-medseg reads: files (NIfTI, NRRD, MHA, TIFF,
  Zarr) and DICOM series folders, one case each (found as the batch command
  finds them, :func:`napari_medseg.batch.collect_cases`). Files named like
  labels (``*_seg``, ``*_label(s)``, ``*_mask``) are not cases; when their stem
  matches a case they become its reference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MedSegError

__all__ = ["FoundCase", "scan_folder", "is_nnunet_raw"]

_LABEL_SUFFIX = re.compile(r"^(.*?)[_-](seg|segmentation|label|labels|mask|gt)$", re.I)
_UNC_SUFFIX = re.compile(r"[_-]uncertainty$", re.I)


@dataclass
class FoundCase:
    """One case of a worklist folder.

    Attributes
    ----------
    case_id : str
    paths : list of str
        One path per image channel (a file or a DICOM series folder).
    reference : str or None
        A reference label file, when the folder has one (nnU-Net ``labelsTr``).
    """

    case_id: str
    paths: list
    reference: str | None = None
    extra: dict = field(default_factory=dict)


def is_nnunet_raw(folder) -> bool:
    """True when ``folder`` holds an nnU-Net raw dataset (``dataset.json`` + images)."""
    folder = Path(folder)
    return (folder / "dataset.json").is_file() and (
        (folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir())


def _nnunet_cases(root: Path) -> list:
    try:
        meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedSegError(f"cannot read dataset.json ({exc})", str(root / "dataset.json")) \
            from exc
    ending = str(meta.get("file_ending") or ".nii.gz")
    n_ch = max(1, len(meta.get("channel_names") or meta.get("modality") or {"0": ""}))
    pat = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    out = []
    for sub in ("imagesTr", "imagesTs"):
        groups: dict = {}
        folder = root / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            m = pat.match(f.name)
            if m and not f.name.startswith("."):
                groups.setdefault(m.group(1), {})[int(m.group(2))] = str(f)
        for case, chans in sorted(groups.items()):
            if sorted(chans) != list(range(n_ch)):
                continue  # incomplete case (a channel missing)
            lab = root / "labelsTr" / f"{case}{ending}"
            out.append(FoundCase(case, [chans[c] for c in range(n_ch)],
                                 str(lab) if sub == "imagesTr" and lab.is_file() else None))
    return out


def _strip(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".seg.nrrd", ".ome.tiff", ".ome.tif", ".ome.zarr", ".nii", ".nrrd",
                ".nhdr", ".mha", ".mhd", ".tiff", ".tif", ".zarr"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def scan_folder(folder) -> list:
    """The cases of a worklist folder, in a stable (sorted) order.

    Parameters
    ----------
    folder : str or Path

    Returns
    -------
    list of FoundCase

    Raises
    ------
    MedSegError
        The folder is missing or holds no volume napari-medseg reads.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise MedSegError("the worklist folder does not exist; choose a folder of images, "
                          "DICOM series or an nnU-Net raw dataset", str(root))
    if is_nnunet_raw(root):
        cases = _nnunet_cases(root)
        if not cases:
            raise MedSegError("the nnU-Net dataset holds no complete case in imagesTr/ or "
                              "imagesTs/", str(root))
        return cases
    from ..batch import collect_cases

    found = collect_cases([root])
    images, labels = [], {}
    for c in found:
        stem = _strip(Path(c.paths[0]).name)
        m = _LABEL_SUFFIX.match(stem)
        if len(c.paths) == 1 and m and Path(c.paths[0]).is_file():
            labels[m.group(1)] = c.paths[0]
        elif _UNC_SUFFIX.search(stem):
            continue
        else:
            images.append(c)
    if not images:
        raise MedSegError("the folder holds label files but no image napari-medseg reads",
                          str(root))
    return [FoundCase(c.case_id, list(c.paths), labels.get(_strip(Path(c.paths[0]).name)))
            for c in images]
