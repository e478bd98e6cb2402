"""Tiny DICOM files for reader tests: a tiled whole-slide image and bulk simple annotations over it.

The slide is written with pydicom as a VL Whole Slide Microscopy Image (TILED_FULL, uncompressed RGB, one
file per pyramid level), because neither highdicom nor wsidicom constructs one from an array; wsidicom
then reads it like any scanner's output. The annotations are built with highdicom's own
MicroscopyBulkSimpleAnnotations, exactly as a converter of the real dataset would write them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

# A private coding scheme for the test concepts (cell types, identifiers), as converters use for terms
# that SNOMED does not cover.
SCHEME = "99CYTOMIL"
BACKGROUND = (236, 214, 220)


@dataclass
class Disc:
    """A synthetic cell drawn on the slide: a filled disc of one colour inside box x0,y0,x1,y1."""

    cell_id: int
    box: tuple[int, int, int, int]
    color: tuple[int, int, int]


@dataclass
class Slide:
    """What a test needs to know about the written slide."""

    folder: Path
    base: Dataset  # the level-0 dataset (what annotations reference)
    pixels: np.ndarray  # (H, W, 3) uint8 level-0 pixels
    files: list[Path] = field(default_factory=list)
    levels: list[Dataset] = field(default_factory=list)  # level k is downsampled 2**k


def draw_discs(size: int, discs: list[Disc]) -> np.ndarray:
    """(size, size, 3) uint8 background with each disc filled inside its box."""
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = BACKGROUND
    rows, cols = np.mgrid[0:size, 0:size]
    for d in discs:
        x0, y0, x1, y1 = d.box
        cx, cy, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2
        pixels[(cols - cx) ** 2 + (rows - cy) ** 2 <= r * r] = d.color
    return pixels


def _level_dataset(
    pixels: np.ndarray,
    *,
    scale: int,
    tile: int,
    uids: dict,
    patient_id: str,
    diagnosis: str | None,
    base_spacing: float,
) -> Dataset:
    height, width = pixels.shape[:2]
    tiles_across, tiles_down = -(-width // tile), -(-height // tile)
    padded = np.zeros((tiles_down * tile, tiles_across * tile, 3), np.uint8)
    padded[:height, :width] = pixels
    # TILED_FULL: frames in row-major tile order, every frame a full tile (edge tiles padded).
    frames = [
        padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile].tobytes()
        for r in range(tiles_down)
        for c in range(tiles_across)
    ]

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    ds.Modality = "SM"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if scale == 1 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.PatientID = patient_id
    ds.PatientName = f"{patient_id}^"  # one-component person name, stated as such
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = ""
    ds.StudyID = "1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    if diagnosis is not None:
        ds.AdmittingDiagnosesDescription = diagnosis
    ds.SeriesNumber = 1
    ds.InstanceNumber = scale
    ds.Manufacturer = "cytomil tests"
    ds.ContainerIdentifier = f"{patient_id}-slide"
    ds.SpecimenDescriptionSequence = Sequence()
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImagedVolumeWidth = width * base_spacing * scale
    ds.ImagedVolumeHeight = height * base_spacing * scale
    ds.ImagedVolumeDepth = 0.001
    # A slide's usual orientation: image rows run along -Y, columns along -X; the origin is a corner.
    ds.ImageOrientationSlide = [0.0, -1.0, 0.0, -1.0, 0.0, 0.0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    origin.ZOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    measures = Dataset()
    measures.PixelSpacing = [base_spacing * scale, base_spacing * scale]
    measures.SliceThickness = 0.001
    measures.SpacingBetweenSlices = 0.001
    path_id = Dataset()
    path_id.OpticalPathIdentifier = "0"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.OpticalPathIdentificationSequence = [path_id]
    ds.SharedFunctionalGroupsSequence = [shared]
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "0"
    illumination = Dataset()
    illumination.CodeValue, illumination.CodingSchemeDesignator = "111744", "DCM"
    illumination.CodeMeaning = "Brightfield illumination"
    optical_path.IlluminationTypeCodeSequence = [illumination]
    colour = Dataset()
    colour.CodeValue, colour.CodingSchemeDesignator, colour.CodeMeaning = "414298005", "SCT", "Full Spectrum"
    optical_path.IlluminationColorCodeSequence = [colour]
    ds.OpticalPathSequence = [optical_path]
    ds.PixelData = b"".join(frames)
    return ds


def write_slide(
    folder: Path,
    pixels: np.ndarray,
    *,
    patient_id: str,
    levels: int = 2,
    tile: int = 128,
    diagnosis: str | None = None,
    base_spacing: float = 0.00025,
) -> Slide:
    """Write a pyramid (level k = 2**k downsampled by box averaging) as one DICOM file per level."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame_of_reference": generate_uid()}
    slide = Slide(folder=folder, base=None, pixels=pixels)
    level_pixels = pixels
    for k in range(levels):
        scale = 2**k
        if k:
            h, w = level_pixels.shape[0] // 2, level_pixels.shape[1] // 2
            level_pixels = (
                level_pixels[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            )
        ds = _level_dataset(
            level_pixels,
            scale=scale,
            tile=tile,
            uids=uids,
            patient_id=patient_id,
            diagnosis=diagnosis,
            base_spacing=base_spacing,
        )
        path = folder / f"level{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        slide.files.append(path)
        slide.levels.append(ds)
        if k == 0:
            slide.base = ds
    return slide


@dataclass
class GroupSpec:
    """One annotation group: boxes (x0,y0,x1,y1 level-0 pixels) with optional per-box cell and ROI ids.

    `property_type` is a code meaning (private scheme) or a (value, scheme, meaning) triple. `id_style`
    "idc" names the id measurements as the IDC conversion of the dataset does (EFO single cell identifier,
    DCM Referenced Region of Interest Identifier, DCM Image Region for an ROI group's own ids); "plain"
    uses private `cell_id` / `roi_id` concepts.
    """

    label: str
    boxes: list[tuple[float, float, float, float]]
    property_type: str | tuple[str, str, str] = "cell"
    description: str | None = None
    cell_ids: list[int] | None = None
    roi_ids: list[int] | None = None
    graphic_type: str = "POLYGON"
    id_style: str = "idc"
    is_roi: bool = False


def _code(concept):
    from pydicom.sr.coding import Code

    if isinstance(concept, tuple):
        return Code(*concept)
    return Code(concept.replace(" ", "_")[:16], SCHEME, concept)


def _id_concepts(spec: GroupSpec):
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if spec.id_style == "plain":
        return _code("cell_id"), _code("roi_id")
    roi = Code("111030", "DCM", "Image Region") if spec.is_roi else codes.DCM.ReferencedRegionOfInterestIdentifier
    return Code("0010197", "EFO", "single cell identifier"), roi


def _corners(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    # Clockwise from top-left, as rectangles are drawn in viewers.
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def write_annotations(
    path: Path,
    source: Dataset,
    groups: list[GroupSpec],
    *,
    coordinates: str = "2D",
    session: str | None = None,
    series_description: str | None = None,
) -> Dataset:
    """Write a Microscopy Bulk Simple Annotations object over `source` with highdicom.

    `session` marks the object as the IDC conversion does: one object per annotation session, named in
    ClinicalTrialSeriesID ('consensus', '1', '2', 'detection-only').
    """
    import highdicom as hd
    from highdicom.ann import AnnotationGroup, Measurements, MicroscopyBulkSimpleAnnotations
    from pydicom.dataelem import DataElement

    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(source, for_total_pixel_matrix=True)
    annotation_groups = []
    for number, spec in enumerate(groups, start=1):
        graphic = []
        for box in spec.boxes:
            # A POINT "box" is the point (x, y) itself.
            points = np.array([box], np.float64) if spec.graphic_type == "POINT" else _corners(box)
            if coordinates == "3D":
                points = to_slide(points)
            graphic.append(points)
        measurements = []
        for concept, values in zip(_id_concepts(spec), (spec.cell_ids, spec.roi_ids), strict=True):
            if values is not None:
                unit = hd.sr.CodedConcept("1", "UCUM", "no units")
                measurements.append(Measurements(name=concept, values=np.asarray(values, dtype=np.float32), unit=unit))
        annotation_groups.append(
            AnnotationGroup(
                number=number,
                uid=generate_uid(),
                label=spec.label,
                annotated_property_category=_code(("91723000", "SCT", "Anatomical structure")),
                annotated_property_type=_code(spec.property_type),
                graphic_type=spec.graphic_type,
                graphic_data=graphic,
                algorithm_type="MANUAL",
                measurements=measurements or None,
                description=spec.description,
            )
        )
    annotations = MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=coordinates,
        annotation_groups=annotation_groups,
        series_instance_uid=generate_uid(),
        series_number=33,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cytomil tests",
        manufacturer_model_name="dicom_fixtures",
        software_versions="1",
        device_serial_number="0",
        series_description=series_description,
    )
    if session is not None:
        annotations.add(DataElement(0x00120071, "LO", session))  # Clinical Trial Series ID
    path.parent.mkdir(parents=True, exist_ok=True)
    annotations.save_as(path, enforce_file_format=True)
    return annotations
