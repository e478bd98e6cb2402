"""Contract test over every registered attention-MIL head, driven by the registry (PRODUCT.md 2.4)."""

from __future__ import annotations

import pytest
import torch

from mil.errors import ConfigError
from mil.heads import EmptyBagError, create_head, head_class, list_heads, register_head
from mil.heads.common import MilHead

torch.set_num_threads(1)
IN_DIM, NUM_CLASSES = 12, 3


def _head(name: str, **kwargs) -> MilHead:
    torch.manual_seed(0)
    return create_head(name, in_dim=IN_DIM, num_classes=NUM_CLASSES, hidden_dim=16, **kwargs)


def _bags(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Three bags of 5, 9 and 2 cells; padding holds large random values and sits between real cells."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, IN_DIM, generator=g, dtype=dtype)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, torch.tensor([0, 1, 3, 4, 5, 7, 8, 9, 10])] = True
    mask[2, torch.tensor([2, 6])] = True
    x[~mask] = 1e4 * torch.randn(int((~mask).sum()), IN_DIM, generator=g, dtype=dtype)
    return x, mask


def test_registry_holds_every_head_of_the_spec():
    assert set(list_heads()) >= {"abmil", "clam_mb", "transmil", "dsmil", "mean", "max"}


@pytest.mark.parametrize("name", list_heads())
def test_forward_shapes_and_backward_reaches_every_parameter(name):
    head = _head(name, dropout=0.0).double().train()
    x, mask = _bags()
    logits = head(x, mask)
    assert logits.shape == (3, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: parameters without a finite gradient: {missing}"
    dead = [n for n, p in head.named_parameters() if p.grad.abs().sum() == 0]
    assert not dead, f"{name}: parameters whose gradient is exactly zero: {dead}"


@pytest.mark.parametrize("name", list_heads())
def test_masked_padding_changes_no_output(name):
    head = _head(name).double().eval()
    x, mask = _bags()
    logits, attention = head.forward_with_attention(x, mask)
    for b in range(3):
        alone_x = x[b : b + 1, mask[b]]  # the bag's real cells only, no padding at all
        alone_mask = torch.ones(1, alone_x.shape[1], dtype=torch.bool)
        alone_logits, alone_attention = head.forward_with_attention(alone_x, alone_mask)
        torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(attention[b][..., mask[b]], alone_attention[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list_heads())
def test_attention_sums_to_one_over_real_cells_and_is_zero_on_padding(name):
    head = _head(name).double().eval()
    x, mask = _bags()
    attention = head.attention(x, mask)
    expected = (3, NUM_CLASSES, 11) if head.multi_branch else (3, 11)
    assert attention.shape == expected
    branch_mask = mask[:, None, :].expand(-1, NUM_CLASSES, -1) if head.multi_branch else mask
    assert (attention[~branch_mask] == 0).all()
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1], dtype=attention.dtype))


@pytest.mark.parametrize("name", list_heads())
def test_all_masked_bag_raises_named_error_not_nan(name):
    head = _head(name).eval()
    x, mask = _bags(torch.float32)
    mask[2] = False
    with pytest.raises(EmptyBagError, match=r"batch position \[2\]"):
        head(x, mask)
    with pytest.raises(EmptyBagError):
        head.attention(x, mask)


@pytest.mark.parametrize("name", list_heads())
def test_float32_train_mode_gives_finite_output_with_nan_padding(name):
    head = _head(name).train()
    x, mask = _bags(torch.float32)
    x[~mask] = float("nan")
    assert torch.isfinite(head(x, mask)).all()


BIG_BAG = 100_000


@pytest.mark.parametrize("name", list_heads())
def test_a_100000_cell_bag_runs_in_memory_linear_in_the_cells(name):
    """Issue 14 case 9: transmil's exact attention tried to allocate 160 GB for one bag of 100,000 cells. Every
    head's forward with attention now fits a CPU (transmil: Nystrom attention, ~1 GB at hidden width 128)."""
    head = _head(name).eval()
    x = torch.randn(1, BIG_BAG, IN_DIM, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, BIG_BAG, dtype=torch.bool)
    with torch.no_grad():
        logits, attention = head.forward_with_attention(x, mask)
    assert logits.shape == (1, NUM_CLASSES) and torch.isfinite(logits).all()
    assert attention.shape == ((1, NUM_CLASSES, BIG_BAG) if head.multi_branch else (1, BIG_BAG))
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-4, rtol=0)


def test_wrong_feature_width_names_the_fix():
    head = _head("abmil")
    with pytest.raises(ValueError, match="in_dim"):
        head(torch.zeros(1, 4, IN_DIM + 1), torch.ones(1, 4, dtype=torch.bool))


def test_unknown_head_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="abmil"):
        create_head("gatedmil", in_dim=4, num_classes=2)


def test_unknown_constructor_option_is_a_config_error():
    with pytest.raises(ConfigError, match="abmil"):
        create_head("abmil", in_dim=4, num_classes=2, hiden_dim=3)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ConfigError, match="already registered"):

        @register_head("abmil")
        class Again(MilHead):
            pass


@pytest.mark.parametrize("name", list_heads())
def test_covariates_reach_the_logits_and_leave_attention_alone(name):
    head = _head(name, dropout=0.0, covariate_dim=2).double().eval()
    x, mask = _bags()
    covariates = torch.randn(3, 2, dtype=torch.float64)
    logits, attention = head.forward_with_attention(x, mask, covariates)
    shifted, attention_shifted = head.forward_with_attention(x, mask, covariates + 1.0)
    assert not torch.allclose(logits, shifted)
    torch.testing.assert_close(attention, attention_shifted)
    head.train()
    head(x, mask, covariates).sum().backward()
    assert head.covariate_classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="covariate_dim=2"):
        head(x, mask)


def test_mil_heads_command_lists_every_attention_and_count_head_with_a_description(capsys):
    from mil.cli import main
    from mil.count.registry import count_head_class, list_count_heads
    from mil.heads.command import describe

    assert main(["heads", "--names"]) == 0
    assert capsys.readouterr().out.split() == list_heads() + list_count_heads()
    assert main(["heads"]) == 0
    table = capsys.readouterr().out.splitlines()
    heads = [(n, head_class(n)) for n in list_heads()] + [(n, count_head_class(n)) for n in list_count_heads()]
    for name, cls in heads:
        assert describe(cls), f"head {name} needs a one-line class docstring (what `mil heads` prints)"
        (line,) = [row for row in table if row.split()[:1] == [name]]  # exactly one line per head
        assert describe(cls) in line
    assert any("clam_mb" in row and "(C, N)" in row for row in table)
    assert not any("compare --help" in row for row in table)
