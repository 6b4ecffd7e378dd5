"""Causal Q-Former: shapes, the causal property, BLIP-2 equivalence, save/load."""

import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Model

from seed_core.qformer import CausalQFormer, QFormerConfig, causal_query_mask


def tiny_blip2_config(**extra) -> Blip2Config:
    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=100, max_position_embeddings=64, **extra),
        num_query_tokens=32,
        image_text_hidden_size=16,
    )  # fmt: skip


@pytest.fixture
def blip2():
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(tiny_blip2_config(use_qformer_text_input=True)).eval()
    with torch.no_grad():  # transformers inits query tokens to zeros: all queries identical
        model.query_tokens.normal_(std=0.02)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_query_output_shape_and_dtype(tiny, patch_features):
    """forward maps (B, P, Dv) ViT tokens to (B, 32, D) float32 query outputs."""
    q = CausalQFormer(tiny.tokenizer.qformer).eval()
    out = q(patch_features)
    assert out.shape == (4, 32, tiny.tokenizer.qformer.hidden_size)
    assert out.dtype == torch.float32


def test_causal_mask_is_lower_triangular():
    """The additive mask allows j <= i and blocks j > i."""
    mask = causal_query_mask(4, dtype=torch.float32, device=torch.device("cpu"))[0, 0]
    assert (mask.tril() == 0).all()
    assert (mask.triu(1)[mask.triu(1) != 0] == torch.finfo(torch.float32).min).all()
    assert (mask.triu(1) != 0).sum() == 6


@pytest.mark.parametrize("j", [0, 7, 31])
def test_perturbing_query_j_leaves_earlier_queries_unchanged(tiny, patch_features, j):
    """With causal=True, changing query j changes outputs >= j only; queries < j are bit-identical."""
    torch.manual_seed(0)
    q = CausalQFormer(tiny.tokenizer.qformer).eval()
    with torch.no_grad():
        before = q(patch_features)
        q.query_tokens[0, j] += torch.randn(
            q.config.hidden_size
        )  # random: LayerNorm removes a constant shift
        after = q(patch_features)
    assert torch.equal(before[:, :j], after[:, :j])
    assert (before[:, j] - after[:, j]).abs().max() > 1e-3
    if j < 31:
        assert (before[:, j + 1 :] - after[:, j + 1 :]).abs().max() > 1e-6


def test_bidirectional_variant_lets_later_queries_influence_earlier(tiny, patch_features):
    """With causal=False, query 0 sees query 31 (the mask, not the model, makes it causal)."""
    torch.manual_seed(0)
    config = QFormerConfig(**{**tiny.tokenizer.qformer.__dict__, "causal": False})
    q = CausalQFormer(config).eval()
    with torch.no_grad():
        before = q(patch_features)
        q.query_tokens[0, 31] += torch.randn(q.config.hidden_size)
        after = q(patch_features)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-6


def test_from_blip2_non_causal_matches_transformers(blip2):
    """causal=False reproduces transformers' query path and text path (relative error < 1e-5)."""
    q = CausalQFormer.from_blip2(blip2, causal=False).eval()
    g = torch.Generator().manual_seed(3)
    image_embeds = torch.randn(3, 17, 32, generator=g)
    ids = torch.randint(1, 100, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours = q(image_embeds)
        theirs = blip2.qformer(
            query_embeds=blip2.query_tokens.expand(3, -1, -1), encoder_hidden_states=image_embeds
        ).last_hidden_state
        ours_text = q.encode_text(ids, mask)
        theirs_text = blip2.qformer(
            query_embeds=blip2.embeddings(input_ids=ids), query_length=0, attention_mask=mask
        ).last_hidden_state
        ours_itc = q.text_feature(ours_text)
        theirs_itc = torch.nn.functional.normalize(blip2.text_projection(theirs_text[:, 0]), dim=-1)
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours_text, theirs_text) < 1e-5
    assert rel_err(ours_itc, theirs_itc) < 1e-5


def test_from_blip2_causal_differs_from_bidirectional(blip2):
    """The causal copy keeps the weights but changes the outputs of the queries that no longer see later ones."""
    causal = CausalQFormer.from_blip2(blip2, causal=True).eval()
    full = CausalQFormer.from_blip2(blip2, causal=False).eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        a, b = causal(x), full(x)
    assert rel_err(a[:, 0], b[:, 0]) > 1e-3  # query 0 sees only itself when causal
    assert torch.allclose(causal.query_tokens, full.query_tokens)


def test_from_blip2_model_without_text_branch_warns():
    """A Blip2Model has no text embeddings/ITC heads: the copy works and warns that they stay random."""
    torch.manual_seed(0)
    model = Blip2Model(tiny_blip2_config())
    with pytest.warns(UserWarning, match="text branch"):
        q = CausalQFormer.from_blip2(model)
    assert torch.equal(q.qformer.layernorm.weight, model.qformer.layernorm.weight)


def test_save_load_round_trip(tmp_path, tiny, patch_features):
    """save_pretrained / from_pretrained reproduce outputs exactly, from safetensors + JSON."""
    torch.manual_seed(0)
    q = CausalQFormer(tiny.tokenizer.qformer).eval()
    q.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = CausalQFormer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(q(patch_features), loaded(patch_features))
    assert loaded.digest == q.digest


def test_config_validation_names_the_field():
    """Bad values raise ValueError naming the field."""
    with pytest.raises(ValueError, match="num_heads"):
        QFormerConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_queries"):
        QFormerConfig(num_queries=0)
