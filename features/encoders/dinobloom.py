"""dinobloom_s|b|l|g.v1: DinoBloom hematology ViTs (DINOv2 fine-tuned on blood and marrow cells).

ViT-S/B/L/G with patch 14 at 224 px (embedding 384/768/1024/1536) built as timm's
`vit_*_patch14_dinov2`, loaded from a local checkpoint (`--weights PATH`). Two checkpoint layouts are
accepted and mapped onto timm's keys:

- the published DinoBloom files (DINOv2 training format): `{"teacher": {"backbone.blocks.0.norm1.weight":
  ..., "dino_head...": ...}}`, sometimes with chunked blocks (`blocks.<chunk>.<i>.`), SwiGLU `mlp.w12/w3`
  (ViT-G), a `mask_token`, and a `pos_embed` for 224 px (257 tokens) or 518 px (1370 tokens);
- community timm ports: timm key names, possibly with `module.`/`model.` prefixes and a classifier head.

The position embedding is resampled to the model's grid when the token count differs; the embedding is
the final-normed class token, as DinoBloom's own feature extraction uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from features.encoders.timm_encoders import TimmEncoder, timm_config
from features.encoders.weights import build_without_init, load_into, read_checkpoint, sha256_file, strip_prefixes
from features.registry import register_encoder
from mil.errors import ConfigError, InputError

PATCH = 14
DEFAULT_SIDE = 224
VARIANTS = {
    "s": ("vit_small_patch14_dinov2", 384),
    "b": ("vit_base_patch14_dinov2", 768),
    "l": ("vit_large_patch14_dinov2", 1024),
    "g": ("vit_giant_patch14_dinov2", 1536),
}
HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.", "fc_norm.")
CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _select(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only keys under `prefix` (without it) when any key has it; the rest is untouched."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def dinobloom_state_dict(
    checkpoint: object, target: dict[str, torch.Tensor], *, path: str | Path = "<checkpoint>"
) -> dict[str, torch.Tensor]:
    """Map a DinoBloom (DINOv2-format) or timm-port checkpoint onto a timm ViT's state dict keys.

    `target` is the model's own state dict (only shapes are read, so meta tensors work): the position
    embedding is resampled to its grid.
    """
    from timm.layers import resample_abs_pos_embed

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("teacher"), dict):
        checkpoint = checkpoint["teacher"]  # DINOv2 eval checkpoints keep the EMA teacher, the published weights
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path} holds no state dict; expected a DinoBloom checkpoint ({{'teacher': {{...}}}})")
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    state = strip_prefixes(state, ("module.", "_orig_mod."))
    state = _select(state, "teacher.")  # full training checkpoints hold student.* and teacher.*
    state = _select(state, "backbone.")
    state = strip_prefixes(state, ("module.", "model.", "_orig_mod.", "encoder."))
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(HEAD_PREFIXES) and key not in target:
            continue
        if key == "mask_token":  # used only by DINOv2's masked-image objective
            continue
        key = CHUNKED_BLOCK.sub(r"blocks.\1.", key)  # block chunks keep the global block index
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)  # SwiGLU packed (ViT-G): timm's SwiGLUPacked names
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        mapped[key] = value
    if "register_tokens" in mapped:
        raise ConfigError(f"{path} is a DINOv2-with-registers checkpoint; DinoBloom entries take the plain ViTs")
    pos = mapped.get("pos_embed")
    expected = target.get("pos_embed")
    if pos is not None and expected is not None and pos.shape != expected.shape:
        old_grid = round((pos.shape[1] - 1) ** 0.5)
        new_grid = round((expected.shape[1] - 1) ** 0.5)
        if old_grid**2 + 1 != pos.shape[1]:
            raise ConfigError(f"{path}: pos_embed has {pos.shape[1]} tokens, not a square grid plus a class token")
        mapped["pos_embed"] = resample_abs_pos_embed(
            pos.float(), new_size=(new_grid, new_grid), old_size=(old_grid, old_grid), num_prefix_tokens=1
        ).to(pos.dtype)
    return mapped


def build_vit(variant: str, *, input_size: int | None, device: str | torch.device | None = None) -> torch.nn.Module:
    """The timm ViT of a DinoBloom variant at `input_size` (a multiple of 14), without weights loaded."""
    import timm

    arch, _ = VARIANTS[variant]
    side = int(input_size or DEFAULT_SIDE)
    if side % PATCH:
        raise ConfigError(f"DinoBloom uses {PATCH}-px patches: input_size {side} must be a multiple of {PATCH}")
    if device is None:  # the caller's device context (e.g. meta in build_without_init) applies
        return timm.create_model(arch, num_classes=0, img_size=side, pretrained=False)
    with torch.device(device):
        return timm.create_model(arch, num_classes=0, img_size=side, pretrained=False)


def _make_builder(variant: str):
    arch, dim = VARIANTS[variant]

    def build(family: str, tag: str, *, weights: str | None, input_size: int | None) -> TimmEncoder:
        assert weights is not None  # needs_weights=True: create_encoder checked
        model = build_without_init(lambda: build_vit(variant, input_size=input_size))
        state = dinobloom_state_dict(read_checkpoint(weights), model.state_dict(), path=weights)
        load_into(model, state, path=weights)
        config = timm_config(
            model,
            name=f"{family}.{tag}",
            arch=arch,
            tag=tag,
            input_size=int(input_size or DEFAULT_SIDE),
            weights_source=str(Path(weights).resolve()),
            weights_sha256=sha256_file(weights),
            extra={"family": "dinobloom", "variant": variant, "pool": "cls_token"},
        )
        if config.embed_dim != dim:
            raise ConfigError(f"dinobloom_{variant}: {arch} gives width {config.embed_dim}, expected {dim}")
        return TimmEncoder(model=model, config=config)

    build.__name__ = f"dinobloom_{variant}"
    return build


for _variant, (_arch, _dim) in VARIANTS.items():
    register_encoder(
        f"dinobloom_{_variant}.v1",
        description=f"DinoBloom-{_variant.upper()} hematology ViT ({_arch}, 224 px) from --weights PATH",
        needs_weights=True,
        embed_dim=_dim,
        input_size=DEFAULT_SIDE,
        weights_source="--weights PATH (DinoBloom or timm-port checkpoint)",
    )(_make_builder(_variant))
