"""Optional wandb logging for the training commands (`--wandb disabled|offline|online`), as `mil compare` does it.

Off unless asked; `WANDB_MODE=disabled` in the environment wins; 'online' without credentials is refused up front
(never a login prompt in a batch job). The classifier takes the Lightning logger, the detector's plain loop
`WandbRun`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mil.errors import ConfigError

WANDB_MODES = ("disabled", "offline", "online")
PROJECT = "cytomil"


def wanted(mode: str) -> bool:
    """True when `mode` asks for wandb and the environment does not switch it off."""
    if mode not in WANDB_MODES:
        raise ConfigError(f"--wandb {mode!r} is unknown; choose one of {list(WANDB_MODES)}")
    if mode == "disabled" or os.environ.get("WANDB_MODE", "") == "disabled":
        return False
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not Path("~/.netrc").expanduser().exists():
        raise ConfigError("--wandb online needs WANDB_API_KEY (no login prompt is ever shown); use --wandb offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return True


def wandb_logger(mode: str, save_dir: str | Path, *, name: str, project: str = PROJECT):
    """A Lightning WandbLogger writing under `save_dir`, or None when wandb is not wanted."""
    if not wanted(mode):
        return None
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=str(save_dir), mode=mode, name=name)


class WandbRun:
    """wandb for a plain training loop: `log(dict, step)` and `finish()`; does nothing when not wanted."""

    def __init__(self, mode: str, save_dir: str | Path, *, name: str, config: dict, project: str = PROJECT) -> None:
        self.run = None
        if wanted(mode):
            import wandb

            Path(save_dir).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=project, dir=str(save_dir), mode=mode, name=name, config=config)

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
