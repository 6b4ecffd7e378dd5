"""Tokenizer training: stage 1 (Causal Q-Former, ITC) or stage 2 (quantizer + decoders).

    seedpipe train-tokenizer --stage 1 --config jobs/configs/tiny_stage1.yaml --root R --corpus demo
    seedpipe train-tokenizer --stage 2 --config jobs/configs/tiny_stage2.yaml stage1=models:/seed-tokenizer-stage1/1
    python -m jobs.train_tokenizer --stage 1 ...     # what `ray job submit` runs

Stage 1 reads the features dataset (patch features + captions), stage 2 the qembeds dataset
(cached causal embeddings + targets), so neither the ViT nor the Q-Former runs per step. Both
run on `jobs.trainer` (Ray Train + DeepSpeed) and export + register their model. The jobs
themselves are `jobs.stage1.Stage1Job` and `jobs.stage2.Stage2Job`.
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs.launch import job_main
from jobs.stage1 import Stage1Job
from jobs.stage2 import Stage2Job
from pipelines.config import cli_main

JOBS = {"1": Stage1Job(), "2": Stage2Job()}


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    stage = _take_stage(argv)
    return job_main(JOBS[stage], argv, prog=f"seedpipe train-tokenizer --stage {stage}",
                    description=(__doc__ or "").split("\n\n")[0])  # fmt: skip


def _take_stage(argv: list[str]) -> str:
    """Remove `--stage N` / `--stage=N` from argv and return N (it picks the config class)."""
    for i, word in enumerate(argv):
        if word.startswith("--stage="):
            value = word.split("=", 1)[1]
            del argv[i]
            break
        if word == "--stage":
            value = argv[i + 1] if i + 1 < len(argv) else ""
            del argv[i : i + 2]
            break
    else:
        if any(w in ("-h", "--help") for w in argv):
            print("usage: seedpipe train-tokenizer --stage {1,2} [options] [key.sub=value ...]\n"
                  "  `seedpipe train-tokenizer --stage 1 --help` lists that stage's options")  # fmt: skip
            raise SystemExit(0)
        raise ValueError("--stage 1 or --stage 2 is required")
    if value not in JOBS:
        raise ValueError(f"--stage must be 1 or 2, got {value!r}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
