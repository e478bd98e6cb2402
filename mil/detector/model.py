"""Faster R-CNN cell detector: a timm backbone with an FPN, chosen by name from a small registry.

Light backbones train on a CPU (`mobilenetv3_large_fpn`, `resnet18_fpn`, or `efficientnet_lite0_fpn` with the
offline ImageNet weights); `resnet50_fpn` is the heavier choice for a GPU. Images are scaled by the config's
`pixel_scale` outside the network and never resized inside it, so a whole image and a tile of a large field are
seen at the same scale (tiled inference depends on that).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mil.atomic import atomic_torch_save
from mil.errors import ConfigError, InputError, refuse_unknown_keys
from mil.runs import load_checkpoint

CHECKPOINT_FORMAT = "cytomil-detector/1"


@dataclass
class DetectorConfig:
    """The detector's architecture and inference settings; saved inside every checkpoint."""

    backbone: str = "efficientnet_lite0_fpn"
    init: str = "auto"  # 'auto' = 'imagenet' where the backbone has ImageNet weights (efficientnet_lite0_fpn)
    classes: tuple[str, ...] = ("cell",)  # ("cell",) = class-agnostic; otherwise the cell table's labels
    # Images are resized by this factor before the network sees them; 0 = derived from the training boxes
    # (mil.detector.anchors: the smallest class reaches about 16 px).
    pixel_scale: float = 0.0
    smallest_anchor: int = 0  # anchor side on the finest FPN level, doubling per level; 0 = from the boxes
    fpn_channels: int = 128
    box_head_dim: int = 256  # torchvision's 1024 is sized for 80 COCO classes; cells need fewer
    # Freeze the backbone layers before the first FPN level: their backward pass at full resolution is most of a
    # CPU step, and ImageNet edges/colours need no retraining. Default: frozen exactly when init is 'imagenet'.
    freeze_stem: bool | None = None
    # Sampled anchors / proposals per image: a field holds tens of cells, not COCO's hundreds of objects.
    rpn_batch_per_image: int = 256
    # 64 sampled RoIs and 500 proposals per training image: 25% faster CPU steps than 128/1000 (RoIAlign's backward
    # and the RPN's NMS dominate after the convolutions), docs/real_data.md.
    box_batch_per_image: int = 64
    proposals_train: int = 500
    proposals_test: int = 500
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    detections_per_image: int = 300
    # Test-time augmentation at inference (mil.detector.tta): the field and its two mirror images, merged by
    # weighted box fusion; 2-3x the detection time. BCCD val.txt mAP@0.5 0.908 -> 0.915 (docs/real_data.md).
    tta: bool = True

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        if not self.classes:
            raise ConfigError("a detector needs at least one class; use ('cell',) for class-agnostic detection")
        if not 0 <= self.pixel_scale <= 4:
            raise ConfigError(f"pixel_scale {self.pixel_scale} must lie in (0, 4], or be 0 (from the training boxes)")
        if self.smallest_anchor < 0:
            raise ConfigError(f"smallest_anchor {self.smallest_anchor} must be positive, or 0 (from the boxes)")

    def resolved_init(self) -> str:
        """'auto' -> 'imagenet' where the backbone offers ImageNet weights, else 'random'."""
        if self.init != "auto":
            return self.init
        return "imagenet" if "imagenet" in backbone_spec(self.backbone).inits else "random"

    @classmethod
    def from_dict(cls, values: dict) -> DetectorConfig:
        refuse_unknown_keys(values, cls.__dataclass_fields__, "detector config")
        return cls(**values)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_arch: str
    out_indices: tuple[int, ...]  # timm feature levels fed to the FPN (2, 3, 4 = strides 8, 16, 32)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    inits: tuple[str, ...] = ("random",)
    extra: dict = field(default_factory=dict)


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str) -> Callable[[Callable[[], BackboneSpec]], Callable[[], BackboneSpec]]:
    """Decorator: the function returns the BackboneSpec registered under `name`; a duplicate name is an error."""

    def wrap(fn: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
        if name in _BACKBONES:
            raise ConfigError(f"detector backbone {name!r} is registered twice")
        _BACKBONES[name] = fn()
        return fn

    return wrap


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in _BACKBONES:
        raise ConfigError(f"unknown detector backbone {name!r}; choose one of {list_backbones()}")
    return _BACKBONES[name]


@register_backbone("mobilenetv3_large_fpn")
def _mobilenet() -> BackboneSpec:
    return BackboneSpec("mobilenetv3_large_fpn", "mobilenetv3_large_100", (2, 3, 4))


@register_backbone("resnet18_fpn")
def _resnet18() -> BackboneSpec:
    return BackboneSpec("resnet18_fpn", "resnet18", (1, 2, 3, 4))


@register_backbone("resnet50_fpn")
def _resnet50() -> BackboneSpec:
    return BackboneSpec("resnet50_fpn", "resnet50", (1, 2, 3, 4))


@register_backbone("efficientnet_lite0_fpn")
def _lite0() -> BackboneSpec:
    # [-1, 1] inputs: the normalization the EfficientNet-Lite0 ImageNet weights were trained with.
    return BackboneSpec(
        "efficientnet_lite0_fpn", "tf_efficientnet_lite0", (2, 3, 4), (0.5,) * 3, (0.5,) * 3, ("random", "imagenet")
    )


@register_backbone("tiny_fpn")
def _tiny() -> BackboneSpec:
    # timm's 100k-parameter test network: for tests and smoke runs only.
    return BackboneSpec("tiny_fpn", "test_efficientnet", (2, 3, 4))


class TimmFPN(nn.Module):
    """timm feature levels -> FPN maps (+ a max-pooled level), the input torchvision's Faster R-CNN expects."""

    def __init__(self, *, spec: BackboneSpec, fpn_channels: int, init: str, freeze_stem: bool = False) -> None:
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        if init not in spec.inits:
            raise ConfigError(f"backbone {spec.name!r} supports init {list(spec.inits)}, not {init!r}")
        self.body = timm.create_model(
            spec.timm_arch, pretrained=False, features_only=True, out_indices=spec.out_indices
        )
        if init == "imagenet":
            from mil.imagenet import lite0_imagenet_state_dict

            missing, _ = self.body.load_state_dict(lite0_imagenet_state_dict(), strict=False)
            if missing:
                raise ConfigError(f"EfficientNet-Lite0 weights miss backbone tensors {missing[:5]}")
            # Batches of a few images make BatchNorm statistics noise: keep the ImageNet ones.
            self.body = timm.layers.freeze_batch_norm_2d(self.body)
        if freeze_stem:
            first_level = self.body.feature_info.module_name()[0]  # module of the first FPN level
            for name, p in self.body.named_parameters():
                if name.startswith(first_level + ".") or name.startswith(first_level.replace(".", "_") + "."):
                    break
                p.requires_grad_(False)
        self.fpn = FeaturePyramidNetwork(
            self.body.feature_info.channels(), fpn_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = fpn_channels
        self.num_levels = len(spec.out_indices) + 1

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)  # list of (B, C_l, H/s_l, W/s_l)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))  # + "pool" level


def build_detector(config: DetectorConfig) -> nn.Module:
    """torchvision FasterRCNN on the configured backbone; the internal resize is switched off (see module doc)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class FixedScaleTransform(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    spec = backbone_spec(config.backbone)
    if config.pixel_scale <= 0 or config.smallest_anchor <= 0:
        raise ConfigError(
            "pixel_scale and smallest_anchor are 0 (derived from the training boxes): train_detector resolves them; "
            "give both to build a detector directly"
        )
    init = config.resolved_init()
    freeze = config.freeze_stem if config.freeze_stem is not None else init == "imagenet"
    backbone = TimmFPN(spec=spec, fpn_channels=config.fpn_channels, init=init, freeze_stem=freeze)
    sizes = tuple(
        (config.smallest_anchor * 2**i, int(config.smallest_anchor * 2**i * 1.5)) for i in range(backbone.num_levels)
    )
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * backbone.num_levels)
    model = FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(config.fpn_channels * 7 * 7, config.box_head_dim),  # 7x7 RoIAlign output
        box_predictor=FastRCNNPredictor(config.box_head_dim, len(config.classes) + 1),  # + background
        box_score_thresh=config.score_threshold,
        box_nms_thresh=config.nms_iou,
        box_detections_per_img=config.detections_per_image,
        rpn_batch_size_per_image=config.rpn_batch_per_image,
        box_batch_size_per_image=config.box_batch_per_image,
        rpn_pre_nms_top_n_train=config.proposals_train * 2,
        rpn_post_nms_top_n_train=config.proposals_train,
        rpn_pre_nms_top_n_test=config.proposals_test * 2,
        rpn_post_nms_top_n_test=config.proposals_test,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )
    model.transform = FixedScaleTransform(
        min_size=1, max_size=1, image_mean=list(spec.mean), image_std=list(spec.std), size_divisible=32
    )
    return model


def save_detector(path: str | Path, *, model: nn.Module, config: DetectorConfig, extra: dict | None = None) -> Path:
    """Atomic checkpoint: plain dict of config, tensors and numbers, so it loads with weights_only=True."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    cfg = asdict(config)
    cfg["classes"] = list(config.classes)
    payload = {"format": CHECKPOINT_FORMAT, "config": cfg, "state_dict": state, "extra": extra or {}}

    def validate(tmp: Path) -> None:
        back = torch.load(tmp, map_location="cpu", weights_only=True)
        if back.get("format") != CHECKPOINT_FORMAT or len(back["state_dict"]) != len(state):
            raise OSError(f"detector checkpoint {path} did not read back")

    atomic_torch_save(payload, path, validate)
    return Path(path)


def load_detector(path: str | Path) -> tuple[nn.Module, DetectorConfig]:
    """(model in eval mode, config) from a checkpoint of `save_detector`."""
    ckpt = load_checkpoint(path, what="detector checkpoint", fix="train one with `mil train-detector`")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint; write it with `mil train-detector`")
    config = DetectorConfig.from_dict(dict(ckpt["config"], init="random"))  # the weights come from the file
    model = build_detector(config)
    model.load_state_dict(ckpt["state_dict"])
    config.init = ckpt["config"].get("init", "random")
    return model.eval(), config
