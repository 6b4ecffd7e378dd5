"""Presets are consistent and the library boundary holds (seed_core never imports ray/mlflow/argparse)."""

import subprocess
import sys

import pytest
import torch

from seed_core.decoders import (
    DecoderConfig,
    GenerationDecoderConfig,
    V1GenerationDecoder,
    V2GenerationDecoder,
)
from seed_core.presets import PRESETS, get_preset
from seed_core.tokenizer import SeedTokenizer


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_consistent(name):
    """Each preset builds and its generation decoder's output matches its target encoder's shape."""
    preset = get_preset(name)
    assert preset.tokenizer.num_queries == 32
    assert preset.tokenizer.generation.output_shape == preset.target.output_shape


def test_paper_shapes():
    """paper-v2/v1 carry the published shapes: ViT-g 257 x 1408, 12 x 768 Q-Former, 8192 x 32 codes."""
    v2, v1 = get_preset("paper_v2"), get_preset("paper-v1")
    assert (
        v2.vision.num_tokens == 257 and v2.vision.hidden_size == 1408 and v2.vision.num_layers == 39
    )
    q = v2.tokenizer.qformer
    assert (q.hidden_size, q.num_layers, q.num_heads, q.cross_attention_frequency) == (
        768,
        12,
        12,
        2,
    )
    assert (v2.tokenizer.quantizer.num_codes, v2.tokenizer.quantizer.code_dim) == (8192, 32)
    assert v2.target.output_shape == (1024,) and v2.tokenizer.generation.mlp_dims == [256, 128, 32]
    assert v1.target.output_shape == (77, 768) and v1.tokenizer.generation.num_output_queries == 77
    assert v2.tokenizer.reconstruction.num_layers == 4


def test_paper_v2_tokenizer_builds_with_published_sizes():
    """The paper-v2 tokenizer's decoders and quantizer have the published layer shapes."""
    tok = SeedTokenizer(get_preset("paper-v2").tokenizer)
    assert tok.quantizer.codebook.weight.shape == (8192, 32)
    assert [m.out_features for m in tok.quantizer.down if hasattr(m, "out_features")] == [768, 32]
    assert (
        tok.generation_decoder.proj.in_features == 1024
        and tok.generation_decoder.proj.out_features == 1024
    )


def test_demo_preset_is_tiny_with_a_wider_codebook():
    """`demo` feeds on tiny features and a tiny stage-1 Q-Former: only the quantizer differs."""
    tiny, demo = get_preset("tiny"), get_preset("demo")
    assert (demo.tokenizer.quantizer.num_codes, demo.tokenizer.quantizer.code_dim) == (512, 16)
    assert demo.tokenizer.quantizer.input_dim == tiny.tokenizer.quantizer.input_dim
    assert demo.vision == tiny.vision and demo.target == tiny.target
    assert demo.tokenizer.qformer == tiny.tokenizer.qformer
    assert demo.tokenizer.reconstruction == tiny.tokenizer.reconstruction
    assert demo.tokenizer.generation == tiny.tokenizer.generation
    codes = SeedTokenizer(demo.tokenizer).eval().encode_embeddings(torch.randn(2, 32, 32))
    assert codes.shape == (2, 32) and int(codes.max()) < 512


def test_unknown_preset_lists_choices():
    """An unknown preset name is a ValueError listing the choices."""
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")


def test_v2_decoder_mlp_has_no_bias_and_v1_uses_reverse_qformer():
    """v2's per-token MLP is bias-free with ReLUs; v1 cross-attends every layer to the codes."""
    blocks = DecoderConfig(width=32, num_layers=1, num_heads=4)
    v2 = V2GenerationDecoder(
        GenerationDecoderConfig(variant="v2", blocks=blocks, output_dim=16, mlp_dims=[16, 8, 4])
    )
    linears = [m for m in v2.token_mlp if isinstance(m, torch.nn.Linear)]
    assert [m.bias for m in linears] == [None, None, None]
    assert sum(isinstance(m, torch.nn.ReLU) for m in v2.token_mlp) == 2
    v1 = V1GenerationDecoder(
        GenerationDecoderConfig(variant="v1", blocks=blocks, output_dim=8, reverse_qformer_layers=2)
    )
    assert all(layer.has_cross_attention for layer in v1.reverse_qformer.encoder.layer)
    assert v1(torch.randn(2, 32, 32)).shape == (2, 77, 8)


def test_seed_core_does_not_import_ray_mlflow_or_argparse():
    """No seed_core module imports ray, mlflow or argparse itself, and importing them all loads neither ray nor mlflow.

    argparse is checked in the source only: torch itself imports it.
    """
    import ast
    from pathlib import Path

    import seed_core

    forbidden = {"ray", "mlflow", "argparse", "deepspeed"}
    for path in Path(seed_core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"
    code = (
        "import sys, pkgutil, importlib, seed_core\n"
        "mods = [m.name for m in pkgutil.iter_modules(seed_core.__path__)]\n"
        "for m in mods: importlib.import_module('seed_core.' + m)\n"
        "bad = [m for m in ('ray', 'mlflow', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert len(mods) >= 8, mods\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
