"""Readers of input datasets into the cell table and the patient table (`mil cells`).

`read_dataset("voc", path)` or `get_reader("voc")(path, label_map=None)`; `list_readers()` names the formats.
Importing this package imports no reader: each format's module is loaded when a reader is first asked for.
"""

from mil.readers.registry import (
    ReaderSpec,
    get_reader,
    list_readers,
    read_dataset,
    register_reader,
    unavailable_readers,
)

__all__ = ["ReaderSpec", "get_reader", "list_readers", "read_dataset", "register_reader", "unavailable_readers"]
