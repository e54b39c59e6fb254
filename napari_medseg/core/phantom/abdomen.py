"""Synthetic upper-abdomen CT (Hounsfield units) with organ labels."""

from __future__ import annotations

import numpy as np

from ..volume import Volume
from ._common import (
    _CANONICAL_SEED,
    ABDOMEN_COLORS,
    ABDOMEN_LABELS,
    _blob,
    _Grid,
    _paint,
    _partial_volume_blur,
    _rotation,
    _Waves,
)

__all__ = ["make_abdomen_ct"]

# Typical portal-venous phase attenuation (HU).
_HU = {
    "air": -1000.0, "fat": -100.0, "skin": 30.0, "muscle": 50.0, "bowel": 25.0, "bowel_wall": 60.0,
    "gas": -850.0, "liver": 100.0, "vessel": 165.0, "spleen": 108.0, "cortex": 175.0,
    "medulla": 110.0, "sinus": -40.0, "lesion": 45.0, "aorta": 170.0, "ivc": 130.0,
    "bone": 700.0, "marrow": 220.0, "disc": 90.0, "canal": 15.0, "rib": 550.0,
    "stomach": 15.0, "table": 250.0,
}

#: Spleen HU minus liver HU when ``vary`` (uniform), unless ``spleen_contrast`` says otherwise.
SPLEEN_CONTRAST = (-25.0, 35.0)
#: Range of the spleen's size factor per axis when ``vary``.
_SPLEEN_SCALE = (0.8, 1.5)
#: Range of the spleen's crescent bend when ``vary`` (0: an ellipsoid; the
#: canonical anatomy keeps the ellipsoid).
_SPLEEN_BEND = (0.3, 0.9)


class _Jitter:
    """Random perturbations that are zero unless ``vary`` (same draws either way)."""

    def __init__(self, rng, vary):
        self.rng, self.vary = rng, vary

    def normal(self, scale):
        v = float(self.rng.normal(0.0, scale))
        return v if self.vary else 0.0

    def uniform(self, lo, hi, default):
        v = float(self.rng.uniform(lo, hi))
        return v if self.vary else default


def make_abdomen_ct(seed: int = 0, shape=(64, 128, 128), spacing=(2.5, 1.5, 1.5),
                    vary: bool = False, phases: bool = False,
                    spleen_contrast=SPLEEN_CONTRAST) -> tuple[Volume, Volume]:
    """A synthetic upper-abdomen CT and its organ labels.

    Parameters
    ----------
    seed : int
        Seed of all random choices (noise always; anatomy, contrast, noise
        level and blur too when ``vary``).
    shape : tuple of 3 int
        Array shape ``(Z, Y, X)``; the anatomy scales with the field of view.
    spacing : tuple of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    vary : bool
        Randomise organ sizes, positions, rotations, HU contrast, noise and
        partial-volume blur (for training data). False gives one canonical
        anatomy.
    phases : bool
        With ``vary``, also draw the contrast phase (from its own random
        stream, so the anatomy of a seed is unchanged): from a non-contrast
        scan (liver ~55 HU, blood ~40 HU) to a portal-venous one (liver
        ~115 HU), the spleen 20 HU darker to 40 HU brighter than the liver.
        Without it every scan is portal-venous (liver 100 +- 6 HU).
    spleen_contrast : tuple of 2 float
        With ``vary`` (and without ``phases``), the spleen is drawn this many HU
        darker / brighter than the liver (uniform; the same draw of the seed's
        stream, so the rest of the anatomy does not change).

    Returns
    -------
    image : Volume
        float32 HU ``(Z, Y, X)``, modality ``"CT"``, stored the DICOM way
        (LPS identity direction), volume centre at the world origin.
    labels : Volume
        uint8 ``(Z, Y, X)`` with :data:`ABDOMEN_LABELS` ids, names and colours.

    Examples
    --------
    >>> img, lab = make_abdomen_ct(shape=(16, 32, 32), spacing=(5.0, 3.0, 3.0))
    >>> img.data.shape, lab.data.dtype.name, img.modality
    ((16, 32, 32), 'uint8', 'CT')
    """
    grid = _Grid.make(shape, spacing, signs=(-1, -1, 1))
    rng = np.random.default_rng(seed if vary else _CANONICAL_SEED)
    jit = _Jitter(rng, vary)
    hu = dict(_HU)
    for k in ("liver", "spleen", "muscle", "bowel", "lesion"):
        hu[k] += jit.normal(6.0)
    # draws added later come from their own stream, so each seed keeps its anatomy
    extra = _Jitter(np.random.default_rng([int(seed), 2]), vary)
    # the spleen is brighter than the liver in arterial and many portal-venous
    # scans, darker in others
    lo, hi = (float(v) for v in spleen_contrast)
    hu["spleen"] = hu["liver"] + extra.uniform(lo, hi, _HU["spleen"] - _HU["liver"])
    enhance = jit.uniform(0.7, 1.3, 1.0)
    if vary and phases:
        # contrast phase: 0 is a non-contrast scan, 1 a strongly enhanced one
        phase = _Jitter(np.random.default_rng([int(seed), 3]), True)
        hu["liver"] = phase.uniform(55.0, 118.0, 0.0) + phase.normal(4.0)
        hu["spleen"] = hu["liver"] + phase.uniform(-20.0, 40.0, 0.0)
        hu["muscle"] = 50.0 + phase.normal(7.0)
        hu["bowel"] = hu["muscle"] - 20.0 + phase.normal(8.0)
        enhance = phase.uniform(0.0, 1.4, 0.0)
    for k in ("cortex", "medulla", "aorta", "ivc", "vessel"):
        hu[k] = 40.0 + (hu[k] - 40.0) * enhance
    hu["lesion"] = min(hu["lesion"], hu["liver"] - 30.0)

    img = np.full(grid.shape, hu["air"], dtype=np.float32)
    lab = np.zeros(grid.shape, dtype=np.uint8)
    cavity = _body(grid, img, rng, jit, hu, extra)
    spine = _spine(grid, img, jit, hu, cavity)
    _vessels(grid, img, hu, spine, cavity)
    _stomach(grid, img, rng, jit, hu, cavity)
    _kidneys(grid, img, lab, rng, jit, hu, spine, cavity)
    _spleen(grid, img, lab, rng, jit, hu, cavity, extra)
    liver = _liver(grid, img, lab, rng, jit, hu, cavity)
    _lesions(grid, img, lab, rng, jit, hu, liver)

    noise_rng = np.random.default_rng([int(seed), 1])
    sigma_mm = jit.uniform(0.3, 1.5, 0.7)
    noise_hu = jit.uniform(6.0, 28.0, 14.0)
    img = _partial_volume_blur(img, grid.spacing, sigma_mm)
    img += noise_rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(noise_hu)
    np.clip(img, -1024.0, 3071.0, out=img)

    meta = {"phantom": "abdomen-ct", "seed": int(seed), "vary": bool(vary)}
    image = Volume(img, grid.affine, modality="CT", meta=dict(meta))
    labels = Volume(lab, grid.affine.copy(), modality="CT", is_label=True,
                    label_names=dict(ABDOMEN_LABELS), label_colors=dict(ABDOMEN_COLORS),
                    meta=dict(meta))
    return image, labels


def _body(grid, img, rng, jit, hu, extra):
    """Skin, subcutaneous fat, abdominal wall and bowel/fat; returns the cavity mask."""
    hx, hy, hz = grid.half
    ax = hx * (0.86 + jit.normal(0.03))
    ay = hy * (0.64 + jit.normal(0.03))
    cy = hy * (0.04 + jit.normal(0.02))
    waves = _Waves(rng, n=5, wavelength=1.6)
    x, y = grid.x[0], grid.y[0]  # (1, X), (Y, 1)
    dy = y - np.float32(cy)
    ay_eff = np.where(dy < 0, np.float32(ay * 0.82), np.float32(ay))
    r2d = np.sqrt((x / np.float32(ax)) ** 2 + (dy / ay_eff) ** 2)
    r2d = r2d + np.float32(0.025) * waves(x / np.float32(ax), dy / np.float32(ay), 0.0)
    rho = np.sqrt(x * x + dy * dy)
    zn = grid.z / np.float32(hz)
    s = np.float32(1.0) + np.float32(0.05) * zn  # slightly wider towards the chest
    depth = rho[None] * (s / np.maximum(r2d[None], 1e-3) - 1.0)  # mm below the skin
    fat = float(np.clip(0.10 * ay + jit.normal(2.0), 3.0, None))
    wall = 7.0 + jit.normal(1.0)
    body = depth >= 0
    img[body] = hu["skin"]
    img[depth >= 2.0] = hu["fat"]
    img[depth >= fat] = hu["muscle"]
    cavity = depth >= fat + wall
    # Bowel loops in mesenteric fat, some with gas: thresholded smooth fields.
    bw = _Waves(rng, n=8, wavelength=38.0)
    gw = _Waves(rng, n=8, wavelength=22.0)
    field = bw(grid.x, grid.y, grid.z)
    visceral = np.where(field > 0.05, np.float32(hu["bowel"]), np.float32(hu["fat"]))
    visceral[(field > 0.05) & (field < 0.15)] = hu["bowel_wall"]
    gas = (field > 0.45) & (gw(grid.x, grid.y, grid.z) > 1.1)
    visceral[gas] = hu["gas"]
    img[cavity] = visceral[cavity]
    _table(grid, img, extra, hu, cy - ay * 0.82)
    return cavity


def _table(grid, img, jit, hu, y_back):
    """The scanner table under the patient's back: two curved carbon-fibre skins
    around foam, outside the body (unlabelled)."""
    x, y = grid.x[0], grid.y[0]  # (1, X), (Y, 1)
    gap = jit.uniform(0.0, 25.0, 5.0)
    depth = jit.uniform(25.0, 60.0, 40.0)
    curve = jit.uniform(0.0, 0.0015, 0.0008)  # 1/mm: the plate rises towards its edges
    top = np.float32(y_back - gap) + np.float32(curve) * x * x  # (1, X)
    below = top - y  # mm under the top skin, (Y, X)
    width = grid.half[0] * jit.uniform(0.7, 1.0, 0.85)
    inside = np.abs(x) < width
    foam = inside & (below > 2.0) & (below < depth - 2.0)
    skin = inside & (((below >= 0) & (below <= 2.0)) | ((below >= depth - 2.0) & (below <= depth)))
    free = img <= hu["air"] + 1.0
    img[free & foam[None]] = hu["air"] + 100.0
    img[free & skin[None]] = hu["table"] + jit.normal(60.0)


def _spine(grid, img, jit, hu, cavity):
    """Vertebrae, discs, canal, paraspinal and psoas muscles, ribs (unlabelled)."""
    hx, hy, hz = grid.half
    ay = hy * 0.64
    rv = 0.19 * ay + jit.normal(0.8)
    yc = hy * 0.04 - 0.42 * ay
    x, y, z = grid.x, grid.y, grid.z
    body = img > hu["air"] + 1.0
    d_vb = np.sqrt(x * x + (y - np.float32(yc)) ** 2)[0]  # (Y, X)
    zmod = np.mod(z + np.float32(jit.normal(8.0)), np.float32(32.0))
    disc = zmod < 7.0  # (Z, 1, 1)
    # paraspinal muscles (behind the vertebra) and psoas (beside it, lower down)
    for side in (-1.0, 1.0):
        m = ((x - side * 1.25 * rv) / (1.1 * rv)) ** 2 + ((y - (yc - 2.0 * rv)) / (0.9 * rv)) ** 2
        img[(m < 1) & body] = hu["muscle"]
        size = np.clip(0.3 - grid.z[:, 0, 0] / hz, 0.0, 1.0) * 0.75 * rv
        psoas = ((x - side * 1.45 * rv) ** 2 + (y - (yc + 0.2 * rv)) ** 2)[0]
        for k in range(grid.shape[0]):
            if size[k] > 1.0:
                sel = (psoas < size[k] ** 2) & body[k]
                img[k][sel] = hu["muscle"]
    vb = d_vb < rv
    img[:, vb] = np.where(disc, np.float32(hu["disc"]), np.float32(hu["marrow"]))[:, :, 0]
    shell = vb & (d_vb > rv - 2.5)
    img[:, shell] = np.where(disc, np.float32(hu["disc"]), np.float32(hu["bone"]))[:, :, 0]
    yk = yc - rv - 0.45 * rv
    d_canal = np.sqrt(x * x + (y - np.float32(yk)) ** 2)[0]
    arch = (d_canal < 0.75 * rv) & ~vb
    spinous = ((np.abs(x) < 0.2 * rv) & (y < yk) & (y > yk - 1.5 * rv))[0]
    post = (arch | spinous)[None] & body
    img[post] = np.broadcast_to(np.where(~disc, np.float32(hu["bone"]),
                                         np.float32(hu["muscle"])), post.shape)[post]
    img[(d_canal < 0.42 * rv)[None] & body] = hu["canal"]
    _ribs(grid, img, hu, cavity, yc)
    return {"yc": yc, "rv": rv}


def _ribs(grid, img, hu, cavity, y_spine):
    """Oblique rib sections just inside the wall, in the upper half (unlabelled)."""
    hx, hy, hz = grid.half
    shell = np.zeros_like(cavity)
    for sh in (-3, 3):
        shell |= cavity & ~np.roll(cavity, sh, axis=2)
        shell |= cavity & ~np.roll(cavity, sh, axis=1)
    angle = np.arctan2(grid.x, grid.y - np.float32(y_spine))  # 0 = anterior
    arc = np.abs(angle) * np.float32(0.5 * (hx + hy))
    band = np.sin(2 * np.pi * (grid.z + 0.9 * arc) / np.float32(28.0)) > 0.8
    upper = grid.z > -0.25 * hz
    ribs = shell & band & upper & (np.abs(angle) > 0.7) & (np.abs(angle) < 2.6)
    img[ribs] = hu["rib"]


def _vessels(grid, img, hu, spine, cavity):
    """Aorta (left of midline) and inferior vena cava (right), in front of the spine."""
    yc, rv = spine["yc"], spine["rv"]
    x, y = grid.x[0], grid.y[0]
    aorta = ((x + 0.35 * rv) ** 2 + (y - (yc + 1.75 * rv)) ** 2) < (0.6 * rv) ** 2
    ivc = (((x - 1.3 * rv) / (0.7 * rv)) ** 2 + ((y - (yc + 1.7 * rv)) / (0.5 * rv)) ** 2) < 1
    img[:, aorta] = hu["aorta"]
    img[:, ivc & ~aorta] = hu["ivc"]


def _stomach(grid, img, rng, jit, hu, cavity):
    """Fluid-filled stomach with an anterior gas cap, patient's left (unlabelled)."""
    hx, hy, hz = grid.half
    c = (-0.32 * hx + jit.normal(3.0), 0.18 * hy + jit.normal(3.0), 0.42 * hz + jit.normal(4.0))
    axes = (0.22 * hx, 0.2 * hy, 0.3 * hz)
    sl, r, (u, v, w) = _blob(grid, c, axes, _rotation(20.0), _Waves(rng, 5, 1.3), 0.12)
    inside = (r < 1) & cavity[sl]
    _paint(img, None, sl, inside, hu["muscle"])
    lumen = (r < 0.85) & inside
    _paint(img, None, sl, lumen, hu["stomach"])
    _paint(img, None, sl, lumen & (grid.sub(sl)[1] > c[1] + 0.35 * axes[1]), hu["gas"])


def _kidneys(grid, img, lab, rng, jit, hu, spine, cavity):
    """Kidneys with cortex, medulla and sinus fat; left = 3, right = 4."""
    hx, hy, hz = grid.half
    yc, rv = spine["yc"], spine["rv"]
    for side, label, zc in ((-1.0, 3, -0.08), (1.0, 4, -0.2)):
        c = (side * (2.4 * rv + 0.07 * hx) + jit.normal(2.0),
             yc + 0.3 * rv + jit.normal(2.0), (zc + jit.normal(0.05)) * hz)
        axes = tuple(a * jit.uniform(0.85, 1.15, 1.0) for a in (0.16 * hx, 0.22 * hy, 0.34 * hz))
        rot = _rotation(side * (35.0 + jit.normal(8.0)), rx=jit.normal(6.0) - 10.0,
                        ry=side * (10.0 + jit.normal(4.0)))
        sl, r, (u, v, w) = _blob(grid, c, axes, rot, _Waves(rng, 5, 1.2), 0.06)
        kidney = (r < 1) & cavity[sl]
        # local +u points laterally on the left kidney; hilum is medial (-side * u)
        medial = -side * u if side > 0 else u
        value = np.where(r < 0.7, np.float32(hu["medulla"]), np.float32(hu["cortex"]))
        value[(medial > 0.35) & (r < 0.75) & (np.abs(w) < 0.5)] = hu["sinus"]
        _paint(img, lab, sl, kidney, value, label)


def _spleen(grid, img, lab, rng, jit, hu, cavity, extra):
    """Spleen, posterior on the patient's left, upper abdomen (label 2)."""
    hx, hy, hz = grid.half
    # An adult spleen is about 12 x 7 x 4 cm (150-250 mL, a tenth of the liver, and
    # up to several times that when enlarged): a thick crescent against the ribs,
    # not a sliver cut off by the body wall.
    c = (-0.47 * hx + jit.normal(3.0), -0.20 * hy + jit.normal(3.0), 0.30 * hz + jit.normal(4.0))
    axes = tuple(a * jit.uniform(*_SPLEEN_SCALE, 1.0) for a in (0.16 * hx, 0.30 * hy, 0.34 * hz))
    rot = _rotation(45.0 + jit.normal(10.0), rx=jit.normal(5.0))
    sl, r, (u, v, w) = _blob(grid, c, axes, rot, _Waves(rng, 5, 1.2), 0.12)
    # a crescent: the ends bend towards the hilum (local +u points medially and
    # forwards), which the stomach and the kidney press in
    bend = np.float32(extra.uniform(*_SPLEEN_BEND, 0.0))
    if bend:
        r = r - np.sqrt(u * u + v * v + w * w) + np.sqrt((u - bend * v * v) ** 2 + v * v + w * w)
    _paint(img, lab, sl, (r < 1) & cavity[sl] & (lab[sl] == 0), hu["spleen"], 2)


def _liver(grid, img, lab, rng, jit, hu, cavity):
    """Liver with hepatic vessels, patient's right, upper abdomen (label 1)."""
    hx, hy, hz = grid.half
    c = (0.40 * hx + jit.normal(3.0), 0.06 * hy + jit.normal(3.0), 0.30 * hz + jit.normal(4.0))
    axes = tuple(a * jit.uniform(0.85, 1.15, 1.0) for a in (0.44 * hx, 0.55 * hy, 0.5 * hz))
    rot = _rotation(-15.0 + jit.normal(8.0), rx=jit.normal(4.0))
    sl, r, (u, v, w) = _blob(grid, c, axes, rot, _Waves(rng, 6, 1.3), 0.13)
    # thinner towards the left lobe tip: shrink where local u is negative
    r = r + np.float32(0.25) * np.clip(-u - 0.2, 0, None) ** 2
    liver = (r < 1) & cavity[sl] & (lab[sl] == 0)
    tex = _Waves(rng, 8, 0.18)(u, v, w)
    value = np.float32(hu["liver"]) + np.float32(3.0) * tex
    vessels = (np.abs(_Waves(rng, 6, 0.9)(u, v, w)) < 0.05) & (r < 0.8)
    value[vessels] = hu["vessel"]
    _paint(img, lab, sl, liver, value, 1)
    return {"center": c, "axes": axes, "rot": rot}


def _lesions(grid, img, lab, rng, jit, hu, liver):
    """1 to 3 hypodense lesions inside the liver (label 5)."""
    n = int(rng.integers(1, 4)) if jit.vary else 2
    hx = grid.half[0]
    for _ in range(n):
        d = rng.normal(size=3)
        d *= rng.uniform(0.15, 0.55) / np.linalg.norm(d)
        c = np.asarray(liver["center"]) + liver["rot"] @ (d * np.asarray(liver["axes"]))
        rad = float(rng.uniform(0.08, 0.14) * hx)
        sl, r, _ = _blob(grid, c, (rad, rad * rng.uniform(0.8, 1.2), rad), _rotation(
            rng.uniform(0, 180)), _Waves(rng, 4, 1.0), 0.15)
        inside = (r < 1) & (lab[sl] == 1)
        value = np.where(r < 0.8, np.float32(hu["lesion"]), np.float32(hu["lesion"] + 12.0))
        _paint(img, lab, sl, inside, value, 5)
