"""The paper recipe's cost at paper shapes: time, FLOPs and peak memory per image of each step.

Usage::

    .venv/bin/python benchmarks/bench_paper_shapes.py [--device cpu|cuda] [--batch-size 2]
        [--reps 3] [--warmup 1] [--threads N] [--skip-target] [--skip-lora] [--json OUT.json]

The `paper-v2` preset (SEED-2's published shapes: EVA ViT-g/14 at 224 px, 257 tokens x 1408,
39 layers; BLIP-2 Q-Former 12 x 768 with 32 causal queries; 8192 x 32 codebook; CLIP ViT-H/14
target, 1024-d) in RANDOM INIT: no weights are needed, and time and FLOPs depend on shapes only.
A handful of samples (`--batch-size` images, `--warmup` untimed + `--reps` timed repetitions,
median) for each of:

  vit_forward        the frozen ViT-g forward (what the features stage runs once per image)
  target_forward     the frozen CLIP ViT-H/14 image tower (the stage-2 target, cached with it)
  qformer_forward    the Causal Q-Former forward on patch features (qembeds / tokenize stages)
  stage1_step        a stage-1 step from cached patch features: Q-Former + BERT text branch,
                     ITC, backward, AdamW (what `train-tokenizer --stage 1` runs per sample)
  stage2_cached      a stage-2 step from cached causal embeddings: quantizer + decoders,
                     backward, AdamW (what seedpipe's stage 2 runs)
  stage2_recompute   the same step recomputing ViT-g + Q-Former on pixels first (what the public
                     SEED code runs every step of every epoch); targets stay cached
  lora_step          (FLOPs only, on the meta device: no memory, no time) a LoRA step of
                     OPT-2.7B (r 16 on q/k/v/out_proj, + 8194 image-token rows) on 96 tokens

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the first, untimed repetition
(the warm-up; forward and backward matmuls/attention; AdamW's elementwise updates are not
counted), with SDPA forced to its math kernel there, because the counter has no formula for the
fused CPU kernel.
Training steps also report their time without the clip + AdamW update (a pass over every
trainable parameter, whatever the batch): at this handful of images per step it weighs far more
per image than at the recipe's 64-256 per GPU. Peak memory: on CPU the peak RSS of this process while the phase runs (model build included; a
sampler thread at 5 ms), also shown above the RSS before the phase; on CUDA
`torch.cuda.max_memory_allocated`. Each phase builds its models and frees them afterwards.

CPU: fp32 (DeepSpeed and these CPUs do no fp16; bf16 matmuls are slow here). `--device cuda`:
bf16 encoders and bf16 autocast for the steps, CUDA-synchronised timing, the absolute rates a
GPU gives (not run in this repository's CI: no GPU there). On a CPU shared with other processes
absolute times move; each phase reports the share of the machine other processes used meanwhile,
and the FLOP counts do not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                     "TOKENIZERS_PARALLELISM": "false"}.items():  # fmt: skip
    os.environ.setdefault(_key, _value)

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

PRESET = "paper-v2"
TEXT_LEN = 32  # tokenizer_stage1.yaml's max_text_len
LORA_TOKENS = 96  # lora_opt2.7b.yaml's max_length


@dataclass
class Phase:
    name: str
    batch_size: int
    times_s: list[float] = field(default_factory=list)
    """Seconds of each timed repetition (the whole batch)."""
    update_s: list[float] = field(default_factory=list)
    """Training steps: seconds of the clip + AdamW part of each timed repetition."""
    flops: float = 0.0
    """FLOPs of one repetition (the whole batch)."""
    peak_bytes: int = 0
    peak_over_start_bytes: int = 0
    params: int = 0
    trainable_params: int = 0
    others_cpu_share: float = 0.0
    note: str = ""

    @property
    def s_per_image(self) -> float:
        return statistics.median(self.times_s) / self.batch_size if self.times_s else float("nan")

    @property
    def s_per_image_without_update(self) -> float:
        """Per image without the per-step parameter update: what a step costs per image once the
        update is spread over the recipe's 64-256 images per GPU instead of this handful."""
        if not self.update_s:
            return self.s_per_image
        return (
            statistics.median(t - u for t, u in zip(self.times_s, self.update_s)) / self.batch_size
        )

    @property
    def flops_per_image(self) -> float:
        return self.flops / self.batch_size


# ---- measuring ------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory while the block runs: RSS sampled by a thread (CPU), or CUDA's allocator peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.proc = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self.proc.memory_info().rss
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)


class OthersCpu:
    """Share of the machine's CPU that processes other than this one used during the block."""

    def __enter__(self) -> OthersCpu:
        self.t0, self.busy0, self.me0 = time.perf_counter(), self._busy(), self._mine()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        others = (self._busy() - self.busy0) - (self._mine() - self.me0)
        self.share = max(0.0, others) / (wall * (os.cpu_count() or 1))

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + t.steal

    @staticmethod
    def _mine() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system


def release_memory() -> None:
    """Free what the last phase held, and hand it back to the OS so the next phase's RSS is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _GlobalOnly:
    """A stand-in for FlopCounterMode's module tracker: totals only. The tracker's per-module
    backward hooks fail on the Q-Former under no_grad ("Expected gradient function to be set",
    torch 2.13), and only the total is wanted here."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> float:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return float(counter.get_total_flops())


def measure(phase: Phase, build: Callable[[], Callable[[], Any]], *, device: torch.device,
            warmup: int, reps: int) -> Phase:  # fmt: skip
    """Build the phase's models (`build` returns the step), warm up, time `reps` steps, count FLOPs."""
    release_memory()
    with PeakMemory(device) as memory, OthersCpu() as others:
        step = build()
        # the first untimed repetition is the counted one (no extra pass: a ViT-g pass is minutes
        # on a loaded CPU); the counter's per-op overhead is nothing beside these matmuls
        phase.flops = count_flops(step)
        for _ in range(warmup - 1):
            step()
        sync(device)
        phase.update_s.clear()
        for _ in range(reps):
            start = time.perf_counter()
            step()
            sync(device)
            phase.times_s.append(time.perf_counter() - start)
    phase.peak_bytes, phase.peak_over_start_bytes = memory.peak, memory.peak - memory.start
    phase.others_cpu_share = others.share
    print(f"  {phase.name:18s} {phase.s_per_image * 1000:10.1f} ms/image  "
          f"{phase.flops_per_image / 1e9:9.2f} GFLOP/image  peak {memory.peak / 2**30:6.2f} GiB", flush=True)  # fmt: skip
    return phase


# ---- the models -----------------------------------------------------------------------------
@dataclass
class Setup:
    device: torch.device
    batch_size: int
    preset: Any
    encoder_dtype: str
    """Weights dtype of the frozen encoders."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def pixels(self) -> torch.Tensor:
        side = self.preset.vision.image_size
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.batch_size, 3, side, side, generator=g).to(self.device)

    def patch_features(self) -> torch.Tensor:
        v = self.preset.vision
        g = torch.Generator().manual_seed(1)
        # cached as fp16 in the features dataset; the jobs' collate turns them into fp32
        return (
            torch.randn(self.batch_size, v.num_tokens, v.hidden_size, generator=g)
            .half()
            .float()
            .to(self.device)
        )

    def target(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(2)
        dim = self.preset.target.projection_dim
        return torch.randn(self.batch_size, dim, generator=g).to(self.device)


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomInitWarning: expected, said in the header
        return fn()


def vision_encoder(setup: Setup) -> Any:
    from seed_core.encoders import load_vision_encoder

    config = dataclasses.replace(setup.preset.vision, pretrained=None, dtype=setup.encoder_dtype)
    vision = _quiet(lambda: load_vision_encoder(config)).to(setup.device).eval()
    assert vision.is_random_init
    return vision


def _adamw(module: torch.nn.Module) -> torch.optim.Optimizer:
    from jobs.trainer import param_groups

    return torch.optim.AdamW(param_groups(module, 0.05), lr=1e-4, betas=(0.9, 0.999))


def _train_step(task: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Callable[[], dict],
                setup: Setup, phase: Phase) -> Callable[[], float]:  # fmt: skip
    """One step as jobs.trainer does it: forward, backward, clip, AdamW. The clip + AdamW time (a
    pass over every trainable parameter, whatever the batch) is recorded in `phase.update_s`."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with setup.autocast():
            out = task(batch())
        out.loss.backward()
        sync(setup.device)
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sync(setup.device)
        phase.update_s.append(time.perf_counter() - start)
        return float(out.loss.detach())

    return step


def build_vit(setup: Setup, phase: Phase) -> Callable[[], Any]:
    vision = vision_encoder(setup)
    pixels = setup.pixels().to(vision.dtype)
    phase.params = sum(p.numel() for p in vision.parameters())
    return torch.no_grad()(lambda: vision(pixels))


def build_target(setup: Setup, phase: Phase) -> Callable[[], Any]:
    from seed_core.encoders import load_target_encoder

    config = dataclasses.replace(setup.preset.target, pretrained=None, dtype=setup.encoder_dtype)
    target = _quiet(lambda: load_target_encoder(config)).to(setup.device).eval()
    pixels = setup.pixels().to(target.dtype)
    phase.params = sum(p.numel() for p in target.parameters())
    return torch.no_grad()(lambda: target(pixels))


def build_qformer(setup: Setup, phase: Phase) -> Callable[[], Any]:
    from seed_core.qformer import CausalQFormer

    torch.manual_seed(0)
    qformer = CausalQFormer(setup.preset.tokenizer.qformer).to(setup.device).eval()
    features = setup.patch_features()
    phase.params = sum(p.numel() for p in qformer.parameters())

    @torch.no_grad()
    def step() -> Any:
        with setup.autocast():
            return qformer(features)

    return step


def build_stage1(setup: Setup, phase: Phase) -> Callable[[], Any]:
    from seed_core.qformer import CausalQFormer
    from seed_core.tasks import Stage1Task

    torch.manual_seed(0)
    config = setup.preset.tokenizer.qformer
    task = Stage1Task(CausalQFormer(config)).to(setup.device).train()
    g = torch.Generator().manual_seed(3)
    batch = {"patch_features": setup.patch_features(),
             "input_ids": torch.randint(0, config.vocab_size, (setup.batch_size, TEXT_LEN), generator=g).to(setup.device),
             "attention_mask": torch.ones(setup.batch_size, TEXT_LEN, dtype=torch.long, device=setup.device)}  # fmt: skip
    phase.params = sum(p.numel() for p in task.parameters())
    phase.trainable_params = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return _train_step(task, _adamw(task), lambda: batch, setup, phase)


def _stage2_task(setup: Setup) -> Any:
    from seed_core.qformer import CausalQFormer
    from seed_core.tasks import Stage2Task
    from seed_core.tokenizer import SeedTokenizer

    torch.manual_seed(0)
    config = setup.preset.tokenizer
    return (
        Stage2Task(SeedTokenizer.from_qformer(CausalQFormer(config.qformer), config))
        .to(setup.device)
        .train()
    )


def build_stage2_cached(setup: Setup, phase: Phase) -> Callable[[], Any]:
    task = _stage2_task(setup)
    with torch.no_grad():
        embeds = task.tokenizer.embed(
            setup.patch_features()
        ).half()  # as the qembeds dataset stores them
    batch = {"causal_embeds": embeds, "target_image_embed": setup.target()}
    phase.params = sum(p.numel() for p in task.parameters())
    phase.trainable_params = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return _train_step(task, _adamw(task), lambda: batch, setup, phase)


def build_stage2_recompute(setup: Setup, phase: Phase) -> Callable[[], Any]:
    vision = vision_encoder(setup)
    task = _stage2_task(setup)
    pixels, target = setup.pixels().to(vision.dtype), setup.target()

    def batch() -> dict:
        with (
            torch.no_grad()
        ):  # frozen ViT; Stage2Task runs the frozen Q-Former under no_grad itself
            features = vision(pixels).float()
        return {"patch_features": features, "target_image_embed": target}

    phase.params = sum(p.numel() for p in task.parameters()) + sum(
        p.numel() for p in vision.parameters()
    )
    phase.trainable_params = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return _train_step(task, _adamw(task), batch, setup, phase)


def lora_flops(batch_size: int) -> Phase:
    """FLOPs of a LoRA step of OPT-2.7B on the meta device (shapes only: no memory, no time)."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    phase = Phase(name="lora_step", batch_size=batch_size, note="FLOPs only (meta device)")
    config = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                       vocab_size=50272 + 8192 + 2, max_position_embeddings=2048, word_embed_proj_dim=2560)  # fmt: skip
    with torch.device("meta"):
        model = OPTForCausalLM(config)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))  # fmt: skip
        ids = torch.zeros(batch_size, LORA_TOKENS, dtype=torch.long)
    phase.params = sum(p.numel() for p in model.parameters())
    phase.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step() -> None:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()

    phase.flops = count_flops(step)
    print(f"  {phase.name:18s} {'-':>10s} ms/image  {phase.flops_per_image / 1e9:9.2f} GFLOP/sequence "
          f"(meta device: FLOPs only)", flush=True)  # fmt: skip
    return phase


PHASES: list[tuple[str, Callable[[Setup, Phase], Callable[[], Any]]]] = [
    ("vit_forward", build_vit),
    ("target_forward", build_target),
    ("qformer_forward", build_qformer),
    ("stage1_step", build_stage1),
    ("stage2_cached", build_stage2_cached),
    ("stage2_recompute", build_stage2_recompute),
]


# ---- report ---------------------------------------------------------------------------------
def cache_sizes(preset: Any) -> dict[str, int]:
    """Bytes per image of what the catalog caches (fp16), from the preset's shapes."""
    v, q = preset.vision, preset.tokenizer.qformer
    target = 2 * preset.target.projection_dim
    return {"patch_features": 2 * v.num_tokens * v.hidden_size, "target_image_embed": target,
            "causal_embeds": 2 * q.num_queries * q.hidden_size, "codes": 2 * q.num_queries}  # fmt: skip


def ratios(phases: dict[str, Phase]) -> dict[str, dict[str, float]]:
    pairs = {
        "stage2_recompute / stage2_cached": ("stage2_recompute", "stage2_cached"),
        "vit_forward / stage2_cached": ("vit_forward", "stage2_cached"),
        "vit_forward / stage1_step": ("vit_forward", "stage1_step"),
        "stage1_step / qformer_forward": ("stage1_step", "qformer_forward"),
        "target_forward / vit_forward": ("target_forward", "vit_forward"),
    }
    out = {}
    for name, (a, b) in pairs.items():
        if a in phases and b in phases:
            pa, pb = phases[a], phases[b]
            out[name] = {
                "time": pa.s_per_image / pb.s_per_image,
                "time_without_update": pa.s_per_image_without_update
                / pb.s_per_image_without_update,
                "flops": pa.flops_per_image / pb.flops_per_image,
            }
    return out


def _finite(x: float) -> float | None:
    return x if x == x else None  # NaN (a FLOPs-only phase has no time) is not JSON


def report(phases: dict[str, Phase], setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n{PRESET} (random init) on {setup.device}"
          f"{f' ({torch.get_num_threads()} threads)' if setup.device.type == 'cpu' else ''}, "
          f"batch {setup.batch_size}, {args.reps} timed reps (median), encoders {setup.encoder_dtype}")  # fmt: skip
    print(f"{'phase':18s} {'ms/image':>10s} {'w/o update':>10s} {'GFLOP/image':>12s} {'achieved':>10s} "
          f"{'peak':>9s} {'peak-start':>10s} {'params':>8s} {'trainable':>9s} {'others':>7s}")  # fmt: skip
    for p in phases.values():
        rate = p.flops_per_image / p.s_per_image / 1e9 if p.times_s else float("nan")
        print(f"{p.name:18s} {p.s_per_image * 1000:10.1f} {p.s_per_image_without_update * 1000:10.1f} "
              f"{p.flops_per_image / 1e9:12.2f} "
              f"{rate:8.1f}GF/s {p.peak_bytes / 2**30:7.2f}Gi {p.peak_over_start_bytes / 2**30:8.2f}Gi "
              f"{p.params / 1e6:7.0f}M {p.trainable_params / 1e6:8.1f}M {p.others_cpu_share:6.0%}")  # fmt: skip
    print("\nratios (per image)                  time  w/o update     FLOPs")
    rs = ratios(phases)
    for name, r in rs.items():
        print(
            f"  {name:32s} {r['time']:7.1f}x {r['time_without_update']:10.1f}x {r['flops']:8.1f}x"
        )
    print(
        "(w/o update: the clip + AdamW pass over all trainable parameters left out, as it is spread "
        "over 64-256 images per GPU in the recipe, not over this batch)"
    )
    sizes = cache_sizes(setup.preset)
    print(
        "\ncache per image (fp16): " + ", ".join(f"{k} {v / 1000:.1f} KB" for k, v in sizes.items())
    )
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "preset": PRESET, "device": str(setup.device), "threads": torch.get_num_threads(),
        "batch_size": setup.batch_size, "reps": args.reps, "torch": torch.__version__,
        "phases": {n: dataclasses.asdict(p) | {"s_per_image": _finite(p.s_per_image),
                                               "s_per_image_without_update": _finite(p.s_per_image_without_update),
                                               "flops_per_image": p.flops_per_image}
                   for n, p in phases.items()},
        "ratios": rs, "cache_bytes_per_image": sizes,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (a handful)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per phase (median)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed repetitions per phase (>= 1: the first one counts the FLOPs)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument(
        "--skip-target", action="store_true", help="skip the CLIP ViT-H/14 target tower"
    )
    parser.add_argument(
        "--skip-lora", action="store_true", help="skip the OPT-2.7B LoRA FLOP count"
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only these phases")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.reps < 1:
        parser.error("--warmup and --reps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    from seed_core.presets import get_preset

    setup = Setup(device=device, batch_size=args.batch_size, preset=get_preset(PRESET),
                  encoder_dtype="bfloat16" if device.type == "cuda" else "float32")  # fmt: skip
    print(
        f"{PRESET} on {device}: batch {args.batch_size}, warmup {args.warmup}, reps {args.reps}",
        flush=True,
    )
    phases: dict[str, Phase] = {}
    for name, build in PHASES:
        if (args.only and name not in args.only) or (args.skip_target and name == "target_forward"):
            continue
        phase = Phase(name=name, batch_size=args.batch_size)
        phases[name] = measure(phase, lambda b=build, p=phase: b(setup, p), device=device,
                               warmup=args.warmup, reps=args.reps)  # fmt: skip
    release_memory()
    if not args.skip_lora and (not args.only or "lora_step" in args.only):
        phases["lora_step"] = lora_flops(args.batch_size)
    result = report(phases, setup, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
