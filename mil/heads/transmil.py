"""TransMIL (Shao et al. 2021): Nystrom self-attention over the cells plus a convolutional positional encoding
(PPEG) on the cells laid out in a square, read out through a class token.

Memory grows linearly with the cells (``mil.heads.nystrom``): a 100,000-cell bag is a few hundred MB, not the
160 GB of exact attention. Departures from the paper, all so that padding changes no output (the head contract):
- the real cells are compacted to the front of each bag (in their order) before the first layer, and the
  Nystrom landmarks are segments of each bag's own tokens, never of padding (see ``mil.heads.nystrom``); a bag of
  at most ``landmarks`` tokens takes exact attention, the limit the approximation converges to;
- each bag gets its own square of side ceil(sqrt(n)) for its n real cells, filled with zeros (the
  convolution's own padding value) instead of repeated cells; a batch stacks these squares in the
  top-left corner of one canvas, so a bag's PPEG output does not depend on its batch mates.
Attention returned: the class token's attention to the cells in the last layer, averaged over heads,
clipped at 0 (the Nystrom row is approximate and can dip slightly below) and renormalised over the real cells.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import nn

from mil.heads.common import MilHead
from mil.heads.nystrom import NystromSelfAttention
from mil.heads.registry import register_head


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
        landmarks: int | None = None,
        dropout: float = 0.25,
        covariate_dim: int = 0,
    ) -> None:
        super().__init__(in_dim=in_dim, num_classes=num_classes, covariate_dim=covariate_dim)
        landmarks = landmarks or max(1, hidden_dim // 2)  # the paper's choice: half the hidden width
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) / math.sqrt(hidden_dim))
        self.layer1 = NystromSelfAttention(dim=hidden_dim, heads=heads, landmarks=landmarks, dropout=dropout)
        self.ppeg = PPEG(dim=hidden_dim)
        self.layer2 = NystromSelfAttention(dim=hidden_dim, heads=heads, landmarks=landmarks, dropout=dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = mask.sum(dim=1)  # (B,)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]  # (B, W) real first
        mask_w = torch.gather(mask, 1, order)  # (B, W) each bag's first counts[b] positions
        h = self.project(torch.gather(x, 1, repeat(order, "b w -> b w d", d=x.shape[2])))  # (B, W, H)
        cls = repeat(self.cls_token, "1 1 h -> b 1 h", b=h.shape[0])  # (B, 1, H)
        keep = torch.cat([torch.ones_like(mask_w[:, :1]), mask_w], dim=1)  # (B, 1+W) the class token is real
        tokens, _ = self.layer1(torch.cat([cls, h], dim=1), keep)  # (B, 1+W, H)
        cells = self.ppeg(tokens[:, 1:], mask_w)  # (B, W, H)
        tokens, first_row = self.layer2(torch.cat([tokens[:, :1], cells], dim=1), keep)  # (B, 1+W, H), (B, G, 1+W)
        logits = self.classifier(self.norm(tokens[:, 0]))  # (B, C)
        to_cells = first_row[:, :, 1:].mean(dim=1).clamp(min=0) * mask_w  # (B, W) class token -> cells
        total = to_cells.sum(dim=1, keepdim=True)  # (B, 1)
        uniform = mask_w / counts[:, None]  # (B, W) only if every weight was clipped away
        to_cells = torch.where(total > 0, to_cells / total.clamp(min=torch.finfo(total.dtype).tiny), uniform)
        attention = to_cells.new_zeros(mask.shape).scatter(1, order, to_cells)  # (B, N) at the cells' own places
        return logits, attention
