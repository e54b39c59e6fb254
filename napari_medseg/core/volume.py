"""The Volume: an image array with the geometry that places it in the patient.

Conventions (used everywhere in napari-medseg)
-----------------------------------------------
* ``data`` is indexed ``(Z, Y, X)`` for one channel or ``(C, Z, Y, X)`` for
  several: the *reverse* of the file's fastest-first order, as in SimpleITK's
  ``GetArrayFromImage`` and tifffile. ``data[k, j, i]`` is voxel ``(i, j, k)``.
* ``affine`` is the 4x4 voxel-to-world matrix of NIfTI / nibabel: it maps the
  voxel index ``(i, j, k, 1)`` (``i`` = last array axis) to world millimetres
  in **RAS+** (x increases to the patient's right, y anterior, z superior).
  LPS formats (DICOM, NRRD, MHA) are converted on read and back on write.
* Per-axis quantities exposed as properties (``spacing``, ``shape3``) are in
  array order ``(Z, Y, X)``, the order napari's ``scale`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "Volume",
    "LPS_TO_RAS",
    "affine_from_itk",
    "itk_from_affine",
    "make_affine",
    "same_grid",
]

#: Flips x and y: converts points between LPS (DICOM, ITK) and RAS (NIfTI).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def make_affine(spacing_zyx, origin_ras=(0.0, 0.0, 0.0), direction=None) -> np.ndarray:
    """Build a NIfTI-style affine from array-order spacing, an origin and directions.

    Parameters
    ----------
    spacing_zyx : sequence of 3 float
        Voxel size in mm along array axes ``(Z, Y, X)``.
    origin_ras : sequence of 3 float
        World position (RAS, mm) of the centre of voxel ``(0, 0, 0)``.
    direction : (3, 3) array_like, optional
        Columns are the unit world (RAS) directions of voxel axes ``i, j, k``
        (file order). Identity when omitted.

    Returns
    -------
    numpy.ndarray
        ``(4, 4)`` float64 affine.

    Examples
    --------
    >>> a = make_affine((3.0, 1.0, 0.5), (10, 20, 30))
    >>> a[:3, :3].diagonal().tolist(), a[:3, 3].tolist()
    ([0.5, 1.0, 3.0], [10.0, 20.0, 30.0])
    """
    spacing_ijk = np.asarray(spacing_zyx, dtype=float)[::-1]
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = d * spacing_ijk[None, :]
    aff[:3, 3] = np.asarray(origin_ras, dtype=float)
    return aff


def affine_from_itk(spacing_ijk, origin_lps, direction_lps) -> np.ndarray:
    """Convert ITK / DICOM / NRRD geometry (LPS, file axis order) to a RAS affine.

    Parameters
    ----------
    spacing_ijk : sequence of 3 float
        ITK spacing, fastest axis first (mm).
    origin_lps : sequence of 3 float
        ITK origin (LPS, mm).
    direction_lps : (3, 3) or (9,) array_like
        ITK direction cosines, columns per voxel axis ``i, j, k`` (LPS).
    """
    d = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = LPS_TO_RAS @ d @ np.diag(np.asarray(spacing_ijk, dtype=float))
    aff[:3, 3] = LPS_TO_RAS @ np.asarray(origin_lps, dtype=float)
    return aff


def itk_from_affine(affine) -> tuple[tuple, tuple, tuple]:
    """Inverse of :func:`affine_from_itk`: ``(spacing_ijk, origin_lps, direction_lps_flat)``."""
    aff = np.asarray(affine, dtype=float)
    m = LPS_TO_RAS @ aff[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing[None, :]
    origin = LPS_TO_RAS @ aff[:3, 3]
    return (
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin),
        tuple(float(v) for v in direction.ravel()),
    )


@dataclass
class Volume:
    """A 3D (optionally multi-channel) image or label map with its geometry.

    Parameters
    ----------
    data : array_like
        ``(Z, Y, X)`` or ``(C, Z, Y, X)``; a numpy array, a memory map or a dask
        array (large files stay lazy).
    affine : (4, 4) numpy.ndarray
        Voxel ``(i, j, k)`` to world RAS mm (see module notes).
    modality : str
        ``"CT"``, ``"MR"``, ``"PT"``, ``"US"``, ``"microscopy"`` or ``"unknown"``.
    is_label : bool
        True for label maps (integer class ids).
    label_names : dict[int, str]
        Class id to name, for label maps.
    label_colors : dict[int, tuple]
        Class id to RGB(A) floats in [0, 1], for label maps.
    source : str, optional
        The file or folder it was read from.
    meta : dict
        Anything else worth carrying (DICOM UIDs, file header fields, the
        original file orientation, notes from the reader).
    """

    data: Any
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    modality: str = "unknown"
    is_label: bool = False
    label_names: dict = field(default_factory=dict)
    label_colors: dict = field(default_factory=dict)
    source: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=float).reshape(4, 4)
        if getattr(self.data, "ndim", None) not in (3, 4):
            from ..errors import MedSegError

            shape = getattr(self.data, "shape", None)
            raise MedSegError(
                f"expected a 3D volume (Z, Y, X) or (C, Z, Y, X), got shape {shape}",
                self.source,
            )

    # ------------------------------------------------------------------ shape
    @property
    def n_channels(self) -> int:
        """Number of channels (1 for a ``(Z, Y, X)`` array)."""
        return 1 if self.data.ndim == 3 else int(self.data.shape[0])

    @property
    def shape3(self) -> tuple[int, int, int]:
        """The spatial shape ``(Z, Y, X)``."""
        return tuple(int(s) for s in self.data.shape[-3:])

    # --------------------------------------------------------------- geometry
    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``(Z, Y, X)``."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)[::-1]
        return tuple(float(v) for v in s)

    @property
    def origin(self) -> tuple[float, float, float]:
        """World RAS position (mm) of the centre of voxel ``(0, 0, 0)``."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` unit RAS directions of voxel axes ``i, j, k`` (as columns)."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)[None, :]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def orientation_code(self) -> str:
        """Three-letter code of the voxel axes ``i, j, k``, e.g. ``"RAS"`` or ``"LPS"``."""
        letters = (("L", "R"), ("P", "A"), ("I", "S"))
        code = ""
        for col in self.direction.T:
            ax = int(np.argmax(np.abs(col)))
            code += letters[ax][int(col[ax] > 0)]
        return code

    def is_oblique(self, tol: float = 1e-4) -> bool:
        """True when the voxel axes are not aligned with the world axes."""
        d = np.abs(self.direction)
        return bool(np.any((d > tol) & (d < 1 - tol)))

    # -------------------------------------------------------------- helpers
    def with_data(self, data, **changes) -> "Volume":
        """A new Volume on the same grid holding ``data`` (metadata copied)."""
        return replace(self, data=data, meta=dict(self.meta), **changes)

    def like_labels(self, labels, names=None, colors=None) -> "Volume":
        """Wrap a ``(Z, Y, X)`` label array as a label Volume on this grid.

        Raises
        ------
        MedSegError
            If ``labels`` does not have this volume's spatial shape.
        """
        labels = np.asarray(labels) if not hasattr(labels, "shape") else labels
        if tuple(labels.shape) != self.shape3:
            from ..errors import MedSegError

            raise MedSegError(
                f"labels of shape {tuple(labels.shape)} do not match the image grid "
                f"{self.shape3}; resample or crop the labels to the image first",
                self.source,
            )
        return Volume(
            data=labels,
            affine=self.affine.copy(),
            modality=self.modality,
            is_label=True,
            label_names=dict(names or {}),
            label_colors=dict(colors or {}),
            source=None,
            meta={"reference": self.source, **{k: v for k, v in self.meta.items()
                                                if k.startswith("dicom_")}},
        )

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"Volume(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, "
            f"spacing={tuple(round(s, 4) for s in self.spacing)}, "
            f"orientation={self.orientation_code()}, modality={self.modality!r}, "
            f"label={self.is_label}, source={self.source!r})"
        )


def same_grid(a, b, atol: float = 1e-3) -> bool:
    """True when two Volumes (or ``(shape3, affine)`` pairs) share one voxel grid."""

    def parts(v):
        if isinstance(v, Volume):
            return v.shape3, v.affine
        return tuple(v[0]), np.asarray(v[1], dtype=float)

    sa, aa = parts(a)
    sb, ab = parts(b)
    return tuple(sa) == tuple(sb) and bool(np.allclose(aa, ab, atol=atol))
