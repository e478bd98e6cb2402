"""The encoder registry: one string name (`arch.tag`) per way of turning a cell crop into a vector.

An encoder's name carries its weights (timm's `arch.tag` idea): `resnet18.random`, `resnet18.file`,
`dinobloom_s.v1`, `morphology.handcrafted`. Entries register themselves with `@register_encoder` where
they are defined (the modules of `features.encoders`); `create_encoder` looks the name up and builds it.

Besides the exact names, three *tags* work for any timm architecture (`ARCH.random`, `ARCH.file`,
`ARCH.hf`): these are registered as tag builders, so the registry never has to list every timm model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mil.errors import ConfigError

# Tags that work with any timm architecture; list_encoders() shows them with ARCH as placeholder.
GENERIC_ARCH = "ARCH"


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that determines an encoder's output: the one record preprocessing is derived from.

    It is written into every bag (attrs `encoder_config`), so two bag directories made with different
    weights, input size or normalisation are told apart, and mixing them is refused.
    """

    name: str  # registry name, e.g. "resnet18.random"
    arch: str  # timm architecture or a family name ("morphology")
    tag: str  # weights tag: random | file | hf | imagenet | v1 | handcrafted
    input_size: int  # square side in pixels the crop is resized to
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic" | "nearest"
    embed_dim: int
    weights_source: str  # "random(seed=...)", a file path, "hf-cache:...", "package:...", "none"
    weights_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen + tuples: the record is hashable in spirit and cannot drift after creation.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"encoder {self.name}: mean and std need 3 values (RGB), got {self.mean}, {self.std}")
        if self.input_size < 1 or self.embed_dim < 1:
            raise ConfigError(f"encoder {self.name}: input_size and embed_dim must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"encoder {self.name}: interpolation {self.interpolation!r} unknown; "
                f"use one of {sorted(INTERPOLATIONS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"encoder config has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"]), "extra": dict(d.get("extra") or {})})

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        return cls.from_dict(json.loads(text))

    def preprocessing(self) -> dict[str, Any]:
        """The part of the config that preprocessing depends on (compared across a bag directory)."""
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


INTERPOLATIONS = {"bilinear", "bicubic", "nearest"}


@dataclass(frozen=True)
class EncoderEntry:
    name: str  # full name ("efficientnet_lite0.imagenet") or "ARCH.tag" for generic tags
    builder: Callable[..., Any]
    description: str
    needs_weights: bool  # True when create_encoder requires weights=PATH
    embed_dim: int | None  # None when it depends on the architecture
    input_size: int | None
    weights_source: str  # short human description for `mil encoders`


_ENTRIES: dict[str, EncoderEntry] = {}


def register_encoder(
    name: str,
    *,
    description: str,
    needs_weights: bool = False,
    embed_dim: int | None = None,
    input_size: int | None = None,
    weights_source: str = "none",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a builder `fn(arch, tag, *, weights, input_size) -> Encoder` under `name`.

    `name` is either a full `arch.tag` or `ARCH.tag`, which makes the tag work for any timm architecture.
    """
    if "." not in name:
        raise ConfigError(f"encoder name {name!r} must be 'arch.tag' (the tag names the weights)")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _ENTRIES:
            raise ConfigError(f"encoder {name!r} is registered twice (second by {fn.__module__}.{fn.__qualname__})")
        _ENTRIES[name] = EncoderEntry(
            name=name,
            builder=fn,
            description=description,
            needs_weights=needs_weights,
            embed_dim=embed_dim,
            input_size=input_size,
            weights_source=weights_source,
        )
        return fn

    return decorate


def _ensure_loaded() -> None:
    # Entry modules register on import; importing the package runs every decorator once.
    import features.encoders  # noqa: F401


def list_encoders(*, include_generic: bool = True) -> list[str]:
    """Registered names, sorted; `ARCH.tag` rows stand for any timm architecture."""
    _ensure_loaded()
    names = sorted(_ENTRIES)
    if not include_generic:
        names = [n for n in names if not n.startswith(GENERIC_ARCH + ".")]
    return names


def get_entry(name: str) -> EncoderEntry:
    """The registry row of an exact name from list_encoders() (use resolve_entry for ARCH.tag names)."""
    _ensure_loaded()
    if name not in _ENTRIES:
        raise ConfigError(f"no registry entry {name!r}; entries: {', '.join(sorted(_ENTRIES))}")
    return _ENTRIES[name]


def split_name(name: str) -> tuple[str, str]:
    """'resnet18.random' -> ('resnet18', 'random'); the tag is everything after the first dot."""
    arch, _, tag = name.partition(".")
    if not arch or not tag:
        raise ConfigError(
            f"encoder name {name!r} needs a weights tag: write ARCH.TAG, e.g. {arch or 'resnet18'}.random; "
            f"registered: {', '.join(list_encoders())}"
        )
    return arch, tag


def resolve_entry(name: str) -> tuple[EncoderEntry, str, str]:
    """Find the entry for `name`: exact names first, then the generic `ARCH.tag` builders."""
    _ensure_loaded()
    arch, tag = split_name(name)
    if name in _ENTRIES:
        return _ENTRIES[name], arch, tag
    generic = f"{GENERIC_ARCH}.{tag}"
    if generic in _ENTRIES:
        return _ENTRIES[generic], arch, tag
    raise ConfigError(
        f"unknown encoder {name!r}. Registered: {', '.join(list_encoders(include_generic=False))}; "
        f"and any timm architecture as ARCH.random (random init), ARCH.file (with --weights PATH) "
        f"or ARCH.hf (local Hugging Face cache). `mil encoders` lists them."
    )


def create_encoder(name: str, *, weights: str | None = None, input_size: int | None = None) -> Encoder:
    """Build the encoder `name` in eval mode; `weights` is a local file for entries that need one.

    `input_size` overrides the entry's default crop side (small crops such as 96 px are common).
    """
    entry, arch, tag = resolve_entry(name)
    if entry.needs_weights and weights is None:
        raise ConfigError(
            f"encoder {name!r} loads its weights from a local file: pass weights=PATH (CLI: --weights PATH)"
        )
    if input_size is not None and input_size < 8:
        raise ConfigError(f"input_size {input_size} is too small for encoder {name!r}; use at least 8 px")
    encoder = entry.builder(arch, tag, weights=weights, input_size=input_size)
    if not isinstance(encoder, Encoder) or encoder.config.name != name:
        # A builder bug, not a user error: every entry must return an Encoder carrying its own name.
        raise TypeError(f"builder of {entry.name!r} returned {type(encoder).__name__} for {name!r}, not its Encoder")
    encoder.eval()
    return encoder


class Encoder(torch.nn.Module):
    """Base of every registered encoder: forward((B,3,H,W) normalised) -> (B, embed_dim).

    Cell-classifier encoders also expose `num_classes`, `class_names` and `cell_probs(x) -> (B,C)`;
    for the others `num_classes` is 0, `class_names` empty and `cell_probs` returns None.
    """

    num_classes: int = 0
    class_names: tuple[str, ...] = ()

    def __init__(self, *, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def cell_probs(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def embed_with_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,embed_dim) features and (B,C) cell probabilities or None; classifiers do both in one pass."""
        return self(x), self.cell_probs(x)
