"""Training cases from an nnU-Net v2 raw dataset folder, on a model's grid.

The folder is the one :func:`napari_medseg.io.export.export_training_case`
writes (``dataset.json``, ``imagesTr/{case}_{channel:04d}{ending}``,
``labelsTr/{case}{ending}``). Images are read with
:func:`napari_medseg.io.read_volume` and taken to the model grid by
:func:`napari_medseg.core.preprocess.preprocess` with the card's settings, the
same function inference uses; labels follow the same reorientation and are
resampled by nearest neighbour.

:class:`PatchSampler` draws random training windows from those cases, a share
of them centred on a foreground class (oversampling of small structures), with
mirror flips along the axes the card allows and, with ``augment``, the
scaling, in-plane rotation and intensity changes nnU-Net draws per window
(:class:`Augment`). When the exporter saved the
correction ledger beside a case (``ledger/{case}/``: the model's original
prediction), a share of the windows is centred on the voxels the user
corrected, so training concentrates on what the model got wrong.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..core.volume import Volume
from ..errors import MedSegError, check_cancel
from ..models.card import ModelCard

__all__ = ["DatasetCase", "TrainingCase", "list_dataset", "dataset_new_classes", "load_case",
           "PatchSampler", "Augment"]

log = logging.getLogger(__name__)


@dataclass
class DatasetCase:
    """File paths of one case of an nnU-Net raw dataset.

    Attributes
    ----------
    case : str
        Case id (``case_000``).
    images : list of Path
        One file per channel, in channel order.
    label : Path
        The label file.
    ledger : Path or None
        The case's correction ledger folder, when the exporter saved one.
    """

    case: str
    images: list
    label: Path
    ledger: Path | None = None


@dataclass
class TrainingCase:
    """One case on the model grid.

    Attributes
    ----------
    case : str
        Case id.
    x : numpy.ndarray
        ``(C, Z, Y, X)`` float32 normalised image, padded to at least the patch.
    y : numpy.ndarray
        ``(Z, Y, X)`` uint8/uint16 labels on the same grid.
    fg : dict
        ``{class id: (N, 3) int array}`` of (a subsample of) that class's voxels.
    corrected : numpy.ndarray or None
        ``(N, 3)`` int array of (a subsample of) the voxels whose label the user
        changed from the model's prediction (from the ledger), or None.
    n_corrected : int
        How many voxels were corrected (before subsampling), on the input grid.
    corrected_mask : numpy.ndarray or None
        ``(Z, Y, X)`` bool, the corrected voxels on the model grid (for the
        loss weights), or None.
    supervised : list of int
        Foreground classes the case speaks for (all of them unless a ``fill``
        hook of :func:`load_case` said otherwise).
    """

    case: str
    x: np.ndarray
    y: np.ndarray
    fg: dict = field(default_factory=dict)
    corrected: np.ndarray | None = None
    n_corrected: int = 0
    corrected_mask: np.ndarray | None = None
    supervised: list = field(default_factory=list)

    @cached_property
    def channel_min(self) -> tuple:
        """Each channel's minimum (the fill value outside the case), computed once."""
        return tuple(float(c.min()) for c in self.x)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MedSegError(f"cannot read dataset.json ({exc.strerror or exc})", str(path)) from exc
    except ValueError as exc:
        raise MedSegError(f"dataset.json is not valid JSON ({exc})", str(path)) from exc
    if not isinstance(data, dict):
        raise MedSegError("dataset.json must be a JSON object", str(path))
    return data


def list_dataset(dataset_dir, card: ModelCard, new_classes=None) -> list[DatasetCase]:
    """The complete cases of a dataset folder, checked against a model card.

    Parameters
    ----------
    dataset_dir : str or Path
        An nnU-Net v2 raw dataset folder (``DatasetXXX_Name``).
    card : ModelCard
        The model to train: channel count and classes must fit.
    new_classes : dict[int, str], optional
        Classes the dataset may have that the model does not (added by
        fine-tuning).

    Returns
    -------
    list of DatasetCase
        Sorted by case id.

    Raises
    ------
    MedSegError
        Missing folder or ``dataset.json``, a channel count or class ids the
        model does not have, a label without its image files, or no cases.
    """
    root = Path(dataset_dir).expanduser()
    where = str(root)
    if not root.is_dir():
        raise MedSegError("the dataset folder does not exist; choose the DatasetXXX_Name "
                          "folder the Export widget wrote", where)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise MedSegError("no dataset.json: not an nnU-Net raw dataset folder; choose the "
                          "DatasetXXX_Name folder that holds imagesTr/ and labelsTr/", where)
    meta = _read_json(meta_path)
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) != card.n_channels:
        raise MedSegError(
            f"the dataset has {len(channels)} image channel(s) but model {card.name} takes "
            f"{card.n_channels}; choose a dataset made for this model", where)
    _check_classes(meta.get("labels") or {}, card, where, new_classes)
    ending = str(meta.get("file_ending") or ".nii.gz")
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise MedSegError("no labelsTr/ folder; the dataset holds no training cases yet",
                          where)
    cases = []
    for lab in sorted(labels_dir.glob(f"*{ending}")):
        if lab.name.startswith("."):
            continue
        case = lab.name[: -len(ending)]
        imgs = [root / "imagesTr" / f"{case}_{c:04d}{ending}" for c in range(card.n_channels)]
        missing = [p.name for p in imgs if not p.is_file()]
        if missing:
            raise MedSegError(f"case {case} has a label file but no image "
                              f"{', '.join(missing)} in imagesTr/; add the image or remove "
                              "the label", where)
        ledger = root / "ledger" / case
        cases.append(DatasetCase(case, imgs, lab, ledger if ledger.is_dir() else None))
    if not cases:
        raise MedSegError(f"no training cases (labelsTr/*{ending}); add corrected cases "
                          "with Export > Add as training case first", where)
    return cases


def dataset_new_classes(dataset_dir, card: ModelCard) -> dict[int, str]:
    """Classes of a dataset's ``dataset.json`` that the model does not have.

    They are what a fine-tuning run must add (``finetune(new_classes=...)``)
    for the dataset to fit the model: a class the annotator labelled that the
    model never predicted.

    Parameters
    ----------
    dataset_dir : str or Path
        An nnU-Net v2 raw dataset folder.
    card : ModelCard

    Returns
    -------
    dict[int, str]
        ``{id: name}``, sorted by id; empty when every class is the model's.

    Raises
    ------
    MedSegError
        No readable ``dataset.json``, or new ids that do not follow the model's
        classes (``n_classes``, ``n_classes + 1``, ...), which an output layer
        cannot grow into.
    """
    root = Path(dataset_dir).expanduser()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise MedSegError("no dataset.json: not an nnU-Net raw dataset folder; choose the "
                          "DatasetXXX_Name folder that holds imagesTr/ and labelsTr/",
                          str(root))
    labels = _read_json(meta_path).get("labels") or {}
    have = set(card.label_names) | {0}
    new = {}
    for name, cid in labels.items():
        if isinstance(cid, (list, tuple)):
            continue  # region-based labels: list_dataset says why they cannot be used
        if int(cid) not in have:
            new[int(cid)] = str(name)
    new = dict(sorted(new.items()))
    k = card.n_classes
    if new and list(new) != list(range(k, k + len(new))):
        raise MedSegError(
            f"the dataset's classes {sorted(new)} are not in model {card.name}, and new "
            f"classes must take the ids right after the model's ({k}, {k + 1}, ...); "
            "renumber them in dataset.json and the label files", str(root))
    return new


def _check_classes(labels: dict, card: ModelCard, where: str, new_classes=None) -> None:
    """Class ids in ``dataset.json`` must exist in the model; warn on renamed ones."""
    names = dict(card.label_names)
    names.update({int(k): str(v) for k, v in (new_classes or {}).items()})
    for name, cid in labels.items():
        if isinstance(cid, (list, tuple)):
            raise MedSegError("region-based nnU-Net labels are not supported for "
                              "fine-tuning", where)
        cid = int(cid)
        if cid == 0:
            continue
        if cid not in names:
            raise MedSegError(
                f"class {cid} ('{name}') of the dataset is not an output of model "
                f"{card.name} (classes {sorted(names)}); fine-tuning cannot add classes "
                "unless asked to (new_classes, --add-class ID NAME)", where)
        if names[cid] != name:
            log.warning("%s: class %d is '%s' in the dataset but '%s' in model %s",
                        where, cid, name, names[cid], card.name)


def load_case(item: DatasetCase, card: ModelCard, patch_size, max_fg: int = 20000,
              seed: int = 0, fill=None) -> tuple[TrainingCase, list, Volume]:
    """Read one case and take it to the model grid.

    Parameters
    ----------
    item : DatasetCase
    card : ModelCard
        Spacing, orientation and normalisation come from here.
    patch_size : tuple of 3 int
        The grid is padded (image with its minimum, labels with 0) to at least this.
    max_fg : int
        Voxels kept per class for foreground sampling.
    seed : int
        Seed of that subsample.
    fill : callable, optional
        ``fill(images, labels, prediction) -> (labels, supervised)``: may fill in
        the classes the case does not supervise (see
        :func:`napari_medseg.training.guard.fill_unsupervised`); ``images`` are
        the input-grid Volumes, ``labels`` the ``(Z, Y, X)`` input-grid labels,
        ``prediction`` the ledger's original prediction or None. The evaluation
        labels returned stay the case's own.

    Returns
    -------
    case : TrainingCase
        On the model grid.
    images : list of Volume
        The input-grid images (for evaluation with ``Model.predict``).
    labels : Volume
        The input-grid labels.

    Raises
    ------
    MedSegError
        Unreadable files, images and labels on different grids, non-integer or
        out-of-range labels.
    """
    from ..core.preprocess import _apply_orientation, preprocess, resample_nearest
    from ..io import read_volume

    imgs = [read_volume(p, lazy=False) for p in item.images]
    lab = read_volume(item.label, lazy=False)
    y0 = np.asarray(lab.data)
    if y0.ndim == 4 and y0.shape[0] == 1:
        y0 = y0[0]
    if np.issubdtype(y0.dtype, np.floating):
        if not np.array_equal(y0, np.round(y0)):
            raise MedSegError(f"case {item.case}: labels are not integers", str(item.label))
        y0 = y0.astype(np.int64)
    for p, v in zip(item.images, imgs):
        if v.shape3 != y0.shape:
            raise MedSegError(f"case {item.case}: image shape {v.shape3} does not match the "
                              f"label shape {y0.shape}; re-export the case", str(p))
    top = int(y0.max()) if y0.size else 0
    if (y0.size and int(y0.min()) < 0) or top >= card.n_classes:
        raise MedSegError(f"case {item.case}: label values must be 0..{card.n_classes - 1} "
                          f"for model {card.name} (found up to {top})", str(item.label))
    x, info = preprocess(imgs, target_spacing=card.target_spacing,
                         orientation=card.orientation, normalization=card.normalization)
    ledger_pred = _ledger_prediction(item, y0)
    changed = None if ledger_pred is None else ledger_pred != y0
    y_train, supervised = y0, sorted(range(1, card.n_classes))
    if fill is not None:
        y_train, supervised = fill(imgs, y0, ledger_pred)
    y = _apply_orientation(y_train, info.perm, info.flips)
    y = np.ascontiguousarray(resample_nearest(y, info.resampled_shape))
    y = y.astype(np.uint8 if card.n_classes <= 256 else np.uint16)
    x, y = _pad_to(x, y, patch_size)
    rng = np.random.default_rng(seed)
    fg = {int(c): _points(y == c, max_fg, rng) for c in np.unique(y) if c != 0}
    corrected, cmask = None, None
    if changed is not None and changed.any():
        grid = _apply_orientation(changed, info.perm, info.flips)
        grid = np.ascontiguousarray(resample_nearest(grid, info.resampled_shape))
        if grid.any():
            corrected = _points(grid, max_fg, rng)
            cmask = np.pad(grid.astype(bool),
                           [(0, n - g) for n, g in zip(y.shape, grid.shape)])
    lab_vol = imgs[0].like_labels(y0, lab.label_names or card.label_names)
    n_corr = 0 if changed is None else int(changed.sum())
    return (TrainingCase(item.case, x, y, fg, corrected, n_corr, cmask, list(supervised)),
            imgs, lab_vol)


def _points(mask: np.ndarray, limit: int, rng) -> np.ndarray:
    """Coordinates ``(N, 3)`` of the voxels of ``mask``, at most ``limit`` of them."""
    pts = np.argwhere(mask)
    if len(pts) > limit:
        pts = pts[rng.choice(len(pts), limit, replace=False)]
    return pts.astype(np.int32)


def _ledger_prediction(item: DatasetCase, labels: np.ndarray) -> np.ndarray | None:
    """The ledger's original prediction on the label grid, or None."""
    if item.ledger is None:
        return None
    from ..core.ledger import CorrectionLedger

    try:
        pred = np.asarray(CorrectionLedger.load(item.ledger).prediction)
    except MedSegError as exc:
        log.warning("case %s: ignoring its correction ledger: %s", item.case, exc)
        return None
    if pred.shape != labels.shape:
        log.warning("case %s: the ledger's prediction %s is not on the label grid %s; "
                    "ignoring it", item.case, pred.shape, labels.shape)
        return None
    return pred


def _pad_to(x: np.ndarray, y: np.ndarray, patch) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, max(0, int(p) - n)) for p, n in zip(patch, y.shape)]
    if not any(b for _, b in pad):
        return x, y
    x = np.stack([np.pad(c, pad, constant_values=float(c.min())) for c in x])
    return x, np.pad(y, pad)


def _crop(case, corner, patch):
    """``(x, y, corrected mask or None)`` of ``case`` in the window at ``corner``."""
    win = tuple(slice(c, c + p) for c, p in zip(corner, patch))
    cm = case.corrected_mask
    return case.x[(slice(None),) + win], case.y[win], None if cm is None else cm[win]


@dataclass(frozen=True)
class Augment:
    """Per-window augmentation in the manner of nnU-Net's defaults.

    A few corrected cases are all a fine-tune sees, so each window is drawn
    with a random zoom and in-plane rotation (about the slice axis, as the
    model grid may be anisotropic) and random intensity changes on the
    normalised image: Gaussian noise, blur, brightness, contrast and gamma.
    Probabilities and ranges follow nnU-Net v2's defaults, the rotation kept
    to a small angle because scans come in a standard orientation.
    """

    p_spatial: float = 0.2
    zoom: tuple = (0.7, 1.4)
    rotate_deg: float = 15.0
    p_noise: float = 0.1
    noise_var: tuple = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple = (0.7, 1.5)

    def window(self, case, corner, patch, rng):
        """``(x, y, w)`` of the window at ``corner``, zoomed and rotated about
        its centre one time in ``1 / p_spatial`` (``w``: the corrected mask's
        window or None)."""
        if rng.random() >= self.p_spatial:
            return _crop(case, corner, patch)
        from scipy import ndimage as ndi

        zoom = float(np.exp(rng.uniform(*np.log(self.zoom))))
        a = np.deg2rad(rng.uniform(-self.rotate_deg, self.rotate_deg))
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        m = rot / zoom  # output voxel -> input voxel, about the window's centre
        half = (np.asarray(patch, float) - 1) / 2
        offset = np.asarray(corner, float) + half - m @ half
        kw = dict(matrix=m, offset=offset, output_shape=tuple(patch), mode="constant")
        x = np.stack([ndi.affine_transform(c, order=1, cval=lo, **kw)
                      for c, lo in zip(case.x, case.channel_min)])
        y = ndi.affine_transform(case.y, order=0, cval=0, **kw)
        cm = case.corrected_mask
        w = None if cm is None else ndi.affine_transform(cm.astype(np.uint8), order=0,
                                                          cval=0, **kw).astype(bool)
        return x, y, w

    def intensity(self, x, rng):
        """Noise, blur, brightness, contrast and gamma on one window's channels."""
        from scipy import ndimage as ndi

        x = np.array(x, np.float32)
        for c in x:
            if rng.random() < self.p_noise:
                c += rng.normal(0.0, np.sqrt(rng.uniform(*self.noise_var)), c.shape)
            if rng.random() < self.p_blur:
                c[...] = ndi.gaussian_filter(c, rng.uniform(*self.blur_sigma))
            if rng.random() < self.p_brightness:
                c *= rng.uniform(*self.brightness)
            if rng.random() < self.p_contrast:
                lo, hi, mean = c.min(), c.max(), c.mean()
                c[...] = np.clip((c - mean) * rng.uniform(*self.contrast) + mean, lo, hi)
            if rng.random() < self.p_gamma:
                lo, hi = float(c.min()), float(c.max())
                if hi > lo:
                    c[...] = ((c - lo) / (hi - lo)) ** rng.uniform(*self.gamma) * (hi - lo) + lo
        return x


class PatchSampler:
    """Random training windows with foreground oversampling and mirror flips.

    Parameters
    ----------
    cases : list of TrainingCase
    patch_size : tuple of 3 int
        Window ``(z, y, x)`` in model-grid voxels.
    mirror_axes : sequence of int
        Spatial axes (0=z, 1=y, 2=x) each flipped with probability 1/2 (the
        card's ``mirror_axes``: never across left/right classes).
    fg_fraction : float
        Share of windows centred on a voxel of a randomly chosen class.
    corrected_fraction : float
        Share of windows centred on a corrected voxel, in cases with a ledger
        (taken from the class-centred share).
    seed : int
    replay : list of TrainingCase
        Cases replayed against forgetting (e.g. synthetic cases the base model
        was trained on), drawn for a ``replay_fraction`` share of the windows.
    augment : Augment, optional
        Zoom, rotation and intensity changes per window (replayed windows too).
    """

    def __init__(self, cases, patch_size, mirror_axes=(0, 1, 2), fg_fraction: float = 0.5,
                 corrected_fraction: float = 0.25, seed: int = 0, replay=(),
                 replay_fraction: float = 0.0, augment: Augment | None = None):
        self.cases = list(cases)
        self.augment = augment
        self.replay = list(replay)
        self.replay_fraction = float(replay_fraction) if self.replay else 0.0
        self.patch = tuple(int(p) for p in patch_size)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.fg_fraction = float(fg_fraction)
        self.corrected_fraction = min(float(corrected_fraction), self.fg_fraction)
        self.rng = np.random.default_rng(seed)

    def _centred(self, pts: np.ndarray, shape) -> tuple:
        centre = pts[int(self.rng.integers(len(pts)))]
        return tuple(int(np.clip(c - p // 2, 0, n - p))
                     for c, p, n in zip(centre, self.patch, shape))

    def _corner(self, case: TrainingCase) -> tuple:
        shape = case.y.shape
        r = self.rng.random()
        if case.corrected is not None and r < self.corrected_fraction:
            return self._centred(case.corrected, shape)
        if case.fg and r < self.fg_fraction:
            cls = list(case.fg)[int(self.rng.integers(len(case.fg)))]
            return self._centred(case.fg[cls], shape)
        return tuple(int(self.rng.integers(0, n - p + 1)) for p, n in zip(self.patch, shape))

    def sample(self, batch: int, corrected_weight: float | None = None):
        """A batch: ``x (B, C, z, y, x)`` float32 and ``y (B, z, y, x)`` int64.

        With ``corrected_weight``, also ``w (B, z, y, x)`` float32: that weight
        on the voxels the user corrected (the ledger's diff), 1 elsewhere.
        """
        xs, ys, ws = [], [], []
        for _ in range(int(batch)):
            if self.replay_fraction and self.rng.random() < self.replay_fraction:
                case = self.replay[int(self.rng.integers(len(self.replay)))]
            else:
                case = self.cases[int(self.rng.integers(len(self.cases)))]
            corner = self._corner(case)
            if self.augment is not None:
                x, y, cm = self.augment.window(case, corner, self.patch, self.rng)
                x = self.augment.intensity(x, self.rng)
            else:
                x, y, cm = _crop(case, corner, self.patch)
            w = None
            if corrected_weight is not None:
                w = np.ones(y.shape, np.float32)
                if cm is not None:
                    w[cm] = float(corrected_weight)
            for a in self.mirror_axes:
                if self.rng.random() < 0.5:
                    x, y = np.flip(x, axis=a + 1), np.flip(y, axis=a)
                    w = None if w is None else np.flip(w, axis=a)
            xs.append(np.ascontiguousarray(x, dtype=np.float32))
            ys.append(np.ascontiguousarray(y, dtype=np.int64))
            if w is not None:
                ws.append(np.ascontiguousarray(w))
        if corrected_weight is not None:
            return np.stack(xs), np.stack(ys), np.stack(ws)
        return np.stack(xs), np.stack(ys)


def load_cases(items, card: ModelCard, patch_size, progress=None, cancel=None, offset=0,
               total=None, fill=None):
    """:func:`load_case` for each item; returns ``(training cases, (images, labels) pairs)``."""
    cases, originals = [], []
    for i, item in enumerate(items):
        check_cancel(cancel)
        tc, imgs, lab = load_case(item, card, patch_size, seed=i, fill=fill)
        cases.append(tc)
        originals.append((imgs, lab))
        log.info("case %s: model grid %s, classes %s, %d corrected voxels", item.case,
                 tc.y.shape, sorted(tc.fg), tc.n_corrected)
        if progress:
            progress(offset + i + 1, total or len(items))
    return cases, originals
