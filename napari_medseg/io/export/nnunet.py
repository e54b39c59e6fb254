"""Append corrected cases to an nnU-Net v2 raw dataset folder.

Layout (nnU-Net v2 "raw" format)::

    DatasetXXX_Name/
      dataset.json          channel_names, labels, numTraining, file_ending
      imagesTr/{case}_{channel:04d}.nii.gz
      labelsTr/{case}.nii.gz
      datalist.json         the same cases as a MONAI datalist
      ledger/{case}/        the correction ledger (original prediction and diff)

New case ids never reuse an existing one: an id is claimed by creating its
reservation folder (``.medseg/cases/{case}``, an atomic ``mkdir``) before any
file is written, so two exports running at once get different ids. Each file
is first written into ``.medseg/staging/{case}/`` and then renamed into place
(the label file last), so nnU-Net never sees a partial case, even when the
process is killed; a failed export removes what it had published. What an
export killed mid-case leaves behind (its staging folder, reservation and any
images published without their label) is removed by the next export into the
dataset once that writer's process is known to be dead (see ``_staging``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ...core.volume import Volume, same_grid
from ...errors import Cancelled, MedSegError, check_cancel
from ._staging import claim_case_id, clean_stale, finish_case, release_case_id
from ._util import folder_lock, read_json, write_json
from .monai import append_datalist

log = logging.getLogger(__name__)

__all__ = ["export_training_case", "dataset_folder", "read_dataset_json", "FILE_ENDING"]

FILE_ENDING = ".nii.gz"
_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")
_FIRST_USER_ID = 501


def dataset_folder(raw_root, name: str, dataset_id: int | None = None) -> Path:
    """The ``DatasetXXX_<name>`` folder for ``name`` under an nnU-Net raw root.

    An existing folder with this name is reused; otherwise the lowest free id
    from 501 up (or ``dataset_id``) is chosen. The folder is not created.
    """
    raw_root = Path(raw_root)
    name = _clean_name(name)
    used = {}
    if raw_root.is_dir():
        for p in raw_root.iterdir():
            m = _DATASET_RE.match(p.name)
            if m and p.is_dir():
                used[int(m.group(1))] = m.group(2)
    for i, n in sorted(used.items()):
        if n == name and (dataset_id is None or i == dataset_id):
            return raw_root / f"Dataset{i:03d}_{name}"
    if dataset_id is None:
        dataset_id = next(i for i in range(_FIRST_USER_ID, 1000) if i not in used)
    elif dataset_id in used:
        raise MedSegError(f"dataset id {dataset_id} is already used by "
                          f"Dataset{dataset_id:03d}_{used[dataset_id]}; choose another id",
                          str(raw_root))
    return raw_root / f"Dataset{dataset_id:03d}_{name}"


def _clean_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_")
    if not name:
        raise MedSegError("the dataset name is empty; give it a name of letters and digits")
    return name


def read_dataset_json(dataset_dir) -> dict | None:
    """``dataset.json`` of an nnU-Net raw dataset folder, or None when missing."""
    return read_json(Path(dataset_dir) / "dataset.json")


# --------------------------------------------------------------------- labels
def _merged_labels(existing: dict | None, names: dict, present, where: str) -> dict:
    """Merge class names into nnU-Net's ``{"background": 0, name: id}`` mapping."""
    by_id = {0: "background"}
    if existing:
        for n, i in existing.items():
            if isinstance(i, (list, tuple)):
                raise MedSegError("region-based nnU-Net datasets are not supported; "
                                  "export into a new dataset", where)
            by_id[int(i)] = str(n)
    for i, n in names.items():
        i = int(i)
        if i == 0:
            continue
        if existing and i in by_id and by_id[i] != n:
            raise MedSegError(f"class {i} is '{by_id[i]}' in dataset.json but '{n}' in "
                              "these labels; rename the class or export into another "
                              "dataset", where)
        by_id.setdefault(i, str(n))
    for i in present:
        by_id.setdefault(int(i), f"label_{int(i)}")
    top = max(by_id)
    for i in range(1, top + 1):  # nnU-Net needs consecutive ids
        by_id.setdefault(i, f"label_{i}")
    seen, out = set(), {}
    for i in sorted(by_id):
        n = by_id[i]
        if n in seen:
            n = f"{n}_{i}"
        seen.add(n)
        out[n] = i
    return out


def _channel_names(existing: dict | None, channel_names, vols, where: str) -> dict:
    if channel_names is None:
        channel_names = [v.modality if v.modality not in ("unknown", "") else f"channel_{i}"
                         for i, v in enumerate(vols)]
    if len(channel_names) != len(vols):
        raise MedSegError(f"{len(channel_names)} channel names for {len(vols)} images; "
                          "give one name per image channel", where)
    new = {str(i): str(n) for i, n in enumerate(channel_names)}
    if existing is not None:
        old = existing.get("channel_names", {})
        if len(old) != len(new):
            raise MedSegError(f"the dataset has {len(old)} image channel(s) "
                              f"({', '.join(old.values())}) but {len(new)} were given; "
                              "select the same image channels or use another dataset", where)
        return old
    return new


# ---------------------------------------------------------------------- files
def _split_channels(image_vols) -> list[Volume]:
    if isinstance(image_vols, Volume):
        image_vols = [image_vols]
    out = []
    for v in image_vols:
        if v.data.ndim == 4:
            out.extend(v.with_data(v.data[c]) for c in range(v.n_channels))
        else:
            out.append(v)
    if not out:
        raise MedSegError("no image given; a training case needs the image as well "
                          "as the labels")
    return out


def _write(path: Path, vol: Volume, label: bool) -> None:
    from .. import write_labels, write_volume

    if label:
        write_labels(path, vol, overwrite=False, verify=True)
    else:
        write_volume(path, vol, overwrite=False)


def export_training_case(image_vols, labels: Volume, dataset_dir, dataset_name=None,
                         channel_names=None, label_names=None, ledger=None,
                         case_prefix: str = "case", datalist="datalist.json",
                         progress=None, cancel=None) -> str:
    """Append one image/labels pair to an nnU-Net v2 raw dataset (and a MONAI datalist).

    Parameters
    ----------
    image_vols : Volume or list of Volume
        The image channel(s), each ``(Z, Y, X)`` (a ``(C, Z, Y, X)`` Volume gives
        ``C`` channels), on the labels' grid.
    labels : Volume
        ``(Z, Y, X)`` integer label map (e.g. the corrected prediction).
    dataset_dir : str or Path
        The ``DatasetXXX_Name`` folder (created when missing; see
        :func:`dataset_folder` to pick one under an nnU-Net raw root).
    dataset_name : str, optional
        ``name`` in ``dataset.json`` (default: the folder name).
    channel_names : sequence of str, optional
        One per channel (``"CT"`` selects nnU-Net's CT normalisation); default:
        each Volume's modality. An existing dataset keeps its own.
    label_names : dict[int, str], optional
        Class names (default: ``labels.label_names``). Merged with the dataset's
        classes; a clash (same id, other name) is an error.
    ledger : CorrectionLedger, optional
        Saved to ``ledger/{case}/`` with the current labels (the user's diff).
    case_prefix : str
        Case ids are ``{case_prefix}_{n:03d}`` with the lowest free ``n``.
    datalist : str, Path or None
        MONAI datalist to append to, relative to ``dataset_dir`` (None: none).
    progress, cancel : callable, optional
        ``progress(done, total)`` and ``cancel() -> bool``.

    Returns
    -------
    str
        The new case id.

    Raises
    ------
    MedSegError
        Images and labels on different grids, non-integer labels, channel or
        class mismatches with the existing dataset, or an unwritable folder.
    Cancelled
        When cancelled; nothing of the case is left behind.
    """
    dataset_dir = Path(dataset_dir)
    where = str(dataset_dir)
    vols = _split_channels(image_vols)
    lab = np.asarray(labels.data)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise MedSegError(f"labels must be integers, got {lab.dtype}; use a Labels layer",
                          where)
    if lab.size and lab.min() < 0:
        raise MedSegError("labels contain negative values; relabel them first", where)
    for i, v in enumerate(vols):
        if not same_grid(v, (lab.shape, labels.affine)):
            raise MedSegError(f"image channel {i} (shape {v.shape3}) is not on the labels' "
                              f"grid (shape {lab.shape}); export the labels drawn on this "
                              "image", where)
    names = dict(label_names if label_names is not None else labels.label_names)
    affine = vols[0].affine  # one affine for every file: identical geometry
    try:
        dataset_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("imagesTr", "labelsTr"):
            (dataset_dir / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise MedSegError(f"cannot create the dataset folder ({exc.strerror}); choose a "
                          "writable folder", where) from exc

    present = [int(v) for v in np.unique(lab) if v != 0]
    with folder_lock(dataset_dir):  # validate against dataset.json before writing
        existing = read_dataset_json(dataset_dir)
        _channel_names(existing, channel_names, vols, where)
        _merged_labels((existing or {}).get("labels"), names, present, where)
    dtype = np.uint8 if (max(present, default=0) < 256) else np.uint16
    lab_vol = Volume(lab.astype(dtype, copy=False), affine=affine, is_label=True,
                     label_names=names, label_colors=dict(labels.label_colors))

    try:
        clean_stale(dataset_dir, FILE_ENDING)
        case = claim_case_id(dataset_dir, case_prefix, FILE_ENDING,
                             datalist=None if not datalist else str(datalist))
    except OSError as exc:
        raise MedSegError(f"cannot reserve a case id in {dataset_dir / '.medseg'} "
                          f"({exc.strerror}); choose a writable folder", where) from exc
    stage = dataset_dir / ".medseg" / "staging" / case
    moved: list[Path] = []
    total = len(vols) + 3
    try:
        stage.mkdir(parents=True)
        staged = []
        for c, v in enumerate(vols):
            check_cancel(cancel)
            name = f"{case}_{c:04d}{FILE_ENDING}"
            _write(stage / name, Volume(np.asarray(v.data), affine=affine,
                                        modality=v.modality), False)
            staged.append((stage / name, dataset_dir / "imagesTr" / name))
            if progress:
                progress(c + 1, total)
        check_cancel(cancel)
        label_name = f"{case}{FILE_ENDING}"
        _write(stage / label_name, lab_vol, True)
        staged.append((stage / label_name, dataset_dir / "labelsTr" / label_name))
        if ledger is not None:
            check_cancel(cancel)
            from ..ledger import save_ledger

            save_ledger(ledger, stage / "ledger", current=lab)
            staged.append((stage / "ledger", dataset_dir / "ledger" / case))
        if progress:
            progress(len(vols) + 2, total)
        check_cancel(cancel)
        # publish: images first, the label (which completes the case) after them
        (dataset_dir / "ledger").mkdir(exist_ok=True)
        for src, dst in staged:
            if dst.exists():
                raise MedSegError(f"{dst.name} appeared while exporting; export again",
                                  where)
            os.replace(src, dst)
            moved.append(dst)
        _update_dataset_json(dataset_dir, dataset_name, channel_names, vols, names, present)
        if datalist:
            append_datalist(dataset_dir / datalist, [d for _, d in staged[: len(vols)]],
                            dataset_dir / "labelsTr" / label_name, extra={"case": case},
                            modality=(read_dataset_json(dataset_dir) or {}).get("channel_names"))
        shutil.rmtree(stage, ignore_errors=True)
        finish_case(dataset_dir, case)  # after the staging folder: see _staging
    except BaseException as exc:
        for p in reversed(moved):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.rmtree(stage, ignore_errors=True)
        release_case_id(dataset_dir, case)
        if isinstance(exc, (MedSegError, Cancelled)):
            raise
        if isinstance(exc, OSError):
            raise MedSegError(f"could not write the training case ({exc}); nothing was "
                              "added", where) from exc
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if progress:
        progress(total, total)
    log.info("added training case %s to %s", case, dataset_dir)
    return case


def _count_cases(dataset_dir: Path, n_channels: int) -> int:
    n = 0
    for p in (dataset_dir / "labelsTr").glob(f"*{FILE_ENDING}"):
        if p.name.startswith("."):
            continue
        case = p.name[: -len(FILE_ENDING)]
        if all((dataset_dir / "imagesTr" / f"{case}_{c:04d}{FILE_ENDING}").exists()
               for c in range(n_channels)):
            n += 1
    return n


def _update_dataset_json(dataset_dir: Path, dataset_name, channel_names, vols, names,
                         present) -> None:
    where = str(dataset_dir)
    with folder_lock(dataset_dir):
        existing = read_dataset_json(dataset_dir)
        info = dict(existing or {})
        info["channel_names"] = _channel_names(existing, channel_names, vols, where)
        info["labels"] = _merged_labels((existing or {}).get("labels"), names, present, where)
        info["numTraining"] = _count_cases(dataset_dir, len(info["channel_names"]))
        info["file_ending"] = FILE_ENDING
        info.setdefault("name", dataset_name or dataset_dir.name)
        info.setdefault("description", "Cases exported from napari-medseg (corrected "
                                       "labels on their source images)")
        write_json(dataset_dir / "dataset.json", info)
