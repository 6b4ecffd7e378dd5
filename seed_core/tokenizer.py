"""`SeedTokenizer`: Causal Q-Former + quantizer + decoders, the unit a tokens dataset is made with.

    patch features (B, P, Dv) --embed--> causal embeddings (B, Q, D) --encode_embeddings--> codes (B, Q)
    codes --reconstruct--> causal embeddings (B, Q, D);  codes --decode--> generation embedding

The vision encoder is not part of it: it is frozen and shared, and the pipelines cache its
outputs (features parquet), so a tokenizer works from patch features or cached causal embeddings.
A tokenizer version is identified by `digest` (config + weights), not by a path or a timestamp.

Shapes: B batch, P ViT tokens, Dv ViT width, Q queries, D width, K codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seed_core.decoders import (
    DecoderConfig,
    GenerationDecoderConfig,
    ReconstructionDecoder,
    build_generation_decoder,
)
from seed_core.qformer import CausalQFormer, QFormerConfig
from seed_core.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer
from seed_core.serialization import (
    config_from_dict,
    load_pretrained_weights,
    module_digest,
    read_pretrained_config,
    save_pretrained_module,
)


@dataclass(kw_only=True)
class SeedTokenizerConfig:
    """The whole tokenizer (defaults: SEED-2's published shapes)."""

    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    reconstruction: DecoderConfig = field(default_factory=DecoderConfig)
    generation: GenerationDecoderConfig = field(default_factory=GenerationDecoderConfig)

    def __post_init__(self) -> None:
        width, queries = self.qformer.hidden_size, self.qformer.num_queries
        if self.quantizer.input_dim != width:
            raise ValueError(
                f"quantizer.input_dim ({self.quantizer.input_dim}) must equal qformer.hidden_size ({width})"
            )
        for name, dec in (
            ("reconstruction", self.reconstruction),
            ("generation.blocks", self.generation.blocks),
        ):
            if dec.width != width:
                raise ValueError(
                    f"{name}.width ({dec.width}) must equal qformer.hidden_size ({width})"
                )
            if dec.num_positions != queries:
                raise ValueError(
                    f"{name}.num_positions ({dec.num_positions}) must equal qformer.num_queries ({queries})"
                )

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @property
    def num_queries(self) -> int:
        return self.qformer.num_queries


class SeedTokenizer(nn.Module):
    def __init__(self, config: SeedTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.qformer = CausalQFormer(config.qformer)
        self.quantizer = VectorQuantizer.from_config(config.quantizer)
        self.reconstruction_decoder = ReconstructionDecoder(config.reconstruction)
        self.generation_decoder = build_generation_decoder(config.generation)

    @classmethod
    def from_qformer(cls, qformer: CausalQFormer, config: SeedTokenizerConfig) -> SeedTokenizer:
        """A tokenizer around a trained (stage-1) Q-Former; quantizer and decoders freshly initialised."""
        if qformer.config != config.qformer:
            raise ValueError("the stage-1 Q-Former's config differs from config.qformer")
        tokenizer = cls(config)
        tokenizer.qformer.load_state_dict(qformer.state_dict())
        return tokenizer

    def embed(self, patch_features_BPV: torch.Tensor) -> torch.Tensor:
        """Causal embeddings (B, Q, D) of ViT patch features."""
        return self.qformer(patch_features_BPV)

    def quantize(self, causal_embeds_BQD: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(causal_embeds_BQD)

    @torch.no_grad()
    def encode(self, patch_features_BPV: torch.Tensor) -> torch.Tensor:
        """Codes (B, Q) int64 in [0, K) of ViT patch features."""
        return self.encode_embeddings(self.embed(patch_features_BPV))

    @torch.no_grad()
    def encode_embeddings(self, causal_embeds_BQD: torch.Tensor) -> torch.Tensor:
        """Codes (B, Q) of cached causal embeddings (what the tokens stage runs on qembeds)."""
        z_BQC = self.quantizer.down(causal_embeds_BQD.to(self.quantizer.codebook.weight.dtype))
        return self.quantizer.nearest_codes(z_BQC)

    def reconstruct(self, codes_BQ: torch.Tensor) -> torch.Tensor:
        """Causal embeddings (B, Q, D) reconstructed from codes."""
        return self.reconstruction_decoder(self.quantizer.embed_codes(codes_BQ))

    def decode(self, codes_BQ: torch.Tensor) -> torch.Tensor:
        """Generation embedding of codes: (B, 1024) for v2, (B, 77, 768) for v1 (paper shapes)."""
        return self.generation_decoder(self.quantizer.embed_codes(codes_BQ))

    def save_pretrained(self, directory: str | Path) -> Path:
        """`config.json` + `model.safetensors`; loads back with `from_pretrained`, no pickle."""
        return save_pretrained_module(self, self.config, directory, kind="seed_tokenizer")

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: Any = None) -> SeedTokenizer:
        config = config_from_dict(
            SeedTokenizerConfig, read_pretrained_config(directory, kind="seed_tokenizer")
        )
        tokenizer = load_pretrained_weights(cls(config), directory)
        return tokenizer.to(map_location) if map_location is not None else tokenizer  # type: ignore[return-value]

    @property
    def digest(self) -> str:
        """sha256 of config + weights: the tokenizer version's identity in catalogs and MLflow."""
        return module_digest(self, self.config)
