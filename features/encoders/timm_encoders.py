"""Any timm architecture as an encoder: ARCH.random, ARCH.file (weights=PATH), ARCH.hf (local HF cache).

The model is built with num_classes=0, so forward returns timm's pooled pre-logit embedding. Input
size, mean, std and interpolation come from timm's pretrained cfg (resolve_model_data_config) unless
`input_size` overrides the side; they go into the EncoderConfig, from which preprocessing is derived.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from features.encoders.weights import (
    build_without_init,
    load_into,
    load_state_dict_file,
    sha256_file,
    strip_prefixes,
)
from features.registry import INTERPOLATIONS, Encoder, EncoderConfig, register_encoder
from mil.errors import ConfigError


class TimmEncoder(Encoder):
    """A timm model with its classifier removed: (B,3,S,S) normalised -> (B, embed_dim)."""

    def __init__(self, *, model: torch.nn.Module, config: EncoderConfig) -> None:
        super().__init__(config=config)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B,3,S,S) -> (B,D)


def name_seed(name: str) -> int:
    """A stable seed per encoder name (Python's hash() is salted per process, sha256 is not)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF


def timm_version() -> str:
    import timm

    return str(timm.__version__)


def check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:6]}*")[:8] if len(arch) >= 3 else []
        hint = f" Similar timm architectures: {', '.join(close)}." if close else ""
        raise ConfigError(
            f'{arch!r} is not a timm architecture.{hint} `python -c "import timm; print(timm.list_models())"` '
            f"lists them all; the project's own entries are shown by `mil encoders`"
        )


def build_timm_model(arch: str, *, input_size: int | None, **kwargs: Any) -> torch.nn.Module:
    """timm.create_model(num_classes=0), at `input_size` for architectures with a fixed input (ViTs)."""
    import timm

    check_arch(arch)
    cfg = timm.models.get_pretrained_cfg(arch)
    if input_size is not None and cfg is not None and cfg.fixed_input_size:
        # Position embeddings are sized for one image side: build the model at the requested side.
        kwargs = {**kwargs, "img_size": input_size}
    return timm.create_model(arch, num_classes=0, **kwargs)


def embed_dim_of(model: torch.nn.Module) -> int:
    """Width of the pooled output: head_hidden_size when the head has a pre-logits layer, else num_features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def timm_config(
    model: torch.nn.Module,
    *,
    name: str,
    arch: str,
    tag: str,
    input_size: int | None,
    weights_source: str,
    weights_sha256: str | None,
    extra: dict[str, Any] | None = None,
) -> EncoderConfig:
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(model)
    side = int(input_size if input_size is not None else data["input_size"][-1])
    interpolation = str(data.get("interpolation", "bilinear"))
    if interpolation not in INTERPOLATIONS:  # timm also knows e.g. "random" (training-time only)
        interpolation = "bilinear"
    return EncoderConfig(
        name=name,
        arch=arch,
        tag=tag,
        input_size=side,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=interpolation,
        embed_dim=embed_dim_of(model),
        weights_source=weights_source,
        weights_sha256=weights_sha256,
        extra=dict(extra or {}),
    )


def adapt_pos_embed(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Resample a ViT's absolute position embedding when the model was built at another input size."""
    from timm.layers import resample_abs_pos_embed

    pos, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape or not hasattr(model, "patch_embed"):
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old = round((pos.shape[1] - prefix) ** 0.5)
    if old * old + prefix != pos.shape[1]:
        return state  # not a square grid: leave it to load_into to report the mismatch
    resampled = resample_abs_pos_embed(
        pos.float(), new_size=list(model.patch_embed.grid_size), old_size=[old, old], num_prefix_tokens=prefix
    )
    return {**state, "pos_embed": resampled.to(pos.dtype)}


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classifier that num_classes=0 removed (e.g. 'fc.', 'head.')."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", ())
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) + ("fc.", "head.", "classifier.", "head.fc.")


@register_encoder(
    "ARCH.random",
    description="any timm architecture, random init seeded from the name (a baseline and for tests)",
    weights_source="random init",
)
def random_timm(arch: str, tag: str, *, weights: str | None, input_size: int | None) -> TimmEncoder:
    if weights is not None:
        raise ConfigError(f"{arch}.random takes no weights; to load {weights} use {arch}.file")
    name = f"{arch}.{tag}"
    seed = name_seed(name)
    # fork_rng keeps the caller's global RNG untouched; the seed makes two calls give identical weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_timm_model(arch, input_size=input_size)
    config = timm_config(
        model,
        name=name,
        arch=arch,
        tag=tag,
        input_size=input_size,
        weights_source=f"random(seed={seed})",
        weights_sha256=None,
        # Random weights are a function of timm's init code: a timm upgrade makes old bags stale.
        extra={"timm_version": timm_version()},
    )
    return TimmEncoder(model=model, config=config)


@register_encoder(
    "ARCH.file",
    description="any timm architecture with a local state dict (--weights PATH: .pth/.pt or .safetensors)",
    needs_weights=True,
    weights_source="--weights PATH",
)
def file_timm(arch: str, tag: str, *, weights: str | None, input_size: int | None) -> TimmEncoder:
    assert weights is not None  # create_encoder enforces it (needs_weights=True)
    state, sha = load_state_dict_file(weights)
    model = build_without_init(lambda: build_timm_model(arch, input_size=input_size))
    state = adapt_pos_embed(strip_prefixes(state), model)
    load_into(model, state, path=weights, ignore_prefixes=classifier_prefixes(model))
    config = timm_config(
        model,
        name=f"{arch}.{tag}",
        arch=arch,
        tag=tag,
        input_size=input_size,
        weights_source=str(Path(weights).resolve()),
        weights_sha256=sha,
    )
    return TimmEncoder(model=model, config=config)


def _no_weights_message(arch: str, hub_id: str, cache_dir: Path) -> str:
    return (
        f"no pretrained weights for {arch!r} (hub id {hub_id}) in the Hugging Face cache {cache_dir}, and the "
        f"hub is offline. Either pass a local state dict with `--encoder {arch}.file --weights PATH`, or "
        f"pre-populate the cache on a machine with network access (`huggingface-cli download {hub_id}`) and "
        f"copy it to {cache_dir} (or point HF_HUB_CACHE at it); "
        f"`python -c \"import timm; print(timm.list_pretrained('{arch}.*'))\"` lists the TAGs"
    )


def _cached_hf_file(hf_hub_id: str, cache_dir: str | None) -> Path | None:
    """Path of timm's weight file for `hf_hub_id` in the local HF cache, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hf_hub_id.partition("@")
    for filename in ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                     "pytorch_model.bin"):  # fmt: skip
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


@register_encoder(
    "ARCH.hf",
    description="any timm architecture with its default pretrained weights from the local Hugging Face cache",
    weights_source="HF cache (offline)",
)
def hf_timm(arch: str, tag: str, *, weights: str | None, input_size: int | None) -> TimmEncoder:
    """Pretrained timm weights, offline only; `weights` may name a HF cache folder other than the default."""
    import huggingface_hub.constants

    cache_dir = Path(weights or huggingface_hub.constants.HF_HUB_CACHE)
    # timm's hub repos are named timm/<arch>.<tag>: without any such folder there is nothing to load, and
    # saying so needs no timm import (seconds on a busy node), so the error comes at once.
    if not any(cache_dir.glob(f"models--timm--{arch}.*")) and not (cache_dir / f"models--timm--{arch}").is_dir():
        raise ConfigError(_no_weights_message(arch, f"timm/{arch}.TAG", cache_dir))

    import timm

    check_arch(arch)
    # Only the local cache is looked at: a missing file fails fast with instructions, never hangs on a socket.
    cfg = timm.models.get_pretrained_cfg(arch)
    hf_hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached = _cached_hf_file(hf_hub_id, str(cache_dir)) if hf_hub_id else None
    if cached is None:
        others = sorted(p.name.removeprefix("models--timm--") for p in cache_dir.glob(f"models--timm--{arch}.*"))
        hint = f" (the cache holds {', '.join(others)}, but {arch}.hf loads timm's default tag)" if others else ""
        raise ConfigError(_no_weights_message(arch, hf_hub_id or f"timm/{arch}", cache_dir) + hint)
    # Load the cached file directly (timm's `file` source): no hub call, not even a revision check.
    kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(cached)}}
    model = build_timm_model(arch, input_size=input_size, **kwargs)
    config = timm_config(
        model,
        name=f"{arch}.{tag}",
        arch=arch,
        tag=tag,
        input_size=input_size,
        weights_source=f"hf-cache:{hf_hub_id}",
        weights_sha256=sha256_file(cached),
    )
    return TimmEncoder(model=model, config=config)
