"""TransMIL (Shao et al. 2021): self-attention over the cells plus a convolutional positional encoding
(PPEG) on the cells laid out in a square, read out through a class token.

Two departures from the paper, both so that padding changes no output (the head contract):
- standard masked multi-head attention instead of the Nystrom approximation, whose landmarks would
  mix padding into real tokens; cytology bags hold hundreds of cells, not the 10^4-10^5 patches of a
  slide, so the exact O(N^2) attention is affordable;
- each bag gets its own square of side ceil(sqrt(n)) for its n real cells, filled with zeros (the
  convolution's own padding value) instead of repeated cells; a batch stacks these squares in the
  top-left corner of one canvas, so a bag's PPEG output does not depend on its batch mates.
Attention returned: the class token's attention to the cells in the last layer, averaged over heads
and renormalised over the real cells.
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange, repeat
from torch import nn

from mil.heads.common import MilHead, masked_softmax
from mil.heads.registry import register_head


class MaskedSelfAttention(nn.Module):
    """Pre-norm residual multi-head self-attention in which padded tokens are never attended to."""

    def __init__(self, *, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.scale = (dim // heads) ** -0.5

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(self.norm(tokens)), "b t (three g d) -> three b g t d", three=3, g=self.heads)
        scores = einsum(q, k, "b g t d, b g s d -> b g t s") * self.scale  # (B, G, T, T)
        weights = masked_softmax(scores, rearrange(keep, "b s -> b 1 1 s"))  # (B, G, T, T)
        mixed = rearrange(einsum(weights, v, "b g t s, b g s d -> b g t d"), "b g t d -> b t (g d)")  # (B, T, H)
        return tokens + self.out(mixed), weights  # (B, T, H), (B, G, T, T)


class PPEG(nn.Module):
    """Pyramid positional encoding: depthwise 7x7, 5x5 and 3x3 convolutions over each bag's square."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, cells: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, n, dim = cells.shape
        side = torch.ceil(torch.sqrt(mask.sum(dim=1).to(torch.float64))).long()  # (B,) square side per bag
        canvas_side = int(side.max())
        rank = mask.long().cumsum(dim=1) - 1  # (B, N) position of each real cell among the real ones
        slot = (rank // side[:, None]) * canvas_side + rank % side[:, None]  # (B, N) row-major slot in canvas
        slot = slot.masked_fill(~mask, canvas_side * canvas_side)  # padding goes to one discarded slot
        index = repeat(slot, "b n -> b n h", h=dim)  # (B, N, H)
        canvas = cells.new_zeros(batch, canvas_side * canvas_side + 1, dim).scatter(1, index, cells)  # (B, S*S+1, H)
        grid = rearrange(canvas[:, :-1], "b (r c) h -> b h r c", r=canvas_side)  # (B, H, S, S)
        grid = grid + sum(conv(grid) for conv in self.convs)  # (B, H, S, S)
        flat = torch.cat([rearrange(grid, "b h r c -> b (r c) h"), canvas[:, -1:]], dim=1)  # (B, S*S+1, H)
        encoded = torch.gather(flat, 1, index)  # (B, N, H)
        return torch.where(rearrange(mask, "b n -> b n 1"), encoded, cells)  # (B, N, H)


@register_head("transmil")
class TransMIL(MilHead):
    """TransMIL (Shao et al. 2021): self-attention over the cells, read out by a class token."""

    multi_branch = False
    attention_meaning = "class-token attention to the cell in the last layer, mean over heads"

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 128,
        heads: int = 4,
        dropout: float = 0.25,
        covariate_dim: int = 0,
    ) -> None:
        super().__init__(in_dim=in_dim, num_classes=num_classes, covariate_dim=covariate_dim)
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) / math.sqrt(hidden_dim))
        self.layer1 = MaskedSelfAttention(dim=hidden_dim, heads=heads, dropout=dropout)
        self.ppeg = PPEG(dim=hidden_dim)
        self.layer2 = MaskedSelfAttention(dim=hidden_dim, heads=heads, dropout=dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)  # (B, N, H)
        cls = repeat(self.cls_token, "1 1 h -> b 1 h", b=h.shape[0])  # (B, 1, H)
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, 1+N) the class token is always real
        tokens, _ = self.layer1(torch.cat([cls, h], dim=1), keep)  # (B, 1+N, H)
        cells = self.ppeg(tokens[:, 1:], mask)  # (B, N, H)
        tokens, weights = self.layer2(torch.cat([tokens[:, :1], cells], dim=1), keep)  # (B, 1+N, H), (B,G,T,T)
        logits = self.classifier(self.norm(tokens[:, 0]))  # (B, C)
        to_cells = weights[:, :, 0, 1:].mean(dim=1)  # (B, N) class token -> cells, mean over heads
        attention = to_cells / to_cells.sum(dim=1, keepdim=True)  # (B, N) renormalised without the class token
        return logits, attention
