"""Cross-check our gated ABMIL against a peer implementation: torchmil 1.0.2's ``ABMIL``.

The mapping, and why it is exact:
- torchmil's ABMIL pools the output of its ``feat_ext`` with ``AttentionPool(gated=True)`` and reads the
  pooled embedding with one ``Linear(H, 1)``. Its attention pool is ``fc2(tanh(fc1 h) * sigmoid(fc_gated h))``
  with a bias-free ``fc2``, softmax over the real cells, then ``z = sum_n s_n h_n``.
- Ours is ``project`` (Linear(D, H) + ReLU + Dropout) -> the same gated attention -> the same pooling ->
  ``classifier``. So torchmil's model with ``feat_ext = Sequential(Linear(D, H), ReLU())`` is our model with
  dropout 0; we copy every torchmil weight into ours: feat_ext.0 -> project.0, pool.fc1 -> tanh_branch,
  pool.fc_gated -> gate_branch, pool.fc2 -> score, classifier -> classifier.
- torchmil is binary (one logit per bag); our heads are multi-class. We compare (1) the binary case,
  ``num_classes=1``: our single logit against torchmil's logit, and our attention against the softmax of
  torchmil's raw attention scores; and (2) the multi-class case through the pooled embedding: torchmil's
  ``pool`` output passed through our C-class classifier must equal our C logits.
Both are checked on padded batches with torchmil's own mask convention (1 = real instance) and padding.
"""

from __future__ import annotations

import pytest
import torch

torchmil = pytest.importorskip("torchmil")
from torchmil.models import ABMIL as TorchmilABMIL  # noqa: E402
from torchmil.nn import masked_softmax as torchmil_masked_softmax  # noqa: E402

from mil.heads import create_head  # noqa: E402

torch.set_num_threads(1)
D, H, A = 24, 16, 8


def _peer() -> torch.nn.Module:
    torch.manual_seed(11)
    feat_ext = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU())
    return TorchmilABMIL(in_shape=(D,), att_dim=A, gated=True, feat_ext=feat_ext).eval()


def _copy_into_ours(peer: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    ours = create_head("abmil", in_dim=D, num_classes=num_classes, hidden_dim=H, attention_dim=A, dropout=0.0).eval()
    with torch.no_grad():
        ours.project[0].load_state_dict(peer.feat_ext[0].state_dict())
        ours.attend.tanh_branch.load_state_dict(peer.pool.fc1.module.state_dict())
        ours.attend.gate_branch.load_state_dict(peer.pool.fc_gated.module.state_dict())
        ours.attend.score.load_state_dict(peer.pool.fc2.state_dict())
        if num_classes == 1:
            ours.classifier.load_state_dict(peer.classifier.module.state_dict())
    return ours


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 30, D, generator=g)
    mask = torch.zeros(4, 30, dtype=torch.bool)
    for row, n in enumerate((30, 17, 5, 1)):
        mask[row, :n] = True
    x[~mask] = 7.0  # padding values that would change every output if they leaked in
    return x, mask


def test_binary_logits_and_attention_match_torchmil():
    peer = _peer()
    ours = _copy_into_ours(peer, num_classes=1)
    x, mask = _batch()
    with torch.no_grad():
        peer_logit, peer_scores = peer(x, mask.to(torch.uint8), return_att=True)  # (B,), (B, N) raw scores
        peer_attention = torchmil_masked_softmax(peer_scores, mask)  # (B, N)
        logits, attention = ours.forward_with_attention(x, mask)
    assert peer_logit.abs().max() > 1e-3  # a real comparison, not two zeros
    torch.testing.assert_close(logits[:, 0], peer_logit, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention, peer_attention, atol=1e-6, rtol=0)


def test_multiclass_logits_match_torchmil_pooled_embedding():
    peer = _peer()
    ours = _copy_into_ours(peer, num_classes=3)
    x, mask = _batch()
    with torch.no_grad():
        pooled = peer.pool(peer.feat_ext(x), mask.to(torch.uint8))  # (B, H) torchmil's bag embedding
        expected = ours.classifier(pooled)  # (B, 3)
        logits = ours(x, mask)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_each_bag_alone_matches_torchmil_without_mask():
    """No padding at all on torchmil's side: the padded batch of ours equals torchmil bag by bag."""
    peer = _peer()
    ours = _copy_into_ours(peer, num_classes=1)
    x, mask = _batch()
    with torch.no_grad():
        logits = ours(x, mask)[:, 0]
        for row in range(len(x)):
            alone = peer(x[row : row + 1, mask[row]])  # (1,)
            torch.testing.assert_close(logits[row : row + 1], alone, atol=1e-6, rtol=0)
