"""Mean and max pooling baselines: no learned attention, but the same contract as the attention heads.

On small cohorts mean pooling with a linear classifier is the baseline attention-MIL must beat
(PRODUCT.md 2.4). Their "attention" says how much each cell contributes to the pooled embedding:
- mean: uniform, 1/n for each of the n real cells;
- max: the share of the hidden dimensions in which the cell holds the maximum (a cell that wins every
  dimension gets 1). Ties within a dimension are split evenly, so the weights always sum to 1.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mil.heads.common import CellProjection, MilHead
from mil.heads.registry import register_head


@register_head("mean")
class MeanPool(MilHead):
    """Mean-pooling baseline: mean of the projected cells, linear classifier."""

    multi_branch = False
    attention_meaning = "uniform weight 1/n (mean pooling)"
    reads_padding = False  # the projection runs on the real cells only

    def __init__(
        self, *, in_dim: int, num_classes: int, hidden_dim: int = 128, dropout: float = 0.25, covariate_dim: int = 0
    ) -> None:
        super().__init__(in_dim=in_dim, num_classes=num_classes, covariate_dim=covariate_dim)
        self.project = CellProjection(in_dim=in_dim, hidden_dim=hidden_dim, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bag, cell = mask.nonzero(as_tuple=True)  # (R,), (R,) the R real cells of the batch
        h = self.project(x[bag, cell])  # (R, H)
        count = rearrange(mask.sum(dim=1).to(h.dtype), "b -> b 1")  # (B, 1)
        pooled = h.new_zeros(mask.shape[0], h.shape[1]).index_add(0, bag, h) / count  # (B, H)
        weights = mask.to(h.dtype) / count  # (B, N) uniform over real cells
        return self.classifier(pooled), weights  # (B, C), (B, N)


@register_head("max")
class MaxPool(MilHead):
    """Max-pooling baseline: per-dimension max of the projected cells, linear classifier."""

    multi_branch = False
    attention_meaning = "share of hidden dimensions where the cell is the maximum (max pooling)"

    def __init__(
        self, *, in_dim: int, num_classes: int, hidden_dim: int = 128, dropout: float = 0.25, covariate_dim: int = 0
    ) -> None:
        super().__init__(in_dim=in_dim, num_classes=num_classes, covariate_dim=covariate_dim)
        self.project = CellProjection(in_dim=in_dim, hidden_dim=hidden_dim, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)  # (B, N, H)
        real = rearrange(mask, "b n -> b n 1")  # (B, N, 1)
        h = h.masked_fill(~real, float("-inf"))  # (B, N, H) padding can never be the maximum
        pooled = h.amax(dim=1)  # (B, H)
        winners = (h == rearrange(pooled, "b h -> b 1 h")) & real  # (B, N, H) argmax cells per dimension
        winners = winners.to(pooled.dtype)
        per_dim = winners / winners.sum(dim=1, keepdim=True)  # (B, N, H) ties split evenly
        weights = per_dim.mean(dim=2)  # (B, N) sums to 1 over real cells
        return self.classifier(pooled), weights  # (B, C), (B, N)
