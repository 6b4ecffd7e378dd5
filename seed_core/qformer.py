"""The Causal Q-Former: BLIP-2's Q-Former with a causal mask among its 32 learned queries.

Design choices (SEED, arXiv 2307.08041):
- Causal, not bidirectional: query i attends only to queries <= i in self-attention, so the 32
  outputs form a left-to-right sequence that an LLM can predict token by token. Cross-attention
  to the frozen ViT tokens is unmasked (every query sees the whole image).
- 32 queries: the number of image tokens per image; the last query has seen all the others,
  which is why stage-1 ITC uses the *last* query output as the image feature.
- BLIP-2 initialisation: `from_blip2` copies a transformers BLIP-2 checkpoint's Q-Former, query
  tokens, text embeddings and ITC projections. The layers are transformers' own
  `Blip2QFormerModel` / `Blip2TextEmbeddings`; only the mask is ours, so with `causal=False`
  the outputs equal transformers' (tested).

Shapes: B batch, P ViT tokens, Dv ViT width, Q queries, D Q-Former width, T text tokens,
E ITC embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

from seed_core.serialization import (
    config_from_dict,
    load_pretrained_weights,
    module_digest,
    read_pretrained_config,
    save_pretrained_module,
)


@dataclass(kw_only=True)
class QFormerConfig:
    """Shape of the Causal Q-Former (defaults: BLIP-2's BERT-base Q-Former, SEED's 32 queries)."""

    num_queries: int = 32
    """Learned queries = image tokens per image."""
    causal: bool = True
    """Lower-triangular self-attention mask among the queries (False = plain BLIP-2)."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    """A cross-attention to the ViT tokens every N-th layer."""
    encoder_hidden_size: int = 1408
    """Width Dv of the frozen vision encoder's tokens."""
    vocab_size: int = 30523
    """Text vocabulary of the BERT text branch (BLIP-2: 30522 + [DEC])."""
    max_text_len: int = 512
    """Text position embeddings."""
    embed_dim: int = 256
    """ITC projection width E."""
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "cross_attention_frequency", "encoder_hidden_size", "vocab_size",
                     "max_text_len", "embed_dim"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"QFormerConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"QFormerConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"QFormerConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_hf(self) -> Blip2QFormerConfig:
        return Blip2QFormerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_text_len,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=self.encoder_hidden_size,
            use_qformer_text_input=True,
        )


def causal_query_mask(
    num_queries: int, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive (1, 1, Q, Q) mask: 0 where query i may attend to query j (j <= i), dtype-min elsewhere.

    Additive rather than boolean because transformers' eager attention adds the mask to the scores,
    while SDPA accepts either; a float mask means the same under both.
    """
    allowed_QQ = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(num_queries, num_queries, dtype=dtype, device=device)
    mask.masked_fill_(~allowed_QQ, torch.finfo(dtype).min)
    return mask[None, None]


class CausalQFormer(nn.Module):
    """Learned queries -> (causal) Q-Former over frozen ViT tokens; plus BLIP-2's BERT text branch."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        hf_config = config.to_hf()
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_queries, config.hidden_size))
        # transformers initialises query_tokens to zeros, which makes every query identical and any
        # causal-mask test vacuous; BLIP-2 draws them from N(0, 0.02).
        nn.init.normal_(self.query_tokens, std=0.02)
        self.embeddings = Blip2TextEmbeddings(hf_config)
        self.qformer = Blip2QFormerModel(hf_config)
        self.vision_projection = nn.Linear(config.hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(config.hidden_size, config.embed_dim)

    def forward(
        self, image_embeds_BPV: torch.Tensor, image_mask_BP: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The query outputs (B, Q, D) for ViT tokens (B, P, Dv)."""
        B = image_embeds_BPV.shape[0]
        queries_BQD = self.query_tokens.expand(B, -1, -1)
        self_mask = None
        if self.config.causal:
            self_mask = causal_query_mask(
                self.config.num_queries, dtype=self.query_tokens.dtype, device=queries_BQD.device
            ).expand(B, -1, -1, -1)
        out = self.qformer(
            query_embeds=queries_BQD,
            query_length=self.config.num_queries,
            attention_mask=self_mask,
            encoder_hidden_states=image_embeds_BPV,
            encoder_attention_mask=image_mask_BP,
        )
        return out.last_hidden_state  # (B, Q, D)

    def encode_text(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The BERT text branch (B, T, D) as in BLIP-2; position 0 is the text feature for ITC."""
        embeds_BTD = self.embeddings(input_ids=input_ids_BT)
        out = self.qformer(
            query_embeds=embeds_BTD, query_length=0, attention_mask=attention_mask_BT
        )
        return out.last_hidden_state

    def image_feature(self, queries_BQD: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC feature (B, E) of the *last* causal query (it has seen all others)."""
        return nn.functional.normalize(self.vision_projection(queries_BQD[:, -1, :]), dim=-1)

    def text_feature(self, text_BTD: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC feature (B, E) of the text's first token."""
        return nn.functional.normalize(self.text_projection(text_BTD[:, 0, :]), dim=-1)

    @classmethod
    def from_blip2(cls, model: Any, *, causal: bool = True) -> CausalQFormer:
        """Copy a transformers BLIP-2 model's Q-Former (+ query tokens, text embeddings, ITC heads).

        `model` is a `Blip2ForImageTextRetrieval` (everything is copied) or a `Blip2Model` (it has
        no text embeddings or ITC projections: those keep their fresh init, and a warning says so).
        """
        hf = model.config
        qf = hf.qformer_config
        config = QFormerConfig(
            num_queries=hf.num_query_tokens,
            causal=causal,
            hidden_size=qf.hidden_size,
            num_layers=qf.num_hidden_layers,
            num_heads=qf.num_attention_heads,
            intermediate_size=qf.intermediate_size,
            cross_attention_frequency=qf.cross_attention_frequency,
            encoder_hidden_size=qf.encoder_hidden_size,
            vocab_size=qf.vocab_size,
            max_text_len=qf.max_position_embeddings,
            embed_dim=getattr(hf, "image_text_hidden_size", 256),
            dropout=qf.hidden_dropout_prob,
            layer_norm_eps=qf.layer_norm_eps,
            pad_token_id=qf.pad_token_id if qf.pad_token_id is not None else 0,
        )
        qformer = cls(config)
        with torch.no_grad():
            qformer.query_tokens.copy_(model.query_tokens.detach().float())
        # strict=False only because a checkpoint without use_qformer_text_input lacks the text FFNs.
        missing, unexpected = qformer.qformer.load_state_dict(
            model.qformer.state_dict(), strict=False
        )
        if unexpected or any(".intermediate_query." in k or ".output_query." in k for k in missing):
            raise ValueError(
                f"BLIP-2 Q-Former does not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        copied_text = all(
            hasattr(model, n) for n in ("embeddings", "vision_projection", "text_projection")
        )
        if copied_text:
            qformer.embeddings.load_state_dict(model.embeddings.state_dict())
            qformer.vision_projection.load_state_dict(model.vision_projection.state_dict())
            qformer.text_projection.load_state_dict(model.text_projection.state_dict())
        if missing or not copied_text:
            import warnings

            warnings.warn(
                f"{type(model).__name__} has no (complete) text branch: the Q-Former's text embeddings, "
                "text FFNs and ITC projections keep a random init. Use Blip2ForImageTextRetrieval "
                "(e.g. Salesforce/blip2-itm-vit-g) for a full BLIP-2 initialisation.",
                stacklevel=2,
            )
        return qformer

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained_module(self, self.config, directory, kind="causal_qformer")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> CausalQFormer:
        data = read_pretrained_config(directory, kind="causal_qformer") | overrides
        return load_pretrained_weights(cls(config_from_dict(QFormerConfig, data)), directory)  # type: ignore[return-value]

    @property
    def digest(self) -> str:
        return module_digest(self, self.config)
