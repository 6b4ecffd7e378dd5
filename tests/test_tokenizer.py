"""SeedTokenizer: encode/decode shapes, determinism, save/load, digest, golden numerics."""

import json

import pytest
import torch

from seed_core.presets import tiny as tiny_preset
from seed_core.tokenizer import SeedTokenizer, SeedTokenizerConfig
from tests.golden.make_golden import FIXTURE, compute


def test_encode_decode_shapes(tiny, tiny_tokenizer, patch_features):
    """encode -> (B, 32) int64 codes in [0, K); reconstruct -> (B, 32, D); decode -> the target shape."""
    codes = tiny_tokenizer.encode(patch_features)
    assert codes.shape == (4, 32) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < tiny.tokenizer.num_codes
    assert tiny_tokenizer.reconstruct(codes).shape == (4, 32, tiny.tokenizer.qformer.hidden_size)
    assert tiny_tokenizer.decode(codes).shape == (4, *tiny.target.output_shape)


def test_v1_decoder_gives_77_conditioning_vectors():
    """The v1 tokenizer decodes codes to (B, 77, O), SD's text-conditioning shape."""
    preset = tiny_preset("v1")
    tok = SeedTokenizer(preset.tokenizer).eval()
    codes = torch.randint(0, preset.tokenizer.num_codes, (2, 32))
    assert tok.decode(codes).shape == (2, 77, preset.target.output_shape[-1])


def test_encode_embeddings_agrees_with_encode(tiny_tokenizer, patch_features):
    """Codes from cached causal embeddings equal codes from patch features (the qembeds path)."""
    with torch.no_grad():
        causal = tiny_tokenizer.embed(patch_features)
    assert torch.equal(
        tiny_tokenizer.encode_embeddings(causal), tiny_tokenizer.encode(patch_features)
    )
    # fp16 storage of the embeddings (the qembeds parquet dtype) keeps codes nearly all the same
    same = (
        tiny_tokenizer.encode_embeddings(causal.half()) == tiny_tokenizer.encode(patch_features)
    ).float()
    assert same.mean() > 0.95


def test_determinism_at_fixed_seed(tiny, patch_features):
    """Two tokenizers built at the same seed give identical weights, codes and digest."""
    torch.manual_seed(0)
    a = SeedTokenizer(tiny.tokenizer).eval()
    torch.manual_seed(0)
    b = SeedTokenizer(tiny.tokenizer).eval()
    assert torch.equal(a.encode(patch_features), b.encode(patch_features))
    assert a.digest == b.digest


def test_save_load_round_trip_is_exact(tmp_path, tiny_tokenizer, patch_features):
    """from_pretrained(save_pretrained(t)) reproduces codes, reconstructions, decodes and digest exactly."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = SeedTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert loaded.config == tiny_tokenizer.config
    codes = tiny_tokenizer.encode(patch_features)
    assert torch.equal(loaded.encode(patch_features), codes)
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(codes), tiny_tokenizer.reconstruct(codes))
        assert torch.equal(loaded.decode(codes), tiny_tokenizer.decode(codes))
    assert loaded.digest == tiny_tokenizer.digest


def test_digest_changes_with_weights_and_config(tiny, tiny_tokenizer):
    """One changed weight or one changed config value gives a different digest."""
    before = tiny_tokenizer.digest
    with torch.no_grad():
        tiny_tokenizer.quantizer.codebook.weight[0, 0] += 1e-3
    assert tiny_tokenizer.digest != before
    other = SeedTokenizerConfig(**{**tiny.tokenizer.__dict__})
    other.quantizer.beta = 0.5
    torch.manual_seed(0)
    assert SeedTokenizer(other).digest != SeedTokenizer(tiny.tokenizer).digest


def test_from_pretrained_rejects_other_kinds(tmp_path, tiny_tokenizer):
    """Loading a Q-Former directory as a tokenizer is a clear ValueError."""
    tiny_tokenizer.qformer.save_pretrained(tmp_path / "qf")
    with pytest.raises(ValueError, match="causal_qformer"):
        SeedTokenizer.from_pretrained(tmp_path / "qf")


def test_unknown_config_key_is_named(tmp_path, tiny_tokenizer):
    """A saved config with an unknown key fails naming that key."""
    tiny_tokenizer.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["config"]["quantizer"]["codebook_decay"] = 0.99
    (tmp_path / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="quantizer.codebook_decay"):
        SeedTokenizer.from_pretrained(tmp_path)


def test_from_qformer_keeps_stage1_weights(tiny, tiny_tokenizer, patch_features):
    """A tokenizer built around a stage-1 Q-Former embeds exactly as that Q-Former does."""
    torch.manual_seed(5)
    tok = SeedTokenizer.from_qformer(tiny_tokenizer.qformer, tiny.tokenizer).eval()
    with torch.no_grad():
        assert torch.equal(tok.embed(patch_features), tiny_tokenizer.qformer(patch_features))


def test_config_cross_checks_widths(tiny):
    """A decoder narrower than the Q-Former is rejected with the field named."""
    cfg = tiny.tokenizer
    with pytest.raises(ValueError, match="reconstruction.width"):
        SeedTokenizerConfig(qformer=cfg.qformer, quantizer=cfg.quantizer,
                            reconstruction=type(cfg.reconstruction)(width=64, num_heads=4), generation=cfg.generation)  # fmt: skip


def test_golden_numerics_tiny_seed0():
    """The tiny preset at seed 0 reproduces the committed codes exactly and losses to 1e-5."""
    golden = json.loads(FIXTURE.read_text())
    now = compute()
    assert now["codes"] == golden["codes"]
    for key in ("stage1_itc", "stage2_loss", "decode_sum"):
        assert now[key] == pytest.approx(golden[key], rel=1e-5, abs=1e-6), key
    for name, value in golden["stage2"].items():
        assert now["stage2"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
