"""Learning: stage 1 on the synthetic shapes corpus beats chance (loss and held-out retrieval).

The path a user's data takes, minus Ray: `make_images` JPEGs -> the tiny preset's random-init
vision tower -> patch features cached as fp16 (as the features stage stores them) -> the stage-1
ITC task stepped by a plain AdamW loop with the job's warmup/cosine schedule -> the in-job
many-to-many retrieval eval (`jobs.stage1.itc_retrieval`) on held-out images, beside its exact
chance level (`jobs.metrics.retrieval_chance`). The Ray Train + DeepSpeed path is tested
elsewhere; this guards that the model and its losses *can* learn on CPU in seconds.

    .venv/bin/python -m tests.test_learning   # prints the numbers
"""

from __future__ import annotations

import io
import math
import time
import warnings

import numpy as np
import pytest
import torch

NUM_IMAGES = 480
HOLDOUT = 96
BATCH = 32
STEPS = 200


def featurize(images: list[bytes], preset) -> torch.Tensor:
    """(N, P, Dv) patch features of the preset's vision encoder, round-tripped through fp16."""
    from PIL import Image

    from seed_core.encoders import RandomInitWarning, load_vision_encoder, preprocess_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        encoder = load_vision_encoder(preset.vision)
    pixels = preprocess_images([Image.open(io.BytesIO(b)) for b in images],
                               image_size=preset.vision.image_size)  # fmt: skip
    with torch.no_grad():
        return (
            torch.cat([encoder(pixels[i : i + 128]) for i in range(0, len(pixels), 128)])
            .half()
            .float()
        )


def train_stage1(*, num_images: int = NUM_IMAGES, holdout: int = HOLDOUT, batch_size: int = BATCH,
                 steps: int = STEPS, lr: float = 3e-3, preset_name: str = "tiny", seed: int = 0,
                 groups: bool = True, keep: dict | None = None) -> dict[str, float]:  # fmt: skip
    """Featurize, train `steps` ITC steps, evaluate on the held-out images; the numbers as a dict.
    `keep`: filled with the trained task, the train/held-out tensors and captions (for stage 2)."""
    from jobs.metrics import dedupe_captions, retrieval_chance
    from jobs.stage1 import caption_groups, itc_retrieval
    from jobs.trainer import lr_lambda, param_groups
    from pipelines.synthetic import make_images
    from seed_core.llm import train_caption_tokenizer
    from seed_core.presets import get_preset
    from seed_core.qformer import CausalQFormer
    from seed_core.tasks import Stage1Task

    start = time.monotonic()
    preset = get_preset(preset_name)
    corpus = make_images(num_images, seed=seed, size=preset.vision.image_size)
    captions = [c for _, _, c in corpus]
    features = featurize([b for _, b, _ in corpus], preset)
    text_tok = train_caption_tokenizer(
        captions[:-holdout], vocab_size=preset.tokenizer.qformer.vocab_size
    )
    text = text_tok(
        captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    data = {"patch_features": features, "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"], "caption_group": caption_groups(captions)}  # fmt: skip
    train = {k: v[:-holdout] for k, v in data.items()}
    if not groups:
        del train["caption_group"]
    held = {k: v[-holdout:] for k, v in data.items()}

    torch.manual_seed(seed)
    task = Stage1Task(CausalQFormer(preset.tokenizer.qformer))
    optimizer = torch.optim.AdamW(param_groups(task, 0.05), lr=lr)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, lr=lr, warmup_start_lr=lr / 100, warmup_steps=warmup, max_steps=steps, min_lr=lr / 10))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    n_train, losses, order = len(captions) - holdout, [], torch.empty(0, dtype=torch.long)
    task.train()
    for _ in range(steps):
        if len(order) < batch_size:  # a fresh epoch: reshuffle, drop the last partial batch
            order = torch.randperm(n_train, generator=g)
        idx, order = order[:batch_size], order[batch_size:]
        out = task({k: v[idx] for k, v in train.items()})
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(out.terms["itc"].item())
    task.eval()
    with torch.no_grad():
        recall = itc_retrieval(task.qformer, held, captions[-holdout:])
    unique, group_I = dedupe_captions(captions[-holdout:])
    chance = retrieval_chance(group_I, np.arange(len(unique)))
    tail = max(1, steps // 10)
    if keep is not None:
        keep.update(task=task, train=train, held=held, captions=captions[-holdout:], preset=preset)
    return {
        "first_loss": float(np.mean(losses[:tail])),
        "final_loss": float(np.mean(losses[-tail:])),
        "chance_loss": math.log(batch_size),
        "i2t_r1": recall["i2t_r1"], "t2i_r1": recall["t2i_r1"],
        "i2t_r1_chance": chance["i2t_r1"], "t2i_r1_chance": chance["t2i_r1"],
        "feature_std": float(features[:, 1:].std(dim=(1, 2)).mean()),
        "seconds": time.monotonic() - start,
    }  # fmt: skip


def train_stage2(stage1: dict, *, steps: int = 150, batch_size: int = BATCH, lr: float = 3e-3,
                 seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Stage 2 on the frozen stage-1 Q-Former's causal embeddings (the job's task and loss, the
    generation term off: there is no target encoder here), then held-out retrieval from the
    embeddings reconstructed from the 32 codes, the `*_codes` rows of `seedpipe evaluate`."""
    from jobs.metrics import dedupe_captions, retrieval_chance
    from jobs.stage1 import itc_retrieval
    from seed_core.tasks import Stage2Config, Stage2Task
    from seed_core.tokenizer import SeedTokenizer

    qformer = stage1["task"].qformer.eval()
    tok_cfg = stage1["preset"].tokenizer
    tok_cfg.qformer = qformer.config
    torch.manual_seed(seed)
    task = Stage2Task(SeedTokenizer.from_qformer(qformer, tok_cfg), Stage2Config(gen_weight=0.0))
    with torch.no_grad():
        causal = task.tokenizer.embed(stage1["train"]["patch_features"])
    target = torch.zeros(len(causal), *task.tokenizer.generation_decoder(
        task.tokenizer.quantize(causal[:1]).quantized).shape[1:])  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    task.train()
    for _ in range(steps):
        idx = torch.randperm(len(causal), generator=g)[:batch_size]
        out = task({"causal_embeds": causal[idx], task.target_key: target[idx]})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    task.eval()

    class FromCodes(torch.nn.Module):
        """The Q-Former whose image queries are rebuilt from the tokenizer's 32 codes."""

        def forward(self, patch_features):
            return task.tokenizer.reconstruct(task.tokenizer.encode(patch_features))

        image_feature, encode_text, text_feature = (
            qformer.image_feature, qformer.encode_text, qformer.text_feature)  # fmt: skip

    with torch.no_grad():
        recall = itc_retrieval(FromCodes(), stage1["held"], stage1["captions"])
        codes = task.tokenizer.encode(stage1["held"]["patch_features"])
    unique, group_I = dedupe_captions(stage1["captions"])
    chance = retrieval_chance(group_I, np.arange(len(unique)))
    tail = max(1, steps // 10)
    return {"first_loss": float(np.mean(losses[:tail])), "final_loss": float(np.mean(losses[-tail:])),
            "i2t_r1_codes": recall["i2t_r1"], "t2i_r1_codes": recall["t2i_r1"],
            "i2t_r1_chance": chance["i2t_r1"], "t2i_r1_chance": chance["t2i_r1"],
            "codes_used": float(len(torch.unique(codes)))}  # fmt: skip


class CaptionOracle(torch.nn.Module):
    """A stand-in Q-Former whose image feature is exactly its caption's text feature."""

    def __init__(self, table_VE: torch.Tensor) -> None:
        super().__init__()
        self.table_VE = table_VE

    def forward(self, patch_features):  # the "queries" are the features themselves
        return patch_features

    def image_feature(self, queries_BQD):
        return torch.nn.functional.normalize(queries_BQD[:, -1], dim=-1)

    def encode_text(self, input_ids_BT, attention_mask_BT):
        return self.table_VE[input_ids_BT]

    def text_feature(self, text_BTD):
        return torch.nn.functional.normalize(text_BTD[:, 0], dim=-1)


def test_in_job_retrieval_is_many_to_many():
    """`itc_retrieval` (the stage-1 job's eval) gives a perfect aligner R@1 = 1 on a corpus that
    repeats each caption 4 times; a one-to-one ground truth would cap it near 1/4."""
    from jobs.metrics import dedupe_captions, retrieval_chance
    from jobs.stage1 import itc_retrieval

    captions = [f"caption {i % 5}" for i in range(20)]
    ids_B = torch.tensor([i % 5 for i in range(20)])
    table_VE = torch.nn.functional.normalize(
        torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    batch = {"patch_features": table_VE[ids_B][:, None, :].expand(-1, 3, -1),
             "input_ids": ids_B[:, None], "attention_mask": torch.ones(20, 1, dtype=torch.long)}  # fmt: skip
    recall = itc_retrieval(CaptionOracle(table_VE), batch, captions)
    assert recall["i2t_r1"] == recall["t2i_r1"] == 1.0
    unique, group_I = dedupe_captions(captions)
    assert retrieval_chance(group_I, np.arange(len(unique)))["i2t_r1"] == pytest.approx(1 / 5)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stage1_learns_the_shapes_corpus():
    """A few hundred synthetic images and 200 steps: the ITC loss ends well below ln(batch) and
    held-out many-to-many R@1 is at least 5x chance in both directions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a width-32 model: a second thread only adds OpenMP spin-waits
    try:
        r = train_stage1()
    finally:
        torch.set_num_threads(threads)
    report = ", ".join(f"{k}={v:.4g}" for k, v in r.items())
    assert r["final_loss"] < r["chance_loss"] - 1.0, report
    assert r["i2t_r1"] >= 5 * r["i2t_r1_chance"], report
    assert r["t2i_r1"] >= 5 * r["t2i_r1_chance"], report


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_codes_of_the_trained_tokenizer_beat_chance():
    """Stage 2 on the learned stage-1 embeddings: its loss falls, and held-out retrieval from the
    embeddings rebuilt from the 32 codes is at least 3x chance both ways (the demo's guard in CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kept: dict = {}
        train_stage1(keep=kept)
        r = train_stage2(kept)
    finally:
        torch.set_num_threads(threads)
    report = ", ".join(f"{k}={v:.4g}" for k, v in r.items())
    assert r["final_loss"] < 0.5 * r["first_loss"], report
    assert r["i2t_r1_codes"] >= 3 * r["i2t_r1_chance"], report
    assert r["t2i_r1_codes"] >= 3 * r["t2i_r1_chance"], report


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    kwargs = {k: type(v)(a) if not isinstance(v, bool) else a == "True"
              for k, v in train_stage1.__kwdefaults__.items()
              for arg in sys.argv[1:] for key, a in [arg.split("=", 1)] if key == k}  # fmt: skip
    print(train_stage1(**kwargs))
