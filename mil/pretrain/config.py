"""The strict, typed config of a pretraining run; written beside its outputs and fingerprinted for resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mil.errors import ConfigError, refuse_unknown_keys
from mil.tracking import WANDB_MODES

METHODS = ("dino", "simclr")


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (labels of the cell table are never read)."""

    method: str = "simclr"
    arch: str = "resnet18"  # any timm architecture
    crop_size: int = 64  # the encoder's input side: crops are cut at this size, views are drawn at it
    max_epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3  # AdamW, cosine schedule over the epochs
    weight_decay: float = 1e-4
    # SimCLR: NT-Xent temperature and projection width.
    temperature: float = 0.2
    proj_dim: int = 128
    # DINO: head sizes, local views, teacher EMA momentum (cosine from momentum to 1) and temperatures.
    dino_out_dim: int = 2048
    dino_hidden_dim: int = 512
    dino_bottleneck_dim: int = 128
    local_views: int = 4
    momentum: float = 0.99
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 5
    # Views (see mil.pretrain.views): crop scales, colour-jitter strength, blur probability.
    min_scale: float = 0.4
    colour_strength: float = 0.5
    hue: float = 0.04
    blur: float = 0.2
    max_steps: int = -1  # stop after this many optimizer steps (tests); -1 = no limit
    seed: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    num_workers: int = 0
    wandb: str = "disabled"  # 'offline' | 'online' | 'disabled' (mil.tracking; never fingerprinted)
    verbose: bool = True  # one line per epoch (mil.progress.EpochLine)
    resume: bool = True  # reuse a finished run / continue from out/run/checkpoints/last.ckpt of the same run

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; choose one of {list(METHODS)}")
        if self.crop_size < 16:
            raise ConfigError(f"crop_size {self.crop_size} is too small; use 16 or more pixels")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size {self.batch_size}: contrastive and DINO losses need at least 2 crops")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(f"min_scale {self.min_scale} must be in (0, 1]")
        if self.method == "dino" and self.local_views < 0:
            raise ConfigError(f"local_views {self.local_views} must be 0 or more")
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs {self.max_epochs} must be at least 1")
        if self.wandb not in WANDB_MODES:
            raise ConfigError(f"wandb {self.wandb!r} is unknown; choose one of {list(WANDB_MODES)}")

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        refuse_unknown_keys(values, cls.__dataclass_fields__, "pretrain config")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
