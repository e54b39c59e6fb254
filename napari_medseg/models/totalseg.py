"""TotalSegmentator's weights, found where TotalSegmentator keeps them, run in the plugin's engine.

TotalSegmentator (Wasserthal et al., Radiology: AI 2023) stores each task as an
nnU-Net v2 result folder under its weights folder: ``$TOTALSEG_WEIGHTS_PATH``,
else ``$TOTALSEG_HOME_DIR/nnunet/results``, else
``~/.totalsegmentator/nnunet/results`` (e.g.
``Dataset291_TotalSegmentator_part1_organs_1559subj/`` holding
``nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/fold_0``).
Nothing is downloaded: :func:`discover` offers the tasks whose folders are there.

- ``total``: the five 1.5 mm part models (datasets 291-295: organs, vertebrae,
  cardiac, muscles, ribs) run one after the other and merged into the 117
  classes with TotalSegmentator's names and ids (a later part's class
  overwrites an earlier one where both claim a voxel, as TotalSegmentator's
  merge does); ``roi_subset`` runs only the parts holding the chosen classes
  and keeps only those classes.
- ``total-fast`` (297, 3 mm, 117 classes), ``total-fastest`` (298, 6 mm),
  ``total_mr`` (730 + 731, or the older 850 + 851), ``total_mr-fast`` (732 / 852),
  ``body`` (299) and ``body-fast`` (300).
- any other dataset folder: offered as ``totalseg-<dataset name>`` and run on
  the whole image at its own plans' spacing.

The class map comes from the ``totalsegmentator`` package when it is installed
(``napari-medseg[totalseg]``), else from each folder's ``dataset.json`` (the
117-class ids of ``total`` are the five parts' classes in part order, which is
TotalSegmentator's own numbering).

Each run follows TotalSegmentator's steps before and after nnU-Net: reorient
to the closest canonical (RAS) axes (``nibabel.as_closest_canonical``),
resample to the task's spacing with ``scipy.ndimage.zoom(order=1,
mode="nearest")`` (its ``resampling_order``, :attr:`TotalSegModel.resampling_order`)
and cast to int32 (not when the voxel sizes already equal the task's spacing),
run the nnU-Net model(s) (here: the native engine of
:mod:`napari_medseg.models.nnunet_native`, windows at TotalSegmentator's step:
0.8 for the 1.5 mm ``total`` parts, 0.5 otherwise, no mirroring), merge, zoom
the labels back with order 0 (``mode="nearest"``) to the canonical input shape
and undo the reorientation. These steps are those of TotalSegmentator v2.18.0,
checked against its own ``python_api.totalsegmentator`` in
``tests/test_totalseg.py`` when the package is installed. Not reproduced:
TotalSegmentator's split of very large images (> 512 x 512 x 900 voxels after
resampling) into three overlapping z-blocks (a memory measure it needs and the
engine does not), the rough 6 mm crop it runs first for ``roi_subset`` and for
organ-cropped tasks, and its post-processing of the ``body`` task.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedSegError, check_cancel
from .card import ModelCard
from .predictor import Model

__all__ = ["weights_dir", "discover", "TotalSegTask", "TotalSegModel", "load_totalseg",
           "TASKS", "totalseg_infos"]

log = logging.getLogger(__name__)

_OPEN = "Apache-2.0 (TotalSegmentator's openly available tasks)"
_LICENSED = {301, 302, 303, 304, 481, 734, 737}


@dataclass(frozen=True)
class _Spec:
    ids: tuple  # alternatives: each a tuple of dataset ids run and merged in order
    spacing: float | None
    step: float
    modality: str
    description: str
    class_map_key: str


#: Named tasks (TotalSegmentator's ``python_api.py``): dataset ids, resampling, window step.
TASKS = {
    "total": _Spec(((291, 292, 293, 294, 295),), 1.5, 0.8, "CT",
                   "117 anatomical structures in CT (five 1.5 mm part models)", "total"),
    "total-fast": _Spec(((297,),), 3.0, 0.5, "CT", "117 structures in CT, one 3 mm model",
                        "total"),
    "total-fastest": _Spec(((298,),), 6.0, 0.5, "CT", "117 structures in CT, one 6 mm model",
                           "total"),
    "total_mr": _Spec(((730, 731), (850, 851)), 1.5, 0.5, "MR",
                      "anatomical structures in MR (two 1.5 mm part models)", "total_mr"),
    "total_mr-fast": _Spec(((732,), (852,)), 3.0, 0.5, "MR",
                           "anatomical structures in MR, one 3 mm model", "total_mr"),
    "body": _Spec(((299,),), 1.5, 0.5, "CT", "body trunk and extremities in CT", "body"),
    "body-fast": _Spec(((300,),), 6.0, 0.5, "CT", "body trunk and extremities in CT (6 mm)",
                       "body"),
}
#: dataset id -> TotalSegmentator's part class map name (``class_map_5_parts`` / MR parts)
_PART_MAPS = {291: "class_map_part_organs", 292: "class_map_part_vertebrae",
              293: "class_map_part_cardiac", 294: "class_map_part_muscles",
              295: "class_map_part_ribs", 730: "class_map_part_organs",
              731: "class_map_part_muscles", 850: "class_map_part_organs",
              851: "class_map_part_muscles"}


# ------------------------------------------------------------------ discovery
def weights_dir() -> Path:
    """TotalSegmentator's weights folder (it may not exist).

    ``$TOTALSEG_WEIGHTS_PATH``, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else
    ``~/.totalsegmentator/nnunet/results``, as TotalSegmentator resolves it.
    """
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"]).expanduser()
    home = os.environ.get("TOTALSEG_HOME_DIR")
    base = Path(home).expanduser() if home else Path.home() / ".totalsegmentator"
    return base / "nnunet" / "results"


def _result_folder(dataset_dir: Path) -> Path | None:
    """The 3d_fullres ``<Trainer>__<Plans>__<config>`` folder with a fold-0 checkpoint."""
    found = []
    for p in sorted(dataset_dir.iterdir()):
        if p.is_dir() and (p / "plans.json").is_file() and (p / "dataset.json").is_file() and \
                any((f / "checkpoint_final.pth").is_file() for f in p.glob("fold_*")):
            found.append(p)
    found.sort(key=lambda p: (not p.name.endswith("__3d_fullres"), p.name))
    return found[0] if found else None


def _datasets(root: Path) -> dict:
    """``{dataset id: result folder}`` for every usable dataset folder under ``root``."""
    out = {}
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        m = re.match(r"Dataset(\d{3})_", d.name)
        if m and d.is_dir():
            folder = _result_folder(d)
            if folder is not None:
                out[int(m.group(1))] = folder
    return out


@dataclass
class TotalSegTask:
    """One task whose weights are on disk.

    Attributes
    ----------
    name : str
        ``total``, ``total-fast``, ... or ``totalseg-<dataset name>``.
    folders : list of Path
        nnU-Net result folders run in this order (several for ``total``).
    dataset_ids : list of int
    spacing : float or None
        Isotropic spacing (mm) TotalSegmentator resamples to; None keeps the input's.
    step : float
        nnU-Net tile step (``1 - overlap``).
    classes : dict
        ``{id: name}`` of the merged output.
    part_maps : list of dict
        Per folder, ``{local id: output id}``.
    """

    name: str
    folders: list
    dataset_ids: list
    spacing: float | None
    step: float
    modality: str
    description: str
    classes: dict
    part_maps: list
    class_map_source: str
    license: str
    extra: dict = field(default_factory=dict)


def _labels_of(folder: Path) -> dict:
    import json

    ds = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    return {int(v): str(k) for k, v in ds.get("labels", {}).items()
            if isinstance(v, int) and int(v) > 0}


def _package_maps():
    try:
        from totalsegmentator import map_to_binary as mtb
    except Exception:  # optional extra, any import problem means "not available"
        return None
    return mtb


def _class_maps(spec_key, ids, folders):
    """Merged ``{id: name}``, per-folder ``{local: merged}`` maps and where they came from."""
    mtb = _package_maps()
    if mtb is not None and spec_key in getattr(mtb, "class_map", {}):
        merged = {int(k): str(v) for k, v in mtb.class_map[spec_key].items()}
        inv = {v: k for k, v in merged.items()}
        part_maps = []
        for tid, folder in zip(ids, folders):
            local = None
            if len(ids) > 1:
                groups = getattr(mtb, "class_map_5_parts", {}) if spec_key == "total" else \
                    getattr(mtb, "class_map_parts_mr", {})
                local = groups.get(_PART_MAPS.get(tid, ""))
            local = {int(k): str(v) for k, v in (local or _labels_of(folder)).items()}
            part_maps.append({k: inv[v] for k, v in local.items() if v in inv})
        return merged, part_maps, "totalsegmentator package"
    merged, part_maps, offset = {}, [], 0
    for folder in folders:
        local = _labels_of(folder)
        if len(folders) == 1:
            part_maps.append({k: k for k in local})
            merged.update(local)
            continue
        pm = {}
        for k in sorted(local):
            pm[k] = offset + k
            merged[offset + k] = local[k]
        offset = max(merged) if merged else offset
        part_maps.append(pm)
    return merged, part_maps, "dataset.json"


def discover(root=None) -> list:
    """The TotalSegmentator tasks whose weights are in ``root`` (default :func:`weights_dir`).

    Returns
    -------
    list of TotalSegTask
        Named tasks first (all their parts present), then every other dataset.
    """
    root = Path(root) if root is not None else weights_dir()
    sets = _datasets(root)
    tasks, used = [], set()
    for name, spec in TASKS.items():
        for ids in spec.ids:
            if all(i in sets for i in ids):
                folders = [sets[i] for i in ids]
                try:
                    classes, maps, src = _class_maps(spec.class_map_key, ids, folders)
                except (OSError, ValueError) as exc:
                    log.warning("skipping TotalSegmentator task %s: %s", name, exc)
                    break
                tasks.append(TotalSegTask(
                    name, folders, list(ids), spec.spacing, spec.step, spec.modality,
                    spec.description, classes, maps, src, _OPEN))
                used.update(ids)
                break
    for tid, folder in sets.items():
        if tid in used:
            continue
        try:
            classes, maps, src = _class_maps("", [tid], [folder])
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", folder, exc)
            continue
        lic = ("needs a TotalSegmentator licence (free for non-commercial use)"
               if tid in _LICENSED else "see TotalSegmentator's README (its open tasks are "
               "Apache-2.0; some tasks need a licence)")
        tasks.append(TotalSegTask(
            f"totalseg-{folder.parent.name}", [folder], [tid], None, 0.5, "CT",
            f"TotalSegmentator dataset {folder.parent.name}", classes, maps, src, lic))
    return tasks


def _card(task: TotalSegTask) -> ModelCard:
    from .nnunet import nnunet_card

    base = nnunet_card(task.folders[0])
    spacing = (task.spacing,) * 3 if task.spacing else base.target_spacing
    return ModelCard(
        name=task.name, version="TotalSegmentator " + "+".join(str(i) for i in task.dataset_ids),
        task=f"TotalSegmentator {task.name}: {task.description}",
        license=task.license,
        channels=[{"name": task.modality, "modality": task.modality}],
        target_spacing=spacing, orientation="RAS", normalization=base.normalization,
        patch_size=base.patch_size, classes={k: {"name": v} for k, v in task.classes.items()},
        format="nnunet", mirror_axes=(),
        training=("TotalSegmentator (Wasserthal et al., Radiology: AI 2023, "
                  "https://github.com/wasserth/TotalSegmentator); nnU-Net v2 weights from "
                  + ", ".join(str(f) for f in task.folders)),
        extra={"totalseg_task": task.name, "dataset_ids": task.dataset_ids,
               "folders": [str(f) for f in task.folders], "class_map": task.class_map_source,
               "step": task.step, "resample_mm": task.spacing},
    )


def totalseg_infos(root=None) -> list:
    """Registry entries (:class:`~napari_medseg.models.registry.ModelInfo`) for the tasks found."""
    from .info import ModelInfo

    out = []
    for task in discover(root):
        try:
            out.append(ModelInfo(task.name, _card(task), "totalseg", str(task.folders[0])))
        except MedSegError as exc:
            log.warning("skipping TotalSegmentator task %s: %s", task.name, exc)
    return out


def load_totalseg(name: str, root=None, backend: str = "native") -> "TotalSegModel":
    """Load a TotalSegmentator task by name (see :func:`discover`).

    Raises
    ------
    MedSegError
        When the task's weights are not in the weights folder.
    """
    tasks = {t.name: t for t in discover(root)}
    if name not in tasks:
        where = Path(root) if root is not None else weights_dir()
        raise MedSegError(f"TotalSegmentator task {name!r} is not in {where} (found: "
                          f"{', '.join(tasks) or 'none'}); set TOTALSEG_HOME_DIR to the folder "
                          "holding nnunet/results", str(where))
    return TotalSegModel(tasks[name], backend=backend)


# ------------------------------------------------------------------ running
def _canonical(data_zyx: np.ndarray, affine: np.ndarray):
    """``(data, affine, ornt)``: the closest canonical (RAS) voxel order, as nibabel makes it."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(affine)
    xyz = np.asarray(data_zyx).transpose(2, 1, 0)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return np.asarray(data_zyx), affine, ornt
    can = apply_orientation(xyz, ornt)
    aff = affine @ inv_ornt_aff(ornt, xyz.shape)
    return np.ascontiguousarray(can.transpose(2, 1, 0)), aff, ornt


def _undo_canonical(labels_zyx: np.ndarray, ornt) -> np.ndarray:
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return labels_zyx
    back = ornt_transform(axcodes2ornt("RAS"), ornt)
    xyz = apply_orientation(labels_zyx.transpose(2, 1, 0), back)
    return np.ascontiguousarray(xyz.transpose(2, 1, 0))


def _zoom_xyz(a_zyx, zoom_xyz, order, dtype):
    """TotalSegmentator's image resampling on the ``(x, y, z)`` view of a ``(Z, Y, X)`` array.

    The same voxels as its ``resampling.change_spacing`` (v2.18.0):
    ``ndimage.zoom(img.get_fdata(), zoom_xyz, order=order, mode="nearest")``
    cast with ``astype(dtype)``. For order 0 and 1 (its default) scipy reads
    the input as it is, converting each value to float64 exactly, so the float64
    copy of the whole volume that ``get_fdata`` makes is skipped; higher orders
    (spline prefilter) are called on the float64 copy, as TotalSegmentator does.

    Parameters
    ----------
    a_zyx : numpy.ndarray
        ``(Z, Y, X)`` image, any real dtype.
    zoom_xyz : sequence of 3 float
        Zoom factors along x, y, z, as given to ``scipy.ndimage.zoom``.
    order : int
        Spline order (TotalSegmentator's ``resampling_order``, default 1).
    dtype : numpy dtype
        Output dtype (cast as ``astype`` does: int32 truncates toward zero).
    """
    from scipy import ndimage

    a = np.asarray(a_zyx).transpose(2, 1, 0)
    if order > 1:
        a = a.astype(np.float64)
    out = ndimage.zoom(a, [float(z) for z in zoom_xyz], order=int(order), mode="nearest",
                       output=np.float64)
    return np.ascontiguousarray(out.transpose(2, 1, 0).astype(dtype))


def _nearest_zoom_xyz(a_zyx, zoom_xyz):
    """``ndimage.zoom(a_xyz, zoom_xyz, order=0, mode="nearest")`` on the ``(x, y, z)`` view.

    TotalSegmentator's resampling of the labels back to the input shape. Order-0
    zoom picks, along each axis, the source index that scipy computes for that
    axis alone (with ``mode="nearest"`` a coordinate that falls outside by
    rounding is clamped to the edge), so the 1D zoom of ``0..n-1`` gives the
    indices and the volume is gathered axis by axis, without evaluating every
    output voxel (512 x 512 x 300 labels: about 4x faster).
    """
    from scipy import ndimage

    a = np.asarray(a_zyx)
    ix, iy, iz = [ndimage.zoom(np.arange(n, dtype=np.float64), float(z), order=0, mode="nearest")
                  .astype(np.intp) for n, z in zip(a.shape[::-1], zoom_xyz)]  # x, y, z
    out = np.take(a, iz, axis=0)
    out = np.take(out, iy, axis=1)
    return np.ascontiguousarray(np.take(out, ix, axis=2))


class TotalSegModel(Model):
    """A TotalSegmentator task behind the :class:`Model` API (see module notes).

    ``overlap`` is ignored (TotalSegmentator's step is used) unless :attr:`step`
    is set; ``tta`` is ignored (its models are trained without mirroring).
    ``roi_subset`` (a list of class names) may be set on the model or passed to
    :meth:`run`.
    """

    def __init__(self, task: TotalSegTask, backend: str = "native"):
        super().__init__(_card(task), str(task.folders[0]))
        from .nnunet import load_nnunet

        self.task = task
        self.parts = [load_nnunet(f, folds=[0], backend=backend) for f in task.folders]
        self.step = task.step
        self.roi_subset = None
        #: TotalSegmentator's ``resampling_order`` for the image (its default is 1; other
        #: orders are called as TotalSegmentator 2.18 calls them, with ``mode="nearest"``)
        self.resampling_order = 1

    @property
    def backend(self) -> str:
        return self.parts[0].backend

    @backend.setter
    def backend(self, value: str):
        for p in self.parts:
            p.backend = value

    def parts_for(self, roi_subset) -> list:
        """Indices of the parts whose classes include any of ``roi_subset`` (names)."""
        if not roi_subset:
            return list(range(len(self.parts)))
        names = set(roi_subset)
        unknown = names - set(self.task.classes.values())
        if unknown:
            raise MedSegError(f"{self.task.name} has no class(es) {', '.join(sorted(unknown))}; "
                              "see the model card for the class names")
        return [i for i, pm in enumerate(self.task.part_maps)
                if names & {self.task.classes[g] for g in pm.values()}]

    def _predict_array(self, vols, device, overlap, tta, uncertainty, progress, cancel):
        ref = vols[0]
        labels, info = self.run(ref, device=device, progress=progress, cancel=cancel)
        return labels, None, info

    def run(self, vol, device="auto", roi_subset=None, progress=None, cancel=None):
        """Segment one Volume; return ``(labels (Z, Y, X) on its grid, info)``."""
        import time

        t0 = time.perf_counter()
        roi = roi_subset if roi_subset is not None else self.roi_subset
        use = self.parts_for(roi)
        data = np.asarray(vol.data if vol.data.ndim == 3 else vol.data[0])
        can, aff, ornt = _canonical(data, vol.affine)
        shape_can = can.shape
        # TotalSegmentator takes the voxel sizes from the NIfTI header (float32)
        spacing_xyz = np.linalg.norm(aff[:3, :3], axis=0).astype(np.float32).astype(np.float64)
        resample = bool(self.task.spacing) and not np.array_equal(
            spacing_xyz, [self.task.spacing] * 3)  # equal: left as it is, not cast
        if resample:
            zoom = spacing_xyz / self.task.spacing
            img = _zoom_xyz(can, zoom, self.resampling_order, dtype=np.int32)
            spacing_xyz = spacing_xyz / zoom
        else:
            img = can
        del can
        # nnU-Net reads the resampled image from a NIfTI (float32 voxel sizes in its header)
        spacing_zyx = [float(np.float32(s)) for s in spacing_xyz[::-1]]
        x = np.asarray(img, dtype=np.float32)[None]
        del img
        merged = np.zeros(x.shape[1:], dtype=np.uint8 if max(self.task.classes, default=0) < 256
                          else np.uint16)
        infos = []
        for n, i in enumerate(use):
            check_cancel(cancel)
            part = self.parts[i]

            def prog(done, total, n=n):
                if progress is not None:
                    progress(n * 1000 + int(1000 * done / max(total, 1)), len(use) * 1000)
            if part.backend == "native":
                res = part.run_array(x, spacing_zyx, device=device, overlap=1.0 - self.step,
                                     progress=prog, cancel=cancel)
                seg, info = res.labels, res.info
            else:  # nnUNetPredictor itself (reference)
                from ..core.inference import pick_device

                pred = part._predictor(pick_device(device), 1.0 - self.step, False)
                seg = pred.predict_single_npy_array(x, {"spacing": spacing_zyx}, None, None,
                                                    False)
                info = {"backend": "nnunetv2"}
            # TotalSegmentator's merge: each class of this part overwrites earlier parts
            lut = np.zeros(int(seg.max()) + 1, dtype=merged.dtype)
            for local, out_id in self.task.part_maps[i].items():
                if local < len(lut):
                    lut[local] = out_id
            mapped = lut[seg]
            np.copyto(merged, mapped, where=mapped > 0)
            del mapped
            infos.append(dict(info, dataset=self.task.dataset_ids[i]))
            del seg
        del x
        if roi:
            keep = [k for k, v in self.task.classes.items() if v in set(roi)]
            merged *= np.isin(merged, keep).astype(merged.dtype)
        if resample:
            zoom_back = np.array(shape_can[::-1], float) / np.array(merged.shape[::-1], float)
            merged = _nearest_zoom_xyz(merged, zoom_back)
        if merged.shape != shape_can:  # pragma: no cover - zoom rounding guard
            raise MedSegError("TotalSegmentator resampling back gave the wrong shape", vol.source)
        labels = _undo_canonical(merged, ornt)
        info = {"backend": self.backend, "parts": infos, "parts_run": len(use),
                "seconds": time.perf_counter() - t0, "device": infos[0].get("device", "")
                if infos else "", "amp": infos[0].get("amp", "") if infos else "",
                "windows": sum(i.get("windows") or 0 for i in infos)}
        return labels, info
