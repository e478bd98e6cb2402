"""DSMIL (Li et al. 2021): an instance classifier finds the critical cell of each class; every cell is
then weighted by how similar its query is to that critical cell's query.

Multi-branch: one attention distribution per class, (B, C, N). The prediction averages the critical
cell's instance score and the bag classifier's score, as in the paper.
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange, repeat
from torch import nn

from mil.heads.common import CellProjection, MilHead, masked_softmax
from mil.heads.registry import register_head


@register_head("dsmil")
class DSMIL(MilHead):
    """DSMIL (Li et al. 2021): cells weighted by similarity to each class's critical cell."""

    multi_branch = True
    attention_meaning = "softmax similarity of the cell's query to the class's critical cell"

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 128,
        query_dim: int = 128,
        dropout: float = 0.25,
        covariate_dim: int = 0,
    ) -> None:
        super().__init__(in_dim=in_dim, num_classes=num_classes, covariate_dim=covariate_dim)
        self.project = CellProjection(in_dim=in_dim, hidden_dim=hidden_dim, dropout=dropout)
        self.instance_classifier = nn.Linear(hidden_dim, num_classes)
        self.query = nn.Sequential(nn.Linear(hidden_dim, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim))
        # The paper's Conv1d(C, C, kernel_size=H) over the per-class bag embeddings, written as one einsum.
        self.bag_weight = nn.Parameter(torch.empty(num_classes, num_classes, hidden_dim))
        self.bag_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.kaiming_uniform_(self.bag_weight, a=math.sqrt(5))
        self.scale = query_dim**-0.5

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)  # (B, N, H)
        instance = self.instance_classifier(h)  # (B, N, C)
        instance = instance.masked_fill(~rearrange(mask, "b n -> b n 1"), float("-inf"))  # (B, N, C)
        critical_score, critical = instance.max(dim=1)  # (B, C), (B, C) index of the critical cell
        q = self.query(h)  # (B, N, Q)
        index = repeat(critical, "b c -> b c q", q=q.shape[-1])  # (B, C, Q)
        q_critical = torch.gather(q, 1, index)  # (B, C, Q)
        scores = einsum(q, q_critical, "b n q, b c q -> b c n") * self.scale  # (B, C, N)
        weights = masked_softmax(scores, rearrange(mask, "b n -> b 1 n"))  # (B, C, N), 0 on padding
        bag = einsum(weights, self.value(h), "b c n, b n h -> b c h")  # (B, C, H)
        bag_score = einsum(bag, self.bag_weight, "b k h, c k h -> b c") + self.bag_bias  # (B, C)
        return 0.5 * (critical_score + bag_score), weights  # (B, C), (B, C, N)
