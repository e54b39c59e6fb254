"""Deterministic synthetic phantoms with ground-truth labels.

Three generators give an image :class:`~napari_medseg.core.volume.Volume` and a
label Volume on the same grid:

* :func:`make_abdomen_ct`: an upper-abdomen CT in Hounsfield units with liver,
  spleen, kidneys and hypodense liver lesions (labelled), plus body wall, fat,
  bowel, stomach, vessels, spine and ribs (unlabelled).
* :func:`make_abdomen_ct_synth`: a far more varied abdominal CT for training
  (:mod:`.abdomen_synth`): random anatomy as a tissue map, then random contrast
  phase, HU, texture, slice thickness, kernel and noise; classes
  :data:`SYNTH_LABELS` (liver, spleen, kidneys, lesion, stomach, aorta, inferior
  vena cava, pancreas).
* :func:`make_head_mr`: a T1-weighted-like head MR with scalp, skull, CSF, gray
  and white matter, ventricles, deep gray nuclei and a lesion, a smooth
  multiplicative bias field and Rician noise.

Anatomy is laid out in world (RAS) millimetres, so the liver lies on the
patient's right whatever the voxel order. Organ shapes are ellipsoids deformed
by a smooth random field (a sum of random low-frequency plane waves), which
makes them look organic while costing only a few array operations.

``vary=False`` gives one canonical anatomy (only the noise follows ``seed``);
``vary=True`` also randomises sizes, positions, rotations, contrast, noise and
blur from ``seed``, for training data. Both are deterministic for a given
``seed`` and arguments, and a 64 x 128 x 128 abdomen takes well under 0.5 s.
"""

from ._common import ABDOMEN_COLORS, ABDOMEN_LABELS, HEAD_COLORS, HEAD_LABELS
from .abdomen import make_abdomen_ct
from .abdomen_synth import SYNTH_COLORS, SYNTH_LABELS, make_abdomen_ct_synth
from .head import make_head_mr

__all__ = [
    "ABDOMEN_LABELS",
    "ABDOMEN_COLORS",
    "HEAD_LABELS",
    "HEAD_COLORS",
    "make_abdomen_ct",
    "make_abdomen_ct_synth",
    "SYNTH_LABELS",
    "SYNTH_COLORS",
    "make_head_mr",
]
