"""Stage-1 and stage-2 tasks: loss terms, gradients where they belong, frozen parts, distributed ITC."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from seed_core.qformer import CausalQFormer
from seed_core.tasks import Stage1Config, Stage1Task, Stage2Task, contrastive_loss


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


def one_hot_itc(image_BE, text_BE, temperature, smoothing):
    """The paper's (BLIP-2's) one-hot ITC, as Stage1Task computed it before caption groups."""
    targets_B = torch.arange(image_BE.shape[0])
    return 0.5 * (
        F.cross_entropy(image_BE @ text_BE.T / temperature, targets_B, label_smoothing=smoothing)
        + F.cross_entropy(text_BE @ image_BE.T / temperature, targets_B, label_smoothing=smoothing)
    )


def test_stage1_unique_caption_groups_give_the_one_hot_loss(tiny, patch_features):
    """With every caption group unique (or no groups), the ITC loss is the paper's one-hot formula."""
    torch.manual_seed(0)
    task = Stage1Task(CausalQFormer(tiny.tokenizer.qformer)).eval()
    batch = text_batch(tiny, patch_features)
    q = task.qformer
    image = q.image_feature(q(batch["patch_features"]))
    text = q.text_feature(q.encode_text(batch["input_ids"], batch["attention_mask"]))
    expected = one_hot_itc(image, text, task.temperature, task.config.label_smoothing)
    grouped = task(batch | {"caption_group": torch.tensor([7, -3, 12, 5])})
    assert task(batch).loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert grouped.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert grouped.metrics["positives_per_row"] == 1


def test_stage1_groups_reward_aligning_copies_not_telling_them_apart():
    """With repeated captions, one-hot targets score a memoriser (each copy its own point) better
    than a perfect group aligner (all copies of a caption on one point); spread targets score the
    aligner better, and the aligner itself scores the same under both (identical columns)."""
    torch.manual_seed(0)
    groups_B = torch.arange(4).repeat_interleave(3)  # 4 captions x 3 copies
    centres_GE = F.normalize(torch.randn(4, 16), dim=-1)
    aligner_BE = centres_GE[groups_B]
    memoriser_BE = F.normalize(aligner_BE + 0.3 * torch.randn(12, 16), dim=-1)
    temperature = torch.tensor([0.07])

    def itc(features_BE, groups):
        return contrastive_loss(
            features_BE, features_BE, temperature, smoothing=0.1, groups_B=groups
        )[0]

    assert itc(memoriser_BE, None) < itc(aligner_BE, None) - 0.5  # one-hot: tell copies apart
    assert itc(aligner_BE, groups_B) < itc(memoriser_BE, groups_B) - 0.5  # spread: align them
    assert itc(aligner_BE, groups_B) == pytest.approx(itc(aligner_BE, None).item(), rel=1e-6)
    assert itc(aligner_BE, None) == pytest.approx(
        one_hot_itc(aligner_BE, aligner_BE, temperature, 0.1).item(), rel=1e-6
    )
    _, metrics = contrastive_loss(
        aligner_BE, aligner_BE, temperature, smoothing=0.1, groups_B=groups_B
    )
    assert metrics["acc_i2t"] == metrics["acc_t2i"] == 1  # a tie with a copy is a hit
    assert metrics["positives_per_row"] == 3


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


def _itc_worker(rank, world, port, features, ids, groups, results):
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
        grouped = task(batch | {"caption_group": groups[half]})
        results[rank] = (out.loss.item(), task.qformer.query_tokens.grad.clone(),
                         grouped.loss.item(), grouped.metrics["positives_per_row"].item())  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_stage1_gathers_negatives_across_ranks(tiny, patch_features):
    """With 2 gloo ranks of 2 samples, the mean rank loss equals the single-process loss on all 4,
    with and without caption groups (the groups are gathered too: a pair split across ranks counts).

    Each rank's loss covers its own rows against all 4 texts/images, so their mean is the global
    loss; without the gather each rank would only see 2 negatives and the numbers would differ.
    """
    batch = text_batch(tiny, patch_features)
    groups = torch.tensor([5, 9, 5, 2])  # rows 0 and 2 share a caption, on different ranks
    batch["input_ids"][2] = batch["input_ids"][0]
    torch.manual_seed(0)
    task = Stage1Task(CausalQFormer(tiny.tokenizer.qformer)).eval()
    single = task(batch).loss.item()
    single_grouped = task(batch | {"caption_group": groups})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(
        _itc_worker,
        args=(2, port, patch_features, batch["input_ids"], groups, results),
        nprocs=2,
        join=True,
    )
    mean_loss = (results[0][0] + results[1][0]) / 2
    assert mean_loss == pytest.approx(single, rel=1e-5)
    assert (results[0][2] + results[1][2]) / 2 == pytest.approx(
        single_grouped.loss.item(), rel=1e-5
    )
    assert results[0][3] == results[1][3] == pytest.approx(1.5)  # rows 0 and 2 found each other


def test_golden_grouped_itc_tiny_seed0():
    """Stage-1 ITC with caption groups on the tiny preset at seed 0 matches the committed fixture."""
    import json

    from tests.golden.make_golden import FIXTURE, compute

    golden = json.loads(FIXTURE.read_text())
    assert compute()["stage1_itc_grouped"] == pytest.approx(golden["stage1_itc_grouped"], rel=1e-5)
