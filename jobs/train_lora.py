"""LoRA tuning of a causal LM on a tokens dataset: image-to-text and text-to-image (SEED's LLM side).

    seedpipe train-lora --config jobs/configs/tiny_lora.yaml --root R --corpus demo
    seedpipe train-lora --config jobs/configs/lora_opt2.7b.yaml tokens=cc3m@seed-tokenizer-v3@abcdef123456
    python -m jobs.train_lora ...     # what `ray job submit` runs

`tokens=` defaults to the corpus's tokens dataset made by the newest registered seed-tokenizer.
The job itself is `jobs.lora.LoraJob`.
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs.launch import job_main
from jobs.lora import LoraJob
from pipelines.config import cli_main


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        LoraJob(), argv, prog="seedpipe train-lora", description=(__doc__ or "").split("\n\n")[0]
    )


if __name__ == "__main__":
    raise SystemExit(main())
