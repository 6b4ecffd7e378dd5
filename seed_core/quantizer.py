"""SEED's vector quantizer: down-projection, Euclidean nearest code, straight-through, up-projection.

Design choices (SEED_NOTES.md):
- The causal embeddings (D=768) are projected down to a small code space (C=32) before the lookup
  (Linear-Tanh-Linear) and back up after it, as SEED does; a low-dimensional codebook is what
  keeps 8192 codes in use.
- Plain Euclidean nearest neighbour, no l2-normalisation and no EMA updates: the published recipe.
- Loss = taming-transformers' "legacy" form: mean((sg[zq] - z)^2) + beta * mean((zq - sg[z])^2),
  i.e. commitment weight 1 and codebook weight beta = 0.25.
- Straight-through: the forward uses zq, the backward passes the gradient to z unchanged.

Shapes: B batch, Q queries (tokens per image), D embedding width, C code width, K codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(kw_only=True)
class QuantizerConfig:
    """Codebook and projections (defaults: SEED's 8192 x 32 codebook on 768-d embeddings)."""

    num_codes: int = 8192
    """Codebook size K (the image vocabulary)."""
    code_dim: int = 32
    """Code width C."""
    input_dim: int = 768
    """Width D of the causal embeddings that are quantized."""
    beta: float = 0.25
    """Codebook-term weight of the legacy VQ loss."""

    def __post_init__(self) -> None:
        for name in ("num_codes", "code_dim", "input_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"QuantizerConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.num_codes > 32767:
            # token shards store codes as int16 (DESIGN.md): larger codebooks would overflow.
            raise ValueError(
                f"QuantizerConfig.num_codes must be <= 32767 (int16 codes), got {self.num_codes}"
            )
        if self.beta < 0:
            raise ValueError(f"QuantizerConfig.beta must be >= 0, got {self.beta}")


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor
    """(B, Q, D) up-projected straight-through codes: what the decoders consume."""
    loss: torch.Tensor
    """Scalar legacy VQ loss."""
    indices: torch.Tensor
    """(B, Q) int64 codes in [0, K)."""
    codes_embed: torch.Tensor
    """(B, Q, C) straight-through code vectors (before the up-projection)."""
    projected: torch.Tensor
    """(B, Q, C) the down-projected encoder output z."""
    usage: torch.Tensor
    """Fraction of the K codes used in this batch."""
    perplexity: torch.Tensor
    """exp(entropy) of the batch's code histogram (K = all codes used evenly)."""


def code_histogram(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(K,) counts of each code in `indices` (any shape)."""
    return torch.bincount(indices.reshape(-1), minlength=num_codes)


def usage_and_perplexity(counts_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, exp(entropy)) of a code histogram."""
    counts = counts_K.float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), torch.exp(entropy)


class VectorQuantizer(nn.Module):
    """z (B, Q, D) -> down -> nearest of K codes -> straight-through -> up -> (B, Q, D)."""

    def __init__(
        self, num_codes: int, code_dim: int, beta: float = 0.25, *, input_dim: int = 768
    ) -> None:
        super().__init__()
        self.config = QuantizerConfig(
            num_codes=num_codes, code_dim=code_dim, input_dim=input_dim, beta=beta
        )
        self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta
        self.down = nn.Sequential(
            nn.Linear(input_dim, input_dim), nn.Tanh(), nn.Linear(input_dim, code_dim)
        )
        self.codebook = nn.Embedding(num_codes, code_dim)
        # taming's init: small uniform codes, so early assignments spread over the codebook.
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)
        self.up = nn.Sequential(
            nn.Linear(code_dim, code_dim), nn.Tanh(), nn.Linear(code_dim, input_dim)
        )

    @classmethod
    def from_config(cls, config: QuantizerConfig) -> VectorQuantizer:
        return cls(config.num_codes, config.code_dim, config.beta, input_dim=config.input_dim)

    def nearest_codes(self, z_BQC: torch.Tensor) -> torch.Tensor:
        """(B, Q) index of the Euclidean-nearest code for each vector, computed in fp32."""
        z = z_BQC.reshape(-1, self.code_dim).float()
        codes_KC = self.codebook.weight.float()
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e ; the argmin does not need ||z||^2.
        dist_NK = codes_KC.pow(2).sum(1)[None, :] - 2 * z @ codes_KC.t()
        return dist_NK.argmin(dim=1).reshape(z_BQC.shape[:-1])

    def embed_codes(self, indices_BQ: torch.Tensor) -> torch.Tensor:
        """Codes (B, Q) -> up-projected embeddings (B, Q, D) (the decoder input at inference)."""
        if indices_BQ.min() < 0 or indices_BQ.max() >= self.num_codes:
            raise ValueError(
                f"codes must lie in [0, {self.num_codes}), got [{indices_BQ.min()}, {indices_BQ.max()}]"
            )
        return self.up(self.codebook(indices_BQ.long()))

    def forward(self, z_BQD: torch.Tensor) -> QuantizerOutput:
        z_BQC = self.down(z_BQD)
        indices_BQ = self.nearest_codes(z_BQC.detach())
        zq_BQC = self.codebook(indices_BQ)
        # legacy taming loss: commitment (weight 1) pulls z to the code, beta pulls the code to z.
        loss = torch.mean((zq_BQC.detach() - z_BQC) ** 2) + self.beta * torch.mean(
            (zq_BQC - z_BQC.detach()) ** 2
        )
        zq_st_BQC = z_BQC + (zq_BQC - z_BQC).detach()  # straight-through estimator
        usage, perplexity = usage_and_perplexity(code_histogram(indices_BQ, self.num_codes))
        return QuantizerOutput(
            quantized=self.up(zq_st_BQC),
            loss=loss,
            indices=indices_BQ,
            codes_embed=zq_st_BQC,
            projected=z_BQC,
            usage=usage,
            perplexity=perplexity,
        )

    @torch.no_grad()
    def reseed_codes(self, code_ids: torch.Tensor, vectors_NC: torch.Tensor) -> None:
        """Overwrite codes `code_ids` with code-space vectors (e.g. recent encoder outputs).

        The opt-in dead-code remedy of the training jobs; never called by the paper recipe.
        """
        if code_ids.numel() != vectors_NC.shape[0]:
            raise ValueError(f"{code_ids.numel()} code ids but {vectors_NC.shape[0]} vectors")
        weight = self.codebook.weight
        weight[code_ids.long().to(weight.device)] = vectors_NC.to(weight.device, weight.dtype)
