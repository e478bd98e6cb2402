"""Multi-branch gated attention (CLAM-MB / SCEMILA style): one attention branch and one classifier per class.

Each diagnosis gets its own attention distribution over the cells and its own bag embedding, so the
report can show which cells speak *for* each class. CLAM's instance-clustering loss is left out: it
needs instance pseudo-labels from a top-k heuristic meant for tissue patches, and SCEMILA does
without it for single cells.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import nn

from mil.heads.common import CellProjection, GatedAttention, MilHead, masked_softmax, pool_cells
from mil.heads.registry import register_head


@register_head("clam_mb")
class ClamMB(MilHead):
    """Multi-branch gated attention (CLAM-MB, SCEMILA): one attention branch per diagnosis."""

    multi_branch = True
    reads_padding = False  # the per-cell layers run on the real cells only

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
        self.attend = GatedAttention(
            hidden_dim=hidden_dim, attention_dim=attention_dim or hidden_dim, branches=num_classes
        )
        # One linear classifier per class, each reading only its own branch's bag embedding.
        self.class_weight = nn.Parameter(torch.empty(num_classes, hidden_dim))
        self.class_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_uniform_(self.class_weight)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bag, cell = mask.nonzero(as_tuple=True)  # (R,), (R,) the R real cells of the batch
        h = self.project(x[bag, cell])  # (R, H)
        real_scores = self.attend(h)  # (R, C)
        scores = real_scores.new_full((*mask.shape, self.num_classes), float("-inf"))  # (B, N, C)
        scores = rearrange(scores.index_put((bag, cell), real_scores), "b n c -> b c n")  # (B, C, N)
        weights = masked_softmax(scores, rearrange(mask, "b n -> b 1 n"))  # (B, C, N), 0 on padding
        real_weights = rearrange(weights, "b c n -> b n c")[bag, cell]  # (R, C)
        pooled = pool_cells(real_weights, h, bag, mask.shape[0])  # (B, C, H)
        logits = einsum(pooled, self.class_weight, "b c h, c h -> b c") + self.class_bias  # (B, C)
        return logits, weights
