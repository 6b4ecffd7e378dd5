"""Frozen encoders and preprocessing: shapes, the loud random-init fallback, frozen-ness, real loading."""

import numpy as np
import pytest
import torch
from PIL import Image

from seed_core.encoders import (
    CLIP_MEAN,
    RandomInitWarning,
    TargetEncoderConfig,
    VisionEncoderConfig,
    load_target_encoder,
    load_vision_encoder,
    preprocess_images,
)


def test_preprocess_resizes_crops_and_normalises():
    """Any-size PIL or array images -> (B, 3, S, S) float32; a CLIP-mean grey image maps to ~0."""
    grey = Image.new("RGB", (50, 30), tuple(round(m * 255) for m in CLIP_MEAN))
    arr = (np.random.default_rng(0).random((20, 40, 3)) * 255).astype(np.uint8)
    x = preprocess_images([grey, arr, Image.new("L", (8, 8))], image_size=32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x[0].abs().max() < 0.02


def test_vision_encoder_random_init_is_loud_and_recorded(tiny):
    """No weights -> RandomInitWarning, is_random_init True, (B, P, Dv) tokens, no grad, eval mode."""
    with pytest.warns(RandomInitWarning, match="RANDOM INIT"):
        enc = load_vision_encoder(tiny.vision)
    assert enc.is_random_init and enc.source.startswith("random-init")
    x = preprocess_images([Image.new("RGB", (40, 40))] * 2, image_size=tiny.vision.image_size)
    out = enc(x)
    assert out.shape == (2, tiny.vision.num_tokens, tiny.vision.hidden_size)
    assert not out.requires_grad and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training


def test_random_init_is_seeded(tiny):
    """The same seed gives the same random encoder (same digest), another seed another one."""
    with pytest.warns(RandomInitWarning):
        a, b = load_vision_encoder(tiny.vision), load_vision_encoder(tiny.vision)
        c = load_vision_encoder(VisionEncoderConfig(**{**tiny.vision.__dict__, "seed": 7}))
    assert a.digest == b.digest != c.digest


def test_unreachable_hub_id_falls_back_loudly(tiny):
    """A hub id that cannot be reached (offline) falls back with the reason in the warning."""
    cfg = VisionEncoderConfig(
        **{**tiny.vision.__dict__, "pretrained": "Salesforce/blip2-itm-vit-g"}
    )
    with pytest.warns(RandomInitWarning, match="blip2-itm-vit-g"):
        enc = load_vision_encoder(cfg)
    assert enc.is_random_init


def test_loads_real_weights_from_a_local_directory(tmp_path, tiny):
    """A saved transformers checkpoint loads for real (not random), with identical outputs."""
    with pytest.warns(RandomInitWarning):
        first = load_vision_encoder(tiny.vision)
    first.model.save_pretrained(tmp_path / "vit")
    enc = load_vision_encoder(
        VisionEncoderConfig(**{**tiny.vision.__dict__, "pretrained": str(tmp_path / "vit")})
    )
    assert not enc.is_random_init and enc.source == str(tmp_path / "vit")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(enc(x), first(x))


@pytest.mark.parametrize("preset_name", ["tiny", "small"])
def test_random_init_features_are_informative_and_survive_fp16(preset_name):
    """The random stand-in tower gives O(1) patch features that differ between images and survive
    the fp16 cache (transformers' BLIP-2 vision init of 1e-10 gives ~1e-6 fp16 subnormals)."""
    import io

    from pipelines.synthetic import make_images
    from seed_core.presets import get_preset

    cfg = get_preset(preset_name).vision
    with pytest.warns(RandomInitWarning):
        enc = load_vision_encoder(cfg)
    corpus = make_images(24, seed=3, size=cfg.image_size)
    images = [Image.open(io.BytesIO(b)) for _, b, _ in corpus]
    patches = enc(preprocess_images(images, image_size=cfg.image_size))[:, 1:]  # (B, P-1, Dv)
    cached = patches.half()
    assert patches.std(dim=(1, 2)).min() > 0.1  # fp16's smallest normal is 6.1e-5
    assert cached.abs().max() < 6e4 and not cached.isinf().any()
    assert (cached.float() - patches).norm() / patches.norm() < 1e-3
    # what differs between images: the features less their batch mean per token (the position
    # table is a component every image shares, as in a pretrained ViT)
    specific = cached.float() - cached.float().mean(dim=0, keepdim=True)
    flat = torch.nn.functional.normalize(specific.flatten(1), dim=-1)
    cosine = flat @ flat.T
    captions = [c for _, _, c in corpus]  # equal captions are the same picture here
    different = torch.tensor([[a != b for b in captions] for a in captions])
    assert cosine[different].mean() < 0.5 and cosine[different].max() < 0.99


@pytest.mark.parametrize("preset_name", ["tiny", "small"])
def test_random_init_tokens_say_where_they_are(preset_name):
    """A Q-Former's cross-attention is blind to token order, so position must live in the token
    features: a linear map from a patch token's features to its (row, column), fitted on 32 scenes
    and applied to 16 others, places >= 80% of the held-out tokens exactly (transformers' N(0, 0.02)
    position init: 6-9%, chance 1/16 on tiny's 4 x 4 grid)."""
    import io

    from pipelines.synthetic import make_scenes
    from seed_core.presets import get_preset

    cfg = get_preset(preset_name).vision
    with pytest.warns(RandomInitWarning):
        enc = load_vision_encoder(cfg)
    scenes = make_scenes(48, seed=5, size=cfg.image_size)
    pixels = preprocess_images(
        [Image.open(io.BytesIO(b)) for _, b, _ in scenes], image_size=cfg.image_size
    )
    with torch.no_grad():
        tokens_BND = enc(pixels)[:, 1:]
    B, N, D = tokens_BND.shape
    grid = int(N**0.5)
    where_BN2 = (
        torch.stack([torch.arange(N) // grid, torch.arange(N) % grid], dim=1)
        .float()
        .expand(B, N, 2)
    )
    # ridge in float64: plain least squares on these near-collinear features is ill-conditioned
    # (its fit moved with the BLAS state of the process)
    x_MF = torch.cat([tokens_BND, torch.ones(B, N, 1)], dim=-1).double().reshape(B, N, D + 1)
    train_MF, held_MF = x_MF[:32].reshape(-1, D + 1), x_MF[32:].reshape(-1, D + 1)
    gram_FF = train_MF.T @ train_MF + 1e-2 * torch.eye(D + 1, dtype=torch.float64)
    fit_F2 = torch.linalg.solve(gram_FF, train_MF.T @ where_BN2[:32].reshape(-1, 2).double())
    placed = (held_MF @ fit_F2).round().clamp(0, grid - 1)
    assert (placed == where_BN2[32:].reshape(-1, 2)).all(dim=1).double().mean() >= 0.8


def test_sincos_positions_are_distinct_and_bounded():
    """The table gives every grid cell its own row (no two alike), values in [-1, 1], zero padding
    channels when the width is not a multiple of 4."""
    from seed_core.encoders import sincos_positions

    table = sincos_positions(4, 34)
    assert table.shape == (16, 34) and table.abs().max() <= 1.0
    assert torch.cdist(table, table).add(torch.eye(16)).min() > 0.1
    assert torch.equal(table[:, 32:], torch.zeros(16, 2))


def test_init_std_never_touches_loaded_weights(tmp_path, tiny):
    """init_std only shapes the random fallback: a checkpoint loads bit-identically whatever it says."""
    with pytest.warns(RandomInitWarning):
        first = load_vision_encoder(tiny.vision)
    first.model.save_pretrained(tmp_path / "vit")
    fields = {**tiny.vision.__dict__, "pretrained": str(tmp_path / "vit"), "init_std": 1e-10}
    enc = load_vision_encoder(VisionEncoderConfig(**fields))
    x = torch.randn(2, 3, 32, 32)
    assert not enc.is_random_init and torch.equal(enc(x), first(x))


def test_loads_vision_tower_from_a_full_blip2_checkpoint(tmp_path):
    """A full BLIP-2 retrieval checkpoint directory yields its vision tower."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=100, use_qformer_text_input=True),
        num_query_tokens=32, image_text_hidden_size=16,
    )  # fmt: skip
    model = Blip2ForImageTextRetrieval(cfg).eval()
    model.save_pretrained(tmp_path / "blip2")
    enc = load_vision_encoder(
        VisionEncoderConfig(
            pretrained=str(tmp_path / "blip2"),
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            intermediate_size=64,
        )  # fmt: skip
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), model.vision_model(pixel_values=x).last_hidden_state)


def test_v2_image_target_shape(tiny):
    """The v2 target encoder gives (B, projection_dim) image embeddings."""
    with pytest.warns(RandomInitWarning):
        enc = load_target_encoder(tiny.target)
    assert enc(torch.randn(3, 3, 32, 32)).shape == (3, tiny.target.projection_dim)


def test_v1_text_target_shape():
    """The v1 target encoder pads captions to 77 tokens: (B, 77, O), empty and long captions included."""
    from seed_core.presets import tiny

    cfg = tiny("v1").target
    with pytest.warns(RandomInitWarning):
        enc = load_target_encoder(cfg)
    out = enc(["", "a dog", "word " * 500])
    assert out.shape == (3, 77, cfg.hidden_size)


def test_config_validation_names_the_field():
    """Inconsistent shapes or unknown dtypes raise ValueError naming the field."""
    with pytest.raises(ValueError, match="patch_size"):
        VisionEncoderConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="dtype"):
        VisionEncoderConfig(dtype="fp8")
    with pytest.raises(ValueError, match="init_std"):
        VisionEncoderConfig(init_std=0.0)
    with pytest.raises(ValueError, match="kind"):
        TargetEncoderConfig(kind="clip_audio")


def test_golden_random_vision_tower_tiny_seed0():
    """The tiny preset's random vision tower (seed 0, init_std 0.02) reproduces the committed
    feature statistics: a change to the stand-in init must be meant, and regenerate the fixture."""
    import json

    from tests.golden.make_golden import FIXTURE, compute

    golden, now = json.loads(FIXTURE.read_text()), compute()
    for key in ("vision_patch_std", "vision_patch_abs_sum"):
        assert now[key] == pytest.approx(golden[key], rel=1e-5), key
