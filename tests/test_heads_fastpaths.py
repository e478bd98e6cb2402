"""The training fast paths give the same answers as the plain ones: packed batches, numpy AUROC, the CPU
dropout mask, the sigmoid-based gated tanh, pooling by one matrix product, and checkpoints flushed every few
epochs (best and last together)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mil.auroc import binary_auroc
from mil.checkpointing import RunCheckpoint
from mil.heads import common, create_head, list_heads, train
from mil.heads.common import CellDropout, GatedAttention, pool_cells
from mil.heads.data import BagRecord, packed_collate, pad_collate
from mil.heads.train import TrainConfig, fit_predict

torch.set_num_threads(1)


@pytest.mark.parametrize("name", list_heads())
def test_forward_packed_equals_forward_on_the_padded_batch(name):
    torch.manual_seed(0)
    head = create_head(name, in_dim=6, num_classes=3, hidden_dim=8, dropout=0.0, covariate_dim=2).double().eval()
    g = torch.Generator().manual_seed(1)
    items = [(torch.randn(n, 6, generator=g, dtype=torch.float64), i % 3, i, None) for i, n in enumerate((4, 9, 1))]
    covariates = torch.randn(3, 2, generator=g, dtype=torch.float64)
    padded, packed = pad_collate(items), packed_collate(items)
    assert torch.equal(padded["mask"], packed["mask"])
    bag, cell = padded["mask"].nonzero(as_tuple=True)
    assert torch.equal(padded["x"][bag, cell], packed["cells"])
    expected = head(padded["x"], padded["mask"], covariates)
    got = head.forward_packed(packed["cells"], packed["bag"], packed["cell"], packed["mask"], covariates)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="covariate_dim=2"):
        head.forward_packed(packed["cells"], packed["bag"], packed["cell"], packed["mask"])


def test_binary_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, 2, size=int(rng.integers(4, 40))).astype(bool)
        labels[:2] = [True, False]
        scores = np.round(rng.random(len(labels)), 1)  # many ties
        assert binary_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_cell_dropout_keeps_the_expected_share_is_seeded_and_off_in_eval():
    drop = CellDropout(0.25)
    x = torch.ones(400, 500)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b)
    assert abs(float((a == 0).float().mean()) - 0.25) < 0.01
    assert torch.allclose(a[a != 0], torch.tensor(4 / 3))
    assert torch.equal(drop.eval()(x), x)


def _bags(n: int, seed: int) -> list[BagRecord]:
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        features = rng.normal(size=(int(rng.integers(5, 15)), 4)).astype(np.float32)
        features[:2, i % 2] += 3.0
        bags.append(BagRecord(f"p{seed}-{i}", features, i % 2))
    return bags


@pytest.mark.parametrize("every_seconds", [0.0, 3600.0])
def test_checkpoints_are_flushed_when_due_and_at_the_end(tmp_path, monkeypatch, every_seconds):
    flushed = []
    original = RunCheckpoint._flush

    def record(self, trainer):
        flushed.append(int(trainer.current_epoch))
        original(self, trainer)

    monkeypatch.setattr(RunCheckpoint, "_flush", record)
    monkeypatch.setattr(train, "LAST_EVERY_SECONDS", every_seconds)
    config = TrainConfig(max_epochs=7, patience=100, lr=5e-3, hidden_dim=8, batch_size=4, seed=1)
    result = fit_predict(
        "abmil", train=_bags(12, 0), val=_bags(6, 1), test=_bags(2, 2), num_classes=2, config=config, log_dir=tmp_path
    )
    assert flushed == (list(range(7)) if every_seconds == 0 else [6])  # a short run writes once, at the end
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert last["epoch"] == 6 and [e["epoch"] for e in last["history"]["epochs"]] == list(range(7))
    losses = [e["val_loss"] for e in last["history"]["epochs"]]
    assert best["epoch"] == result.history["best_epoch"] == int(np.argmin(losses))  # first minimum, as before


def test_rows_are_bucketed_only_under_cpu_autocast_and_the_extra_rows_change_nothing(monkeypatch):
    from mil.heads import common

    cells = torch.randn(300, 6)
    assert common.bucket_rows(cells) is cells  # fp32: MKL needs no fixed shapes
    torch.manual_seed(0)
    head = create_head("abmil", in_dim=6, num_classes=3, hidden_dim=8, dropout=0.0).eval()
    batch = packed_collate([(cells[:120], 0, 0, None), (cells[120:], 1, 1, None)])
    args = (batch["cells"], batch["bag"], batch["cell"], batch["mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert common.bucket_rows(cells).shape == (512, 6)
        bucketed = head.forward_packed(*args).float()
        monkeypatch.setattr(common, "ROW_BUCKET", 1)
        plain = head.forward_packed(*args).float()
    torch.testing.assert_close(bucketed, plain, atol=2e-2, rtol=0)


def test_gated_attention_equals_tanh_times_sigmoid_with_exact_gradients():
    torch.manual_seed(0)
    attend = GatedAttention(hidden_dim=8, attention_dim=5, branches=2).double()
    h = torch.randn(40, 8, dtype=torch.float64, requires_grad=True) * 3
    expected = attend.score(torch.tanh(attend.tanh_branch(h)) * torch.sigmoid(attend.gate_branch(h)))
    torch.testing.assert_close(attend(h), expected, atol=1e-12, rtol=0)
    a, g = torch.randn(2, 30, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(common._TanhSigmoidGate.apply, (a, g))
    x = torch.linspace(-12, 12, 10001)  # float32: within 2e-7 of torch.tanh, saturating to exactly +-1
    got = common._TanhSigmoidGate.apply(x, torch.full_like(x, 50.0))
    assert (got - torch.tanh(x)).abs().max() < 3e-7 and got.abs().max() <= 1


@pytest.mark.parametrize("dense_limit", [1 << 22, 0])  # one matrix product; index_add past the limit
def test_pool_cells_sums_each_bags_weighted_cells(monkeypatch, dense_limit):
    monkeypatch.setattr(common, "DENSE_POOL_ELEMENTS", dense_limit)
    g = torch.Generator().manual_seed(3)
    bag = torch.tensor([0, 0, 0, 2, 2, 3])  # bag 1 has no cell in this batch: its row stays 0
    weights = torch.rand(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pooled = pool_cells(weights, h, bag, 4)  # (B, K, H)
    expected = torch.stack([(weights[bag == b, :, None] * h[bag == b, None, :]).sum(0) for b in range(4)])
    torch.testing.assert_close(pooled, expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda w, x: pool_cells(w, x, bag, 4), (weights, h))
