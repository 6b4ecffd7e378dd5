"""The `seedpipe` command line: one subcommand per job or stage, each a `main(argv)` elsewhere.

Subcommands arrive with the jobs and pipelines that implement them; what is listed here works.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

STACK = ("torch", "ray", "deepspeed", "transformers", "peft", "mlflow", "pyarrow", "img2dataset")


def version_info() -> dict[str, str]:
    """seedpipe's version and the versions of the stack it runs on."""
    info = {"seedpipe": metadata.version("seedpipe")}
    for name in STACK:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def cmd_version(args: argparse.Namespace) -> int:
    for name, value in version_info().items():
        print(f"{name:14s} {value}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from seed_core.presets import PRESETS, get_preset

    print(f"{'preset':10s} {'vision tokens':>14s} {'qformer':>14s} {'codebook':>10s} {'target':>10s}  weights")
    for name in PRESETS:
        p = get_preset(name)
        q, vq = p.tokenizer.qformer, p.tokenizer.quantizer
        weights = p.vision.pretrained or "random init"
        print(
            f"{name:10s} {p.vision.num_tokens:>6d} x {p.vision.hidden_size:<5d} {q.num_layers:>4d} x {q.hidden_size:<7d}"
            f" {vq.num_codes:>5d} x {vq.code_dim:<3d} {'x'.join(map(str, p.target.output_shape)):>10s}  {weights}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seedpipe",
        description="SEED image tokenizer + LoRA LLM as a Ray Data / Ray Train / DeepSpeed pipeline with MLflow lineage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("version", help="print seedpipe's version and its stack's").set_defaults(func=cmd_version)
    sub.add_parser("presets", help="list the model presets and their shapes").set_defaults(func=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
