"""A varied synthetic abdominal CT for training: anatomy first, intensities drawn after.

The generator works in two steps, in the manner of SynthSeg (Billot et al. 2023):

1. :func:`make_abdomen_tissues` lays out the anatomy as a map of ~30 *tissues*
   (fat, muscle, skin, bone, lung, liver parenchyma and vessels, spleen, kidney
   cortex/medulla/sinus, stomach wall/content/gas, bowel, colon, pancreas,
   gallbladder, aorta, vena cava, portal vein, heart, ribs, cartilage, arms,
   the table, liver lesions) plus the *class* labels (:data:`SYNTH_LABELS`). Body
   size and shape, fat thickness, organ sizes, positions and rotations, the
   diaphragm height, stomach filling, arms up or down, the table and the field
   of view along z all vary with the seed, and every shape is evaluated on
   coordinates warped by a smooth random displacement field.
2. :func:`paint_ct` turns a tissue map (or a window of it) into Hounsfield units:
   a contrast phase (non-contrast, arterial, portal-venous, delayed) sets each
   tissue's HU range and a value is drawn from it; then per-tissue texture, a
   smooth bias, slice thickness (blur along z), the point-spread function,
   a smooth or sharp reconstruction kernel and correlated noise. Drawing this on
   the fly gives every training window a new appearance from one stored anatomy.

:func:`make_abdomen_ct_synth` does both and returns Volumes like
:func:`~napari_medseg.core.phantom.make_abdomen_ct`.

Anatomy is laid out in world RAS millimetres (+x towards the patient's right,
+y anterior, +z superior), volume centre at the origin; the arrays are stored
the DICOM way (LPS identity direction), like the other phantoms.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..volume import Volume
from ._common import _Grid, _rotation, _Waves

__all__ = ["SYNTH_LABELS", "SYNTH_COLORS", "TISSUES", "make_abdomen_tissues", "paint_ct",
           "make_abdomen_ct_synth"]

#: Class ids of the synthetic abdomen labels.
SYNTH_LABELS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "lesion",
                6: "stomach", 7: "aorta", 8: "inferior_vena_cava", 9: "pancreas"}
#: RGB colours (floats in [0, 1]) of those classes.
SYNTH_COLORS = {1: (0.86, 0.33, 0.24), 2: (0.55, 0.25, 0.65), 3: (0.95, 0.75, 0.2),
                4: (0.2, 0.7, 0.35), 5: (0.1, 0.6, 0.95), 6: (0.9, 0.6, 0.6),
                7: (0.9, 0.1, 0.1), 8: (0.3, 0.3, 0.9), 9: (0.95, 0.85, 0.55)}

#: Tissue ids of :func:`make_abdomen_tissues` (index = id).
TISSUES = ("air", "fat", "skin", "muscle", "bone", "marrow", "disc", "canal", "lung", "heart",
           "liver", "hepatic_vessel", "spleen", "kidney_cortex", "kidney_medulla",
           "kidney_sinus", "stomach_wall", "stomach_content", "gas", "aorta", "ivc", "portal",
           "pancreas", "gallbladder", "bowel_wall", "bowel_content", "colon_content",
           "lesion_a", "lesion_b", "lesion_rim", "cartilage", "table", "adrenal")
T = {n: i for i, n in enumerate(TISSUES)}

# HU ranges (lo, hi) by contrast phase: non-contrast, arterial, portal-venous, delayed.
_PHASES = ("native", "arterial", "portal", "delayed")
_PHASE_P = (0.2, 0.2, 0.45, 0.15)
_HU_PHASE = {
    "liver": ((40, 70), (55, 95), (80, 140), (70, 110)),
    "hepatic_vessel": ((25, 50), (55, 130), (130, 230), (90, 150)),
    "spleen": ((38, 60), (80, 170), (90, 145), (75, 115)),
    "kidney_cortex": ((25, 45), (140, 280), (130, 240), (110, 190)),
    "kidney_medulla": ((22, 42), (45, 110), (110, 230), (110, 220)),
    "aorta": ((30, 55), (200, 450), (120, 230), (90, 150)),
    "ivc": ((30, 55), (50, 160), (85, 180), (85, 140)),
    "portal": ((30, 55), (70, 170), (130, 230), (90, 150)),
    "heart": ((30, 55), (150, 400), (110, 210), (90, 140)),
    "pancreas": ((30, 50), (80, 150), (65, 125), (55, 95)),
    "stomach_wall": ((30, 50), (60, 130), (60, 120), (55, 95)),
    "bowel_wall": ((30, 50), (60, 130), (60, 120), (55, 95)),
    "adrenal": ((20, 45), (50, 110), (50, 100), (45, 85)),
    "muscle": ((35, 60), (40, 65), (45, 75), (45, 70)),
}
_HU_FIXED = {
    "air": (-1010, -960), "fat": (-125, -70), "skin": (0, 60), "bone": (350, 1200),
    "marrow": (120, 380), "disc": (60, 120), "canal": (0, 45), "lung": (-910, -740),
    "kidney_sinus": (-90, 20), "gas": (-1000, -750), "gallbladder": (-5, 30),
    "cartilage": (70, 260), "table": (-300, 500),
}
# per-tissue texture (HU standard deviation of a smooth field): (lo, hi)
_TEXTURE = {"liver": (2, 12), "spleen": (2, 12), "pancreas": (5, 20), "lung": (10, 60),
            "fat": (3, 15), "muscle": (3, 12), "marrow": (10, 60), "stomach_content": (3, 30),
            "bowel_content": (5, 40), "colon_content": (40, 200), "kidney_cortex": (2, 12),
            "kidney_medulla": (2, 12), "lesion_a": (2, 15), "lesion_b": (2, 15)}


# ------------------------------------------------------------------ anatomy
class _Field:
    """Warped world coordinates ``(X, Y, Z)`` (full 3D arrays, mm) of a grid."""

    def __init__(self, grid, rng, amp_mm, wavelength_mm):
        zz, yy, xx = np.broadcast_arrays(grid.z, grid.y, grid.x)
        self.grid = grid
        self.w = [np.ascontiguousarray(a, dtype=np.float32) for a in (xx, yy, zz)]
        self.margin = 1.5 * amp_mm + 2.0
        if amp_mm > 0:
            # evaluated on a 4x coarser grid and interpolated (it is smooth)
            cz, cy, cx = (a[::4] for a in (grid.z.ravel(), grid.y.ravel(), grid.x.ravel()))
            for a in range(3):
                waves = _Waves(rng, n=5, wavelength=wavelength_mm)
                coarse = waves(cx[None, None, :], cy[None, :, None], cz[:, None, None])
                zoom = [n / c for n, c in zip(grid.shape, coarse.shape)]
                fine = ndi.zoom(coarse, zoom, order=1, grid_mode=False)
                fine = fine[:grid.shape[0], :grid.shape[1], :grid.shape[2]]
                if fine.shape == tuple(grid.shape):
                    self.w[a] += np.float32(amp_mm) * fine

    def sub(self, center, radius):
        """``(slices, X, Y, Z)`` of the box of ``radius`` mm around ``center`` (x, y, z)."""
        sl = self.grid.box(center, radius + self.margin)
        return sl, self.w[0][sl], self.w[1][sl], self.w[2][sl]


def _ellipsoid(f: _Field, rng, center, axes, rot=None, amp=0.1, wavelength=1.3):
    """Box and normalised radius (< 1 inside) of a deformed ellipsoid, plus local coords."""
    rot = np.eye(3) if rot is None else rot
    sl, x, y, z = f.sub(center, max(axes) * (1 + 2 * amp) + 2)
    dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
    loc = []
    for a in range(3):
        r0, r1, r2 = (np.float32(v / axes[a]) for v in rot[:, a])
        loc.append(dx * r0 + dy * r1 + dz * r2)
    u, v, w = loc
    r = np.sqrt(u * u + v * v + w * w)
    if amp:
        r = r + np.float32(amp) * _Waves(rng, 6, wavelength)(u, v, w)
    return sl, r, (u, v, w)


def _tube(f: _Field, rng, points, radii, amp=0.15):
    """Box and normalised distance (< 1 inside) to a polyline with per-point radii (mm)."""
    p = np.asarray(points, float)
    rad = np.asarray(radii, float)
    lo, hi = p.min(0) - rad.max(), p.max(0) + rad.max()
    c = (lo + hi) / 2
    sl, x, y, z = f.sub(c, float(np.max(hi - lo) / 2) + 2)
    best = np.full(x.shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(p[:-1], p[1:], rad[:-1], rad[1:]):
        ab = b - a
        L2 = max(float(ab @ ab), 1e-6)
        px, py, pz = x - np.float32(a[0]), y - np.float32(a[1]), z - np.float32(a[2])
        t = (px * np.float32(ab[0]) + py * np.float32(ab[1]) + pz * np.float32(ab[2]))
        t = np.clip(t / np.float32(L2), 0, 1)
        d2 = (px - t * np.float32(ab[0])) ** 2 + (py - t * np.float32(ab[1])) ** 2 + \
            (pz - t * np.float32(ab[2])) ** 2
        r = np.float32(ra) + t * np.float32(rb - ra)
        np.minimum(best, np.sqrt(d2) / r, out=best)
    if amp:
        best = best + np.float32(amp) * _Waves(rng, 5, 40.0)(x, y, z)
    return sl, best


def _set(tis, lab, sl, mask, tissue, label=None, where=None):
    """Paint ``tissue`` (and ``label``) on ``mask`` within box ``sl`` (optionally only
    where the current tissue is in ``where``)."""
    tv = tis[sl]
    if where is not None:
        mask = mask & np.isin(tv, [T[w] for w in where])
    tv[mask] = T[tissue]
    if label is not None:
        lab[sl][mask] = label
    return mask


def make_abdomen_tissues(seed: int, shape=(96, 160, 200), spacing=(2.5, 2.0, 2.0)):
    """Random abdominal anatomy as a tissue map and class labels.

    Parameters
    ----------
    seed : int
        Seed of every random choice.
    shape : tuple of 3 int
        ``(Z, Y, X)`` voxels.
    spacing : tuple of 3 float
        Voxel size in mm along ``(Z, Y, X)``.

    Returns
    -------
    tissue : numpy.ndarray
        uint8 ``(Z, Y, X)`` ids into :data:`TISSUES`.
    labels : numpy.ndarray
        uint8 ``(Z, Y, X)`` ids of :data:`SYNTH_LABELS`.
    grid : _Grid
        The grid (LPS identity direction, centre at the origin).
    """
    rng = np.random.default_rng([int(seed), 7])
    grid = _Grid.make(shape, spacing, signs=(-1, -1, 1))
    f = _Field(grid, rng, amp_mm=rng.uniform(0, 10), wavelength_mm=rng.uniform(120, 220))
    X, Y, Z = f.w
    tis = np.zeros(grid.shape, np.uint8)
    lab = np.zeros(grid.shape, np.uint8)
    U = rng.uniform

    # --- body outline: superellipse, flatter back; fat and muscle layers
    W = U(120, 185)                       # half width (mm)
    D = W * U(0.6, 0.85)                  # half depth
    cx, cy = U(-15, 15), U(-25, 20)
    zd = U(0, 150)                        # right diaphragm dome (mm from the centre)
    p = U(2.0, 2.8)
    xn = (X - np.float32(cx)) / np.float32(W * (1 + 0.0002 * 0))
    yn = (Y - np.float32(cy)) / np.float32(D)
    yn = np.where(yn < 0, yn * np.float32(U(1.0, 1.15)), yn)
    # slightly narrower towards the pelvis, wider at the lower chest
    scale = np.float32(1.0) + np.float32(U(0.0, 0.08)) * np.clip((Z - np.float32(zd)) / 150,
                                                                 -1, 0.5)
    r = (np.abs(xn) ** p + np.abs(yn) ** p) ** np.float32(1 / p) / scale
    rho = np.sqrt((X - np.float32(cx)) ** 2 + (Y - np.float32(cy)) ** 2)
    depth = rho * (1 / np.maximum(r, 1e-3) - 1)          # mm below the skin (approx.)
    fat_t = U(5, 50)
    fat_th = np.float32(fat_t) * (1 + np.float32(0.5) * np.clip(-yn, 0, 1)
                                  + np.float32(0.3) * np.abs(xn))
    wall = np.float32(U(6, 16))
    body = depth >= 0
    tis[body] = T["skin"]
    tis[depth >= 2.5] = T["fat"]
    muscle = (depth >= fat_th) & (depth < fat_th + wall)
    tis[muscle] = T["muscle"]
    cavity = depth >= fat_th + wall
    del rho

    # --- diaphragm: surface height; lungs above, inside the ribcage
    xl = (X - np.float32(cx)) / np.float32(W)
    dome_l = zd - U(5, 25)
    zdia = np.where(xl > 0, np.float32(zd), np.float32(dome_l))
    zdia = zdia - np.float32(U(20, 45)) * (np.abs(xl) - np.float32(0.45)) ** 2 / 0.25
    post = np.clip(-(Y - np.float32(cy)) / np.float32(D), 0, 1)
    zdia = zdia - np.float32(U(15, 45)) * post ** 2 * np.clip(np.abs(xl) * 1.6, 0, 1)
    zdia = zdia - np.float32(U(0, 20)) * np.clip((Y - np.float32(cy)) / np.float32(D), 0, 1)
    below = Z < zdia
    chest = cavity & ~below
    tis[chest] = T["lung"]
    # heart: anterior-left above the diaphragm
    hc = (cx - 0.15 * W + U(-15, 15), cy + 0.25 * D, zd + U(45, 70))
    sl, rr, _ = _ellipsoid(f, rng, hc, (U(50, 70), U(45, 60), U(55, 70)), amp=0.08)
    _set(tis, lab, sl, (rr < 1) & chest[sl], "heart")
    _set(tis, lab, sl, (rr >= 1) & (rr < 1.12) & chest[sl], "fat")

    # --- spine, paraspinal muscles, canal
    rv = U(15, 23)
    y_vb = cy - D + fat_t * 1.3 + wall + U(45, 65) + rv
    x_vb = cx + U(-5, 5)
    d_vb = np.sqrt((X - np.float32(x_vb)) ** 2 + ((Y - np.float32(y_vb)) / 0.9) ** 2)
    pitch = U(27, 34)
    zmod = np.mod(Z + np.float32(U(0, pitch)), np.float32(pitch))
    disc = zmod < np.float32(U(5, 8))
    for side in (-1, 1):  # paraspinal (erector) muscles
        m = ((X - np.float32(x_vb + side * 1.4 * rv)) / np.float32(1.35 * rv)) ** 2 + \
            ((Y - np.float32(y_vb - 2.3 * rv)) / np.float32(1.1 * rv)) ** 2
        tis[(m < 1) & body] = T["muscle"]
    vb = d_vb < rv
    tis[vb & disc] = T["disc"]
    tis[vb & ~disc] = T["marrow"]
    tis[vb & ~disc & (d_vb > rv - U(1.5, 3))] = T["bone"]
    y_cn = y_vb - rv - 0.55 * rv
    d_cn = np.sqrt((X - np.float32(x_vb)) ** 2 + (Y - np.float32(y_cn)) ** 2)
    arch = (d_cn < 0.85 * rv) & ~vb & ~disc
    spin = (np.abs(X - np.float32(x_vb)) < 0.22 * rv) & (Y < y_cn) & (Y > y_cn - 1.9 * rv) & ~disc
    transverse = (np.abs(Y - np.float32(y_cn + 0.1 * rv)) < 0.25 * rv) & \
        (np.abs(X - np.float32(x_vb)) < 2.3 * rv) & ~disc & (zmod > pitch * 0.45) & ~vb
    tis[(arch | spin | transverse) & body] = T["bone"]
    tis[(d_cn < 0.5 * rv) & body] = T["canal"]
    del d_vb, d_cn, arch, spin, transverse, zmod, disc
    spine = (abs(y_vb), rv)

    # --- ribs: bands in the muscle layer and just inside it, upper part; cartilage in front
    ang = np.arctan2(X - np.float32(cx), Y - np.float32(y_vb))   # 0 = anterior
    aang = np.abs(ang)
    rib_zone = (depth >= fat_th - 2) & (depth < fat_th + wall + U(4, 10))
    rib_low = np.float32(zd) - np.float32(U(70, 110)) - np.float32(U(50, 90)) * aang / np.pi
    rpitch = U(22, 32)
    slope = U(0.25, 0.5) * (W + D) / 2
    phase = np.sin(2 * np.pi * (Z - np.float32(slope) * (np.pi - aang)) / np.float32(rpitch))
    band = phase > np.float32(U(0.55, 0.75))
    ribs = rib_zone & band & (Z > rib_low) & (aang > 0.25)
    cart = ribs & (aang < 0.9)
    tis[ribs & ~cart] = T["bone"]
    inner = ribs & ~cart & (depth > fat_th + 2) & (depth < fat_th + wall + 2)
    tis[inner] = T["marrow"]
    tis[cart] = T["cartilage"]
    del ang, aang, rib_zone, phase, band, ribs, cart, inner, rib_low

    # --- aorta (left-anterior of the spine) and IVC (right)
    ya = y_vb + rv * 0.9 + U(8, 16)
    ra = U(8, 14)
    xa = x_vb - U(0.2, 0.6) * rv
    zz = np.linspace(-grid.half[2] - 5, grid.half[2] + 5, 9)
    wob = rng.normal(0, 3, size=(9, 2))
    sl, d = _tube(f, rng, [(xa + wob[i, 0], ya + wob[i, 1], zz[i]) for i in range(9)],
                  [ra] * 9, amp=0.03)
    aorta = _set(tis, lab, sl, d < 1, "aorta", 7)
    yi = y_vb + rv * 0.8 + U(8, 16)
    xi = x_vb + rv + U(5, 18)
    ri = U(8, 13)
    sl, d = _tube(f, rng, [(xi + wob[i, 0], yi + U(-3, 3) + 0.15 * max(0, zz[i] - zd + 60),
                            zz[i]) for i in range(9)], [ri] * 9, amp=0.08)
    ivc_mask = (d < 1) & (Z[sl] < zd + 15)
    _set(tis, lab, sl, ivc_mask, "ivc", 8, where=("fat", "lung", "muscle", "air"))
    ivc_sl, ivc_m = sl, ivc_mask

    # --- spleen: posterior-left-lateral, crescent against the ribs
    sp_s = U(0.75, 1.45)
    sc = (cx - U(0.55, 0.72) * W, cy - U(0.2, 0.5) * D, dome_l - U(35, 70))
    sa = (U(18, 28) * sp_s ** 0.5, U(45, 65) * sp_s, U(40, 60) * sp_s)
    srot = _rotation(U(-60, -25), U(-25, 10), U(-15, 15))
    sl, rr, (u, v, w) = _ellipsoid(f, rng, sc, sa, srot, amp=0.1)
    # medial concavity: the hilum side (+u faces the midline after the rotation sign)
    med = np.float32(0.35) * np.clip(u + np.float32(0.2), 0, None) ** 2 * \
        np.clip(1 - v * v - w * w, 0, None)
    sp = ((rr + med) < 1) & cavity[sl] & below[sl]
    sp &= np.isin(tis[sl], [T["fat"], T["muscle"]])
    tis[sl][sp] = T["spleen"]
    lab[sl][sp] = 2
    spleen_c = sc

    # --- kidneys with cortex, medulla, sinus; adrenals above them
    for side, label, dz in ((-1, 3, 0.0), (1, 4, -U(5, 25))):
        kc = (x_vb + side * (rv + U(40, 60)), y_vb + U(-5, 15), zd - U(110, 150) + dz)
        ks = U(0.8, 1.2)
        ka = (U(22, 30) * ks, U(20, 27) * ks, U(45, 60) * ks)
        krot = _rotation(side * U(20, 50), U(-25, -5), side * U(5, 20))
        sl, rr, (u, v, w) = _ellipsoid(f, rng, kc, ka, krot, amp=0.05)
        kid = (rr < 1) & cavity[sl] & below[sl]
        kid &= ~np.isin(tis[sl], [T["liver"], T["spleen"], T["bone"], T["marrow"], T["disc"],
                                  T["aorta"], T["ivc"], T["canal"]])
        medial = -side * u  # points to the midline
        value = np.where(rr < U(0.62, 0.75), np.uint8(T["kidney_medulla"]),
                         np.uint8(T["kidney_cortex"]))
        sinus = (medial > 0.3) & (rr < 0.8) & (np.abs(w) < 0.55)
        value[sinus] = T["kidney_sinus"]
        tv = tis[sl]
        tv[kid] = value[kid]
        lab[sl][kid] = label
        # adrenal: small wedge above-medial
        ac = (kc[0] - side * 10, kc[1] + 5, kc[2] + ka[2] * 0.95)
        sl2, r2, _ = _ellipsoid(f, rng, ac, (4, 12, 14), _rotation(U(0, 90)), amp=0.2)
        _set(tis, lab, sl2, r2 < 1, "adrenal", where=("fat",))

    # --- liver: right lobe + left lobe, under the diaphragm
    liv_s = U(0.85, 1.2)
    c1 = (cx + U(0.3, 0.45) * W, cy + U(-0.05, 0.15) * D, zd - U(55, 80))
    a1 = (U(0.45, 0.6) * W * liv_s, U(0.7, 0.9) * D * liv_s, U(70, 100) * liv_s)
    sl, rr, _ = _ellipsoid(f, rng, c1, a1, _rotation(U(-20, 10), U(-15, 15), U(-20, 5)),
                           amp=0.12, wavelength=1.2)
    liver = np.zeros(grid.shape, bool)
    liver[sl] = (rr < 1)
    c2 = (cx + U(-0.25, 0.05) * W, cy + U(0.2, 0.45) * D, zd - U(25, 55))
    a2 = (U(0.3, 0.45) * W, U(0.25, 0.4) * D, U(25, 45))
    sl, rr, _ = _ellipsoid(f, rng, c2, a2, _rotation(U(-25, 25)), amp=0.15)
    liver[sl] |= rr < 1
    # caudal tip of the right lobe (variable, Riedel-like)
    c3 = (c1[0] + U(0.05, 0.2) * W, c1[1] + U(-0.2, 0.1) * D, c1[2] - a1[2] * U(0.5, 0.9))
    sl, rr, _ = _ellipsoid(f, rng, c3, (U(0.15, 0.25) * W, U(0.25, 0.45) * D, U(25, 60)),
                           amp=0.15)
    liver[sl] |= rr < 1
    liver &= cavity & below & (Z < zdia - 3) & np.isin(tis, [T["fat"], T["muscle"]])
    liver &= ~ndi.binary_dilation(np.isin(tis, [T["spleen"], T["kidney_cortex"], T["adrenal"]]),
                                  iterations=1)
    liver &= ~((np.abs(X - np.float32(x_vb)) < rv * 1.6) & (Y < y_vb + rv + 10))
    tis[liver] = T["liver"]
    lab[liver] = 1
    # hepatic vessels: curves where two smooth fields both cross zero
    f1, f2 = _Waves(rng, 6, U(50, 90)), _Waves(rng, 6, U(50, 90))
    lz = np.nonzero(liver.any(axis=(1, 2)))[0]
    if lz.size:
        zs = slice(lz[0], lz[-1] + 1)
        g1 = f1(X[zs], Y[zs], Z[zs])
        g2 = f2(X[zs], Y[zs], Z[zs])
        e = np.float32(U(0.04, 0.1))
        ves = (np.abs(g1) < e) & (np.abs(g2) < e * 2.5) & liver[zs]
        tis[zs][ves] = T["hepatic_vessel"]
        del g1, g2, ves

    # --- portal vein: from the confluence behind the pancreas neck into the liver hilum
    conf = (x_vb + U(5, 25), ya + U(25, 40), zd - U(95, 125))
    hil = (c1[0] - U(0.1, 0.25) * W, conf[1] + U(5, 20), zd - U(55, 80))
    sl, d = _tube(f, rng, [conf, ((conf[0] + hil[0]) / 2, conf[1] + 5, (conf[2] + hil[2]) / 2),
                           hil], [U(5, 8)] * 3, amp=0.1)
    pv = d < 1
    tis[sl][pv] = T["portal"]
    lab[sl][pv] = 0

    # --- gallbladder under the liver
    if rng.random() < 0.8:
        gc = (cx + U(0.1, 0.3) * W, cy + U(0.15, 0.4) * D, zd - U(85, 115))
        gs = U(0.5, 1.2)
        sl, rr, _ = _ellipsoid(f, rng, gc, (14 * gs, 16 * gs, 35 * gs),
                               _rotation(U(-30, 30), U(-30, 30)), amp=0.08)
        gb = (rr < 1) & cavity[sl] & below[sl]
        tis[sl][gb] = T["gallbladder"]
        lab[sl][gb] = 0
        tis[sl][(rr >= 1) & (rr < 1.12) & gb.any() & (tis[sl] == T["gallbladder"])] = \
            T["bowel_wall"]

    # --- stomach: J-shaped tube in the left upper quadrant
    ds = U(0.55, 1.3)
    fundus = (cx - U(0.25, 0.45) * W, cy + U(-0.15, 0.1) * D, dome_l - U(15, 35))
    bodyp = (cx - U(0.2, 0.4) * W, cy + U(0.15, 0.35) * D, fundus[2] - U(35, 55))
    antrum = (cx + U(-0.05, 0.1) * W, cy + U(0.25, 0.45) * D, bodyp[2] - U(15, 35))
    pyl = (cx + U(0.12, 0.22) * W, cy + U(0.15, 0.3) * D, antrum[2] + U(-10, 10))
    sl, d = _tube(f, rng, [fundus, bodyp, antrum, pyl],
                  [U(30, 45) * ds, U(28, 40) * ds, U(18, 28) * ds, U(8, 12)], amp=0.12)
    st = (d < 1) & cavity[sl] & below[sl] & ~np.isin(
        tis[sl], [T["liver"], T["spleen"], T["kidney_cortex"], T["kidney_medulla"],
                  T["kidney_sinus"], T["aorta"], T["ivc"], T["bone"], T["marrow"]])
    wall_t = U(3, 7)
    rad = np.float32(35 * ds)
    lumen = st & (d < 1 - wall_t / rad)
    tv = tis[sl]
    tv[st] = T["stomach_wall"]
    tv[lumen] = T["stomach_content"]
    lab[sl][st] = 6
    gas_frac = U(0, 0.6)
    if gas_frac > 0.05:
        yl = Y[sl]
        ys = yl[lumen]
        if ys.size:
            thr = np.quantile(ys, 1 - gas_frac)
            tv[lumen & (yl > thr)] = T["gas"]

    # --- pancreas: head by the duodenum, body over the aorta, tail to the splenic hilum
    head = (x_vb + U(25, 45), ya + U(25, 40), zd - U(115, 140))
    neck = (x_vb + U(0, 15), ya + U(35, 50), head[2] + U(5, 20))
    body_p = (xa - U(25, 45), ya + U(20, 35), neck[2] + U(0, 15))
    tail = (spleen_c[0] + U(15, 30), spleen_c[1] + U(10, 30), spleen_c[2] - U(0, 25))
    pr = U(0.8, 1.2)
    sl, d = _tube(f, rng, [head, neck, body_p, tail],
                  [U(15, 22) * pr, U(10, 13) * pr, U(10, 14) * pr, U(8, 12) * pr], amp=0.2)
    pa = (d < 1) & np.isin(tis[sl], [T["fat"], T["muscle"]]) & cavity[sl] & below[sl]
    tis[sl][pa] = T["pancreas"]
    lab[sl][pa] = 9
    # splenic vein along its back
    sl, d = _tube(f, rng, [(conf[0], conf[1] - 3, conf[2]), (body_p[0], body_p[1] - 10,
                                                               body_p[2]),
                           (tail[0], tail[1] - 8, tail[2])], [U(3.5, 5.5)] * 3, amp=0.1)
    _set(tis, lab, sl, d < 1, "portal", where=("fat", "pancreas"))
    lab[sl][(tis[sl] == T["portal"])] = 0

    # --- colon frame and small bowel loops in the rest of the cavity
    free = cavity & below & (tis == T["fat"])
    colon_pts = [(cx + 0.55 * W, cy + 0.0 * D, zd - 240), (cx + 0.6 * W, cy + 0.1 * D, zd - 130),
                 (cx + 0.3 * W, cy + 0.55 * D, zd - U(100, 150)),
                 (cx - 0.3 * W, cy + 0.5 * D, zd - U(80, 130)),
                 (cx - 0.62 * W, cy + 0.0 * D, spleen_c[2] - U(40, 70)),
                 (cx - 0.6 * W, cy - 0.05 * D, zd - 260)]
    colon_pts = [(q[0] + U(-15, 15), q[1] + U(-15, 15), q[2]) for q in colon_pts]
    sl, d = _tube(f, rng, colon_pts, [U(18, 30)] * len(colon_pts), amp=0.2)
    col = (d < 1) & free[sl]
    tv = tis[sl]
    tv[col] = T["bowel_wall"]
    tv[col & (d < 0.8)] = T["colon_content"]
    gas_col = col & (d < 0.8) & (_Waves(rng, 6, 30.0)(X[sl], Y[sl], Z[sl]) > U(-0.3, 0.8))
    tv[gas_col] = T["gas"]
    free = cavity & below & (tis == T["fat"])
    bw = _Waves(rng, 8, U(30, 55))(X, Y, Z)
    thr = np.float32(U(-0.2, 0.3))
    loops = free & (bw > thr)
    tis[loops] = T["bowel_wall"]
    tis[loops & (bw > thr + np.float32(U(0.08, 0.15)))] = T["bowel_content"]
    gw = _Waves(rng, 8, 25.0)(X, Y, Z)
    tis[loops & (bw > thr + 0.3) & (gw > np.float32(U(0.6, 1.3)))] = T["gas"]
    del bw, gw, free, loops

    # --- psoas muscles, lower down beside the spine
    for side in (-1, 1):
        sl, d = _tube(f, rng, [(x_vb + side * rv * 1.3, y_vb + 0.1 * rv, zd - U(110, 140)),
                               (x_vb + side * rv * 2.0, y_vb + 0.2 * rv, zd - 300)],
                      [U(3, 6), U(20, 30)], amp=0.1)
        _set(tis, lab, sl, d < 1, "muscle", where=("fat", "bowel_wall", "bowel_content",
                                                   "colon_content", "gas"))
        lab[sl][(d < 1) & (tis[sl] == T["muscle"])] = 0

    # --- liver lesions
    n_les = int(rng.choice([0, 1, 1, 2, 3, 4, 6]))
    lp = np.argwhere(liver)
    for _ in range(n_les if lp.size else 0):
        q = lp[rng.integers(len(lp))]
        c = (float(grid.x.ravel()[q[2]]), float(grid.y.ravel()[q[1]]),
             float(grid.z.ravel()[q[0]]))
        rad = float(np.exp(U(np.log(4), np.log(40))))
        sl, rr, _ = _ellipsoid(f, rng, c, (rad, rad * U(0.7, 1.3), rad * U(0.7, 1.3)),
                               _rotation(U(0, 180), U(0, 180)), amp=0.15, wavelength=1.0)
        inside = (rr < 1) & (lab[sl] == 1)
        kind = "lesion_a" if rng.random() < 0.65 else "lesion_b"
        tv = tis[sl]
        tv[inside] = T[kind]
        if rng.random() < 0.3:
            tv[inside & (rr > U(0.7, 0.85))] = T["lesion_rim"]
        lab[sl][inside] = 5

    # --- arms down beside the body (otherwise above the head, out of the field)
    if rng.random() < 0.45:
        for side in (-1, 1):
            ac = (cx + side * (W + U(15, 45) + 45), cy + U(-0.3, 0.2) * D, 0.0)
            ar = (U(38, 55), U(42, 60))
            dd = np.sqrt(((X - np.float32(ac[0])) / np.float32(ar[0])) ** 2
                         + ((Y - np.float32(ac[1])) / np.float32(ar[1])) ** 2)
            arm = dd < 1
            tis[arm & (tis == T["air"])] = T["skin"]
            tis[arm & (dd < 0.95)] = T["fat"]
            tis[arm & (dd < U(0.6, 0.85))] = T["muscle"]
            hb = np.sqrt((X - np.float32(ac[0] + U(-8, 8))) ** 2 +
                         (Y - np.float32(ac[1] + U(-8, 8))) ** 2)
            hr = U(10, 15)
            tis[arm & (hb < hr)] = T["bone"]
            tis[arm & (hb < hr - U(2, 4))] = T["marrow"]
            del dd, hb, arm

    # --- CT table beneath the back
    if rng.random() < 0.6:
        yt = cy - D * U(1.0, 1.05) - U(5, 40)
        curv = U(0, 1.0 / 800)
        yy = Y - np.float32(yt) - np.float32(curv) * (X - np.float32(cx)) ** 2
        t1 = (yy < 0) & (yy > -U(2, 5)) & (np.abs(X - np.float32(cx)) < U(180, 260))
        tis[t1 & (tis == T["air"])] = T["table"]
        t2 = (yy < -U(25, 45)) & (yy > -50) & (np.abs(X - np.float32(cx)) < U(150, 240))
        tis[t2 & (tis == T["air"])] = T["table"]
    del X, Y, Z, f
    return tis, lab, grid


# ------------------------------------------------------------------ intensities
def _smooth_noise(rng, shape, sigma):
    n = rng.standard_normal(shape, dtype=np.float32)
    if np.max(sigma) > 0:
        n = ndi.gaussian_filter(n, sigma, truncate=2.5)
        n /= max(float(n.std()), 1e-6)
    return n


def draw_hu_table(rng, phase: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Mean HU and texture SD per tissue for one random appearance.

    Returns
    -------
    mean, sd : numpy.ndarray
        float32 ``(len(TISSUES),)``.
    phase : str
    """
    if phase is None:
        phase = str(rng.choice(_PHASES, p=_PHASE_P))
    k = _PHASES.index(phase)
    mean = np.zeros(len(TISSUES), np.float32)
    for n, i in T.items():
        if n in _HU_PHASE:
            lo, hi = _HU_PHASE[n][k]
        elif n in _HU_FIXED:
            lo, hi = _HU_FIXED[n]
        else:
            continue
        mean[i] = rng.uniform(lo, hi)
    mean[T["marrow"]] = min(mean[T["marrow"]], mean[T["bone"]] - 50)
    # the spleen is brighter than the liver in contrast phases, near it without contrast
    content = rng.choice(["water", "food", "contrast"], p=[0.5, 0.3, 0.2])
    mean[T["stomach_content"]] = {"water": rng.uniform(-5, 25), "food": rng.uniform(15, 70),
                                  "contrast": rng.uniform(120, 500)}[content]
    bowel = rng.choice(["water", "contrast"], p=[0.65, 0.35])
    mean[T["bowel_content"]] = rng.uniform(-5, 35) if bowel == "water" else \
        rng.uniform(100, 450)
    mean[T["colon_content"]] = rng.uniform(-150, 40)
    liver = mean[T["liver"]]
    if rng.random() < 0.2:  # fatty liver
        liver = mean[T["liver"]] = rng.uniform(-20, 45)
    mean[T["lesion_a"]] = liver - rng.uniform(20, 90) if rng.random() < 0.75 else \
        rng.uniform(-5, 20)
    mean[T["lesion_b"]] = liver + rng.uniform(-45, 60)
    mean[T["lesion_rim"]] = liver + rng.uniform(-10, 60)
    if abs(mean[T["lesion_b"]] - liver) < 12:
        mean[T["lesion_b"]] = liver - 15
    sd = np.zeros(len(TISSUES), np.float32)
    for n, (lo, hi) in _TEXTURE.items():
        sd[T[n]] = rng.uniform(lo, hi)
    if phase == "arterial" and rng.random() < 0.5:
        sd[T["spleen"]] = rng.uniform(15, 40)  # arciform enhancement
    sd += rng.uniform(0, 4, size=sd.shape).astype(np.float32)
    return mean, sd, phase


def paint_ct(tissue: np.ndarray, spacing, rng, phase: str | None = None) -> np.ndarray:
    """Random CT appearance (HU, float32) of a tissue map.

    Parameters
    ----------
    tissue : numpy.ndarray
        uint8 ``(Z, Y, X)`` ids into :data:`TISSUES` (a whole case or a window).
    spacing : tuple of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    rng : numpy.random.Generator
    phase : str, optional
        ``"native"``, ``"arterial"``, ``"portal"`` or ``"delayed"``; random by default.

    Returns
    -------
    numpy.ndarray
        float32 HU, same shape, clipped to [-1024, 3071].
    """
    mean, sd, _ = draw_hu_table(rng, phase)
    shape = tissue.shape
    img = mean[tissue]
    tex_sigma = rng.uniform(0.5, 2.0)
    img += _smooth_noise(rng, shape, tex_sigma) * sd[tissue]
    # smooth bias (scatter / beam hardening-like), in HU
    if rng.random() < 0.5:
        coarse = rng.standard_normal((3, 3, 3)).astype(np.float32)
        bias = ndi.zoom(coarse, [s / 3 for s in shape], order=1)[:shape[0], :shape[1], :shape[2]]
        if bias.shape == shape:
            img += bias * np.float32(rng.uniform(0, 12))
    sp = np.asarray(spacing, float)
    # point-spread function in-plane, slice profile along z (thickness 0.5..5 mm)
    psf = rng.uniform(0.3, 1.1)                 # mm sigma in-plane
    thick = rng.uniform(0.5, 5.0)               # mm FWHM along z
    sig = [max(thick / 2.355, 0.3) / sp[0], psf / sp[1], psf / sp[2]]
    sig = [float(np.sqrt(s * s + 0.25)) for s in sig]  # voxel's own footprint
    img = ndi.gaussian_filter(img, sig, truncate=2.5)
    # kernel: sharp kernels add an edge overshoot and white noise; smooth ones, correlated
    sharp = rng.random() < 0.4
    if sharp:
        amt = rng.uniform(0.2, 0.8)
        img = img + np.float32(amt) * (img - ndi.gaussian_filter(img, [0.0, 1.0, 1.0],
                                                                 truncate=2.5))
    noise_sd = float(np.exp(rng.uniform(np.log(4), np.log(45))))
    nsig = [0.0, rng.uniform(0, 0.3), rng.uniform(0, 0.3)] if sharp else \
        [rng.uniform(0, 0.5), rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0)]
    img += _smooth_noise(rng, shape, nsig) * np.float32(noise_sd)
    np.clip(img, -1024.0, 3071.0, out=img)
    return img.astype(np.float32, copy=False)


def make_abdomen_ct_synth(seed: int = 0, shape=(96, 160, 200), spacing=(2.5, 2.0, 2.0),
                          phase: str | None = None) -> tuple[Volume, Volume]:
    """A varied synthetic abdominal CT (HU) and its class labels (:data:`SYNTH_LABELS`).

    Parameters
    ----------
    seed : int
        Seed of the anatomy and the appearance.
    shape : tuple of 3 int
        ``(Z, Y, X)`` voxels; the anatomy keeps its size in mm (about 240 x 320 x 400 mm
        at the default, a body 240..370 mm wide).
    spacing : tuple of 3 float
        Voxel size in mm along ``(Z, Y, X)``.
    phase : str, optional
        Contrast phase (see :func:`paint_ct`); random by default.

    Returns
    -------
    image : Volume
        float32 HU ``(Z, Y, X)``, modality ``"CT"``, LPS identity direction.
    labels : Volume
        uint8 ``(Z, Y, X)``.

    Examples
    --------
    >>> img, lab = make_abdomen_ct_synth(1, shape=(24, 40, 50), spacing=(10.0, 8.0, 8.0))
    >>> img.shape3, sorted(set(lab.data.ravel().tolist()))[:2]
    ((24, 40, 50), [0, 1])
    """
    tis, lab, grid = make_abdomen_tissues(seed, shape, spacing)
    img = paint_ct(tis, spacing, np.random.default_rng([int(seed), 11]), phase)
    meta = {"phantom": "abdomen-ct-synth", "seed": int(seed)}
    image = Volume(img, grid.affine, modality="CT", meta=dict(meta))
    labels = Volume(lab, grid.affine.copy(), modality="CT", is_label=True,
                    label_names=dict(SYNTH_LABELS), label_colors=dict(SYNTH_COLORS),
                    meta=dict(meta))
    return image, labels
