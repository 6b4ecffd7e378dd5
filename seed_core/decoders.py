"""SEED's decoders from the 32 quantized code embeddings.

- `ReconstructionDecoder`: 4 pre-norm transformer blocks + 32 learned positions, trained to
  reconstruct the continuous causal embeddings (loss 1 - cosine). It keeps the codes semantic.
- `V1GenerationDecoder`: blocks, then a *reverse Q-Former* (77 learned queries cross-attending to
  the 32 decoded embeddings; transformers' Q-Former layers with cross-attention in every layer)
  and Linear -> 77 x 768, the text conditioning of frozen Stable Diffusion v1.4.
- `V2GenerationDecoder`: blocks, then a per-token MLP 768->256->128->32 (ReLU, no bias), flatten
  32 x 32 = 1024, Linear -> the 1024-d unCLIP image embedding of SD-2-1-unclip.
Bidirectional attention inside the decoders: they see all 32 codes at once (decoding happens after
the LLM has produced the whole sequence).

Shapes: B batch, Q queries/codes, D width, G generation queries (77), O output width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel


@dataclass(kw_only=True)
class DecoderConfig:
    """A stack of transformer blocks over the Q code embeddings (SEED: 4 x 768-d, 12 heads, mlp 4x)."""

    width: int = 768
    num_layers: int = 4
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_positions: int = 32
    """Learned positions = codes per image."""

    def __post_init__(self) -> None:
        for name in ("width", "num_layers", "num_heads", "num_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"DecoderConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.width % self.num_heads:
            raise ValueError(
                f"DecoderConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"DecoderConfig.mlp_ratio must be positive, got {self.mlp_ratio}")


@dataclass(kw_only=True)
class GenerationDecoderConfig:
    """The generation decoder: v1 -> 77 x 768 SD text conditioning, v2 -> 1024-d unCLIP image embedding."""

    variant: Literal["v1", "v2"] = "v2"
    blocks: DecoderConfig = field(default_factory=DecoderConfig)
    output_dim: int = 1024
    """v2: width of the image embedding; v1: width O of each of the G conditioning vectors."""
    mlp_dims: list[int] = field(default_factory=lambda: [256, 128, 32])
    """v2: per-token MLP widths (the last times Q is the flattened width)."""
    num_output_queries: int = 77
    """v1: G, the length of SD's text conditioning."""
    reverse_qformer_layers: int = 4
    """v1: BERT layers of the reverse Q-Former."""

    def __post_init__(self) -> None:
        if self.variant not in ("v1", "v2"):
            raise ValueError(
                f"GenerationDecoderConfig.variant must be 'v1' or 'v2', got {self.variant!r}"
            )
        if self.output_dim <= 0:
            raise ValueError(
                f"GenerationDecoderConfig.output_dim must be positive, got {self.output_dim}"
            )
        if not self.mlp_dims or any(d <= 0 for d in self.mlp_dims):
            raise ValueError(
                f"GenerationDecoderConfig.mlp_dims must be positive widths, got {self.mlp_dims}"
            )
        if self.num_output_queries <= 0 or self.reverse_qformer_layers <= 0:
            raise ValueError(
                "GenerationDecoderConfig.num_output_queries and reverse_qformer_layers must be positive"
            )

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the generation embedding."""
        return (
            (self.output_dim,)
            if self.variant == "v2"
            else (self.num_output_queries, self.output_dim)
        )


class Blocks(nn.Module):
    """Learned positions + pre-norm transformer blocks + final LayerNorm: (B, Q, D) -> (B, Q, D)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_positions, config.width))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.width,
                config.num_heads,
                dim_feedforward=int(config.width * config.mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.width)

    def forward(self, x_BQD: torch.Tensor) -> torch.Tensor:
        x_BQD = x_BQD + self.pos_embed[:, : x_BQD.shape[1]]
        for layer in self.layers:
            x_BQD = layer(x_BQD)
        return self.norm(x_BQD)


class ReconstructionDecoder(Blocks):
    """Quantized code embeddings (B, Q, D) -> reconstructed causal embeddings (B, Q, D)."""


class V2GenerationDecoder(nn.Module):
    """(B, Q, D) -> blocks -> per-token MLP (no bias) -> flatten -> Linear -> (B, O)."""

    def __init__(self, config: GenerationDecoderConfig) -> None:
        super().__init__()
        self.blocks = Blocks(config.blocks)
        widths = [config.blocks.width, *config.mlp_dims]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(w_in, w_out, bias=False))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.token_mlp = nn.Sequential(*layers)
        self.proj = nn.Linear(config.blocks.num_positions * config.mlp_dims[-1], config.output_dim)

    def forward(self, x_BQD: torch.Tensor) -> torch.Tensor:
        h_BQM = self.token_mlp(self.blocks(x_BQD))
        return self.proj(h_BQM.flatten(1))  # (B, O)


class V1GenerationDecoder(nn.Module):
    """(B, Q, D) -> blocks -> reverse Q-Former (G queries) -> Linear -> (B, G, O)."""

    def __init__(self, config: GenerationDecoderConfig) -> None:
        super().__init__()
        width = config.blocks.width
        self.blocks = Blocks(config.blocks)
        self.queries = nn.Parameter(torch.zeros(1, config.num_output_queries, width))
        nn.init.normal_(self.queries, std=0.02)
        self.reverse_qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=width,
                num_hidden_layers=config.reverse_qformer_layers,
                num_attention_heads=config.blocks.num_heads,
                intermediate_size=int(width * config.blocks.mlp_ratio),
                cross_attention_frequency=1,
                encoder_hidden_size=width,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                vocab_size=1,  # no text input: the embeddings table is never built
                max_position_embeddings=config.num_output_queries,
            )
        )
        self.proj = nn.Linear(width, config.output_dim)

    def forward(self, x_BQD: torch.Tensor) -> torch.Tensor:
        memory_BQD = self.blocks(x_BQD)
        queries_BGD = self.queries.expand(x_BQD.shape[0], -1, -1)
        out_BGD = self.reverse_qformer(
            query_embeds=queries_BGD, encoder_hidden_states=memory_BQD
        ).last_hidden_state
        return self.proj(out_BGD)  # (B, G, O)


def build_generation_decoder(config: GenerationDecoderConfig) -> nn.Module:
    return V1GenerationDecoder(config) if config.variant == "v1" else V2GenerationDecoder(config)
