"""The LoRA export: a PEFT adapter plus what it takes to rebuild the model it adapts.

    out/adapter_config.json, adapter_model.safetensors   PeftModel.save_pretrained
    out/text_tokenizer/                                  text vocabulary + <img_xxxxx>, <img>, </img>
    out/base_model/                                      only for tiny-opt (a random base)
    out/seed_lora.json                                   base, image-token space, prompts, lineage

`load_exported` is its inverse (used by evaluation, `caption`, `generate` and the pyfunc model).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TINY_LLM = "tiny-opt"
EXPORT_META = "seed_lora.json"
TINY_LLM_LOGIT_RANGE = 16.0
"""The largest logit |LN(h)| * |e| a text token of the tiny OPT can reach (see `build_tiny_llm`)."""


@dataclass(frozen=True, kw_only=True)
class LoraExportInfo:
    """The tokens dataset an adapter was trained on, and the tokenizer that made it (lineage)."""

    name: str
    digest: str
    tokenizer_id: str = ""
    tokenizer_digest: str = ""
    tokenizer_uri: str = ""


def build_tiny_llm(vocab_size: int, *, max_positions: int, tokenizer: Any, seed: int) -> Any:
    """A random 2-layer OPT (hidden 32, 4 heads, ffn 64): builds in milliseconds, for CPU tests.

    Why not OPT's default init: its embeddings are N(0, 0.02) and tied to the lm_head, and LoRA
    leaves them (and the final layer norm) frozen, so the largest logit a text token can get is
    about |LN(h)| * |e| = sqrt(d) * 0.02 * sqrt(d) = 0.64 at d = 32: every caption token stays
    near 1/V however long LoRA trains (measured: the image-to-text loss sat at 5.6 nats, ln 400 =
    6.0). A pretrained LM's output layer can put nearly all the mass on one token; so the token
    embeddings get std TINY_LLM_LOGIT_RANGE / d, which lets one logit reach TINY_LLM_LOGIT_RANGE,
    and the position embeddings the same (else the first layer norm would drown them). The linear
    layers keep OPT's init: near-identity residual blocks for LoRA to write into."""
    import transformers

    hidden = 32
    config = transformers.OPTConfig(
        vocab_size=vocab_size, hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=2, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.OPTForCausalLM(config)
        with torch.no_grad():
            embeddings = model.get_input_embeddings()
            embeddings.weight.normal_(0.0, TINY_LLM_LOGIT_RANGE / hidden)
            if embeddings.padding_idx is not None:
                embeddings.weight[embeddings.padding_idx].zero_()
            model.model.decoder.embed_positions.weight.normal_(0.0, TINY_LLM_LOGIT_RANGE / hidden)
        return model


def export_lora(
    model: Any,
    tokenizer: Any,
    space: Any,
    out: Path,
    *,
    config: Any,
    llm: str,
    base_in_export: bool,
    tokens: LoraExportInfo,
) -> None:
    """The PEFT adapter (+ image-token row deltas), the extended tokenizer, and how to rebuild the base.

    out/adapter_config.json, adapter_model.safetensors   PeftModel.save_pretrained
    out/text_tokenizer/                                  text vocabulary + <img_xxxxx>, <img>, </img>
    out/base_model/                                      only for tiny-opt (a random base)
    out/seed_lora.json                                   base, image-token space, prompts, lineage
    """
    import shutil

    from seed_core.llm import IMAGE_TO_TEXT_PROMPT, TEXT_TO_IMAGE_PROMPT

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # PEFT would add the whole resized embedding matrix when it can find the base config; the rows
    # are rebuilt by add_image_tokens (seeded) and only their deltas are trained, so never save it.
    model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out / "text_tokenizer")
    base = llm
    if base_in_export:
        shutil.copytree(llm, out / "base_model", dirs_exist_ok=True)
        base = "base_model"
    meta = {"kind": "lora_adapter", "base_model": base, "llm": config.llm, "num_codes": space.num_codes,
            "num_tokens_per_image": space.num_tokens_per_image, "space": dataclasses.asdict(space),
            "prompts": {"image_to_text": IMAGE_TO_TEXT_PROMPT, "text_to_image": TEXT_TO_IMAGE_PROMPT},
            "max_length": config.max_length, "lora": dataclasses.asdict(config.lora),
            "tokens": dataclasses.asdict(tokens), "corpus": config.corpus, "holdout": config.holdout}  # fmt: skip
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_exported(
    directory: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, Any]:
    """(PeftModel, extended tokenizer, ImageTokenSpace) from an `export_lora` directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seed_core.llm import ImageTokenSpace, add_image_tokens

    directory = Path(directory)
    meta = json.loads((directory / EXPORT_META).read_text())
    base_ref = (
        directory / meta["base_model"]
        if (directory / meta["base_model"]).is_dir()
        else meta["base_model"]
    )
    tokenizer = AutoTokenizer.from_pretrained(directory / "text_tokenizer")
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=dtype)
    # The tokenizer already holds the image tokens; this grows the base's rows exactly as in training.
    space = add_image_tokens(
        tokenizer, base, meta["num_codes"], num_tokens_per_image=meta["num_tokens_per_image"]
    )
    if space != ImageTokenSpace(**meta["space"]):
        raise ValueError(
            f"{directory}: image-token ids differ from the ones the adapter was trained with"
        )
    return PeftModel.from_pretrained(base, directory), tokenizer, space
