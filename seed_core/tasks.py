"""Training tasks: a model plus its losses, returning named loss terms and metrics.

The training loop only sums (`TaskOutput.loss`), steps and logs; one loop serves every stage
(open_clip's TrainingTask idiom).

- `Stage1Task`: image-text contrastive loss (ITC) between the *last* causal query's feature and
  the caption's first-token feature from the Q-Former's own text branch (as BLIP-2). Learned
  temperature (init 0.07, clamped as BLIP-2 does), label smoothing 0.1, in-batch negatives
  gathered across all ranks when torch.distributed is initialised. With a `caption_group` per
  row (e.g. a hash of the caption text), every in-batch pair of the same group is a positive and
  the target is spread evenly over them, as ALBEF/BLIP spread it over pairs sharing an image id:
  templated corpora repeat captions inside a batch, and one-hot targets count the copies as
  negatives (rewarding a model for telling them apart by dropout noise). With unique groups (or
  none) this is the paper's one-hot ITC.
- `Stage2Task`: the Q-Former is frozen; trains quantizer and decoders with
  5 * VQ + 2 * (1 - cos) reconstruction + 0.5 * MSE generation (SEED-2; v1 uses the MSE to the
  77 x 768 SD text conditioning). Takes patch features (runs the frozen Q-Former) or cached
  causal embeddings (the fast path: neither ViT nor Q-Former per step).

Shapes: B local batch, N global batch, P ViT tokens, Dv ViT width, Q queries, D width, T text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from seed_core.llm import ImageTokenSpace
from seed_core.qformer import CausalQFormer
from seed_core.tokenizer import SeedTokenizer


@dataclass
class TaskOutput:
    loss: torch.Tensor
    """The scalar to backpropagate: sum of weight * term."""
    terms: dict[str, torch.Tensor]
    """Unweighted loss terms by name."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalars to log."""
    codes: torch.Tensor | None = None
    """(B, Q) codes of the batch (stage 2), for codebook-usage accounting across steps."""
    projected: torch.Tensor | None = None
    """(B, Q, C) detached down-projected encoder outputs (stage 2): candidates to re-seed dead codes."""


def gather_with_grad(x_BE: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (N, E) with gradients flowing back to each rank's own rows, and this rank's offset.

    Every rank must pass the same local batch size (all_gather needs equal shapes): the jobs read
    with drop_last so that holds.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x_BE, 0
    gathered = dist_fn.all_gather(x_BE)
    return torch.cat(gathered, dim=0), dist.get_rank() * x_BE.shape[0]


@torch.no_grad()
def gather_no_grad(x_B: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (N, ...) in rank order, without autograd (ids, labels); same rule as above."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x_B
    gathered = [torch.empty_like(x_B) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x_B.contiguous())
    return torch.cat(gathered, dim=0)


def itc_targets(
    groups_B: torch.Tensor, all_groups_N: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """(B, N) soft ITC targets: (1 - smoothing) spread evenly over the same-group columns, plus
    smoothing / N everywhere (torch's label smoothing). One-hot + smoothing when groups are unique."""
    positive_BN = (groups_B[:, None] == all_groups_N[None, :]).float()
    spread_BN = positive_BN / positive_BN.sum(dim=1, keepdim=True)
    return (1.0 - smoothing) * spread_BN + smoothing / all_groups_N.shape[0]


def contrastive_loss(
    image_BE: torch.Tensor,
    text_BE: torch.Tensor,
    temperature: torch.Tensor,
    *,
    smoothing: float,
    groups_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(ITC loss, detached metrics) of L2-normalised features against every rank's in-batch rows.

    groups_B (B,) int: rows of equal group are positives of each other; None = every row its own
    group (one-hot). Mean of the image-to-text and text-to-image soft cross-entropies. Where a
    group's copies have identical features on one side (a caption's text feature without dropout)
    the loss equals the one-hot loss, since identical columns can trade their targets; where they
    differ on both sides (dropout noise, augmented views), one-hot targets reward telling the
    copies apart and spread targets do not.
    """
    all_image_NE, offset = gather_with_grad(image_BE)
    all_text_NE, _ = gather_with_grad(text_BE)
    logits_i2t_BN = image_BE @ all_text_NE.t() / temperature
    logits_t2i_BN = text_BE @ all_image_NE.t() / temperature
    if groups_B is None:
        all_groups_N = torch.arange(all_text_NE.shape[0], device=image_BE.device)
        groups_B = all_groups_N[offset : offset + image_BE.shape[0]]
    else:
        groups_B = groups_B.reshape(-1).long()
        all_groups_N = gather_no_grad(groups_B)
    # the group relation is symmetric: text i's positive images are image i's positive texts
    targets_BN = itc_targets(groups_B, all_groups_N, smoothing).to(logits_i2t_BN.dtype)
    itc = 0.5 * (
        nn.functional.cross_entropy(logits_i2t_BN, targets_BN)
        + nn.functional.cross_entropy(logits_t2i_BN, targets_BN)
    )
    with torch.no_grad():
        positive_BN = groups_B[:, None] == all_groups_N[None, :]
        rows_B = torch.arange(image_BE.shape[0], device=image_BE.device)
        metrics = {  # a hit is any positive: an identical caption is not a mistake
            "acc_i2t": positive_BN[rows_B, logits_i2t_BN.argmax(1)].float().mean(),
            "acc_t2i": positive_BN[rows_B, logits_t2i_BN.argmax(1)].float().mean(),
            "positives_per_row": positive_BN.sum(1).float().mean(),
        }
    return itc, metrics


@dataclass(kw_only=True)
class Stage1Config:
    """Stage-1 ITC settings (SEED_NOTES.md, Training)."""

    temperature_init: float = 0.07
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if not 0.001 <= self.temperature_init <= 0.5:
            raise ValueError(
                f"Stage1Config.temperature_init must be in [0.001, 0.5], got {self.temperature_init}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"Stage1Config.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )


class Stage1Task(nn.Module):
    def __init__(self, qformer: CausalQFormer, config: Stage1Config | None = None) -> None:
        super().__init__()
        self.config = config or Stage1Config()
        self.qformer = qformer
        # shape (1,), not a 0-d scalar: DeepSpeed's CPU shared-memory broadcast cannot view 0-d tensors.
        self.temperature = nn.Parameter(torch.tensor([self.config.temperature_init]))

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """batch: patch_features (B, P, Dv), input_ids (B, T), attention_mask (B, T), and optionally
        caption_group (B,) int64: rows of equal group are positives of each other (default: none)."""
        queries_BQD = self.qformer(batch["patch_features"])
        image_BE = self.qformer.image_feature(queries_BQD)
        text_BE = self.qformer.text_feature(
            self.qformer.encode_text(batch["input_ids"], batch["attention_mask"])
        )
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)  # BLIP-2 keeps the learned temperature in range
        itc, metrics = contrastive_loss(image_BE, text_BE, self.temperature,
                                        smoothing=self.config.label_smoothing,
                                        groups_B=batch.get("caption_group"))  # fmt: skip
        metrics["temperature"] = self.temperature.detach()[0].clone()
        return TaskOutput(loss=itc, terms={"itc": itc}, metrics=metrics)


@dataclass(kw_only=True)
class Stage2Config:
    """Stage-2 loss weights (SEED-2: 5 * VQ + 2 * (1 - cos) + 0.5 * MSE)."""

    vq_weight: float = 5.0
    recon_weight: float = 2.0
    gen_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("vq_weight", "recon_weight", "gen_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"Stage2Config.{name} must be >= 0, got {getattr(self, name)}")


class Stage2Task(nn.Module):
    def __init__(self, tokenizer: SeedTokenizer, config: Stage2Config | None = None) -> None:
        super().__init__()
        self.config = config or Stage2Config()
        self.tokenizer = tokenizer
        self.tokenizer.qformer.requires_grad_(False)
        self.tokenizer.qformer.eval()
        self.target_key = (
            "target_image_embed"
            if tokenizer.config.generation.variant == "v2"
            else "target_text_cond"
        )

    def train(self, mode: bool = True) -> Stage2Task:
        super().train(mode)
        self.tokenizer.qformer.eval()  # frozen: no dropout, whatever the loop asks for
        return self

    def causal_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "causal_embeds" in batch:
            return batch["causal_embeds"].float()
        if "patch_features" not in batch:
            raise ValueError(
                "a stage-2 batch needs 'causal_embeds' (B, Q, D) or 'patch_features' (B, P, Dv)"
            )
        with torch.no_grad():
            return self.tokenizer.embed(batch["patch_features"].float())

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """batch: causal_embeds (B, Q, D) or patch_features (B, P, Dv); plus the v2/v1 target."""
        if self.target_key not in batch:
            raise ValueError(
                f"a {self.tokenizer.config.generation.variant} stage-2 batch needs '{self.target_key}'"
            )
        causal_BQD = self.causal_embeddings(batch)
        vq = self.tokenizer.quantize(causal_BQD)
        recon_BQD = self.tokenizer.reconstruction_decoder(vq.quantized)
        cosine_BQ = nn.functional.cosine_similarity(recon_BQD, causal_BQD, dim=-1)
        recon = 1.0 - cosine_BQ.mean()
        generated = self.tokenizer.generation_decoder(vq.quantized)
        target = batch[self.target_key].float().reshape(generated.shape)
        gen = nn.functional.mse_loss(generated, target)
        c = self.config
        loss = c.vq_weight * vq.loss + c.recon_weight * recon + c.gen_weight * gen
        metrics = {
            "codebook_usage": vq.usage.detach(),
            "perplexity": vq.perplexity.detach(),
            "recon_cosine": cosine_BQ.mean().detach(),
            "target_mse": gen.detach(),
        }
        return TaskOutput(
            loss=loss,
            terms={"vq": vq.loss, "recon": recon, "gen": gen},
            metrics=metrics,
            codes=vq.indices,
            projected=vq.projected.detach(),
        )


class LoraTask(nn.Module):
    """PEFT-wrapped causal LM + the token-level losses of both directions (SEED's LLM side).

    `loss` is the mean over all target tokens of the batch (what the model's own loss computes);
    `loss_i2t` / `loss_t2i` are the same token-level mean restricted to one direction's rows
    (`batch["i2t"]`). Only target positions go through the (B, T, V) -> float cross-entropy, to
    spare a vocabulary-wide fp32 copy of the logits. M = target positions of the batch.
    """

    def __init__(self, model: nn.Module, space: ImageTokenSpace) -> None:
        super().__init__()
        self.model = model
        self.space = space

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logits_BTV = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        labels_BT = batch["labels"][:, 1:]  # position t predicts token t + 1
        target_BT = labels_BT != -100
        logits_MV = logits_BTV[:, :-1][target_BT].float()  # M target positions of the batch
        labels_M = labels_BT[target_BT]
        nll_M = nn.functional.cross_entropy(logits_MV, labels_M, reduction="none")
        correct_M = (logits_MV.argmax(-1) == labels_M).float()
        i2t_M = batch["i2t"].bool()[:, None].expand_as(target_BT)[target_BT]
        zero = nll_M.sum() * 0  # keeps the graph (and the dtype) when a direction is absent

        def mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
            return values[where].mean() if bool(where.any()) else zero

        everywhere = torch.ones_like(i2t_M)
        terms = {"loss_i2t": mean(nll_M, i2t_M), "loss_t2i": mean(nll_M, ~i2t_M)}
        metrics = {
            "token_acc_i2t": mean(correct_M, i2t_M).detach(),
            "token_acc_t2i": mean(correct_M, ~i2t_M).detach(),
            "i2t_rows": batch["i2t"].float().mean(),
            "target_tokens": torch.tensor(float(labels_M.numel())),
        }
        return TaskOutput(loss=mean(nll_M, everywhere), terms=terms, metrics=metrics)
