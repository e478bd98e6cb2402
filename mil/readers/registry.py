"""The reader registry: one string-keyed entry per input format, filled by `@register_reader` where the
reader is defined.

A reader is a function `(input: Path, *, label_map: LabelMap | None, **options) -> (CellTable, PatientTable)`.
`label_map=None` means the format's default: the 33-class map of configs/label_map.yaml for formats that
carry the reference vocabulary (zenodo, idc), the dataset's own labels for detection and crop formats.

Reader modules are imported only when a reader is asked for (no I/O, no heavy imports at package import).
The `idc` reader lives in its own module with heavy optional dependencies (highdicom, wsidicom); when that
module or its dependencies are missing, asking for `idc` says so instead of claiming the name is unknown.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mil.cell_table import CellTable, PatientTable
from mil.errors import ConfigError
from mil.labels import LabelMap

ReadFn = Callable[..., tuple[CellTable, PatientTable]]

# Modules whose import fills the registry. Order only fixes import order, never the listing order.
BUILTIN_MODULES = (
    "mil.readers.zenodo",
    "mil.readers.coco",
    "mil.readers.yolo",
    "mil.readers.voc",
    "mil.readers.imagefolder",
    "mil.readers.patient_folders",
)
# Formats whose module may be absent or need optional dependencies: format name -> module.
OPTIONAL_MODULES = {"idc": "mil.readers.idc"}


@dataclass(frozen=True)
class ReaderSpec:
    """A registered reader and what the rest of the pipeline needs to know about its format."""

    name: str
    read: ReadFn
    summary: str
    carries_diagnosis: bool  # the format itself says each patient's diagnosis, so a missing one is an error
    default_label_map: str  # "default" (configs/label_map.yaml) or "dataset" (keep the dataset's own labels)

    @property
    def options(self) -> list[str]:
        """Keyword options the reader takes besides `label_map`."""
        params = inspect.signature(self.read).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "label_map"]

    def __call__(
        self, input: str | Path, *, label_map: LabelMap | None = None, **options
    ) -> tuple[CellTable, PatientTable]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            flags = ", ".join("--" + o.replace("_", "-") for o in unknown)
            takes = ", ".join("--" + o.replace("_", "-") for o in self.options) or "no extra options"
            raise ConfigError(f"format {self.name!r} does not take {flags}; it takes {takes}")
        return self.read(Path(input), label_map=label_map, **options)


_READERS: dict[str, ReaderSpec] = {}
_UNAVAILABLE: dict[str, str] = {}
_loaded = False


def register_reader(
    name: str, *, carries_diagnosis: bool = False, default_label_map: str = "dataset"
) -> Callable[[ReadFn], ReadFn]:
    """Register `fn` as the reader of format `name`; a second reader of the same name is an error."""
    if default_label_map not in ("default", "dataset"):
        raise ConfigError(f"reader {name!r}: default_label_map must be 'default' or 'dataset'")

    def decorator(fn: ReadFn) -> ReadFn:
        if name in _READERS and _READERS[name].read is not fn:
            raise ConfigError(
                f"reader {name!r} is registered twice ({_READERS[name].read.__module__}, {fn.__module__})"
            )
        summary = (inspect.getdoc(fn) or name).splitlines()[0]
        _READERS[name] = ReaderSpec(name, fn, summary, carries_diagnosis, default_label_map)
        return fn

    return decorator


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for name, module in OPTIONAL_MODULES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                _UNAVAILABLE[name] = f"its module {module} is not part of this installation"
            else:
                _UNAVAILABLE[name] = f"{module} needs {e.name!r}, which is not installed; pip install {e.name}"
        except ImportError as e:
            _UNAVAILABLE[name] = f"{module} failed to import ({e}); reinstall its dependencies"
        else:
            if name not in _READERS:
                _UNAVAILABLE[name] = f"{module} imported but registered no reader named {name!r}"
    _loaded = True


def list_readers() -> list[str]:
    """Names of the formats that can be read now, sorted."""
    _load_builtin()
    return sorted(_READERS)


def unavailable_readers() -> dict[str, str]:
    """Formats that exist but cannot be read in this installation -> why."""
    _load_builtin()
    return {k: v for k, v in sorted(_UNAVAILABLE.items()) if k not in _READERS}


def get_reader(name: str) -> ReaderSpec:
    """The reader of format `name`; an unknown or unavailable name says which ones exist."""
    _load_builtin()
    if name in _READERS:
        return _READERS[name]
    if name in _UNAVAILABLE:
        raise ConfigError(f"format {name!r} cannot be read here: {_UNAVAILABLE[name]}")
    raise ConfigError(f"unknown format {name!r}; choose one of: {', '.join(list_readers())}")


def read_dataset(
    format: str, input: str | Path, *, label_map: LabelMap | None = None, **options
) -> tuple[CellTable, PatientTable]:
    """Read `input` with the reader of `format` (the Python entry point of `mil cells`)."""
    return get_reader(format)(input, label_map=label_map, **options)
