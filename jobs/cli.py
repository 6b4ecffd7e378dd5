"""The `seedpipe` command line: one subcommand per job or stage, each a `main(argv)` elsewhere.

Every subcommand speaks one grammar (`pipelines.config`): `--config FILE.yaml`, flags that are
shorthands for config keys (`--root`, `--corpus`, `--dry-run`, `--address`, ...), and dotted
`key.sub=value` overrides; `seedpipe COMMAND --help` lists every key with its default.
Subcommands arrive with the jobs and pipelines that implement them; what is listed here works.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

from pipelines.config import cli_main, parse_command

# Subcommands implemented by a module's own `main(argv)`: `seedpipe NAME ...` == `python -m MODULE ...`.
DELEGATED = {
    "ingest": (
        "pipelines.ingest",
        "download a URL list with img2dataset into <root>/corpora/<corpus>/raw",
    ),
    "features": ("pipelines.features", "raw shards -> frozen ViT patch features + stage-2 targets"),
    "qembeds": (
        "pipelines.qembeds",
        "features -> stage-1 causal embeddings (for stage-2 training)",
    ),
    "tokenize": ("pipelines.tokens", "features -> 32 image codes per image with a SeedTokenizer"),
    "train-tokenizer": (
        "jobs.train_tokenizer",
        "Ray Train + DeepSpeed: tokenizer stage 1 (--stage 1) or 2",
    ),
    "train-lora": (
        "jobs.train_lora",
        "Ray Train + DeepSpeed: LoRA-tune an LLM on image/text tokens",
    ),
    "ui": ("jobs.cli:ui_main", "open the MLflow UI on the catalog's tracking store"),
    "demo": (
        "jobs.demo",
        "the whole pipeline on a synthetic corpus, CPU only, offline: the results table",
    ),
    "lineage": (
        "jobs.lineage",
        "where a run, model or dataset came from (--downstream: what was built from it)",
    ),
    "compare": (
        "jobs.compare",
        "runs side by side: differing params, metrics, inputs; a PNG and a Markdown table",
    ),
    "status": (
        "jobs.status",
        "the catalog at a glance: datasets, digests, shards, and what is stale",
    ),
    "evaluate": (
        "jobs.evaluate",
        "retrieval, codebook, decoder and LLM metrics on held-out data, beside chance",
    ),
    "caption": ("jobs.try_model:caption_main", "caption image files with a tokenizer + LoRA LLM"),
    "generate": (
        "jobs.try_model:generate_main",
        "generate image codes for a prompt; show the nearest corpus images",
    ),
    "submit": ("jobs.submit", "run a stage or job on a Ray cluster (`seedpipe jobs` lists them)"),
    "jobs": ("jobs.submit:jobs_main", "submitted Ray jobs: list, `logs ID`, `stop ID`"),
}

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

    print(
        f"{'preset':10s} {'vision tokens':>14s} {'qformer':>14s} {'codebook':>10s} {'target':>10s}  weights"
    )
    for name in PRESETS:
        p = get_preset(name)
        q, vq = p.tokenizer.qformer, p.tokenizer.quantizer
        weights = p.vision.pretrained or "random init"
        print(
            f"{name:10s} {p.vision.num_tokens:>6d} x {p.vision.hidden_size:<5d} {q.num_layers:>4d} x {q.hidden_size:<7d}"
            f" {vq.num_codes:>5d} x {vq.code_dim:<3d} {'x'.join(map(str, p.target.output_shape)):>10s}  {weights}"
        )
    return 0


@dataclass(kw_only=True)
class UiConfig:
    root: str = "./seed-data"
    """Catalog root whose embedded store to open (ignored when MLFLOW_TRACKING_URI is set)."""
    host: str = "127.0.0.1"
    port: int = 5000


@cli_main
def ui_main(argv: Sequence[str] | None = None) -> int:
    """Open the MLflow UI on the catalog's tracking store (embedded SQLite unless MLFLOW_TRACKING_URI)."""
    import subprocess

    from pipelines.catalog import Catalog
    from pipelines.tracking import tracking_uri

    config = parse_command(UiConfig, argv, prog="seedpipe ui", description=ui_main.__doc__ or "")
    uri = tracking_uri(Catalog(config.root))
    if uri.startswith(("http://", "https://")):
        # a tracking server serves its own UI (`mlflow ui` only opens a store it can read itself)
        print(f"MLflow's UI is the tracking server's own: open {uri}", flush=True)
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", config.host,
           "--port", str(config.port)]  # fmt: skip
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seedpipe",
        description="SEED image tokenizer + LoRA LLM as a Ray Data / Ray Train / DeepSpeed pipeline with MLflow lineage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("version", help="print seedpipe's version and its stack's").set_defaults(
        func=cmd_version
    )
    sub.add_parser("presets", help="list the model presets and their shapes").set_defaults(
        func=cmd_presets
    )
    for name, (_module, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (`seedpipe {name} --help`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import pkgutil

        # entry-point strings, as console_scripts name them: the module is imported only when used
        target = DELEGATED[argv[0]][0]
        return pkgutil.resolve_name(target if ":" in target else f"{target}:main")(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
