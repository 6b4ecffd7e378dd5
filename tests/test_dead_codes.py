"""Stage 2's dead-code accounting and the opt-in re-seeding remedy (`dead_codes.reseed=true`)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from jobs.code_usage import CodeUsage

NUM_CODES = 16
LR = 1e-3


class _Out:
    """The two fields of a Stage2Task output that CodeUsage reads."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = torch.tensor([codes])
        self.projected = torch.randn(1, len(codes), 4)


def test_dead_codes_counted_per_window_and_checkpointed():
    """Codes unused for a whole window are reported dead at its end, then the window restarts;
    the counts survive a state_dict round trip through JSON (what a checkpoint holds)."""
    import json

    usage = CodeUsage(NUM_CODES, window=2, reseed=False, world=1)
    assert usage.on_step(None, _Out([0, 1, 1]), step=1) == {}
    metrics = usage.on_step(None, _Out([2, 0]), step=2)
    assert metrics == {"dead_codes": NUM_CODES - 3.0, "window_usage": 3 / NUM_CODES}
    assert usage.on_step(None, _Out([5]), step=3) == {}

    restored = CodeUsage(NUM_CODES, window=2, reseed=False, world=1)
    restored.load_state_dict(json.loads(json.dumps(usage.state_dict())))
    assert restored.total.tolist() == usage.total.tolist()
    assert restored.total[:3].tolist() == [2, 2, 1]
    metrics = restored.on_step(None, _Out([6]), step=4)  # window 3-4 used codes 5 and 6 only
    assert metrics["dead_codes"] == NUM_CODES - 2.0


def _reseed_worker(rank: int, world: int, port: int, zero_stage: int, results: dict) -> None:
    """One rank: a tiny Stage2Task under DeepSpeed, a step, a re-seed of codes 0/3/7, a step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import deepspeed

    from jobs.deepspeed_ops import configure_environment, ensure_ops
    from jobs.trainer import param_groups
    from seed_core.presets import tiny
    from seed_core.tasks import Stage2Task
    from seed_core.tokenizer import SeedTokenizer

    configure_environment()
    ensure_ops(timeout_s=120)
    preset = tiny()
    torch.manual_seed(0)  # the same initial weights on both ranks
    task = Stage2Task(SeedTokenizer(preset.tokenizer))
    optimizer = torch.optim.AdamW(param_groups(task, 0.0), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9,
    })  # fmt: skip
    codebook = engine.module.tokenizer.quantizer.codebook.weight

    def full_codebook() -> torch.Tensor:
        with deepspeed.zero.GatheredParameters([codebook], enabled=zero_stage == 3):
            return codebook.detach().clone()

    g = torch.Generator().manual_seed(rank)
    width = preset.tokenizer.qformer.hidden_size
    batch = {"causal_embeds": torch.randn(2, 32, width, generator=g),
             "target_image_embed": torch.randn(2, *preset.target.output_shape, generator=g)}  # fmt: skip

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        return out.codes, out.projected

    codes, projected = step()  # the used codes have Adam moments now
    # Re-seed three codes rank 0 just used (non-zero moments to reset): the mechanism, whichever
    # codes CodeUsage finds dead.
    chosen = codes.flatten().unique()[:3].contiguous()
    torch.distributed.broadcast(chosen, src=0)
    before = full_codebook()
    moment_before = _moment(engine, codebook, "exp_avg")
    usage = CodeUsage(before.shape[0], window=1, reseed=True, world=world)
    picks = usage.reseed_from(engine, chosen, projected)
    results[rank] = {
        "chosen": chosen,
        "picks": picks,
        "before": before,
        "exp_avg_before": moment_before,
        "exp_avg_after": _moment(engine, codebook, "exp_avg"),
        "after_reseed": full_codebook(),
        "after_step": (step(), full_codebook())[1],
        "reseeded": usage.reseeded,
    }
    torch.distributed.destroy_process_group()


def _moment(engine, weight, key):
    from deepspeed.utils import safe_get_full_optimizer_state

    moment = safe_get_full_optimizer_state(weight, key)
    return (moment if moment is not None else engine.optimizer.state[weight][key]).detach().clone()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_reseed_reaches_the_master_weights_under_zero(zero_stage):
    """Re-seeded codes hold rank 0's picks on every rank, in the module and in ZeRO's fp32 master
    copy (the next optimizer step moves them by about one lr step instead of restoring the old
    codes), and their Adam moments restart from zero while the other codes' are kept."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_reseed_worker, args=(2, port, zero_stage, results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert torch.equal(r0["picks"], r1["picks"]), "ranks re-seeded different vectors"
    dead = r0["chosen"].tolist()
    alive = [i for i in range(r0["before"].shape[0]) if i not in dead]
    for r in (r0, r1):
        assert r["reseeded"] == 3
        if zero_stage < 3:  # ZeRO-3's module copy follows the master at the next step
            torch.testing.assert_close(r["after_reseed"][dead], r0["picks"])
            torch.testing.assert_close(r["after_reseed"][alive], r["before"][alive])
        assert r["exp_avg_before"][dead].abs().sum() > 0, (
            "the chosen codes had no momentum to reset"
        )
        assert torch.all(r["exp_avg_after"][dead] == 0)
        torch.testing.assert_close(r["exp_avg_after"][alive], r["exp_avg_before"][alive])
        moved = (r["after_step"][dead] - r0["picks"]).abs().max().item()
        assert moved < 5 * LR, (
            f"re-seeded codes moved {moved} in one step: the master copy disagrees"
        )
        assert (r["before"][dead] - r0["picks"]).abs().max().item() > 50 * LR
    torch.testing.assert_close(r0["after_step"], r1["after_step"])
