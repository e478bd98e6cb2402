"""Nystrom attention (mil/heads/nystrom.py), the part of TransMIL that keeps memory linear in the cells: its
pseudo-inverse iteration, its approximation of exact attention, and bags on either side of the landmark count."""

from __future__ import annotations

import torch

from mil.heads.nystrom import NystromSelfAttention, iterative_pinv

torch.set_num_threads(1)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    x = torch.softmax(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    torch.testing.assert_close(iterative_pinv(x, iterations=25), torch.linalg.pinv(x), atol=1e-8, rtol=0)


def _pair(landmarks: int) -> tuple[NystromSelfAttention, NystromSelfAttention]:
    torch.manual_seed(0)
    approximate = NystromSelfAttention(dim=32, heads=4, landmarks=landmarks, dropout=0.0).double().eval()
    exact = NystromSelfAttention(dim=32, heads=4, landmarks=10**9, dropout=0.0).double().eval()
    exact.load_state_dict(approximate.state_dict())
    return approximate, exact


@torch.no_grad()
def test_nystrom_approximates_exact_attention_and_is_exact_for_small_bags():
    tokens = torch.randn(1, 200, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = torch.ones(1, 200, dtype=torch.bool)
    approximate, exact = _pair(landmarks=100)
    (out, row), (out_exact, row_exact) = approximate(tokens, keep), exact(tokens, keep)
    assert float((out - out_exact).norm() / (out_exact - tokens).norm()) < 0.05  # measured 0.013
    assert float((row - row_exact).abs().sum(-1).max()) < 0.2  # measured 0.09 (L1 over the row)
    approximate, exact = _pair(landmarks=200)  # a bag of at most `landmarks` tokens: exact attention
    torch.testing.assert_close(approximate(tokens, keep), exact(tokens, keep), atol=1e-12, rtol=0)


@torch.no_grad()
def test_padding_and_batch_mates_change_no_token():
    """Compacted tokens: a bag's outputs are the same alone, beside a bigger bag, and with padding after it."""
    approximate, _ = _pair(landmarks=8)
    g = torch.Generator().manual_seed(2)
    small, big = torch.randn(1, 20, 32, generator=g, dtype=torch.float64), torch.randn(1, 50, 32, generator=g)
    batch = torch.cat([torch.cat([small, 1e3 * torch.randn(1, 30, 32, generator=g)], 1), big.double()])  # (2, 50, 32)
    keep = torch.ones(2, 50, dtype=torch.bool)
    keep[0, 20:] = False
    out, row = approximate(batch, keep)
    alone, alone_row = approximate(small, torch.ones(1, 20, dtype=torch.bool))
    torch.testing.assert_close(out[0, :20], alone[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(row[0, :, :20], alone_row[0], atol=1e-9, rtol=0)
    assert (row[0, :, 20:] == 0).all()
