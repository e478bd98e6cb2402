"""Vectorised drawing of one cell (or a batch of erythrocytes) as an optical-density sprite.

Every shape is a signed distance in pixels (positive inside) turned into a soft 1-px edge, so a whole cell
is a handful of array operations on its own small patch; no per-pixel Python loop anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from mil.synth.morphology import ERYTHROCYTE_RADIUS, CellMorph
from mil.synth.palette import Stain


@dataclass(kw_only=True)
class Sprite:
    """A drawn cell: OD (h, w, 3) and coverage alpha (h, w) on a patch centred on the cell."""

    od: np.ndarray
    alpha: np.ndarray
    half: int  # the patch is (2 * half + 1) square, centred on the cell centre
    radius: float  # the cell's nominal radius, used for placement


def soft(distance: np.ndarray) -> np.ndarray:
    """Signed distance (px, positive inside) -> coverage with a 1-px anti-aliased edge."""
    return np.clip(distance + 0.5, 0.0, 1.0)


def texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance smooth noise: small sigma = fine chromatin, large sigma = clumped chromatin."""
    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise * np.float32(2.0 * np.sqrt(np.pi) * max(sigma, 0.5))  # std of filtered white noise


def _segment_distance(px, py, ax, ay, bx, by):
    """Distance of points (px, py) to segments a-b; segment arrays broadcast against the points."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    return np.hypot(px - ax - t * dx, py - ay - t * dy)


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)


class _Canvas:
    """Pixel coordinates of one patch, relative to the cell centre."""

    def __init__(self, half: int):
        self.half = half
        y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
        self.x, self.y = x, y
        self.shape = x.shape

    def ellipse(self, cx, cy, a, b, angle) -> np.ndarray:
        """Approximate signed distance of an ellipse (exact for circles)."""
        c, s = np.cos(angle), np.sin(angle)
        u = (self.x - cx) * c + (self.y - cy) * s
        v = -(self.x - cx) * s + (self.y - cy) * c
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        return (1.0 - rho) * min(a, b)

    def disc(self, cx, cy, r) -> np.ndarray:
        return r - np.hypot(self.x - cx, self.y - cy)


def _outline(cv: _Canvas, m: CellMorph, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Signed distance of the cell outline: an ellipse with a low-order wobble."""
    angle = rng.uniform(0, np.pi)
    e = rng.uniform(0, m.elongation)
    a, b = radius * (1 + e / 2), radius / (1 + e / 2)
    c, s = np.cos(angle), np.sin(angle)
    u, v = cv.x * c + cv.y * s, -cv.x * s + cv.y * c
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    phi = np.arctan2(v, u)
    wobble = np.ones_like(rho)
    for k in (2, 3, 4, 5):
        wobble += m.irregularity * rng.normal(0, 1.0 / k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return (wobble - rho) * radius


def _nucleus(cv: _Canvas, m: CellMorph, radius: float, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signed distance of the nucleus of the class's shape."""
    rn = m.nc * radius * rng.uniform(0.94, 1.06)
    cx, cy = centre
    shape = m.nucleus
    if shape in ("round", "pyknotic"):
        e = rng.uniform(0, 0.12)
        return cv.ellipse(cx, cy, rn * (1 + e / 2), rn / (1 + e / 2), rng.uniform(0, np.pi))
    if shape == "indented":
        # kidney: a bite taken from the side facing the cell centre (or a random side when centred)
        toward = -centre / max(float(np.hypot(cx, cy)), 1e-3) if np.hypot(cx, cy) > 0.5 else _unit(rng.uniform(0, 6.3))
        toward = toward + rng.normal(0, 0.25, 2).astype(np.float32)
        toward /= max(float(np.hypot(*toward)), 1e-3)
        bite = centre + toward * rn * rng.uniform(0.9, 1.05)
        return np.minimum(cv.ellipse(cx, cy, rn * 1.08, rn * 0.92, rng.uniform(0, np.pi)), -cv.disc(*bite, rn * 0.55))
    if shape == "band":
        arc_r, half_w = 0.5 * radius, rng.uniform(0.15, 0.19) * radius
        phi0, span = rng.uniform(-np.pi, np.pi), np.deg2rad(rng.uniform(190, 250))
        dist = np.hypot(cv.x - cx, cv.y - cy)
        dphi = np.angle(np.exp(1j * (np.arctan2(cv.y - cy, cv.x - cx) - phi0)))
        body = np.minimum(half_w - np.abs(dist - arc_r), (span / 2 - np.abs(dphi)) * arc_r)
        ends = [centre + arc_r * _unit(phi0 + sgn * span / 2) for sgn in (-1, 1)]
        return np.maximum(body, np.maximum(cv.disc(*ends[0], half_w), cv.disc(*ends[1], half_w)))
    if shape == "lobed":
        n = int(rng.integers(m.lobes[0], m.lobes[1] + 1))
        lobe_r = radius * {1: 0.4, 2: 0.31, 3: 0.27, 4: 0.24}.get(n, 0.22)
        phi0, span = rng.uniform(-np.pi, np.pi), np.deg2rad(min(70 * (n - 1), 260))
        angles = phi0 + np.linspace(-span / 2, span / 2, n) + rng.normal(0, 0.12, n)
        arc_r = 0.42 * radius
        lx = (cx + arc_r * np.cos(angles) + rng.normal(0, 0.6, n)).astype(np.float32)
        ly = (cy + arc_r * np.sin(angles) + rng.normal(0, 0.6, n)).astype(np.float32)
        lx, ly = lx[:, None, None], ly[:, None, None]
        sizes = lobe_r * rng.uniform(0.88, 1.1, (n, 1, 1))
        lobes = np.max(sizes - np.hypot(cv.x - lx, cv.y - ly), axis=0)
        if n > 1:  # thin chromatin filaments between neighbouring lobes
            seg = _segment_distance(cv.x, cv.y, lx[:-1], ly[:-1], lx[1:], ly[1:])
            lobes = np.maximum(lobes, np.max(1.0 - seg, axis=0))
        return lobes
    if shape == "multilobed":
        n = int(rng.integers(m.lobes[0], m.lobes[1] + 1))
        lx = (cx + rng.normal(0, 0.22 * rn, n)).astype(np.float32)[:, None, None]
        ly = (cy + rng.normal(0, 0.22 * rn, n)).astype(np.float32)[:, None, None]
        r = (rn * rng.uniform(0.4, 0.55, n)).astype(np.float32)[:, None, None]
        return np.max(r - np.hypot(cv.x - lx, cv.y - ly), axis=0)
    if shape == "mitosis":
        # metaphase plate: short chromosome arms gathered along a line through the centre
        n, plate = int(rng.integers(14, 22)), rng.uniform(0, np.pi)
        along = rng.uniform(-0.55, 0.55, n) * rn
        across = rng.normal(0, 1.6, n)
        px = cx + along * np.cos(plate) - across * np.sin(plate)
        py = cy + along * np.sin(plate) + across * np.cos(plate)
        arm = plate + np.pi / 2 + rng.normal(0, 0.5, n)
        length = rng.uniform(2.0, 3.5, n)
        ax, ay = px - length * np.cos(arm), py - length * np.sin(arm)
        bx, by = px + length * np.cos(arm), py + length * np.sin(arm)
        args = [np.asarray(a, dtype=np.float32)[:, None, None] for a in (ax, ay, bx, by)]
        return np.max(1.3 - _segment_distance(cv.x, cv.y, *args), axis=0)
    raise ValueError(f"unknown nucleus shape {shape!r}")


def _granules(
    rng: np.random.Generator, region: np.ndarray, density: float, size: float, max_count: int = 600
) -> np.ndarray:
    """Granule density map (h, w): Poisson points in `region`, each a blurred dot of peak ~1."""
    ys, xs = np.nonzero(region > 0.5)
    out = np.zeros(region.shape, dtype=np.float32)
    n = min(int(rng.poisson(density * len(ys))), max_count) if len(ys) else 0
    if n == 0:
        return out
    pick = rng.integers(0, len(ys), n)
    np.add.at(out, (ys[pick], xs[pick]), 1.0)
    out = gaussian_filter(out, size) * np.float32(2 * np.pi * size * size)
    return np.minimum(out, 1.6) * region


def draw_cell(m: CellMorph, stain: Stain, rng: np.random.Generator, *, auer_rod: bool = False) -> Sprite:
    """One nucleated cell (or thrombocyte, smudge, mitosis) of morphology `m`."""
    radius = float(max(m.radius + rng.normal(0, m.radius_sd), 0.55 * m.radius))
    half = int(np.ceil(radius * (1 + m.elongation / 2) * (1 + 2.5 * m.irregularity))) + 2
    cv = _Canvas(half)
    cell = soft(_outline(cv, m, radius, rng))  # (h, w)

    if m.nucleus == "smudge":
        # a burst cell: no cytoplasm, chromatin smeared into streaks along one direction
        streak = gaussian_filter(rng.standard_normal(cv.shape).astype(np.float32), (0.8, 2.5)) * 4.0
        blotch = texture(rng, cv.shape, 2.5)
        density = np.clip(1 + m.texture_amp * (0.5 * streak + 0.8 * blotch), 0.2, None)
        cell = gaussian_filter(cell, 1.2)  # frayed, fuzzy border
        od = stain.od(m.chromatin) * (m.chromatin_density * cell * density)[..., None]
        return Sprite(od=od.astype(np.float32), alpha=cell, half=half, radius=radius)

    offset = m.nucleus_offset * radius * rng.uniform(0.7, 1.2)
    centre = _unit(rng.uniform(-np.pi, np.pi)) * offset
    nucleus = np.minimum(soft(_nucleus(cv, m, radius, centre, rng)), cell)
    if m.nucleus == "mitosis":
        nucleus = np.minimum(gaussian_filter(nucleus, 0.5) * 1.4, cell)

    chroma = np.clip(1.0 + m.texture_amp * texture(rng, cv.shape, m.texture_sigma), 0.25, None)
    nuc_od = stain.od(m.chromatin) * (m.chromatin_density * chroma)[..., None]
    if m.nucleoli[1] > 0:
        k = int(rng.integers(m.nucleoli[0], m.nucleoli[1] + 1))
        rn = m.nc * radius
        spots = np.zeros(cv.shape, dtype=np.float32)
        for _ in range(k):
            p = centre + _unit(rng.uniform(-np.pi, np.pi)) * rng.uniform(0, 0.45) * rn
            spots = np.maximum(spots, soft(cv.disc(*p, m.nucleolus_size * rn * rng.uniform(0.8, 1.2))))
        spots = spots[..., None]
        nuc_od = nuc_od * (1 - 0.6 * spots) + stain.od("nucleolus") * 0.7 * spots

    cyto_factor = np.full(cv.shape, m.cytoplasm_density, dtype=np.float32)
    if m.halo:
        p = centre * 0.35
        cyto_factor *= 1 - 0.45 * soft(cv.disc(*p, 0.5 * m.nc * radius + 2))
    if m.dark_rim:
        rho = np.hypot(cv.x, cv.y) / radius
        cyto_factor *= 1 + 0.8 * np.clip((rho - 0.65) / 0.3, 0, 1)
    cytoplasm = cell * (1 - nucleus)
    if m.vacuoles[1] > 0:
        ys, xs = np.nonzero(cytoplasm > 0.9)
        for _ in range(int(rng.integers(m.vacuoles[0], m.vacuoles[1] + 1)) if len(ys) else 0):
            i = rng.integers(0, len(ys))
            vac = soft(cv.disc(xs[i] - half, ys[i] - half, rng.uniform(1.3, 3.0)))
            cyto_factor *= 1 - 0.8 * vac
    cyto_od = stain.od(m.cytoplasm) * cyto_factor[..., None]

    od = cell[..., None] * ((1 - nucleus)[..., None] * cyto_od + nucleus[..., None] * nuc_od)
    if m.granules:
        region = cell if m.granules_over_nucleus else cytoplasm
        dots = _granules(rng, region, m.granule_density, m.granule_size)
        od = od + stain.od(m.granules) * (m.granule_strength * dots)[..., None]
    if auer_rod:
        # a thin red-purple needle in the cytoplasm on the far side of the nucleus, where it stands out
        away = -centre / offset if offset > 0.5 else _unit(rng.uniform(-np.pi, np.pi))
        mid = away * radius * rng.uniform(0.72, 0.8)
        tangent = np.array([-away[1], away[0]]) * radius * rng.uniform(0.22, 0.32)
        tangent = tangent + rng.normal(0, 0.06, 2) * radius
        a, b = mid - tangent, mid + tangent
        rod = soft(0.9 - _segment_distance(cv.x, cv.y, a[0], a[1], b[0], b[1])) * cell
        od = od + stain.od("auer") * (1.6 * rod)[..., None]
    return Sprite(od=od.astype(np.float32), alpha=cell, half=half, radius=radius)


def draw_erythrocytes(stain: Stain, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A batch of n erythrocytes: OD (n, P, P, 3), alpha (n, P, P) and the half size of the P-square patch.

    Biconcave discs: thin (pale) centre, thick rim; drawn all at once because a field holds hundreds.
    """
    half = erythrocyte_half()
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    f32 = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]
    radius = f32(np.clip(rng.normal(ERYTHROCYTE_RADIUS, 0.7, n), 7.5, ERYTHROCYTE_RADIUS * 1.25))
    e = f32(rng.uniform(0, 0.14, n))
    angle = rng.uniform(0, np.pi, n)
    c, s = f32(np.cos(angle)), f32(np.sin(angle))
    u, v = x * c + y * s, -x * s + y * c
    rho = np.sqrt((u * (1 + e / 2)) ** 2 + (v / (1 + e / 2)) ** 2) / radius
    alpha = soft((1 - rho) * radius)
    pallor = f32(rng.uniform(0.45, 0.7, n))
    thickness = 1 - pallor * np.clip(1 - rho / 0.62, 0, 1) ** 1.2
    strength = f32(rng.normal(0.8, 0.06, n))
    od = stain.od("rbc").astype(np.float32) * (alpha * thickness * strength)[..., None]
    return od, alpha, half


def erythrocyte_half() -> int:
    """Half size of an erythrocyte patch."""
    return int(np.ceil(ERYTHROCYTE_RADIUS * 1.3)) + 2
