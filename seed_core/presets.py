"""Presets: plain functions returning the config dataclasses of a whole SEED setup.

- `tiny`: CPU tests and the demo, seconds. Random-init encoders (no weights are downloadable
  here), 32 queries kept (the 32-token contract), small widths and codebook.
- `demo`: `tiny` with a 512 x 16 codebook, for `seedpipe demo`'s stage 2 (only the quantizer differs,
  so tiny features and a tiny stage-1 Q-Former feed it).
- `small`: CPU benchmarks: the same structure at widths where the arithmetic dominates overheads.
- `paper_v1`, `paper_v2`: SEED v1 / SEED-2 published shapes and pretrained ids (SEED_NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from seed_core.decoders import DecoderConfig, GenerationDecoderConfig
from seed_core.encoders import TargetEncoderConfig, VisionEncoderConfig
from seed_core.qformer import QFormerConfig
from seed_core.quantizer import QuantizerConfig
from seed_core.tokenizer import SeedTokenizerConfig

NUM_QUERIES = 32  # image tokens per image: fixed by the token-shard schema (DESIGN.md)


@dataclass(kw_only=True)
class Preset:
    name: str
    vision: VisionEncoderConfig
    target: TargetEncoderConfig
    tokenizer: SeedTokenizerConfig

    def __post_init__(self) -> None:
        if self.tokenizer.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError(
                f"preset {self.name}: tokenizer.qformer.encoder_hidden_size must equal vision.hidden_size"
            )
        gen = self.tokenizer.generation
        wanted = "clip_image" if gen.variant == "v2" else "clip_text"
        if self.target.kind != wanted:
            raise ValueError(
                f"preset {self.name}: a {gen.variant} generation decoder needs a {wanted} target"
            )
        if gen.output_shape != self.target.output_shape:
            raise ValueError(
                f"preset {self.name}: generation output {gen.output_shape} != target {self.target.output_shape}"
            )


def _tokenizer(*, width: int, heads: int, layers: int, intermediate: int, vision_width: int, vocab: int,
               embed_dim: int, num_codes: int, code_dim: int, dec_layers: int, generation: GenerationDecoderConfig,
               qformer_dropout: float = 0.1, cross_attention_frequency: int = 2,
               ) -> SeedTokenizerConfig:  # fmt: skip
    return SeedTokenizerConfig(
        qformer=QFormerConfig(
            num_queries=NUM_QUERIES,
            hidden_size=width,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=intermediate,
            encoder_hidden_size=vision_width,
            vocab_size=vocab,
            embed_dim=embed_dim,
            dropout=qformer_dropout,
            cross_attention_frequency=cross_attention_frequency,
        ),  # fmt: skip
        quantizer=QuantizerConfig(num_codes=num_codes, code_dim=code_dim, input_dim=width),
        reconstruction=DecoderConfig(
            width=width, num_layers=dec_layers, num_heads=heads, num_positions=NUM_QUERIES
        ),
        generation=generation,
    )


def tiny(variant: str = "v2") -> Preset:
    """CPU tests and demo: 32x32 images, 17 ViT tokens x 32, Q-Former 2 x 32 (both layers cross-attend,
    no dropout), 128 codes x 8."""
    width, heads = 32, 4
    blocks = DecoderConfig(width=width, num_layers=1, num_heads=heads, num_positions=NUM_QUERIES)
    if variant == "v2":
        target = TargetEncoderConfig(kind="clip_image", pretrained=None, image_size=32, patch_size=8,
                                     hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                     projection_dim=16)  # fmt: skip
        generation = GenerationDecoderConfig(
            variant="v2", blocks=blocks, output_dim=16, mlp_dims=[16, 8, 4]
        )
    else:
        target = TargetEncoderConfig(kind="clip_text", pretrained=None, hidden_size=16, num_layers=1,
                                     num_heads=4, intermediate_size=32, max_text_len=77, vocab_size=260)  # fmt: skip
        generation = GenerationDecoderConfig(variant="v1", blocks=blocks, output_dim=16, num_output_queries=77,
                                             reverse_qformer_layers=1)  # fmt: skip
    return Preset(
        name=f"tiny-{variant}" if variant != "v2" else "tiny",
        vision=VisionEncoderConfig(
            arch="blip2",
            pretrained=None,
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
        ),  # fmt: skip
        target=target,
        tokenizer=_tokenizer(
            width=width,
            heads=heads,
            layers=2,
            intermediate=64,
            vision_width=32,
            vocab=1000,
            embed_dim=16,
            num_codes=128,
            code_dim=8,
            dec_layers=1,
            generation=generation,
            # BLIP-2's 0.1 dropout regularises a 12 x 768 Q-Former on 129M pairs; on 4 heads of
            # width 8 it drowns the signal (3,000 scenes of circles/squares/triangles/diamonds,
            # 1,500 plain-torch steps: held-out R@1 0.16 with it, 0.65 without).
            qformer_dropout=0.0,
            # BLIP-2 cross-attends every 2nd of 12 layers (6 looks at the image); every 2nd of 2
            # is one look, and the demo scenes' position was then learnt by neither of 2 seeds (held-out
            # R@1 0.46-0.52 at 1,500 plain-torch steps); every layer: 2 of 2 seeds, 0.93-0.94.
            cross_attention_frequency=1,
        ),  # fmt: skip
    )


def demo() -> Preset:
    """`seedpipe demo`'s stage 2: `tiny` with 512 codes x 16 instead of 128 x 8 (the vision tower and
    Q-Former are tiny's, so the demo's tiny features and stage-1 model feed it unchanged).

    Why a wider codebook: 128 x 8 codes were the demo's bottleneck. On one demo stage-1 model,
    800 plain-torch stage-2 steps at lr 8e-3 (held-out i2t R@1 through the Q-Former's ITC head, the
    continuous embeddings giving 0.92): 128 x 8 0.54; 512 x 16 0.72 and 0.73 (two seeds); 1024 x 16
    0.69 at 4e-3, with usage down to 0.87. The LLM then learns 512 image tokens instead of 128."""
    base = tiny()
    quantizer = replace(base.tokenizer.quantizer, num_codes=512, code_dim=16)
    return replace(base, name="demo", tokenizer=replace(base.tokenizer, quantizer=quantizer))


def small() -> Preset:
    """CPU benchmarks: 64x64 images, 65 ViT tokens x 192, Q-Former 4 x 192, 1024 codes x 32."""
    width, heads = 192, 6
    blocks = DecoderConfig(width=width, num_layers=2, num_heads=heads, num_positions=NUM_QUERIES)
    return Preset(
        name="small",
        vision=VisionEncoderConfig(
            arch="blip2",
            pretrained=None,
            image_size=64,
            patch_size=8,
            hidden_size=192,
            num_layers=6,
            num_heads=6,
            intermediate_size=768,
        ),  # fmt: skip
        target=TargetEncoderConfig(
            kind="clip_image",
            pretrained=None,
            image_size=64,
            patch_size=8,
            hidden_size=192,
            num_layers=4,
            num_heads=6,
            intermediate_size=768,
            projection_dim=256,
        ),  # fmt: skip
        tokenizer=_tokenizer(
            width=width,
            heads=heads,
            layers=4,
            intermediate=768,
            vision_width=192,
            vocab=4000,
            embed_dim=128,
            num_codes=1024,
            code_dim=32,
            dec_layers=2,
            generation=GenerationDecoderConfig(
                variant="v2", blocks=blocks, output_dim=256, mlp_dims=[128, 64, 16]
            ),
        ),  # fmt: skip
    )


def _paper_tokenizer(generation: GenerationDecoderConfig) -> SeedTokenizerConfig:
    return _tokenizer(width=768, heads=12, layers=12, intermediate=3072, vision_width=1408, vocab=30523,
                      embed_dim=256, num_codes=8192, code_dim=32, dec_layers=4, generation=generation)  # fmt: skip


def paper_v2() -> Preset:
    """SEED-2: EVA ViT-g (BLIP-2), 8192 x 32 codes, MLP generation decoder -> 1024-d unCLIP embedding."""
    return Preset(
        name="paper-v2",
        vision=VisionEncoderConfig(),
        target=TargetEncoderConfig(),
        tokenizer=_paper_tokenizer(GenerationDecoderConfig(variant="v2")),
    )


def paper_v1() -> Preset:
    """SEED v1: as v2, but a reverse Q-Former decoder -> SD v1.4's 77 x 768 text conditioning."""
    return Preset(
        name="paper-v1",
        vision=VisionEncoderConfig(),
        target=TargetEncoderConfig(
            kind="clip_text",
            pretrained="CompVis/stable-diffusion-v1-4",
            subfolder="text_encoder",
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
        ),  # fmt: skip
        tokenizer=_paper_tokenizer(GenerationDecoderConfig(variant="v1", output_dim=768)),
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": tiny,
    "tiny-v1": lambda: tiny("v1"),
    "demo": demo,
    "small": small,
    "paper-v1": paper_v1,
    "paper-v2": paper_v2,
}


def get_preset(name: str) -> Preset:
    """A preset by name; `paper_v2` and `paper-v2` both work."""
    key = name.replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]()
