"""Frozen encoders: the vision encoder the tokenizer reads, and the stage-2 target encoders.

- Vision encoder: BLIP-2's EVA ViT-g (transformers `Blip2VisionModel`, whose `post_layernorm`
  is BLIP-2's `ln_vision`) or any HF CLIP vision tower. Output: all tokens (CLS + patches).
- v2 target: a CLIP vision tower with projection (ViT-H/14: the 1024-d unCLIP image embedding).
- v1 target: SD v1.4's CLIP text encoder on the caption: 77 x 768 last hidden states.
- Preprocessing: bicubic resize of the short side + centre crop to 224, CLIP mean/std (SEED).

Weights load from a local directory or a hub id. When they cannot be loaded (no weights on disk,
no network), a seeded random init of the *same architecture* is used, a `RandomInitWarning` says
so, and `encoder.is_random_init` is True so that jobs can record it. Never silently.

Shapes: B batch, S image side, P tokens (CLS + patches), Dv width, L text length (77), O output.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
)

from seed_core.serialization import module_digest

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RandomInitWarning(UserWarning):
    """An encoder runs with random weights because no pretrained weights could be loaded."""


@dataclass(kw_only=True)
class VisionEncoderConfig:
    """The frozen vision encoder (defaults: BLIP-2's EVA ViT-g/14, 257 tokens x 1408)."""

    arch: Literal["blip2", "clip"] = "blip2"
    pretrained: str | None = "Salesforce/blip2-itm-vit-g"
    """Local directory or hub id; a full BLIP-2/CLIP checkpoint works (its vision tower is taken)."""
    subfolder: str | None = None
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    intermediate_size: int = 6144
    dtype: str = "float32"
    """Weights and compute dtype: float32 on CPU; float16/bfloat16 on GPU (SEED runs it in fp16)."""
    seed: int = 0
    """Seed of the random init used when no weights load."""
    init_std: float = 0.02
    """Std of that random init (never applied to loaded weights). BERT/CLIP's 0.02, not
    transformers' BLIP-2 vision default of 1e-10 (BLIP-2 is only ever loaded from weights), whose
    random tower outputs ~1e-6 features that barely differ between images and are fp16
    subnormals once cached: a stand-in for real weights must give informative features."""

    def __post_init__(self) -> None:
        if self.arch not in ("blip2", "clip"):
            raise ValueError(
                f"VisionEncoderConfig.arch must be 'blip2' or 'clip', got {self.arch!r}"
            )
        _check_tower(self, "VisionEncoderConfig")
        if not 0.0 < self.init_std <= 1.0:
            raise ValueError(f"VisionEncoderConfig.init_std must be in (0, 1], got {self.init_std}")

    @property
    def num_tokens(self) -> int:
        """P = CLS + (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(kw_only=True)
class TargetEncoderConfig:
    """The stage-2 target encoder (defaults: v2, OpenCLIP ViT-H/14 image embedding, 1024-d)."""

    kind: Literal["clip_image", "clip_text"] = "clip_image"
    """clip_image: v2 image embedding; clip_text: v1 SD text conditioning of the caption."""
    pretrained: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    subfolder: str | None = None
    """E.g. 'text_encoder' for a Stable Diffusion repo (its tokenizer is then read from 'tokenizer')."""
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    intermediate_size: int = 5120
    projection_dim: int = 1024
    """clip_image: width of the output embedding."""
    max_text_len: int = 77
    vocab_size: int = 49408
    dtype: str = "float32"
    seed: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("clip_image", "clip_text"):
            raise ValueError(
                f"TargetEncoderConfig.kind must be 'clip_image' or 'clip_text', got {self.kind!r}"
            )
        _check_tower(self, "TargetEncoderConfig")
        if self.projection_dim <= 0 or self.max_text_len <= 0 or self.vocab_size <= 0:
            raise ValueError(
                "TargetEncoderConfig.projection_dim, max_text_len and vocab_size must be positive"
            )

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (
            (self.projection_dim,)
            if self.kind == "clip_image"
            else (self.max_text_len, self.hidden_size)
        )


def _check_tower(cfg: Any, owner: str) -> None:
    for name in (
        "image_size",
        "patch_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
    ):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"{owner}.image_size ({cfg.image_size}) must be a multiple of patch_size ({cfg.patch_size})"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"{owner}.hidden_size ({cfg.hidden_size}) must be divisible by num_heads ({cfg.num_heads})"
        )
    if cfg.dtype not in DTYPES:
        raise ValueError(f"{owner}.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")


def preprocess_images(
    images: Sequence[Image.Image | np.ndarray], *, image_size: int = 224, keep_ratio: bool = True
) -> torch.Tensor:
    """Images (PIL or HWC uint8 arrays) -> (B, 3, S, S) float32, CLIP-normalised.

    Bicubic resize of the short side to S then centre crop (keep_ratio), or a plain bicubic
    resize to S x S.
    """
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        img = (
            Image.fromarray(np.asarray(image, dtype=np.uint8))
            if isinstance(image, np.ndarray)
            else image
        )
        img = img.convert("RGB")
        if keep_ratio:
            w, h = img.size
            scale = image_size / min(w, h)
            new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
        else:
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        out[i] = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class FrozenEncoder(nn.Module):
    """Eval-mode, no-grad wrapper; records where its weights came from."""

    def __init__(self, model: nn.Module, config: Any, *, is_random_init: bool, source: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.is_random_init = is_random_init
        self.source = source

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # frozen: never dropout or batch-stat updates

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def digest(self) -> str:
        """sha256 of config + weights (cached: the weights never change)."""
        return module_digest(self.model, self.config)


class VisionEncoder(FrozenEncoder):
    @torch.no_grad()
    def forward(self, pixel_values_BCSS: torch.Tensor) -> torch.Tensor:
        """All tokens (B, P, Dv) of the last layer (after BLIP-2's ln_vision for blip2)."""
        return self.model(
            pixel_values=pixel_values_BCSS.to(self.device, self.dtype)
        ).last_hidden_state


class ImageTargetEncoder(FrozenEncoder):
    @torch.no_grad()
    def forward(self, pixel_values_BCSS: torch.Tensor) -> torch.Tensor:
        """The projected CLIP image embedding (B, O) (v2 target)."""
        return self.model(pixel_values=pixel_values_BCSS.to(self.device, self.dtype)).image_embeds


class TextTargetEncoder(FrozenEncoder):
    def __init__(
        self, model: nn.Module, config: Any, *, is_random_init: bool, source: str, tokenizer: Any
    ) -> None:
        super().__init__(model, config, is_random_init=is_random_init, source=source)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """SD's text conditioning (B, L, O): last hidden states of the padded caption (v1 target)."""
        batch = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.config.max_text_len,
            return_tensors="pt",
        )  # fmt: skip
        return self.model(input_ids=batch["input_ids"].to(self.device)).last_hidden_state


RANDOM_POSITION_RMS = 0.5
"""RMS of the 2-D sin-cos patch position table that a random-init vision tower gets (the patch
embedding's own output is ~0.4 RMS on the demo scenes at init_std 0.02). Why not transformers' N(0, init_std): at
0.02 a token barely says *where* it is, and a Q-Former's cross-attention, blind to token order,
then cannot learn position at all (plain-torch stage 1 on 3,000 demo scenes: the top retrieved
caption had the right quadrant for 28% of held-out images after 600 steps, chance 25%; with this
table 66% after 600 and 97% after 1,500). Pretrained ViTs encode position strongly; a stand-in must
too. Larger (RMS 1.0, random rather than sin-cos) swamped the content: colour fell to 53%."""


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2-D sin-cos table (MAE's): half the channels encode the row, half the
    column, each as sin/cos pairs over geometric frequencies; channels beyond a multiple of 4 are 0.
    Written here because the installed transformers (5.x) no longer exposes ViT-MAE's helper."""
    quarter = width // 4
    omega_F = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for axis in (rows, cols):
        angle_NF = axis.reshape(-1, 1) * omega_F
        parts += [angle_NF.sin(), angle_NF.cos()]
    table_NW = torch.zeros(grid * grid, width, dtype=torch.float64)
    table_NW[:, : 4 * quarter] = torch.cat(parts, dim=1)
    return table_NW.float()


def _informative_positions(model: nn.Module) -> None:
    """Overwrite a random vision tower's patch position embeddings with the sin-cos table at
    RANDOM_POSITION_RMS (the CLS position is zero)."""
    if not isinstance(model, (Blip2VisionModel, CLIPVisionModel, CLIPVisionModelWithProjection)):
        return  # text towers keep their 1-D positions
    embeddings: Any = getattr(model, "vision_model", model).embeddings  # each model's own class
    table = embeddings.position_embedding
    weight_PD = table.weight if isinstance(table, nn.Embedding) else table[0]
    grid = int(round((weight_PD.shape[0] - 1) ** 0.5))
    positions_ND = sincos_positions(grid, weight_PD.shape[1])
    positions_ND *= RANDOM_POSITION_RMS / positions_ND.pow(2).mean().sqrt()
    with torch.no_grad():
        weight_PD[0].zero_()
        weight_PD[1:].copy_(positions_ND)


def _random_init(
    model_cls: type, hf_config: Any, *, seed: int, what: str, reason: str
) -> nn.Module:
    message = (
        f"{what}: no pretrained weights could be loaded ({reason}); using a RANDOM INIT of the same "
        f"architecture (seed {seed}). Its features are meaningless for real data."
    )
    warnings.warn(message, RandomInitWarning, stacklevel=3)
    logger.warning(message)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(hf_config)
    _informative_positions(model)
    return model


def _load_tower(model_cls: Any, cfg: Any, what: str) -> tuple[nn.Module, bool, str]:
    """(model, is_random_init, source) for a vision or text tower class."""
    if cfg.pretrained:
        try:
            kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
            if cfg.subfolder:
                kwargs["subfolder"] = cfg.subfolder
            hub_config = AutoConfig.from_pretrained(
                cfg.pretrained, **({"subfolder": cfg.subfolder} if cfg.subfolder else {})
            )
            if hub_config.model_type == "blip-2":
                # a full BLIP-2 checkpoint: load it with its own class and keep the vision tower
                import transformers

                full_cls = getattr(transformers, (hub_config.architectures or ["Blip2Model"])[0])
                return (
                    full_cls.from_pretrained(cfg.pretrained, **kwargs).vision_model,
                    False,
                    cfg.pretrained,
                )
            return model_cls.from_pretrained(cfg.pretrained, **kwargs), False, cfg.pretrained
        except (OSError, ValueError, KeyError) as err:
            reason = f"{cfg.pretrained!r}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    else:
        reason = "no pretrained path configured"
    model = _random_init(
        model_cls, _hf_tower_config(model_cls, cfg), seed=cfg.seed, what=what, reason=reason
    )
    return model.to(DTYPES[cfg.dtype]), True, f"random-init(seed={cfg.seed})"


def _hf_tower_config(model_cls: type, cfg: Any) -> Any:
    shape = dict(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
    )  # fmt: skip
    if model_cls is Blip2VisionModel:
        return Blip2VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size,
                                 initializer_range=cfg.init_std, **shape)  # fmt: skip
    if model_cls is CLIPTextModel:
        return CLIPTextConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_text_len,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)  # fmt: skip
    projection = getattr(cfg, "projection_dim", cfg.hidden_size)
    init = (
        {"initializer_range": cfg.init_std} if hasattr(cfg, "init_std") else {}
    )  # the vision tower
    return CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=projection,
        **shape,
        **init,
    )


def load_vision_encoder(config: VisionEncoderConfig) -> VisionEncoder:
    model_cls = Blip2VisionModel if config.arch == "blip2" else CLIPVisionModel
    model, random_init, source = _load_tower(model_cls, config, "vision encoder")
    return VisionEncoder(model, config, is_random_init=random_init, source=source)


def load_target_encoder(config: TargetEncoderConfig) -> ImageTargetEncoder | TextTargetEncoder:
    if config.kind == "clip_image":
        model, random_init, source = _load_tower(
            CLIPVisionModelWithProjection, config, "v2 target encoder"
        )
        return ImageTargetEncoder(model, config, is_random_init=random_init, source=source)
    model, random_init, source = _load_tower(CLIPTextModel, config, "v1 target encoder")
    if random_init:
        tokenizer: Any = byte_level_tokenizer(config.max_text_len)
    else:
        sub = "tokenizer" if config.subfolder == "text_encoder" else config.subfolder
        tokenizer = AutoTokenizer.from_pretrained(
            config.pretrained, **({"subfolder": sub} if sub else {})
        )
    return TextTargetEncoder(
        model, config, is_random_init=random_init, source=source, tokenizer=tokenizer
    )


def byte_level_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A training-free byte-level tokenizer (ids 0-2 special, 3-258 bytes) for random-init text towers.

    Only used when no real tokenizer can be loaded alongside the text encoder's weights.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from tokenizers import decoders as tk_decoders

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
