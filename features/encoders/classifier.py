"""classifier.file: the project's own trained cell classifier used as an encoder.

Its forward returns the pooled pre-logit features (the bag's `features`), and `cell_probs` the softmax
over its cell classes (the bag's `cell_probs`), so count-based heads need no second pass.

Checkpoint format "cytomil-classifier/1": a torch.save'd dict that loads with weights_only=True:
    {"format": "cytomil-classifier/1", "arch": timm arch, "input_size": int, "mean": [3], "std": [3],
     "class_names": [C], "state_dict": timm.create_model(arch, num_classes=C).state_dict()}
optionally with "interpolation" (default bilinear), "extra" (a dict of plain values, e.g. the
training config), "timm_kwargs" (create_model arguments such as a ViT's img_size) and "tta" (predictions average
the 8 flips/rotations by 90 degrees of a crop). The classifier stage writes it with `save_classifier_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from features.encoders.weights import sha256_file
from features.registry import Encoder, EncoderConfig, register_encoder
from mil.atomic import atomic_torch_save
from mil.errors import ConfigError, InputError

FORMAT = "cytomil-classifier/1"
REQUIRED_KEYS = ("format", "arch", "input_size", "mean", "std", "class_names", "state_dict")


def _check_checkpoint(ckpt: object, path: str | Path) -> dict[str, Any]:
    if not isinstance(ckpt, Mapping):
        raise InputError(f"{path} is not a cell-classifier checkpoint (expected a dict with format {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise InputError(
            f"{path} lacks {missing} of a {FORMAT} checkpoint; write it with "
            f"features.encoders.classifier.save_classifier_checkpoint"
        )
    if ckpt["format"] != FORMAT:
        raise InputError(f"{path} has format {ckpt['format']!r}; this version reads {FORMAT!r}")
    if len(ckpt["mean"]) != 3 or len(ckpt["std"]) != 3:
        raise InputError(f"{path}: mean and std need 3 values (RGB)")
    names = list(ckpt["class_names"])
    if not names or len(set(names)) != len(names):
        raise InputError(f"{path}: class_names must be a non-empty list of distinct names, got {names}")
    return dict(ckpt)


def load_classifier_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(timm classifier with num_classes=C in eval mode, the checkpoint's metadata without the state dict)."""
    import timm

    path = Path(path)
    if not path.is_file():
        raise InputError(f"classifier checkpoint {path} does not exist; train one with `mil train-classifier`")
    from mil.runs import load_checkpoint  # refuses pickles unread, with a plain message (RELIABILITY 6)

    ckpt = load_checkpoint(path, what=f"{FORMAT} classifier checkpoint", fix="train one with `mil train-classifier`")
    ckpt = _check_checkpoint(ckpt, path)
    if not timm.is_model(ckpt["arch"]):
        raise InputError(f"{path}: arch {ckpt['arch']!r} is not a timm architecture")
    kwargs = dict(ckpt.get("timm_kwargs") or {})
    model = timm.create_model(ckpt["arch"], num_classes=len(ckpt["class_names"]), pretrained=False, **kwargs)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise InputError(
            f"{path}: state_dict does not fit {ckpt['arch']} with {len(ckpt['class_names'])} classes: {e}"
        ) from e
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta


def save_classifier_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    arch: str,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    interpolation: str = "bilinear",
    extra: Mapping[str, Any] | None = None,
    timm_kwargs: Mapping[str, Any] | None = None,
    tta: bool = False,
) -> str:
    """Write a FORMAT checkpoint atomically (validated by loading it back); returns its sha256.

    `model` is the timm classifier (`timm.create_model(arch, num_classes=len(class_names))`) or its
    state dict. `extra` holds plain values only (str, int, float, bool, lists, dicts) so the file
    stays loadable with weights_only=True.
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    ckpt = {
        "format": FORMAT,
        "arch": str(arch),
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": [str(c) for c in class_names],
        "interpolation": str(interpolation),
        "extra": dict(extra or {}),
        "timm_kwargs": dict(timm_kwargs or {}),
        "tta": bool(tta),
        # Detached CPU copies: a checkpoint must not depend on the device it was trained on.
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
    }
    _check_checkpoint(ckpt, path)
    atomic_torch_save(ckpt, path, validate=load_classifier_checkpoint)
    return sha256_file(path)


class ClassifierEncoder(Encoder):
    """(B,3,S,S) normalised -> (B,D) pre-logit features; cell_probs -> (B,C) softmax over cell classes."""

    def __init__(self, *, model: torch.nn.Module, config: EncoderConfig, class_names: Sequence[str]) -> None:
        super().__init__(config=config)
        self.model = model
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)  # (B,...) backbone map or tokens
        return self.model.forward_head(features, pre_logits=True)  # (B,D)

    def cell_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().softmax(dim=-1)  # (B,C)

    def embed_with_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and class probabilities from one backbone pass (what extraction uses)."""
        pooled = self.forward(x)  # (B,D)
        logits = self.model.get_classifier()(pooled)  # (B,C)
        return pooled, logits.float().softmax(dim=-1)


@register_encoder(
    "classifier.file",
    description="the project's trained cell classifier (--weights CHECKPOINT): pre-logit features + cell_probs",
    needs_weights=True,
    weights_source="--weights PATH (mil train-classifier checkpoint)",
)
def classifier_file(arch: str, tag: str, *, weights: str | None, input_size: int | None) -> ClassifierEncoder:
    assert weights is not None  # needs_weights=True: create_encoder checked
    model, meta = load_classifier_checkpoint(weights)
    trained_side = int(meta["input_size"])
    if input_size is not None and input_size != trained_side:
        raise ConfigError(
            f"classifier {weights} was trained at {trained_side} px; extract at that size (drop --input-size "
            f"{input_size}) so its cell probabilities mean what they meant in training"
        )
    config = EncoderConfig(
        name=f"{arch}.{tag}",
        arch=str(meta["arch"]),
        tag=tag,
        input_size=trained_side,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        interpolation=str(meta.get("interpolation", "bilinear")),
        embed_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        weights_source=str(Path(weights).resolve()),
        weights_sha256=sha256_file(weights),
        extra={"class_names": list(meta["class_names"]), "classifier_extra": dict(meta.get("extra") or {})},
    )
    return ClassifierEncoder(model=model, config=config, class_names=meta["class_names"])
