"""Stage-1 and stage-2 tasks: loss terms, gradients where they belong, frozen parts, distributed ITC."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from seed_core.qformer import CausalQFormer
from seed_core.tasks import Stage1Config, Stage1Task, Stage2Task


def text_batch(tiny, patch_features, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(
        1, tiny.tokenizer.qformer.vocab_size, (patch_features.shape[0], 10), generator=g
    )
    return {
        "patch_features": patch_features,
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


def test_stage1_itc_loss_and_gradients(tiny, tiny_tokenizer, patch_features):
    """ITC is a finite scalar near log(B) at init; Q-Former, projections and temperature get gradients."""
    task = Stage1Task(tiny_tokenizer.qformer)
    out = task(text_batch(tiny, patch_features))
    assert set(out.terms) == {"itc"} and out.loss.ndim == 0
    assert 0.5 < out.loss.item() < 10
    out.loss.backward()
    assert task.temperature.grad is not None
    assert task.qformer.query_tokens.grad.abs().sum() > 0
    assert task.qformer.vision_projection.weight.grad.abs().sum() > 0
    assert task.qformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_stage1_uses_the_last_query(tiny, tiny_tokenizer, patch_features):
    """The ITC image feature depends on the last query: queries < 31 alone cannot change it via the mask."""
    q = tiny_tokenizer.qformer
    queries = torch.randn(2, 32, tiny.tokenizer.qformer.hidden_size)
    feat = q.image_feature(queries)
    queries2 = queries.clone()
    queries2[:, :31] = 0
    assert torch.equal(feat, q.image_feature(queries2))


def test_stage1_learns_a_tiny_batch(tiny, patch_features):
    """A few Adam steps on one batch lower the ITC loss (the loss is wired to the parameters)."""
    torch.manual_seed(0)
    task = Stage1Task(CausalQFormer(tiny.tokenizer.qformer))
    batch = text_batch(tiny, patch_features)
    opt = torch.optim.Adam(task.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = task(batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task(batch).loss.item() < first - 0.1


def test_stage2_terms_and_frozen_qformer(tiny, tiny_tokenizer, patch_features):
    """Stage 2 returns vq/recon/gen; quantizer and decoders get gradients, the Q-Former none."""
    task = Stage2Task(tiny_tokenizer).train()
    target = torch.randn(4, *tiny.target.output_shape)
    out = task({"patch_features": patch_features, "target_image_embed": target})
    assert set(out.terms) == {"vq", "recon", "gen"}
    expected = 5 * out.terms["vq"] + 2 * out.terms["recon"] + 0.5 * out.terms["gen"]
    assert torch.allclose(out.loss, expected)
    assert {"codebook_usage", "perplexity", "recon_cosine", "target_mse"} <= set(out.metrics)
    assert out.codes.shape == (4, 32)
    assert out.projected.shape == (4, 32, tiny.tokenizer.quantizer.code_dim)
    assert not out.projected.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in tiny_tokenizer.qformer.parameters())
    assert not tiny_tokenizer.qformer.training  # stays in eval (no dropout) under task.train()
    for module in (tiny_tokenizer.quantizer.down, tiny_tokenizer.quantizer.codebook,
                   tiny_tokenizer.reconstruction_decoder, tiny_tokenizer.generation_decoder):  # fmt: skip
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_stage2_from_cached_embeddings_equals_from_features(tiny, tiny_tokenizer, patch_features):
    """Cached causal embeddings give the same losses as running the frozen Q-Former (the qembeds fast path)."""
    task = Stage2Task(tiny_tokenizer).eval()
    target = torch.randn(4, *tiny.target.output_shape)
    with torch.no_grad():
        causal = tiny_tokenizer.embed(patch_features)
        a = task({"patch_features": patch_features, "target_image_embed": target})
        b = task({"causal_embeds": causal, "target_image_embed": target})
    assert torch.allclose(a.loss, b.loss)


def test_stage2_missing_inputs_are_clear_errors(tiny_tokenizer):
    """A batch without a target or without features/embeddings names what is missing."""
    task = Stage2Task(tiny_tokenizer)
    with pytest.raises(ValueError, match="target_image_embed"):
        task({"causal_embeds": torch.randn(1, 32, 32)})
    with pytest.raises(ValueError, match="causal_embeds"):
        task({"target_image_embed": torch.randn(1, 16)})


def test_stage1_config_validation():
    """Out-of-range temperature / smoothing name the field."""
    with pytest.raises(ValueError, match="temperature_init"):
        Stage1Config(temperature_init=2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        Stage1Config(label_smoothing=1.0)


def _itc_worker(rank, world, port, features, ids, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from seed_core.presets import tiny

        torch.manual_seed(0)
        task = Stage1Task(CausalQFormer(tiny().tokenizer.qformer)).eval()
        half = slice(rank * 2, rank * 2 + 2)
        batch = {
            "patch_features": features[half],
            "input_ids": ids[half],
            "attention_mask": torch.ones_like(ids[half]),
        }
        out = task(batch)
        out.loss.backward()
        results[rank] = (out.loss.item(), task.qformer.query_tokens.grad.clone())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_stage1_gathers_negatives_across_ranks(tiny, patch_features):
    """With 2 gloo ranks of 2 samples, the mean rank loss equals the single-process loss on all 4.

    Each rank's loss covers its own rows against all 4 texts/images, so their mean is the global
    loss; without the gather each rank would only see 2 negatives and the numbers would differ.
    """
    batch = text_batch(tiny, patch_features)
    torch.manual_seed(0)
    single = Stage1Task(CausalQFormer(tiny.tokenizer.qformer)).eval()(batch).loss.item()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(
        _itc_worker,
        args=(2, port, patch_features, batch["input_ids"], results),
        nprocs=2,
        join=True,
    )
    mean_loss = (results[0][0] + results[1][0]) / 2
    assert mean_loss == pytest.approx(single, rel=1e-5)
