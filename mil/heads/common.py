"""Pieces every attention-MIL head shares: the empty-bag check, masked softmax, the cell projection,
gated attention scoring and the base class that fixes the head contract.

Contract (PRODUCT.md 2.4): ``forward(x (B,N,D), mask (B,N) bool True=real cell) -> logits (B,C)``;
``attention(x, mask) -> (B,N)`` for single-branch heads or ``(B,C,N)`` for multi-branch heads,
zero on padding and summing to 1 over the real cells of each bag. Padding never changes an output.
"""

from __future__ import annotations

import torch
from einops import einsum
from torch import nn

from mil.errors import MilError


class EmptyBagError(MilError):
    """A bag with no real cell reached a head: its attention and prediction would be NaN."""


def check_batch(x: torch.Tensor, mask: torch.Tensor, *, in_dim: int) -> torch.Tensor:
    """Validate a padded batch and return the mask as bool; an all-masked bag raises EmptyBagError."""
    if x.dim() != 3:
        raise ValueError(f"expected cell features of shape (B, N, D), got {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(
            f"the bags have {x.shape[-1]} features per cell but the head was built for in_dim={in_dim}; "
            "build the head with in_dim taken from the bag directory (BagDirectory.feature_dim)"
        )
    if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
        got = None if mask is None else tuple(mask.shape)
        raise ValueError(f"expected a mask of shape {tuple(x.shape[:2])} (True = real cell), got {got}")
    mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise EmptyBagError(
            f"bag(s) at batch position {empty} have no real cell (all masked); "
            "drop patients without cells before training (an empty bag has no attention and no prediction)"
        )
    return mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis (cells) with padding set to exactly 0.

    ``scores`` (..., N), ``mask`` broadcastable to it. Callers check for empty bags first, so every
    row has a finite entry and the result never holds NaN.
    """
    filled = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(filled, dim=-1).masked_fill(~mask, 0.0)


ROW_BUCKET = 256


def bucket_rows(cells: torch.Tensor) -> torch.Tensor:
    """Packed cells (R, D), zero rows appended up to a multiple of ``ROW_BUCKET`` under CPU autocast (bf16).

    oneDNN builds a bf16 matmul kernel for every new row count, and every packed batch has a different R:
    measured here, that cost ate all of bf16's ~1.7x speed-up. With R rounded up, a run sees a few shapes.
    The caller drops the extra rows right after the per-cell layers; in fp32 (MKL) nothing is padded."""
    if cells.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return cells
    extra = -cells.shape[0] % ROW_BUCKET
    return torch.cat([cells, cells.new_zeros(extra, cells.shape[1])]) if extra else cells


class CellDropout(nn.Module):
    """Inverted dropout (as ``nn.Dropout``: zero with probability p, scale the rest by 1/(1-p)) whose mask
    on CPU comes from 16-bit random integers compared with a threshold, i.e. the keep probability is
    rounded to a multiple of 1/65536 (exact for 0.25). torch's per-element Bernoulli draw on CPU cost as
    much as the Linear layer before it (~3x this). On other devices it is ``nn.functional.dropout``.
    The mask comes from torch's global generator, so ``torch.manual_seed`` fixes it as before."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout p={p} must be in [0, 1)")
        self.p = float(p)
        self.threshold = round((1.0 - self.p) * 65536) - 32768  # int16 below this value = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # 64 random bits each
        keep = bits.view(torch.int16)[:n].view(x.shape) < self.threshold
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))  # scaled in place: one temporary, not two

    def extra_repr(self) -> str:
        return f"p={self.p}"


class CellProjection(nn.Sequential):
    """Per-cell Linear -> ReLU -> Dropout from the bag's feature width to the head's hidden width."""

    def __init__(self, *, in_dim: int, hidden_dim: int, dropout: float) -> None:
        # In-place ReLU: the Linear's output feeds nothing else, and one (cells, hidden) buffer fewer per step.
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), CellDropout(dropout))


class _TanhSigmoidGate(torch.autograd.Function):
    """``tanh(a) * sigmoid(g)``, with tanh computed as ``2 sigmoid(2a) - 1`` (equal within 2e-7): torch's CPU tanh
    kernel takes ~5x as long as its sigmoid. Its own backward also skips autograd's intermediate products.
    Measured: ~3.5% of an ABMIL training step on CPU (gated attention over ~1,700 cells of 128 features)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(a * 2).mul_(2).sub_(1)  # tanh(a)
        s = torch.sigmoid(g)
        ctx.save_for_backward(t, s)
        return t * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad * s, t), torch.ops.aten.sigmoid_backward(grad * t, s)


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018): ``w^T (tanh(V h) * sigmoid(U h))`` per branch.

    The score layer has no bias: a constant added before a softmax changes nothing, so a bias would
    be a parameter that never learns. No dropout here (as in Ilse et al. and torchmil): the cell
    projection before it already drops, and a second mask over (B, N, A) costs as much as a Linear.
    """

    def __init__(self, *, hidden_dim: int, attention_dim: int, branches: int) -> None:
        super().__init__()
        self.tanh_branch = nn.Linear(hidden_dim, attention_dim)
        self.gate_branch = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, branches, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gated = _TanhSigmoidGate.apply(self.tanh_branch(h), self.gate_branch(h))  # (B, N, A)
        return self.score(gated)  # (B, N, K) raw scores, K branches


# Above this many entries of the (B, R, K) weight matrix, pool_cells sums with index_add instead.
DENSE_POOL_ELEMENTS = 1 << 22


def pool_cells(weights: torch.Tensor, h: torch.Tensor, bag: torch.Tensor, num_bags: int) -> torch.Tensor:
    """Attention pooling of packed cells: ``pooled[b, k] = sum of weights[r, k] * h[r] over the cells r of bag b``.

    weights (R, K), h (R, H), bag (R,) -> (B, K, H). One matrix product with the (B, R, K) matrix holding each
    cell's weights in its bag's row and 0 elsewhere (forward and backward are each one small GEMM); the
    elementwise (R, K, H) product + index_add it replaces was ~1.5% of an ABMIL training step. Batches whose
    matrix would pass DENSE_POOL_ELEMENTS entries (many bags of many cells) take the index_add path.
    """
    r, k = weights.shape
    if num_bags * r * k <= DENSE_POOL_ELEMENTS:
        rows = torch.arange(r, device=weights.device)
        matrix = weights.new_zeros(num_bags, r, k).index_put((bag, rows), weights)  # (B, R, K)
        return einsum(matrix, h, "b r k, r h -> b k h")
    weighted = einsum(weights, h, "r k, r h -> r k h")  # (R, K, H)
    return weighted.new_zeros(num_bags, k, h.shape[1]).index_add(0, bag, weighted)


class MilHead(nn.Module):
    """Base class: subclasses implement ``_forward(x, mask) -> (logits, attention)`` on a checked batch.

    ``multi_branch`` says whether attention is (B,N) or (B,C,N); ``attention_meaning`` documents what
    the weights are for the report (e.g. "uniform" for mean pooling).

    Patient covariates (age, blood counts; ``covariate_dim`` > 0) join every head the same way: a linear
    term ``W_cov @ covariates`` added to the logits. Every head ends in a linear classifier, so this is
    exactly concatenating the covariates to the bag embedding before that classifier (for multi-branch
    heads: to each class's embedding), without touching the head's own code or its attention.
    """

    multi_branch: bool = False
    attention_meaning: str = "softmax attention weight of the cell"
    # A head that gathers the real cells before any per-cell layer never reads padding and skips zeroing it.
    reads_padding: bool = True

    def __init__(self, *, in_dim: int, num_classes: int, covariate_dim: int = 0) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1 or covariate_dim < 0:
            raise ValueError(
                f"in_dim and num_classes must be >= 1 and covariate_dim >= 0, got in_dim={in_dim}, "
                f"num_classes={num_classes}, covariate_dim={covariate_dim}"
            )
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.covariate_dim = covariate_dim
        self.covariate_classifier = nn.Linear(covariate_dim, num_classes, bias=False) if covariate_dim else None

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _forward_packed(
        self, cells: torch.Tensor, bag: torch.Tensor, cell: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_forward`` on the padded batch whose real cells are ``cells`` (R, D) at (bag, cell) of ``mask``.
        Heads whose per-cell layers run on the real cells only override it and skip the padded copy."""
        x = cells.new_zeros((*mask.shape, cells.shape[-1])).index_put((bag, cell), cells)  # (B, N, D), 0 padding
        return self._forward(x, mask)

    def _check_covariates(self, batch_size: int, covariates: torch.Tensor | None) -> None:
        expected = (batch_size, self.covariate_dim)
        if self.covariate_dim and (covariates is None or tuple(covariates.shape) != expected):
            got = None if covariates is None else tuple(covariates.shape)
            raise ValueError(
                f"this head was built with covariate_dim={self.covariate_dim}: pass covariates {expected}, got {got}"
            )
        if not self.covariate_dim and covariates is not None:
            raise ValueError("covariates given to a head built with covariate_dim=0; build it with covariate_dim=K")

    def _with_covariates(self, logits: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
        if self.covariate_classifier is not None:
            logits = logits + self.covariate_classifier(covariates.to(logits.dtype))  # (B, C)
        return logits

    def forward_with_attention(
        self, x: torch.Tensor, mask: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B,C) and attention (B,N) or (B,C,N) from one pass; covariates (B,K) when covariate_dim=K."""
        mask = check_batch(x, mask, in_dim=self.in_dim)
        self._check_covariates(x.shape[0], covariates)
        # Zero the padding first: attention 0 times a NaN or inf padding value would still be NaN.
        if self.reads_padding and not bool(mask.all()):
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        logits, attention = self._forward(x, mask)  # (B, C), (B, N) or (B, C, N)
        return self._with_covariates(logits, covariates), attention

    def forward_packed(
        self,
        cells: torch.Tensor,
        bag: torch.Tensor,
        cell: torch.Tensor,
        mask: torch.Tensor,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, C) of the batch in ``mil.heads.data.packed_collate`` form, equal to ``forward`` on its
        padded batch: ``cells`` (R, D) are the real cells, at (bag (R,), cell (R,)) of ``mask`` (B, N)."""
        if cells.dim() != 2 or cells.shape[-1] != self.in_dim:
            raise ValueError(f"expected packed cells of shape (R, {self.in_dim}), got {tuple(cells.shape)}")
        if not (len(bag) == len(cell) == len(cells)):
            raise ValueError(f"cells ({len(cells)}), bag ({len(bag)}) and cell ({len(cell)}) differ in length")
        # An all-masked bag cannot occur: every row of the mask holds its bag's cells (>= 1 by check_records).
        self._check_covariates(mask.shape[0], covariates)
        logits, _ = self._forward_packed(cells, bag, cell, mask.bool())
        return self._with_covariates(logits, covariates)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_attention(x, mask, covariates)[0]

    def attention(self, x: torch.Tensor, mask: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_attention(x, mask, covariates)[1]
