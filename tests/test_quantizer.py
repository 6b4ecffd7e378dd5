"""Vector quantizer: the legacy VQ loss, straight-through gradients, code range, usage stats."""

import math

import pytest
import torch

from seed_core.quantizer import (
    QuantizerConfig,
    VectorQuantizer,
    code_histogram,
    usage_and_perplexity,
)


@pytest.fixture
def vq():
    torch.manual_seed(0)
    return VectorQuantizer(64, 8, beta=0.25, input_dim=32)


def test_shapes_dtypes_and_range(vq):
    """Output shapes follow (B, Q, D); codes are int64 in [0, K)."""
    out = vq(torch.randn(3, 32, 32))
    assert out.quantized.shape == (3, 32, 32)
    assert out.codes_embed.shape == out.projected.shape == (3, 32, 8)
    assert out.indices.shape == (3, 32) and out.indices.dtype == torch.int64
    assert out.indices.min() >= 0 and out.indices.max() < 64


def test_indices_are_the_euclidean_nearest_codes(vq):
    """Every index is the argmin of the Euclidean distance to the codebook."""
    out = vq(torch.randn(2, 32, 32))
    dist = torch.cdist(out.projected.reshape(-1, 8), vq.codebook.weight)
    assert torch.equal(out.indices.reshape(-1), dist.argmin(dim=1))


def test_loss_matches_the_legacy_formula(vq):
    """loss = mean((sg[zq]-z)^2) + beta * mean((zq-sg[z])^2), computed directly."""
    out = vq(torch.randn(2, 32, 32))
    z = out.projected
    zq = vq.codebook.weight[out.indices]
    expected = torch.mean((zq.detach() - z) ** 2) + 0.25 * torch.mean((zq - z.detach()) ** 2)
    assert torch.allclose(out.loss, expected, rtol=1e-6, atol=0)


def test_loss_gradients_split_commitment_and_codebook(vq):
    """The commitment term drives z (weight 1) and the codebook term drives codes (weight beta)."""
    z_in = torch.randn(2, 32, 32)
    out = vq(z_in)
    out.loss.backward()
    z, zq = out.projected.detach(), vq.codebook.weight[out.indices].detach()
    n = z.numel()
    expected_code_grad = torch.zeros_like(vq.codebook.weight)
    expected_code_grad.index_add_(
        0, out.indices.reshape(-1), (0.25 * 2 * (zq - z) / n).reshape(-1, 8)
    )
    assert torch.allclose(vq.codebook.weight.grad, expected_code_grad, atol=1e-7)


def test_straight_through_passes_gradient_to_encoder_side(vq):
    """A loss on the quantized output alone gives the down-projection (encoder side) a gradient."""
    z_in = torch.randn(2, 32, 32, requires_grad=True)
    out = vq(z_in)
    out.quantized.pow(2).mean().backward()
    assert z_in.grad is not None and z_in.grad.abs().sum() > 0
    assert vq.down[0].weight.grad.abs().sum() > 0
    # forward value is the code, not z
    assert torch.allclose(out.codes_embed, vq.codebook.weight[out.indices], atol=1e-6)


def test_usage_and_perplexity():
    """Usage = fraction of codes hit; perplexity = K for a uniform histogram, 1 for a single code."""
    usage, ppl = usage_and_perplexity(code_histogram(torch.arange(16), 16))
    assert usage.item() == 1.0 and math.isclose(ppl.item(), 16.0, rel_tol=1e-5)
    usage, ppl = usage_and_perplexity(code_histogram(torch.zeros(10, dtype=torch.long), 16))
    assert math.isclose(usage.item(), 1 / 16) and math.isclose(ppl.item(), 1.0, rel_tol=1e-5)


def test_embed_codes_rejects_out_of_range(vq):
    """Codes outside [0, K) are a ValueError, not an index error deep inside torch."""
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.embed_codes(torch.tensor([[64]]))


def test_reseed_codes_overwrites_rows(vq):
    """reseed_codes writes the given vectors into exactly the given rows."""
    before = vq.codebook.weight.detach().clone()
    vq.reseed_codes(torch.tensor([3, 5]), torch.ones(2, 8))
    after = vq.codebook.weight.detach()
    assert torch.equal(after[[3, 5]], torch.ones(2, 8))
    keep = [i for i in range(64) if i not in (3, 5)]
    assert torch.equal(after[keep], before[keep])


def test_config_validation():
    """int16 token storage caps the codebook; bad values name the field."""
    with pytest.raises(ValueError, match="num_codes"):
        QuantizerConfig(num_codes=40000)
    with pytest.raises(ValueError, match="beta"):
        QuantizerConfig(beta=-1)
