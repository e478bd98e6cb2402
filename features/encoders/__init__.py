"""Encoder entries. Importing this package imports every entry module, so each `@register_encoder` runs.

Entry modules import only torch/timm at module level; optional packages (the EfficientNet-Lite0
weights, safetensors, huggingface_hub) are imported inside the builders that need them.
"""

from features.encoders import classifier, dinobloom, efficientnet_lite0, morphology, ssl, timm_encoders

__all__ = ["classifier", "dinobloom", "efficientnet_lite0", "morphology", "ssl", "timm_encoders"]
