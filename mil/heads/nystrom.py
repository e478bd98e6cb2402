"""Nystrom self-attention (Xiong et al. 2021) as TransMIL uses it (Shao et al. 2021, via the `nystrom-attention`
package): memory and time grow linearly with the tokens, so a 100,000-cell bag fits where exact attention would
need 160 GB.

softmax(Q K^T) V is approximated through m landmarks, the means of m consecutive segments of the queries and keys:
``softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V``, the pseudo-inverse by 6 Newton-Schulz iterations, plus
the package's depthwise convolution of the values along the sequence (``residual=True`` in TransMIL).

What differs, so that padding changes no output (the head contract):
- tokens arrive compacted, the real ones first (``keep[b] = [True] * n_b + [False] * pad``);
- the segments split each bag's own ``n_b`` tokens (the package pads the sequence to a multiple of m with zeros,
  which mixes padding into the landmarks), and keys that are padding get zero weight;
- the pseudo-inverse starts from a scale per matrix, not one over the batch, so a bag's output does not depend on
  its batch mates;
- a bag of at most m tokens (every landmark would be one token, the limit Nystrom converges to) takes exact
  attention over its first m positions.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange, repeat
from torch import nn

from mil.heads.common import masked_softmax

PINV_ITERATIONS = 6
RESIDUAL_KERNEL = 33  # the `nystrom-attention` package's default


def iterative_pinv(x: torch.Tensor, iterations: int = PINV_ITERATIONS) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix of ``x`` (..., m, m) by Newton-Schulz iterations,
    started from ``x^T / (max row sum * max column sum)`` of that matrix."""
    magnitude = x.abs()
    scale = magnitude.sum(-1).amax(-1) * magnitude.sum(-2).amax(-1)  # (...,)
    z = rearrange(x, "... i j -> ... j i") / scale[..., None, None]  # (..., m, m)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromSelfAttention(nn.Module):
    """Pre-norm residual multi-head self-attention over compacted tokens (B, T, H) with ``keep`` (B, T) True on
    each bag's first n_b tokens. Returns the new tokens and the first token's attention row (B, G, T), zero on
    padding (approximate, so it may hold small negative entries)."""

    def __init__(self, *, dim: int, heads: int, landmarks: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim={dim} must be divisible by heads={heads}")
        if landmarks < 1:
            raise ValueError(f"landmarks={landmarks} must be at least 1")
        self.heads, self.landmarks = heads, landmarks
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.scale = (dim // heads) ** -0.5
        self.residual = nn.Conv2d(
            heads, heads, (RESIDUAL_KERNEL, 1), padding=(RESIDUAL_KERNEL // 2, 0), groups=heads, bias=False
        )

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(self.norm(tokens)), "b t (three g d) -> three b g t d", three=3, g=self.heads)
        v = v * rearrange(keep, "b t -> b 1 t 1")  # (B, G, T, D) padding zero for the convolution along t
        counts = keep.sum(dim=1)  # (B,)
        exact = counts <= self.landmarks
        q = q * self.scale
        if bool(exact.all()) or not bool(exact.any()):  # one kind of bag: no copies of the batch
            attend = self._exact if bool(exact[0]) else self._nystrom
            mixed, first_row = attend(q, k, v, keep, counts)  # (B, G, T', D), (B, G, T')
            mixed = nn.functional.pad(mixed, (0, 0, 0, v.shape[2] - mixed.shape[2]))  # (B, G, T, D)
            first_row = nn.functional.pad(first_row, (0, v.shape[2] - first_row.shape[2]))  # (B, G, T)
        else:
            mixed, first_row = torch.zeros_like(v), v.new_zeros(v.shape[:3])  # (B, G, T, D), (B, G, T)
            for rows, attend in (
                (exact.nonzero().flatten(), self._exact),
                ((~exact).nonzero().flatten(), self._nystrom),
            ):
                out, row = attend(q[rows], k[rows], v[rows], keep[rows], counts[rows])
                mixed[rows, :, : out.shape[2]] = out
                first_row[rows, :, : row.shape[2]] = row
        mixed = mixed + self.residual(v)  # (B, G, T, D)
        return tokens + self.out(rearrange(mixed, "b g t d -> b t (g d)")), first_row  # (B, T, H), (B, G, T)

    def _exact(self, q, k, v, keep, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact attention over the first min(T, m) positions, which hold every real token of these bags."""
        width = min(q.shape[2], self.landmarks)
        q, k, v, keep = q[:, :, :width], k[:, :, :width], v[:, :, :width], keep[:, :width]
        weights = masked_softmax(einsum(q, k, "b g t d, b g s d -> b g t s"), rearrange(keep, "b s -> b 1 1 s"))
        return einsum(weights, v, "b g t s, b g s d -> b g t d"), weights[:, :, 0]  # (b, G, w, D), (b, G, w)

    def _nystrom(self, q, k, v, keep, counts) -> tuple[torch.Tensor, torch.Tensor]:
        m, length = self.landmarks, q.shape[2]
        position = torch.arange(length, device=q.device)  # (T,)
        segment = torch.div(position[None] * m, counts[:, None], rounding_mode="floor")  # (b, T) in 0..m-1 if real
        segment = segment.masked_fill(~keep, m)  # padding goes to a discarded slot m
        sizes = torch.zeros(len(q), m + 1, dtype=q.dtype, device=q.device).index_put_(
            (repeat(torch.arange(len(q), device=q.device), "b -> b t", t=length), segment),
            torch.ones_like(segment, dtype=q.dtype),
            accumulate=True,
        )[:, :m]  # (b, m) >= 1: each bag has more than m real tokens
        index = repeat(segment, "b t -> b g t d", g=q.shape[1], d=q.shape[3])

        def landmarks_of(x: torch.Tensor) -> torch.Tensor:
            sums = x.new_zeros(*x.shape[:2], m + 1, x.shape[3]).scatter_add_(2, index, x)[:, :, :m]  # (b, G, m, D)
            return sums / rearrange(sizes, "b m -> b 1 m 1")

        q_land, k_land = landmarks_of(q), landmarks_of(k)  # (b, G, m, D)
        to_landmarks = torch.softmax(einsum(q, k_land, "b g t d, b g m d -> b g t m"), dim=-1)  # (b, G, T, m)
        between = torch.softmax(einsum(q_land, k_land, "b g m d, b g l d -> b g m l"), dim=-1)  # (b, G, m, m)
        from_landmarks = masked_softmax(
            einsum(q_land, k, "b g m d, b g t d -> b g m t"), rearrange(keep, "b t -> b 1 1 t")
        )  # (b, G, m, T)
        inverse = iterative_pinv(between)  # (b, G, m, m)
        context = einsum(from_landmarks, v, "b g m t, b g t d -> b g m d")  # (b, G, m, D)
        left = einsum(to_landmarks, inverse, "b g t m, b g m l -> b g t l")  # (b, G, T, m)
        out = einsum(left, context, "b g t l, b g l d -> b g t d")  # (b, G, T, D)
        first_row = einsum(left[:, :, 0], from_landmarks, "b g l, b g l t -> b g t")  # (b, G, T)
        return out, first_row
