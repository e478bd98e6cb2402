"""Gated attention-MIL (ABMIL, Ilse et al. 2018): one attention distribution over the cells of a bag.

cells -> per-cell projection -> gated attention scores -> masked softmax -> weighted mean -> classifier.
The per-cell layers run on the real cells only (packed), so padding in a batch costs no compute.
With ``num_classes=1`` and no dropout it computes exactly torchmil's ``ABMIL(gated=True)`` whose
``feat_ext`` is the same Linear + ReLU projection (see tests/test_torchmil_crosscheck.py).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mil.heads.common import CellProjection, GatedAttention, MilHead, bucket_rows, masked_softmax, pool_cells
from mil.heads.registry import register_head


@register_head("abmil")
class ABMIL(MilHead):
    """Gated attention-MIL (Ilse et al. 2018): attention-weighted mean of the cells."""

    multi_branch = False
    reads_padding = False

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
        bag, cell = mask.nonzero(as_tuple=True)  # (R,), (R,) the R real cells of the batch
        return self._forward_packed(x[bag, cell], bag, cell, mask)

    def _forward_packed(
        self, cells: torch.Tensor, bag: torch.Tensor, cell: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r = cells.shape[0]
        h = self.project(bucket_rows(cells))  # (R', H), R' >= R under CPU bf16 autocast, else R' = R
        real_scores = rearrange(self.attend(h)[:r], "r 1 -> r")  # (R,)
        h = h[:r]  # (R, H) the real cells only
        scores = real_scores.new_full(mask.shape, float("-inf")).index_put((bag, cell), real_scores)  # (B, N)
        weights = masked_softmax(scores, mask)  # (B, N), 0 on padding
        pooled = pool_cells(rearrange(weights[bag, cell], "r -> r 1"), h, bag, mask.shape[0])  # (B, 1, H)
        return self.classifier(rearrange(pooled, "b 1 h -> b h")), weights  # (B, C), (B, N)
