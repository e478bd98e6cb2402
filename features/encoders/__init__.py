"""Encoder entries. Importing this package imports every entry module, so each `@register_encoder` runs.

Entry modules import only torch/timm at module level; optional packages (the EfficientNet-Lite0
weights, safetensors) are imported inside the builders that need them.
"""

from features.encoders import morphology, timm_encoders

__all__ = ["morphology", "timm_encoders"]
