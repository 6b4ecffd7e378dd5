"""Held-out evaluation of a LoRA-tuned LLM: teacher-forced losses, captions, generated image codes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def unconstrained_valid(
    model: Any, tokenizer: Any, space: Any, captions: Sequence[str], *, max_length: int
) -> torch.Tensor:
    """(B,) bool: would plain greedy decoding after `<img>` give exactly N codes then `</img>`?

    The paper's "valid 32-token images" count (causal 4997 / 5000); generate_image_codes itself is
    constrained and valid by construction, so this is the measure of what the model learned.
    """
    from seed_core.llm import build_text_to_image_example

    n = space.num_tokens_per_image
    dummy = torch.zeros(n, dtype=torch.long)
    prompts = [build_text_to_image_example(dummy, c, tokenizer, space, max_length=max_length)["input_ids"][: -n - 1]
               for c in captions]  # fmt: skip  # ends with <img>
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n + 1,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.train(was_training)
    new = out[:, width:]
    if new.shape[1] < n + 1:  # every row stopped at eos early: none is valid
        return torch.zeros(len(captions), dtype=torch.bool)
    return (space.is_code_id(new[:, :n]).all(1) & (new[:, n] == space.image_end_id)).cpu()


@torch.no_grad()
def evaluate_lora(task: Any, tokenizer: Any, space: Any, holdout: Any, collate: Any, *, batch_size: int,
                  max_length: int) -> dict[str, float]:  # fmt: skip
    """Held-out metrics: teacher-forced losses both ways, captions (exact match, BLEU-4), generated images.

    `t2i_valid` checks generate_image_codes' output (exactly N codes in [0, K): 1.0 unless the
    constrained decoder is broken); `t2i_valid_unconstrained` is what plain greedy would have given;
    `t2i_code_acc` is the share of generated codes equal to the tokenizer's codes of the true image.
    """
    from jobs.metrics import caption_scores
    from pipelines.schemas import from_fixed_list
    from seed_core.llm import IMAGE_TO_TEXT_PROMPT, generate_caption, generate_image_codes

    model, n = task.model, space.num_tokens_per_image
    prompt_len = 1 + n + 2 + len(tokenizer.encode(IMAGE_TO_TEXT_PROMPT, add_special_tokens=False))
    sums: dict[str, float] = Counter()
    hyps, refs = [], []
    valid = unconstrained = code_hits = 0
    device = next(model.parameters()).device
    for start in range(0, holdout.num_rows, batch_size):
        rows = holdout.slice(start, batch_size)
        weight = rows.num_rows
        out = task({k: v.to(device) for k, v in collate(rows).items()})
        for name, value in {"loss": out.loss, **out.terms}.items():
            sums[name] += float(value) * weight
        codes = torch.from_numpy(from_fixed_list(rows.column("codes"), (n,)).astype(np.int64))
        captions = [c or "" for c in rows.column("caption").to_pylist()]
        hyps += generate_caption(model, tokenizer, space, codes.to(device),
                                 max_new_tokens=max(1, max_length - prompt_len))  # fmt: skip
        refs += captions
        generated = generate_image_codes(model, tokenizer, space, captions).cpu()
        valid += (
            int(((generated >= 0) & (generated < space.num_codes)).all(1).sum())
            if generated.shape[1] == n
            else 0
        )
        code_hits += int((generated == codes).sum()) if generated.shape == codes.shape else 0
        unconstrained += int(
            unconstrained_valid(model, tokenizer, space, captions, max_length=max_length).sum()
        )
    rows_total = holdout.num_rows
    metrics = {k: v / rows_total for k, v in sums.items()}
    metrics |= caption_scores(hyps, [[r] for r in refs])
    metrics |= {
        "t2i_valid": valid / rows_total,
        "t2i_valid_unconstrained": unconstrained / rows_total,
        "t2i_code_acc": code_hits / (rows_total * n),
        "rows": float(rows_total),
    }  # fmt: skip
    return metrics
