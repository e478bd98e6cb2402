"""Lightning's banner lines, tips and deprecation notes are noise in the output of our commands."""

from __future__ import annotations

import contextlib
import logging
import warnings

NOISE = (
    ".*does not have many workers.*",  # in-memory bags and crops need no loader workers
    ".*LeafSpec.*",  # a deprecation inside Lightning itself
    ".*is smaller than the logging interval.*",
)


@contextlib.contextmanager
def quiet_lightning(enabled: bool = True):
    """Within the block, Lightning logs warnings only (no 'GPU available', tips or 'Trainer.fit stopped' lines)
    and the warnings in NOISE are dropped; both are restored afterwards. ``enabled=False`` changes nothing."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    if enabled:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        if enabled:
            for message in NOISE:
                warnings.filterwarnings("ignore", message=message)
        try:
            yield
        finally:
            logger.setLevel(level)
