"""Gated attention-MIL (ABMIL, Ilse et al. 2018): one attention distribution over the cells of a bag.

cells -> per-cell projection -> gated attention scores -> masked softmax -> weighted mean -> classifier.
With ``num_classes=1`` and no dropout it computes exactly torchmil's ``ABMIL(gated=True)`` whose
``feat_ext`` is the same Linear + ReLU projection (see tests/test_torchmil_crosscheck.py).
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import nn

from mil.heads.common import CellProjection, GatedAttention, MilHead, masked_softmax
from mil.heads.registry import register_head


@register_head("abmil")
class ABMIL(MilHead):
    multi_branch = False

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 128,
        attention_dim: int | None = None,
        dropout: float = 0.25,
        covariate_dim: int = 0,
    ) -> None:
        super().__init__(in_dim=in_dim, num_classes=num_classes, covariate_dim=covariate_dim)
        self.project = CellProjection(in_dim=in_dim, hidden_dim=hidden_dim, dropout=dropout)
        self.attend = GatedAttention(hidden_dim=hidden_dim, attention_dim=attention_dim or hidden_dim, branches=1)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)  # (B, N, H)
        scores = rearrange(self.attend(h), "b n 1 -> b n")  # (B, N)
        weights = masked_softmax(scores, mask)  # (B, N), 0 on padding
        pooled = einsum(weights, h, "b n, b n h -> b h")  # (B, H)
        return self.classifier(pooled), weights  # (B, C), (B, N)
