"""Regenerate the golden numerics fixture of the tiny preset at seed 0.

    .venv/bin/python -m tests.golden.make_golden   # writes tests/golden/tiny_seed0.json

Only rerun it for a change that is *meant* to change numerics, and say so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).with_name("tiny_seed0.json")


def compute() -> dict:
    """Codes, stage-1 ITC (one-hot and with caption groups), stage-2 loss terms and the random
    vision tower's feature statistics of the tiny preset: weights seed 0, inputs seed 1 (pixels 2)."""
    import warnings

    from seed_core.encoders import RandomInitWarning, load_vision_encoder
    from seed_core.presets import tiny
    from seed_core.tasks import Stage1Task, Stage2Task
    from seed_core.tokenizer import SeedTokenizer

    preset = tiny()
    torch.manual_seed(0)
    tokenizer = SeedTokenizer(preset.tokenizer).eval()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(4, preset.vision.num_tokens, preset.vision.hidden_size, generator=g)
    input_ids = torch.randint(1, preset.tokenizer.qformer.vocab_size, (4, 12), generator=g)
    target = torch.randn(4, *preset.target.output_shape, generator=g)
    with torch.no_grad():
        codes = tokenizer.encode(features)
        stage1 = Stage1Task(tokenizer.qformer).eval()(
            {
                "patch_features": features,
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
            }
        )
        stage2 = Stage2Task(tokenizer).eval()(
            {"patch_features": features, "target_image_embed": target}
        )
        decoded = tokenizer.decode(codes)
        stage1_grouped = Stage1Task(tokenizer.qformer).eval()(
            {
                "patch_features": features,
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "caption_group": torch.tensor([0, 1, 0, 2]),
            }
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomInitWarning)
            vision = load_vision_encoder(preset.vision)
        size = preset.vision.image_size
        pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
        patches = vision(pixels)[:, 1:]
    return {
        "codes": codes.tolist(),
        "stage1_itc": stage1.loss.item(),
        "stage2": {name: value.item() for name, value in stage2.terms.items()},
        "stage2_loss": stage2.loss.item(),
        "decode_sum": decoded.sum().item(),
        "stage1_itc_grouped": stage1_grouped.loss.item(),
        "vision_patch_std": patches.std().item(),
        "vision_patch_abs_sum": patches.abs().sum().item(),
    }


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {FIXTURE}")
