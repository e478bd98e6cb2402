"""Class-specific morphology of the 33 classes: one record per class, read by the drawing code.

Sizes are in pixels at the generator's scale (an erythrocyte is ~20 px across, so ~2.7 px per micrometre).
The table follows textbook marrow cytology: blasts are large with fine chromatin, nucleoli and blue
cytoplasm; granulocytes mature from round (myelocyte) to kidney (metamyelocyte) to band to segmented
nuclei, and their granules tell the three lines apart; lymphocytes are small with dense chromatin;
erythroblasts shrink, condense their nucleus and turn their cytoplasm from deep blue to pink.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CellMorph:
    """How one class looks. Ranges are (low, high) and sampled per cell."""

    radius: float  # mean cell radius, px
    radius_sd: float = 1.2
    elongation: float = 0.08  # max extra axis ratio of the cell outline
    irregularity: float = 0.03  # amplitude of the outline's low-order wobble
    nucleus: str = "round"  # round | indented | band | lobed | multilobed | pyknotic | mitosis | smudge
    nc: float = 0.7  # nucleus radius / cell radius
    nucleus_offset: float = 0.1  # nucleus centre distance from the cell centre, fraction of the radius
    lobes: tuple[int, int] = (1, 1)
    chromatin: str = "chromatin"  # palette material of the nucleus
    chromatin_density: float = 1.0
    texture_sigma: float = 1.0  # px: fine (<1) to coarse, clumped (>1.4) chromatin
    texture_amp: float = 0.2
    nucleoli: tuple[int, int] = (0, 0)
    nucleolus_size: float = 0.18  # fraction of the nucleus radius
    cytoplasm: str = "cyto_blue"
    cytoplasm_density: float = 1.0
    granules: str | None = None  # palette material
    granule_density: float = 0.0  # granules per px^2 of the region they cover
    granule_size: float = 0.7  # blur sigma of one granule, px
    granule_strength: float = 1.0
    granules_over_nucleus: bool = False
    vacuoles: tuple[int, int] = (0, 0)
    halo: bool = False  # pale perinuclear Golgi zone
    dark_rim: bool = False  # cytoplasm darkening towards the edge (reactive lymphocytes)


def _granulocyte_series(
    radius: tuple[float, float, float, float], granules: str, density: float, size: float, **kw
) -> list[CellMorph]:
    """Myelocyte -> metamyelocyte -> band -> segmented of one granulocyte line."""
    cyto = kw.pop("cytoplasm", "cyto_lilac")
    cyto_density = kw.pop("cytoplasm_density", 1.2)
    seg_lobes = kw.pop("seg_lobes", (3, 5))
    over = kw.pop("over_nucleus", False)
    strength = kw.pop("strength", 1.0)
    common = dict(
        cytoplasm=cyto,
        cytoplasm_density=cyto_density,
        granules=granules,
        granule_density=density,
        granule_size=size,
        granule_strength=strength,
        granules_over_nucleus=over,
        radius_sd=1.0,
    )
    return [
        CellMorph(radius=radius[0], nucleus="round", nc=0.56, nucleus_offset=0.26, texture_sigma=1.2,
                  texture_amp=0.25, chromatin_density=0.95, **common),
        CellMorph(radius=radius[1], nucleus="indented", nc=0.56, nucleus_offset=0.16, texture_sigma=1.3,
                  texture_amp=0.3, chromatin_density=1.05, **common),
        CellMorph(radius=radius[2], nucleus="band", nc=0.6, nucleus_offset=0.0, texture_sigma=1.4,
                  texture_amp=0.3, chromatin_density=1.15, **common),
        CellMorph(radius=radius[3], nucleus="lobed", nc=0.6, nucleus_offset=0.0, lobes=seg_lobes,
                  texture_sigma=1.5, texture_amp=0.3, chromatin_density=1.25, **common),
    ]  # fmt: skip


_NEUTRO = _granulocyte_series((18.0, 16.5, 15.5, 14.5), "gran_neutrophilic", 0.22, 0.55, strength=0.8)
_EOS = _granulocyte_series(
    (19.0, 17.5, 16.5, 15.5), "gran_eosinophilic", 0.16, 0.95, cytoplasm="cyto_pale_blue",
    cytoplasm_density=0.7, seg_lobes=(2, 2), strength=1.3,
)  # fmt: skip
_BASO = _granulocyte_series(
    (16.5, 15.0, 14.0, 13.0), "gran_basophilic", 0.05, 1.05, cytoplasm="cyto_lilac", cytoplasm_density=0.9,
    seg_lobes=(2, 3), over_nucleus=True, strength=1.2,
)  # fmt: skip

MORPHOLOGY: dict[str, CellMorph] = {
    "myeloblast": CellMorph(
        radius=19.0,
        radius_sd=1.5,
        nc=0.78,
        nucleus_offset=0.08,
        chromatin="chromatin_fine",
        texture_sigma=0.7,
        texture_amp=0.12,
        nucleoli=(2, 3),
        cytoplasm="cyto_blue",
        cytoplasm_density=0.95,
        granules="gran_azurophilic",
        granule_density=0.012,
        granule_size=0.6,
    ),
    "lymphoblast": CellMorph(
        radius=13.5,
        radius_sd=1.1,
        nc=0.88,
        nucleus_offset=0.05,
        chromatin="chromatin_fine",
        chromatin_density=1.2,
        texture_sigma=1.0,
        texture_amp=0.16,
        nucleoli=(0, 1),
        nucleolus_size=0.14,
        cytoplasm="cyto_blue",
        cytoplasm_density=1.05,
    ),
    "monoblast": CellMorph(
        radius=24.0,
        radius_sd=2.0,
        elongation=0.15,
        irregularity=0.06,
        nc=0.7,
        nucleus_offset=0.12,
        chromatin="chromatin_fine",
        chromatin_density=0.85,
        texture_sigma=0.6,
        texture_amp=0.1,
        nucleoli=(1, 2),
        nucleolus_size=0.24,
        cytoplasm="cyto_grey_blue",
        cytoplasm_density=1.15,
    ),
    "unknown_blast": CellMorph(
        radius=16.5,
        radius_sd=2.2,
        nc=0.82,
        nucleus_offset=0.08,
        chromatin="chromatin_fine",
        texture_sigma=0.8,
        texture_amp=0.14,
        nucleoli=(1, 2),
        cytoplasm="cyto_blue",
        cytoplasm_density=0.9,
    ),
    "promyelocyte": CellMorph(
        radius=25.0,
        radius_sd=2.0,
        nc=0.6,
        nucleus_offset=0.22,
        chromatin="chromatin_fine",
        texture_sigma=1.0,
        texture_amp=0.15,
        nucleoli=(1, 2),
        cytoplasm="cyto_blue",
        cytoplasm_density=0.85,
        halo=True,
        granules="gran_azurophilic",
        granule_density=0.08,
        granule_size=0.75,
        granule_strength=0.85,
        granules_over_nucleus=True,
    ),
    "neutrophilic_myelocyte": _NEUTRO[0],
    "neutrophilic_metamyelocyte": _NEUTRO[1],
    "neutrophilic_band": _NEUTRO[2],
    "segmented_neutrophil": _NEUTRO[3],
    "eosinophilic_myelocyte": _EOS[0],
    "eosinophilic_metamyelocyte": _EOS[1],
    "eosinophilic_band": _EOS[2],
    "segmented_eosinophil": _EOS[3],
    "basophilic_myelocyte": _BASO[0],
    "basophilic_metamyelocyte": _BASO[1],
    "basophilic_band": _BASO[2],
    "segmented_basophil": _BASO[3],
    "promonocyte": CellMorph(
        radius=22.0,
        radius_sd=1.8,
        irregularity=0.06,
        nucleus="indented",
        nc=0.68,
        nucleus_offset=0.1,
        chromatin="chromatin_fine",
        chromatin_density=0.9,
        texture_sigma=0.8,
        texture_amp=0.14,
        nucleoli=(0, 1),
        cytoplasm="cyto_grey_blue",
        cytoplasm_density=1.0,
        granules="gran_azurophilic",
        granule_density=0.02,
        granule_size=0.5,
    ),
    "monocyte": CellMorph(
        radius=21.0,
        radius_sd=1.8,
        irregularity=0.09,
        elongation=0.12,
        nucleus="indented",
        nc=0.62,
        nucleus_offset=0.14,
        chromatin_density=0.8,
        texture_sigma=1.0,
        texture_amp=0.22,
        cytoplasm="cyto_grey_blue",
        cytoplasm_density=0.9,
        vacuoles=(0, 4),
        granules="gran_azurophilic",
        granule_density=0.015,
        granule_size=0.5,
    ),
    "prolymphocyte": CellMorph(
        radius=14.5,
        radius_sd=1.1,
        nc=0.8,
        nucleus_offset=0.1,
        chromatin_density=1.05,
        texture_sigma=1.1,
        texture_amp=0.25,
        nucleoli=(1, 1),
        nucleolus_size=0.22,
        cytoplasm="cyto_blue",
        cytoplasm_density=0.9,
    ),
    "lymphocyte": CellMorph(
        radius=11.0,
        radius_sd=0.8,
        nc=0.87,
        nucleus_offset=0.08,
        chromatin_density=1.4,
        texture_sigma=1.4,
        texture_amp=0.32,
        cytoplasm="cyto_pale_blue",
        cytoplasm_density=1.1,
    ),
    "reactive_lymphocyte": CellMorph(
        radius=19.0,
        radius_sd=2.0,
        irregularity=0.1,
        elongation=0.15,
        nc=0.52,
        nucleus_offset=0.22,
        chromatin_density=1.1,
        texture_sigma=1.3,
        texture_amp=0.3,
        cytoplasm="cyto_blue",
        cytoplasm_density=1.0,
        dark_rim=True,
    ),
    "plasma_cell": CellMorph(
        radius=15.0,
        radius_sd=1.2,
        elongation=0.35,
        nc=0.48,
        nucleus_offset=0.38,
        chromatin_density=1.3,
        texture_sigma=1.8,
        texture_amp=0.45,
        cytoplasm="cyto_basophilic",
        cytoplasm_density=1.15,
        halo=True,
    ),
    "proerythroblast": CellMorph(
        radius=19.5,
        radius_sd=1.5,
        irregularity=0.05,
        nc=0.78,
        nucleus_offset=0.05,
        chromatin="chromatin_fine",
        chromatin_density=1.15,
        texture_sigma=0.9,
        texture_amp=0.2,
        nucleoli=(1, 2),
        cytoplasm="cyto_basophilic",
        cytoplasm_density=1.45,
    ),
    "basophilic_erythroblast": CellMorph(
        radius=15.0,
        radius_sd=1.1,
        nc=0.72,
        nucleus_offset=0.05,
        chromatin_density=1.1,
        texture_sigma=1.3,
        texture_amp=0.35,
        cytoplasm="cyto_basophilic",
        cytoplasm_density=1.25,
    ),
    "polychromatic_erythroblast": CellMorph(
        radius=12.5,
        radius_sd=0.9,
        nc=0.6,
        nucleus_offset=0.06,
        chromatin_density=1.35,
        texture_sigma=1.5,
        texture_amp=0.45,
        cytoplasm="cyto_polychromatic",
        cytoplasm_density=1.1,
    ),
    "orthochromatic_erythroblast": CellMorph(
        radius=10.5,
        radius_sd=0.8,
        nucleus="pyknotic",
        nc=0.44,
        nucleus_offset=0.22,
        chromatin_density=1.9,
        texture_sigma=1.0,
        texture_amp=0.08,
        cytoplasm="cyto_pink",
        cytoplasm_density=1.0,
    ),
    "megakaryocyte": CellMorph(
        radius=46.0,
        radius_sd=5.0,
        irregularity=0.08,
        elongation=0.12,
        nucleus="multilobed",
        nc=0.58,
        nucleus_offset=0.05,
        lobes=(6, 10),
        chromatin_density=1.1,
        texture_sigma=1.4,
        texture_amp=0.3,
        cytoplasm="cyto_pink",
        cytoplasm_density=0.85,
        granules="gran_azurophilic",
        granule_density=0.1,
        granule_size=0.55,
        granule_strength=0.6,
    ),
    "macrophage": CellMorph(
        radius=30.0,
        radius_sd=4.0,
        irregularity=0.14,
        elongation=0.2,
        nc=0.32,
        nucleus_offset=0.4,
        chromatin_density=0.95,
        texture_sigma=1.2,
        texture_amp=0.25,
        cytoplasm="cyto_grey_blue",
        cytoplasm_density=0.55,
        vacuoles=(4, 10),
        granules="debris",
        granule_density=0.005,
        granule_size=2.2,
        granule_strength=1.6,
    ),
    "thrombocyte": CellMorph(
        radius=4.2,
        radius_sd=0.6,
        irregularity=0.2,
        elongation=0.3,
        nc=0.6,
        nucleus_offset=0.1,
        chromatin="platelet",
        chromatin_density=0.9,
        texture_sigma=0.7,
        texture_amp=0.35,
        cytoplasm="platelet_rim",
        cytoplasm_density=1.0,
    ),
    "mitosis": CellMorph(
        radius=19.0,
        radius_sd=1.5,
        nucleus="mitosis",
        nc=0.7,
        nucleus_offset=0.0,
        chromatin_density=1.6,
        cytoplasm="cyto_grey_blue",
        cytoplasm_density=0.85,
    ),
    "smudge_cell": CellMorph(
        radius=19.0,
        radius_sd=3.0,
        irregularity=0.22,
        elongation=0.5,
        nucleus="smudge",
        nc=1.0,
        chromatin="chromatin_fine",
        chromatin_density=0.5,
        texture_sigma=1.0,
        texture_amp=0.45,
        cytoplasm="chromatin_fine",
        cytoplasm_density=0.0,
    ),
}

# Erythrocytes are drawn by the background routine (draw.draw_erythrocytes); this radius is shared with it.
ERYTHROCYTE_RADIUS = 10.0
