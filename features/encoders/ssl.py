"""ssl.file: a cell encoder pretrained by `mil pretrain` (DINO or SimCLR), its config record read from the file.

Format "cytomil-ssl-encoder/1": a .safetensors file of the timm backbone's state dict (num_classes=0) whose
metadata (safetensors' string header) holds the record the pretraining run decided: arch, input_size, mean, std,
interpolation, embed_dim and the run (method, run folder, fingerprint, epochs, cells, config). `mil extract
--encoder ssl.file --weights ENC/encoder.safetensors` therefore needs nothing retyped, and every bag records the
pretraining run and the sha256 of the weights in its encoder config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from features.encoders.timm_encoders import TimmEncoder, build_timm_model, embed_dim_of
from features.encoders.weights import build_without_init, load_into, sha256_file
from features.registry import INTERPOLATIONS, EncoderConfig, register_encoder
from mil.errors import ConfigError, InputError

FORMAT = "cytomil-ssl-encoder/1"
REQUIRED_KEYS = ("format", "arch", "input_size", "mean", "std", "interpolation", "embed_dim", "pretrain")


def save_ssl_encoder(
    path: str | Path,
    *,
    model: torch.nn.Module,
    arch: str,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    pretrain: Mapping[str, Any] | None = None,
) -> str:
    """Write a FORMAT file atomically (validated by loading it back into `arch`); returns its sha256.

    `model` is the timm backbone built with num_classes=0; `pretrain` is a JSON-able record of the run."""
    from safetensors.torch import save_file

    from mil.atomic import atomic_path

    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation {interpolation!r} unknown; use one of {sorted(INTERPOLATIONS)}")
    metadata = {
        "format": FORMAT,
        "arch": str(arch),
        "input_size": str(int(input_size)),
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "interpolation": interpolation,
        "embed_dim": str(embed_dim_of(model)),
        "pretrain": json.dumps(dict(pretrain or {}), sort_keys=True, default=str),
    }
    # Detached contiguous CPU copies: safetensors refuses shared or strided storage.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path, validate=lambda tmp: load_ssl_encoder(tmp)) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return sha256_file(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The record of a FORMAT file, decoded (input_size and embed_dim ints, mean/std/pretrain parsed)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ssl encoder {path} does not exist; write one with `mil pretrain --out DIR`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # a torch file, a truncated file: safetensors raises several types
        raise InputError(
            f"{path} is not a .safetensors file ({type(e).__name__}: {e}); ssl.file takes the encoder.safetensors "
            "that `mil pretrain` writes (for another timm state dict use ARCH.file)"
        ) from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise InputError(
            f"{path} is not a {FORMAT} file (metadata lacks {missing or ['format ' + FORMAT]}); ssl.file takes the "
            "encoder.safetensors that `mil pretrain` writes (for another timm state dict use ARCH.file)"
        )
    return {
        **meta,
        "input_size": int(meta["input_size"]),
        "embed_dim": int(meta["embed_dim"]),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
        "pretrain": json.loads(meta["pretrain"]),
    }


def load_ssl_encoder(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(timm backbone with the file's weights in eval mode, the file's decoded record)."""
    from safetensors.torch import load_file

    from features.encoders.timm_encoders import check_arch

    meta = read_metadata(path)
    try:
        check_arch(meta["arch"])
    except ConfigError as e:
        raise InputError(f"{path}: {e}") from None
    model = build_without_init(lambda: build_timm_model(meta["arch"], input_size=meta["input_size"]))
    load_into(model, load_file(str(path), device="cpu"), path=path)
    if embed_dim_of(model) != meta["embed_dim"]:
        raise InputError(f"{path}: {meta['arch']} gives width {embed_dim_of(model)}, the file says {meta['embed_dim']}")
    return model.eval(), meta


@register_encoder(
    "ssl.file",
    description="a cell encoder pretrained by `mil pretrain` (DINO/SimCLR; --weights OUT/encoder.safetensors)",
    needs_weights=True,
    weights_source="--weights PATH (mil pretrain encoder.safetensors)",
)
def ssl_file(arch: str, tag: str, *, weights: str | None, input_size: int | None) -> TimmEncoder:
    assert weights is not None  # needs_weights=True: create_encoder checked
    model, meta = load_ssl_encoder(weights)
    trained_side = meta["input_size"]
    if input_size is not None and input_size != trained_side:
        raise ConfigError(
            f"ssl encoder {weights} was pretrained at {trained_side} px; extract at that size (drop --input-size "
            f"{input_size}): the config record comes from the pretraining run"
        )
    pretrain = meta["pretrain"]
    config = EncoderConfig(
        name=f"{arch}.{tag}",
        arch=str(meta["arch"]),
        tag=tag,
        input_size=trained_side,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        interpolation=str(meta["interpolation"]),
        embed_dim=int(meta["embed_dim"]),
        weights_source=str(Path(weights).resolve()),
        weights_sha256=sha256_file(weights),
        extra={"family": "ssl", "method": pretrain.get("method"), "pretrain": pretrain},
    )
    return TimmEncoder(model=model, config=config)
