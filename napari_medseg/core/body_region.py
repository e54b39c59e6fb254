"""Which part of the body a volume shows: a head, a limb, the trunk, or cannot tell.

:func:`detect_body_region` looks at up to 24 axial slices (perpendicular to the
voxel axis closest to the patient's head-foot axis) and measures, per slice:

* the **body**: the largest connected piece above a threshold (CT: -500 HU;
  MR: 10% of the 99th percentile), holes filled; its **width** is the longer
  side of its bounding box in mm, and it is **cut** when it touches the
  slice border (a cropped field of view);
* for CT, a **skull ring**: bone (> 300 HU) that closes around an interior of
  at least 20 cm\\ :sup:`2` (larger than a vertebral canal, about 2 cm\\ :sup:`2`),
  covering at least 30% of the body's cross-section and holding brain-range
  tissue (median -10 to 90 HU);
* for CT, **limb slices**: every sizeable piece of body (a quarter of the
  largest piece's area or more; the scanner table is thinner) is under 22 cm
  wide and one holds a **long-bone shaft**: a dense cortical ring (median over
  700 HU) of 1.5-25 cm\\ :sup:`2` around a marrow cavity (a tenth of its area
  or more, median under 150 HU), round rather than flat (not a rib, a
  scapula or the pelvis). A thigh, a leg or an arm looks like that; an abdomen
  has a single wide piece, and its vertebrae have a thin shell around
  cancellous bone;
* for MR, **limb slices** alike, the shaft being a cortex without signal
  (under the body threshold) around marrow brighter than the piece's median
  (fat, on T1 and T2), the cortex at least a quarter of the shaft's
  cross-section (a femur's is over half; a vertebral body's shell is thin).

The decision:

* ``"head"``: CT with a skull ring in at least 30% of the body slices and a
  median width under 25 cm; MR whose body is not cut by the field of view in
  most slices and is under 22 cm wide (a head is 15-20 cm; a trunk 25-45 cm);
* ``"limb"``: CT or MR with limb slices in at least half of the body slices, trunk-wide
  slices (24 cm or more) in under a fifth (a scan from the chest to the knees
  shows the trunk too) and, for CT, no skull ring (a thigh sarcoma is not an
  abdomen, though a crop of it is as wide as one; in MR, a whole thigh is not
  a head, though it is as wide as one);
* ``"trunk"``: a median width of at least 24 cm (cut or not: no head is that
  wide) and, for CT, skull rings in under 10% of the slices; chest, abdomen
  and pelvis are not told apart;
* ``"unknown"``: anything else (crops smaller than a head without a shaft, PET,
  too little body), so the checks built on it stay silent.

Qt- and napari-free; numpy and scipy only. About 0.5 s for a 512 x 512 x 300 CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RegionGuess", "detect_body_region", "region_fits", "axial_axis", "body_box"]

_MAX_SLICES = 24
_BONE_HU, _BODY_HU = 300.0, -500.0
_RING_MIN_CM2, _RING_MIN_FRACTION = 20.0, 0.3
_BRAIN_HU = (-10.0, 90.0)
_LIMB_MAX_WIDTH_MM, _LIMB_MIN_FRACTION, _LIMB_MAX_TRUNK_FRACTION = 220.0, 0.5, 0.2
_TRUNK_MIN_WIDTH_MM = 240.0
_SHAFT_CM2, _CORTEX_HU, _MARROW_MAX_HU = (1.5, 25.0), 700.0, 150.0
_MR_CORTEX_MIN_SHARE = 0.25

#: Card regions an image region is compatible with.
_FITS = {"head": {"any", "head", "brain", "whole-body"},
         "limb": {"any", "limb", "whole-body"},
         "trunk": {"any", "neck", "chest", "abdomen", "pelvis", "trunk", "whole-body"}}


@dataclass(frozen=True)
class RegionGuess:
    """What :func:`detect_body_region` found.

    Attributes
    ----------
    region : str
        ``"head"``, ``"limb"``, ``"trunk"`` or ``"unknown"``.
    reason : str
        The measurements behind it, in words.
    skull_fraction : float
        Fraction of body slices with a closed skull ring (CT; 0 otherwise).
    width_mm : float or None
        Median body width over the body slices, in mm.
    limb_fraction : float
        Fraction of body slices that look like limbs (CT and MR; 0 otherwise).
    """

    region: str
    reason: str
    skull_fraction: float = 0.0
    width_mm: float | None = None
    limb_fraction: float = 0.0


def region_fits(image_region: str, card_region: str) -> bool:
    """True when an image of ``image_region`` suits a model for ``card_region``.

    ``"unknown"`` images and ``"any"`` cards always fit.
    """
    card_region = str(card_region or "any").lower()
    if image_region not in _FITS or card_region == "any":
        return True
    return card_region in _FITS[image_region]


def axial_axis(affine) -> int:
    """The array axis (0 = Z, 1 = Y, 2 = X) closest to the patient's head-foot axis."""
    d = np.asarray(affine, dtype=float)[:3, :3]
    d = d / np.maximum(np.linalg.norm(d, axis=0), 1e-12)[None, :]
    ijk = int(np.argmax(np.abs(d[2])))  # largest superior component among i, j, k
    return 2 - ijk


def _width_mm(mask, spacing2d) -> float:
    """The longer side (mm) of the bounding box of a 2D mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return float(max((rows[-1] - rows[0] + 1) * spacing2d[0],
                     (cols[-1] - cols[0] + 1) * spacing2d[1]))


def _has_shaft(img2d, piece, px_cm2, dark=None) -> bool:
    """True when ``piece`` holds a long-bone shaft (see the module notes).

    ``dark``: for MR, the intensity under which the cortex lies (it gives no
    signal); the marrow must then be brighter than the piece's median (fat on
    T1 and T2) and the cortex thick (a vertebra's shell is thin).
    """
    from scipy import ndimage

    bone = ((img2d > _BONE_HU) if dark is None else (img2d < dark)) & piece
    lab, n = ndimage.label(bone)
    if n == 0:
        return False
    tissue = None if dark is None else float(np.median(img2d[piece]))
    boxes = ndimage.find_objects(lab)
    for k, box in enumerate(boxes, start=1):
        ring = lab[box] == k
        h, w = ring.shape
        if max(h, w) > 2.5 * min(h, w):  # a rib's arc or a flat bone
            continue
        filled = ndimage.binary_fill_holes(ring)
        area = float(filled.sum()) * px_cm2
        if not _SHAFT_CM2[0] <= area <= _SHAFT_CM2[1] or filled.sum() < 0.5 * h * w:
            continue
        marrow = filled & ~ring
        if marrow.sum() < 0.1 * filled.sum():
            continue
        sub = img2d[box]
        if dark is not None:
            if (ring.sum() >= _MR_CORTEX_MIN_SHARE * filled.sum()
                    and float(np.median(sub[marrow])) > tissue):
                return True
            continue
        if (float(np.median(sub[ring])) >= _CORTEX_HU
                and float(np.median(sub[marrow])) < _MARROW_MAX_HU):
            return True
    return False


def _is_limb_slice(img2d, lab, sizes, spacing2d, px_cm2, dark=None) -> bool:
    """Every sizeable piece of body is limb-narrow, and one holds a long-bone shaft
    (``dark``: MR, see :func:`_has_shaft`)."""
    from scipy import ndimage

    big = np.flatnonzero(sizes >= 0.25 * sizes.max())
    shaft = False
    boxes = ndimage.find_objects(lab)
    for k in big:
        box = boxes[k - 1]
        piece = lab[box] == k
        if _width_mm(piece, spacing2d) >= _LIMB_MAX_WIDTH_MM:
            return False
        shaft = shaft or _has_shaft(img2d[box], ndimage.binary_fill_holes(piece), px_cm2,
                                    dark)
    return shaft


def _slice_stats(img2d, spacing2d, modality, threshold):
    """Per-slice measures: (width mm, cut, skull ring, limb), or None without a body."""
    from scipy import ndimage

    px_cm2 = spacing2d[0] * spacing2d[1] / 100.0
    pieces, n = ndimage.label(img2d > threshold)
    if n == 0:
        return None
    piece_sizes = np.bincount(pieces.ravel())
    piece_sizes[0] = 0
    body = ndimage.binary_fill_holes(pieces == int(piece_sizes.argmax()))
    area = float(body.sum()) * px_cm2
    if area < 10.0:
        return None
    width = _width_mm(body, spacing2d)
    border = np.concatenate([body[0], body[-1], body[:, 0], body[:, -1]])
    cut = bool(border.mean() > 0.05)
    ring = False
    if modality == "CT":
        bone = (img2d > _BONE_HU) & body
        interior = ndimage.binary_fill_holes(bone) & ~bone
        lab, n = ndimage.label(interior)
        if n:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            k = int(sizes.argmax())
            inner = float(sizes[k]) * px_cm2
            if inner >= _RING_MIN_CM2 and inner >= _RING_MIN_FRACTION * area:
                med = float(np.median(img2d[lab == k]))
                ring = _BRAIN_HU[0] <= med <= _BRAIN_HU[1]
    limb = _is_limb_slice(img2d, pieces, piece_sizes, spacing2d, px_cm2,
                          None if modality == "CT" else threshold)
    return float(width), cut, ring, limb


def detect_body_region(volume, modality: str | None = None) -> RegionGuess:
    """Guess whether ``volume`` shows a head, a limb or the trunk (see the module notes).

    Parameters
    ----------
    volume : Volume
        ``(Z, Y, X)`` (or ``(C, Z, Y, X)``: channel 0), CT in Hounsfield units.
    modality : str, optional
        ``"CT"``, ``"MR"`` or ``"PET"``; detected with
        :func:`~napari_medseg.core.modality.detect_modality` when omitted.

    Returns
    -------
    RegionGuess
    """
    from .modality import detect_modality, intensity_sample, normalize_modality

    modality = normalize_modality(modality) if modality else \
        detect_modality(volume).modality
    if modality not in ("CT", "MR"):
        return RegionGuess("unknown", f"no region rule for modality {modality}")
    data = volume.data[0] if volume.data.ndim == 4 else volume.data
    ax = axial_axis(volume.affine)
    spacing = volume.spacing
    sp2 = tuple(s for i, s in enumerate(spacing) if i != ax)
    if modality == "CT":
        threshold = _BODY_HU
    else:
        sample = intensity_sample(data)
        threshold = 0.1 * float(np.percentile(sample, 99)) if sample.size else 0.0
    n = int(data.shape[ax])
    picks = np.unique(np.linspace(0, n - 1, min(n, _MAX_SLICES)).round().astype(int))
    stats = []
    for k in picks:
        sl = [slice(None)] * 3
        sl[ax] = int(k)
        img2d = np.asarray(data[tuple(sl)], dtype=np.float32)
        s = _slice_stats(img2d, sp2, modality, threshold)
        if s is not None:
            stats.append(s)
    if len(stats) < 3:
        return RegionGuess("unknown", f"body found in only {len(stats)} of {len(picks)} "
                                      "sampled slices")
    widths = np.array([s[0] for s in stats])
    cut = float(np.mean([s[1] for s in stats]))
    skull = float(np.mean([s[2] for s in stats]))
    limb = float(np.mean([s[3] for s in stats]))
    wide = float(np.mean(widths >= _TRUNK_MIN_WIDTH_MM))
    width = float(np.median(widths))
    facts = (f"median body width {width / 10:.1f} cm over {len(stats)} axial slices"
             f"{f', cut by the field of view in {100 * cut:.0f}%' if cut else ''}")
    shafts = f", a long-bone shaft in limb-narrow body in {100 * limb:.0f}%"
    limb_like = limb >= _LIMB_MIN_FRACTION and wide < _LIMB_MAX_TRUNK_FRACTION
    if modality == "CT":
        facts += f", a closed bone ring around brain-range tissue in {100 * skull:.0f}%"
        facts += shafts
        if skull >= 0.3 and width < 250.0:
            return RegionGuess("head", f"CT: {facts}: a skull", skull, width, limb)
        if limb_like and skull < 0.1:
            return RegionGuess("limb", f"CT: {facts}: an arm or a leg", skull, width, limb)
        if width >= _TRUNK_MIN_WIDTH_MM and skull < 0.1:
            return RegionGuess("trunk", f"CT: {facts}: wider than a head", skull, width, limb)
        return RegionGuess("unknown", f"CT: {facts}", skull, width, limb)
    facts += shafts
    if limb_like:
        return RegionGuess("limb", f"MR: {facts}: an arm or a leg", 0.0, width, limb)
    if width < 220.0 and cut < 0.5:
        return RegionGuess("head", f"MR: {facts}: head-sized", 0.0, width, limb)
    if width >= _TRUNK_MIN_WIDTH_MM:
        return RegionGuess("trunk", f"MR: {facts}: wider than a head", 0.0, width, limb)
    return RegionGuess("unknown", f"MR: {facts}", 0.0, width, limb)


def body_box(data, threshold: float = _BODY_HU, step: int = 4, min_saving: float = 0.2):
    """The box around the body of a CT, or None when it would not save much.

    The body is the largest connected piece above ``threshold`` (HU; -500 leaves
    out air but keeps fat and skin) on a grid subsampled by ``step`` along each
    axis (so a 512 x 512 x 300 CT is judged in well under a second); the box is
    grown by ``step`` voxels on each side to cover what subsampling missed.
    The patient table, a separate piece, is left out.

    Parameters
    ----------
    data : array_like
        ``(Z, Y, X)`` HU (numpy, memory map or dask).
    threshold : float
        Body threshold in HU.
    step : int
        Subsampling step in voxels.
    min_saving : float
        Return None unless the box leaves out at least this fraction of the voxels.

    Returns
    -------
    tuple of 3 slice or None
    """
    from scipy import ndimage

    shape = tuple(int(n) for n in data.shape[-3:])
    sub = data[::step, ::step, ::step]
    sub = np.asarray(sub.compute() if hasattr(sub, "compute") else sub)
    lab, n = ndimage.label(sub > threshold)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = lab == int(sizes.argmax())
    box = []
    for ax, size in enumerate(shape):
        idx = np.flatnonzero(keep.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(max(0, (int(idx[0]) - 1) * step),
                         min(size, (int(idx[-1]) + 2) * step)))
    kept = np.prod([b.stop - b.start for b in box]) / max(np.prod(shape), 1)
    return tuple(box) if kept <= 1.0 - min_saving else None
